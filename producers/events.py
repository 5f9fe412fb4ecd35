"""A job's events as Server-Sent Events: the change source, the frames, the stream.

The stream reads the job events log (jobstore/events.py) from the client's position on,
and between reads waits on a ``ChangeFeed``: whatever tells this process that a job may
have changed: the API's waiter hub (``producers/waiters.py::HubChanges``, one subscription
per process), so an idle stream costs nothing but its heartbeat. At each heartbeat the
stream reads its log anyway: a change that keeps the status (a redelivered job started
again) wakes no waiter. ``PollingFeed`` needs nothing: it says "look again" every
``interval_s`` (tests use it to count waits).

Nothing outlives a client: the response stops its stream as soon as the client goes away
(``EventStreamResponse`` listens for the disconnect), and the stream's ``finally`` gives
back its gauge and whatever the feed holds for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol

import anyio
from prometheus_client import Gauge
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from jobstore.errors import JobNotFound, StoreUnavailable
from jobstore.events import JobEvent
from jobstore.store import JobStore
from schemas.jobs import JobResource, JobStatus
from transports.blobs import ClaimCheck

log = logging.getLogger(__name__)

# how long a client waits before reconnecting after the stream broke (the SSE `retry:`)
RECONNECT_MS = 1000


class ChangeFeed(Protocol):
    async def wait_for_change(
        self,
        job_id: str,
        within: float,
        known: JobStatus | None,
    ) -> bool:
        """Wait up to ``within`` s for ``job_id`` to leave status ``known``: True when it
        may have (the caller reads the log), False when the time ran out quietly."""
        ...


class PollingFeed:
    """The feed that knows nothing: every ``interval_s`` it says "look again"."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s

    async def wait_for_change(
        self,
        job_id: str,
        within: float,
        known: JobStatus | None,
    ) -> bool:
        if within < self.interval_s:
            await asyncio.sleep(max(within, 0.0))
            return False
        await asyncio.sleep(self.interval_s)
        return True


def frame(event: JobEvent, job: JobResource) -> bytes:
    """One SSE event: ``id`` (resume after it), ``event`` (the type), ``data`` (the job)."""
    return f"id: {event.id}\nevent: {event.type}\ndata: {job.model_dump_json()}\n\n".encode()


HEARTBEAT = b": heartbeat\n\n"
PREAMBLE = f"retry: {RECONNECT_MS}\n\n".encode()


async def job_events(
    store: JobStore,
    feed: ChangeFeed,
    job_id: str,
    first: Sequence[JobEvent],
    *,
    after: int,
    known: JobStatus | None,
    resource: Callable[[JobResource], Awaitable[JobResource]],
    heartbeat_s: float,
    streams: Gauge,
) -> AsyncIterator[bytes]:
    """The stream of ``job_id`` from ``first`` (already read) on, to its terminal event."""
    streams.inc()
    try:
        yield PREAMBLE
        pending = list(first)
        seq = after
        beat = time.monotonic()
        while True:
            for event in pending:
                yield frame(event, await resource(event.job))
                seq, known = event.seq, event.job.status
                if event.terminal:
                    return
            if pending:
                beat = time.monotonic()
            left = heartbeat_s - (time.monotonic() - beat)
            look = True  # a heartbeat reads the log too: same-status changes wake no feed
            if left <= 0:
                yield HEARTBEAT
                beat = time.monotonic()
            else:
                look = await feed.wait_for_change(job_id, left, known)
            pending = []
            if look:
                try:
                    pending = await asyncio.to_thread(store.events_after, job_id, seq)
                except JobNotFound:
                    return  # removed meanwhile (retention): nothing more will come
                except StoreUnavailable as exc:
                    # the client reconnects with Last-Event-ID once the store is back
                    log.warning("event stream of %s ends: %s", job_id, exc)
                    return
    finally:
        streams.dec()


class EventStreamResponse(StreamingResponse):
    """A ``text/event-stream`` that stops its stream the moment the client disconnects,
    whatever the server's ASGI version (Starlette only notices on the next write there)."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:
                    pass  # the client went away mid-write
                finally:
                    group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()
        closing = getattr(self.body_iterator, "aclose", None)
        if closing is not None:
            await closing()  # a stream cancelled between two writes runs its finally now


async def resolve_result(claim_check: ClaimCheck | None, job: JobResource) -> JobResource:
    """The job as the API answers it: a result kept in S3 given by a presigned URL."""
    if claim_check is not None and job.result is not None:
        url = await claim_check.result_url(job.result)
        if url is not None:
            return job.model_copy(update={"result": None, "result_url": url})
    return job
