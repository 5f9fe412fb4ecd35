"""`/v1/jobs/{id}/events`: a job's state changes as Server-Sent Events (producers/events.py)."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Header, Response

from jobstore.errors import JobNotFound
from jobstore.events import parse_event_id
from producers.events import EventStreamResponse, job_events, resolve_result
from producers.limits import JobIdPath
from producers.state import State
from producers.waiters import HubChanges
from schemas.errors import ApiError, ErrorCode

_STREAM_DOC = (
    "One event per state change, in order: `event:` is the type (`job.queued`, "
    "`job.started`, `job.succeeded`, `job.failed`, `job.cancelled`, `job.expired`), "
    "`data:` the job resource as `GET /v1/jobs/{id}` showed it at that change, `id:` the "
    "event id (`<job id>:<seq>`). The stream ends after the terminal event; an idle one "
    "carries a `: heartbeat` comment every 15 s."
)


# written out: with the stream's own media type, a ``model`` would be documented as an event
_ERROR = {"$ref": "#/components/schemas/ErrorResponse"}


def events_router() -> APIRouter:
    router = APIRouter(tags=["jobs"])

    @router.get(
        "/v1/jobs/{job_id}/events",
        response_class=EventStreamResponse,
        summary="Stream a job's events (Server-Sent Events)",
        responses={
            200: {
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
                "description": _STREAM_DOC,
            },
            204: {"description": "Resumed after the terminal event: nothing more will come"},
            **{
                s: {"content": {"application/json": {"schema": _ERROR}}}
                for s in (400, 404, 422, 503)
            },
        },
    )
    async def stream_job_events(
        job_id: JobIdPath,
        st: State,
        last_event_id: Annotated[
            str | None,
            Header(
                alias="Last-Event-ID",
                description="Resume after this event id (`<job id>:<seq>`, as sent in "
                "`id:`); any other value is 400 `invalid_last_event_id`.",
            ),
        ] = None,
    ) -> Response:
        after = 0
        if last_event_id is not None and last_event_id.strip():
            seq = parse_event_id(job_id, last_event_id.strip())
            if seq is None:
                if await asyncio.to_thread(st.deps.store.get, job_id) is None:
                    raise _unknown(job_id)  # no such job comes first: 404, whatever the header
                raise ApiError(
                    400,
                    ErrorCode.INVALID_LAST_EVENT_ID,
                    f"Last-Event-ID must be an event id of job {job_id!r} (`{job_id}:<seq>`)",
                    field="Last-Event-ID",
                )
            after = seq
        store = st.deps.store
        try:
            first = await asyncio.to_thread(store.events_after, job_id, after)
        except JobNotFound as exc:
            raise _unknown(job_id) from exc
        known = first[-1].job.status if first else None
        if not first:
            current = await asyncio.to_thread(store.get, job_id)
            if current is not None and current.terminal and after > 0:
                # an EventSource reconnects whenever a stream ends; 204 tells it to stop
                return Response(status_code=204)
            known = current.status if current is not None else None
        config = st.deps.config
        stream = job_events(
            store,
            st.deps.changes or HubChanges(st.waiters),
            job_id,
            first,
            after=after,
            known=known,
            resource=partial(resolve_result, st.deps.claim_check),
            heartbeat_s=config.sse_heartbeat_s,
            streams=st.metrics.event_streams,
        )
        headers: dict[str, Any] = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return EventStreamResponse(stream, headers=headers)

    return router


def _unknown(job_id: str) -> ApiError:
    return ApiError(404, ErrorCode.JOB_NOT_FOUND, f"no job with id {job_id!r}", field="id")
