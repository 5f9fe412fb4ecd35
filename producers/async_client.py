"""The async twin of ``InferqClient`` (producers/client.py), on ``httpx.AsyncClient``: the
same methods, awaited, and ``events()`` as an async iterator."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import httpx

from producers.client import InferqError, batch_items, raise_for
from producers.sse import SseParser, StreamEvent, resume_headers
from schemas.batch import BatchResponse
from schemas.jobs import JobResource

__all__ = ["AsyncClient", "InferqError", "StreamEvent"]


class AsyncClient:
    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def submit(
        self,
        model: str,
        input: dict[str, Any],
        *,
        version: str | None = None,
        idempotency_key: str | None = None,
        wait: float | None = None,
        **fields: Any,
    ) -> JobResource:
        """As ``InferqClient.submit``: with ``wait``, ``Prefer: wait`` (at most 60 s)."""
        body = {"model": model, "input": input, **fields}
        if version is not None:
            body["version"] = version
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        if wait is not None:
            headers["Prefer"] = f"wait={max(int(wait), 0)}"
        return JobResource.model_validate(
            await self._call("POST", "/v1/jobs", json=body, headers=headers)
        )

    async def run(
        self,
        model: str,
        input: dict[str, Any],
        *,
        timeout: float = 60.0,  # noqa: ASYNC109
        **kw: Any,
    ) -> JobResource:
        """As ``InferqClient.run``: submit with ``Prefer: wait``, then wait if need be."""
        deadline = time.monotonic() + timeout
        job = await self.submit(model, input, wait=min(timeout, 60.0), **kw)
        if job.status.terminal:
            return job
        return await self.wait(job.id, timeout=max(deadline - time.monotonic(), 0.0))

    async def submit_many(
        self, requests: Sequence[Mapping[str, Any]]
    ) -> list[JobResource | InferqError]:
        """As ``InferqClient.submit_many``: per request, its job or its error, in order."""
        body = {"jobs": [dict(r) for r in requests]}
        page = BatchResponse.model_validate(await self._call("POST", "/v1/jobs/batch", json=body))
        return batch_items(page)

    async def get(self, job_id: str, *, wait: float = 0) -> JobResource:
        params = {"wait": wait} if wait else {}
        return JobResource.model_validate(
            await self._call("GET", f"/v1/jobs/{job_id}", params=params)
        )

    # ``timeout`` as in InferqClient: the same methods, the same arguments
    async def wait(self, job_id: str, *, timeout: float = 60.0) -> JobResource:  # noqa: ASYNC109
        """As ``InferqClient.wait`` (the job's event stream; ``?wait`` for an id not yet
        known), and on time: a job still running at ``timeout`` comes back then."""
        deadline = time.monotonic() + timeout
        try:
            async with asyncio.timeout(timeout):
                async for event in self.events(job_id, timeout=timeout):
                    if event.terminal:
                        return event.job
        except TimeoutError:
            return await self.get(job_id)
        except InferqError as exc:
            if exc.status != 404:
                raise
        while True:
            remaining = deadline - time.monotonic()
            job = await self.get(job_id, wait=max(min(remaining, 20.0), 0.0))
            if job.status.terminal or remaining <= 0:
                return job

    async def wait_many(
        self,
        job_ids: Sequence[str],
        *,
        timeout: float = 60.0,  # noqa: ASYNC109
    ) -> list[JobResource]:
        """Every job once terminal (or when ``timeout`` passed), in order; waited together."""
        return list(await asyncio.gather(*(self.wait(j, timeout=timeout) for j in job_ids)))

    async def cancel(self, job_id: str) -> JobResource:
        return JobResource.model_validate(await self._call("POST", f"/v1/jobs/{job_id}/cancel"))

    async def events(
        self,
        job_id: str,
        *,
        last_event_id: str | None = None,
        timeout: float = 300.0,  # noqa: ASYNC109
    ) -> AsyncIterator[StreamEvent]:
        """As ``InferqClient.events``: resumed with ``Last-Event-ID`` when it breaks."""
        deadline = time.monotonic() + timeout
        parser = SseParser(last_id=last_event_id)
        while True:
            try:
                async with self._http.stream(
                    "GET",
                    f"/v1/jobs/{job_id}/events",
                    headers=resume_headers(parser.last_id),
                    timeout=httpx.Timeout(self._http.timeout.connect, read=60.0),
                ) as response:
                    if response.status_code == 204:
                        return
                    if response.status_code >= 400:
                        await response.aread()
                        raise_for(response)
                    async for line in response.aiter_lines():
                        event = parser.line(line)
                        if event is not None:
                            yield event
                            if event.terminal:
                                return
            except httpx.TransportError:
                pass  # reconnect below
            if time.monotonic() + parser.retry_s > deadline:
                raise TimeoutError(f"no terminal event of job {job_id} within {timeout}s")
            await asyncio.sleep(parser.retry_s)

    async def _call(self, method: str, path: str, **kw: Any) -> Any:
        response = await self._http.request(method, path, **kw)
        raise_for(response)
        return response.json()
