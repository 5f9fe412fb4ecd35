"""`/v1/jobs`: submit, get (or wait for), list and cancel jobs. Submitting is the
``SubmissionService``'s; the handlers here only translate HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from starlette.types import Receive

from jobstore.errors import IllegalTransition, InvalidCursor, JobNotFound
from jobstore.records import JobRecord
from producers.bulk import BulkSubmission
from producers.limits import JobIdPath
from producers.prefer import wait_preference
from producers.state import ApiState, State
from producers.waiters import Waiter
from schemas.batch import IDEMPOTENCY_KEY_PATTERN, BatchRequest, BatchResponse
from schemas.errors import ApiError, ErrorCode, ErrorResponse
from schemas.jobs import MODEL_NAME_PATTERN, JobPage, JobRequest, JobResource, JobStatus

MAX_WAIT_S = 60.0
SUBMITTED = {
    "description": "The job, finished within `Prefer: wait=N` (then `Preference-Applied: "
    "wait=N` says so), or an idempotent replay of an earlier submit.",
    "headers": {
        "Preference-Applied": {
            "description": "`wait=N` when the answer waited for the job to finish",
            "schema": {"type": "string", "pattern": r"^wait=[0-9]+$"},
        }
    },
}

ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (400, 404, 409, 413, 422, 429, 503)
}


def jobs_router() -> APIRouter:
    router = APIRouter(tags=["jobs"])

    @router.post(
        "/v1/jobs",
        status_code=202,
        response_model=JobResource,
        responses={200: {"model": JobResource, **SUBMITTED}, **ERRORS},
    )
    async def submit_job(
        body: JobRequest,
        request: Request,
        response: Response,
        st: State,
        idempotency_key: Annotated[
            str | None,
            Header(
                alias="Idempotency-Key",
                description="Replays of the same key and body return the same job (400 "
                "`invalid_idempotency_key` when it does not match the pattern).",
                json_schema_extra={"pattern": IDEMPOTENCY_KEY_PATTERN},
            ),
        ] = None,
        prefer: Annotated[
            str | None,
            Header(
                alias="Prefer",
                description="`wait=N` (RFC 7240): answer 200 with the finished job if it "
                "finishes within N seconds (at most 60; more is capped), else 202 as "
                "without it. A malformed preference is ignored.",
            ),
        ] = None,
    ) -> JobResource:
        """202 once the job is accepted (its publish acknowledged by the broker); with
        `Prefer: wait=N`, 200 once it is finished, if that is within N seconds."""
        submitted = await st.submissions.submit(body, idempotency_key)
        job = submitted.job
        # every Prefer field counts (RFC 9110: repeated fields are one comma-separated list)
        wait = wait_preference(request.headers.getlist("prefer"), limit=int(MAX_WAIT_S))
        if wait is not None and not job.status.terminal:
            record = await _wait_for(st, request.receive, job.id, wait, status=job.status)
            if record is not None and record.status.terminal:
                job = await _resource(st, record)
        if wait is not None and job.status.terminal:
            response.status_code = 200
            response.headers["Preference-Applied"] = f"wait={wait}"
        elif not submitted.created:
            response.status_code = 200
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        return job

    @router.post(
        "/v1/jobs/batch",
        response_model=BatchResponse,
        responses={
            200: {"description": "One answer per item, in request order"},
            **{s: {"model": ErrorResponse} for s in (400, 413, 422, 503)},
        },
        summary="Submit up to 1,000 jobs",
    )
    async def submit_batch(body: BatchRequest, st: State) -> BatchResponse:
        """Each item gets the answer a single submit would have had (202 with the job, 200
        for an idempotent replay, or its error with the field as `jobs[i].input.text`);
        valid items are accepted even when others are not. 413 `batch_too_large` over
        1,000 items, 422 `batch_empty` for none."""
        return BatchResponse(data=await BulkSubmission(st.submissions).submit(body.jobs))

    @router.get("/v1/jobs/{job_id}", response_model=JobResource, responses=ERRORS)
    async def get_job(
        job_id: JobIdPath,
        request: Request,
        st: State,
        wait: Annotated[
            float,
            Query(
                ge=0,
                le=MAX_WAIT_S,
                description="Hold up to N seconds until the job is terminal (or, for an id not "
                "yet known, until it appears).",
            ),
        ] = 0,
    ) -> JobResource:
        record = await _wait_for(st, request.receive, job_id, wait)
        if record is None:
            raise _not_found(job_id)
        return await _resource(st, record)

    @router.get("/v1/jobs", response_model=JobPage, responses=ERRORS)
    async def list_jobs(
        st: State,
        status: JobStatus | None = None,
        model: Annotated[str | None, Query(pattern=MODEL_NAME_PATTERN)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[
            str | None,
            Query(
                description="`next_cursor` of the previous page; any other value is 400 "
                "`invalid_cursor`.",
                # documented shape only: the store decodes it, and refuses it with 400
                json_schema_extra={"minLength": 1, "pattern": r"^[A-Za-z0-9_\-]+$"},
            ),
        ] = None,
    ) -> JobPage:
        try:
            records, next_cursor = await asyncio.to_thread(
                st.deps.store.list, status=status, model=model, limit=limit, cursor=cursor
            )
        except InvalidCursor as exc:
            raise ApiError(
                400, ErrorCode.INVALID_CURSOR, "cursor is malformed or expired", field="cursor"
            ) from exc
        return JobPage(data=[await _resource(st, r) for r in records], next_cursor=next_cursor)

    @router.post("/v1/jobs/{job_id}/cancel", response_model=JobResource, responses=ERRORS)
    async def cancel_job(job_id: JobIdPath, st: State) -> JobResource:
        try:
            record = await asyncio.to_thread(st.deps.store.cancel, job_id)
        except JobNotFound as exc:
            raise _not_found(job_id) from exc
        except IllegalTransition as exc:
            raise ApiError(
                409,
                ErrorCode.JOB_NOT_CANCELLABLE,
                f"job {job_id} is {exc.current.value}; only queued jobs can be cancelled",
                field="status",
            ) from exc
        return record.to_resource()

    return router


async def _wait_for(
    st: ApiState,
    receive: Receive,
    job_id: str,
    wait: float,
    *,
    status: JobStatus | None = None,
) -> JobRecord | None:
    """The job's row, after up to ``wait`` seconds for it to be terminal. An id not yet
    known is waited for too: a job published straight onto the bus has no row until a
    worker picks it up. The waiter hub wakes the wait when the job's status changes, with
    the row when it is terminal; the row is read here only when the hub could not.

    ``status``: the caller knows the row's status (it has just written it), so the first
    read is skipped; then the row is returned only if it turned terminal (else None)."""
    store = st.deps.store
    if wait <= 0:
        return await asyncio.to_thread(store.get, job_id)
    deadline = time.monotonic() + wait
    with st.waiters.watch(job_id) as waiter:  # before the read: no change falls in between
        record: JobRecord | None = None
        known = status
        if status is None:
            record = await asyncio.to_thread(store.get, job_id)
            known = None if record is None else record.status
        async with _abandon_on_disconnect(receive, waiter):
            while known is None or not known.terminal:
                heard = await waiter.changed(known, deadline - time.monotonic())
                if heard is None:  # the time is up, or the client went away
                    break
                if heard.terminal:
                    record = waiter.record or await asyncio.to_thread(store.get, job_id)
                    known = None if record is None else record.status
                elif known is None:  # the row appeared
                    record = await asyncio.to_thread(store.get, job_id)
                    known = None if record is None else record.status
                else:
                    known = heard  # running, or queued again: no need to read the row
    return record


@contextlib.asynccontextmanager
async def _abandon_on_disconnect(receive: Receive, waiter: Waiter) -> AsyncIterator[None]:
    """Stop ``waiter`` when the client disconnects. The ASGI server says so only to a
    ``receive()``, which a handler does not otherwise call once it has the body; the one
    parked task that listens costs nothing until then."""

    async def listen() -> None:
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # a server that cannot say: the wait runs its time
            return
        waiter.abandon()

    listener = asyncio.get_running_loop().create_task(listen())
    try:
        yield
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener


async def _resource(st: ApiState, record: JobRecord) -> JobResource:
    """The job as answered: a result kept in S3 given by its URL."""
    resource = record.to_resource()
    cc = st.deps.claim_check
    if cc is not None and record.result is not None:
        url = await cc.result_url(record.result)
        if url is not None:
            resource = resource.model_copy(update={"result": None, "result_url": url})
    return resource


def _not_found(job_id: str) -> ApiError:
    return ApiError(404, ErrorCode.JOB_NOT_FOUND, f"no job with id {job_id!r}", field="id")
