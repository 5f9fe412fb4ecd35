"""A small Python client for the HTTP API (``InferqClient``; ``AsyncClient`` is its async
twin in producers/async_client.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import httpx

from producers.sse import SseParser, StreamEvent, resume_headers
from schemas.batch import BatchResponse
from schemas.errors import ErrorResponse
from schemas.jobs import JobPage, JobResource, JobStatus

__all__ = ["InferqClient", "InferqError", "StreamEvent"]


class InferqError(Exception):
    """An error answer from the API, with its stable code and field."""

    def __init__(self, status: int, code: str, message: str, field: str | None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.field = status, code, message, field


class InferqClient:
    def __init__(
        self, base_url: str, *, timeout: float = 30.0, transport: httpx.BaseTransport | None = None
    ) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=timeout, transport=transport)

    def __enter__(self) -> InferqClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def submit(
        self,
        model: str,
        input: dict[str, Any],
        *,
        version: str | None = None,
        idempotency_key: str | None = None,
        wait: float | None = None,
        **fields: Any,
    ) -> JobResource:
        """Submit a job; with ``wait``, the answer waits up to that many seconds (at most
        60) for it to finish (``Prefer: wait``), and the job comes back finished if it did."""
        body = {"model": model, "input": input, **fields}
        if version is not None:
            body["version"] = version
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        if wait is not None:
            headers["Prefer"] = f"wait={max(int(wait), 0)}"
        return JobResource.model_validate(
            self._call("POST", "/v1/jobs", json=body, headers=headers)
        )

    def run(
        self, model: str, input: dict[str, Any], *, timeout: float = 60.0, **kw: Any
    ) -> JobResource:
        """Submit and wait until the job is finished or ``timeout`` passed: one request
        when it finishes within a minute (``Prefer: wait``), long polls after that."""
        deadline = time.monotonic() + timeout
        job = self.submit(model, input, wait=min(timeout, 60.0), **kw)
        if job.status.terminal:
            return job
        return self.wait(job.id, timeout=max(deadline - time.monotonic(), 0.0))

    def submit_many(self, requests: Sequence[Mapping[str, Any]]) -> list[JobResource | InferqError]:
        """Submit up to 1,000 job requests in one call (``POST /v1/jobs/batch``); each may
        carry its own ``idempotency_key``. Per request, in order: its job, or the error it
        got (the others are accepted all the same)."""
        page = BatchResponse.model_validate(
            self._call("POST", "/v1/jobs/batch", json={"jobs": [dict(r) for r in requests]})
        )
        return batch_items(page)

    def wait_many(self, job_ids: Sequence[str], *, timeout: float = 60.0) -> list[JobResource]:
        """Block until every job is terminal or ``timeout`` passed; the jobs, in order."""
        deadline = time.monotonic() + timeout
        return [self.wait(j, timeout=max(deadline - time.monotonic(), 0.0)) for j in job_ids]

    def get(self, job_id: str, *, wait: float = 0) -> JobResource:
        params = {"wait": wait} if wait else {}
        return JobResource.model_validate(self._call("GET", f"/v1/jobs/{job_id}", params=params))

    def wait(self, job_id: str, *, timeout: float = 60.0) -> JobResource:
        """Block until the job is terminal or ``timeout`` passed; the job as it then is.

        It follows the job's event stream (``GET /v1/jobs/{id}/events``, resumed after a
        break); an id the API does not know yet (a job published straight onto the bus and
        not picked up) is long-polled with ``?wait`` until it appears. A job still running
        at ``timeout`` comes back up to one stream heartbeat late (15 s by default), as a
        blocking read cannot be cut short; the async client returns on time."""
        deadline = time.monotonic() + timeout
        try:
            for event in self._stream(job_id, None, deadline):
                if event.terminal:
                    return event.job
        except TimeoutError:
            return self.get(job_id)
        except InferqError as exc:
            if exc.status != 404:
                raise
        return self._poll(job_id, deadline)

    def _poll(self, job_id: str, deadline: float) -> JobResource:
        while True:
            remaining = deadline - time.monotonic()
            job = self.get(job_id, wait=max(min(remaining, 20.0), 0.0))
            if job.status.terminal or remaining <= 0:
                return job

    def cancel(self, job_id: str) -> JobResource:
        return JobResource.model_validate(self._call("POST", f"/v1/jobs/{job_id}/cancel"))

    def list(
        self, *, status: JobStatus | None = None, model: str | None = None, limit: int = 50
    ) -> Iterator[JobResource]:
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": limit}
            if status:
                params["status"] = status.value
            if model:
                params["model"] = model
            if cursor:
                params["cursor"] = cursor
            page = JobPage.model_validate(self._call("GET", "/v1/jobs", params=params))
            yield from page.data
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def events(
        self, job_id: str, *, last_event_id: str | None = None, timeout: float = 300.0
    ) -> Iterator[StreamEvent]:
        """The job's events (``GET /v1/jobs/{id}/events``) up to its terminal one.

        A broken stream (an API restart, a proxy timeout) is resumed from the last event
        seen with ``Last-Event-ID``, so none is missed or repeated; ``timeout`` bounds the
        whole iteration (TimeoutError after it)."""
        yield from self._stream(job_id, last_event_id, time.monotonic() + timeout)

    def _stream(
        self, job_id: str, last_event_id: str | None, deadline: float
    ) -> Iterator[StreamEvent]:
        parser = SseParser(last_id=last_event_id)
        while True:
            read_s = min(max(deadline - time.monotonic(), 0.05), 60.0)
            try:
                with self._http.stream(
                    "GET",
                    f"/v1/jobs/{job_id}/events",
                    headers=resume_headers(parser.last_id),
                    timeout=httpx.Timeout(self._http.timeout.connect, read=read_s),
                ) as response:
                    if response.status_code == 204:
                        return  # resumed after the terminal event
                    if response.status_code >= 400:
                        response.read()
                        raise_for(response)
                    for line in response.iter_lines():
                        event = parser.line(line)
                        if event is not None:
                            yield event
                            if event.terminal:
                                return
                        if time.monotonic() > deadline:  # heartbeats come every few seconds
                            break
            except httpx.TransportError:
                pass  # reconnect below
            if time.monotonic() + parser.retry_s > deadline:
                raise TimeoutError(f"no terminal event of job {job_id} in time")
            time.sleep(parser.retry_s)

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        response = self._http.request(method, path, **kw)
        raise_for(response)
        return response.json()


def raise_for(response: httpx.Response) -> None:
    """InferqError for an error answer, with its code and field."""
    if response.status_code < 400:
        return
    try:
        err = ErrorResponse.model_validate(response.json()).error
    except ValueError:
        raise InferqError(response.status_code, "http_error", response.text, None) from None
    raise InferqError(response.status_code, err.code.value, err.message, err.field)


def batch_items(page: BatchResponse) -> list[JobResource | InferqError]:
    out: list[JobResource | InferqError] = []
    for item in page.data:
        if item.job is not None:
            out.append(item.job)
        else:
            err = item.error
            assert err is not None  # the API answers each item with a job or an error
            out.append(InferqError(item.status, err.code.value, err.message, err.field))
    return out
