"""`/v1/jobs`: submit, get (or wait for), list and cancel jobs. Submitting is the
``SubmissionService``'s; the handlers here only translate HTTP."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response

from jobstore.errors import IllegalTransition, InvalidCursor, JobNotFound
from jobstore.records import JobRecord
from producers.bulk import BulkSubmission
from producers.limits import JobIdPath
from producers.state import ApiState, State
from schemas.batch import IDEMPOTENCY_KEY_PATTERN, BatchRequest, BatchResponse
from schemas.errors import ApiError, ErrorCode, ErrorResponse
from schemas.jobs import MODEL_NAME_PATTERN, JobPage, JobRequest, JobResource, JobStatus

MAX_WAIT_S = 60.0

ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (400, 404, 409, 413, 422, 429, 503)
}


def jobs_router() -> APIRouter:
    router = APIRouter(tags=["jobs"])

    @router.post(
        "/v1/jobs",
        status_code=202,
        response_model=JobResource,
        responses={200: {"model": JobResource, "description": "Idempotent replay"}, **ERRORS},
    )
    async def submit_job(
        body: JobRequest,
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
    ) -> JobResource:
        submitted = await st.submissions.submit(body, idempotency_key)
        if not submitted.created:
            response.status_code = 200
        response.headers["Location"] = f"/v1/jobs/{submitted.job.id}"
        return submitted.job

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
        record = await _wait_for(st, job_id, wait)
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


async def _wait_for(st: ApiState, job_id: str, wait: float) -> JobRecord | None:
    """The job's row, after up to ``wait`` seconds for it to be terminal. An id not yet
    known is waited for too: a job published straight onto the bus has no row until a
    worker picks it up."""
    store = st.deps.store
    record = await asyncio.to_thread(store.get, job_id)
    deadline = time.monotonic() + wait
    interval = 0.002
    while (record is None or not record.status.terminal) and time.monotonic() < deadline:
        await asyncio.sleep(min(interval, max(deadline - time.monotonic(), 0)))
        record = await asyncio.to_thread(store.get, job_id) or record
        # fast polls while a quick job is likely to finish, then back off to spare the store
        waited = time.monotonic() - (deadline - wait)
        interval = 0.003 if waited < 0.5 else min(interval * 1.5, 0.05)
    return record


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
