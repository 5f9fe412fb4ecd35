"""The worker's writes to the job store, made to fail one job at a time.

Two kinds of failure are kept apart. StoreUnavailable (the database is down or busy) is
nobody's fault: the caller backs off and tries again, acknowledging nothing meanwhile. Any
other error while writing a batch is some row the store refuses (a NUL in PostgreSQL text,
an over-long field): the batch is halved until that row stands alone, and only its job
fails. A job id is bound to its first request (see jobstore.records.content_hash).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from jobstore.errors import StoreUnavailable
from jobstore.records import Binding, NewJob, Outcome, Reschedule, content_hash
from jobstore.store import JobStore
from schemas.contracts import ModelConfig
from schemas.envelope import JobEnvelope
from schemas.errors import ErrorCode
from schemas.jobs import JobStatus
from transports.base import Delivery

log = logging.getLogger(__name__)

_T = TypeVar("_T")
MAX_BACKOFF_S = 5.0


class Stopping(Exception):
    """The worker stopped while the store was unreachable: leave the work for redelivery."""


async def store_call(stop: asyncio.Event, what: str, call: Callable[[], _T]) -> _T:
    """``call`` off the loop; while the store is unreachable, back off and try again.

    Raises Stopping when ``stop`` is set first: the caller then acknowledges nothing.
    """
    delay = 0.05
    while True:
        try:
            return await asyncio.to_thread(call)
        except StoreUnavailable as exc:
            if stop.is_set():
                raise Stopping(what) from exc
            log.warning("%s: %s; retrying in %.2fs", what, exc, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, MAX_BACKOFF_S)


def ensure_isolating(store: JobStore, jobs: list[NewJob]) -> dict[str, Exception]:
    """Insert the missing rows; the rows the store cannot keep, alone: id -> error."""
    try:
        store.ensure(jobs)
        return {}
    except StoreUnavailable:
        raise
    except Exception as exc:
        if len(jobs) == 1:
            return {jobs[0].id: exc}
        mid = len(jobs) // 2
        return ensure_isolating(store, jobs[:mid]) | ensure_isolating(store, jobs[mid:])


def complete_isolating(
    store: JobStore, items: list[Outcome | Reschedule], replaced: dict[str, Outcome]
) -> None:
    """Store outcomes and retries; one the store refuses fails its job (``job_unstorable``)
    instead, recorded in ``replaced``. Safe to repeat: completions are guarded."""
    try:
        store.complete(
            [i for i in items if isinstance(i, Outcome)],
            [i for i in items if isinstance(i, Reschedule)],
        )
        return
    except StoreUnavailable:
        raise
    except Exception as exc:
        if len(items) > 1:
            mid = len(items) // 2
            complete_isolating(store, items[:mid], replaced)
            complete_isolating(store, items[mid:], replaced)
            return
        error = exc
    item = items[0]
    failed = Outcome(
        job_id=item.job_id,
        attempt=item.attempt,
        status=JobStatus.FAILED,
        error_code=ErrorCode.JOB_UNSTORABLE.value,
        error_message=printable(f"the job store cannot keep the outcome: {db_reason(error)}"),
    )
    log.warning("outcome of %s cannot be stored: %s", item.job_id, error)
    try:
        store.complete([failed])
        replaced[item.job_id] = failed
    except StoreUnavailable:
        raise
    except Exception as exc:  # the row stays running; its lease lapses and it is retried
        log.error("cannot record the failure of job %s: %s", item.job_id, exc)


def clean(items: list[Outcome | Reschedule]) -> list[Outcome | Reschedule]:
    """Error messages quote inputs: escape the NULs PostgreSQL text cannot hold."""
    return [
        replace(i, error_message=printable(i.error_message))
        if i.error_message and "\x00" in i.error_message
        else i
        for i in items
    ]


def fail_placeholder(
    store: JobStore, job_id: str, delivery: Delivery, code: ErrorCode, message: str
) -> None:
    """A failed row for a message whose request cannot be stored as sent; it binds the id
    to no content. Best effort: the dead letter keeps the message either way."""
    placeholder = NewJob(
        id=job_id,
        model="unknown",
        version=None,
        input={},
        source=f"{delivery.source}@{delivery.position}",
        bound=False,
    )
    try:
        store.ensure([placeholder])
        store.fail_unstarted(job_id, code.value, printable(message))
    except StoreUnavailable:
        raise
    except Exception as exc:
        log.error("cannot record the failure of job %s: %s", job_id, exc)


def fail_row(
    store: JobStore, envelope: JobEnvelope, delivery: Delivery, code: ErrorCode, message: str
) -> None:
    """The failed row of a poison message, or a placeholder when the store refuses it."""
    job = new_job(envelope, None)
    try:
        store.ensure([job])
    except StoreUnavailable:
        raise
    except Exception as exc:  # e.g. a NUL in the input: PostgreSQL cannot keep it
        log.warning("job %s cannot be stored as sent: %s", envelope.id, exc)
        fail_placeholder(store, envelope.id, delivery, code, message)
        return
    # only this request's row: a poison event reusing an id must not fail its owner
    binding = Binding(job.source, frozenset({content_hash(job)}))
    try:
        store.fail_unstarted(envelope.id, code.value, printable(message), binding)
    except StoreUnavailable:
        raise
    except Exception as exc:
        log.error("cannot record the failure of job %s: %s", envelope.id, exc)


def binding(envelope: JobEnvelope, config: ModelConfig, raw: dict[str, Any]) -> Binding:
    """The request an event asks to run under its id, as the job store hashes it."""
    job = new_job(envelope, config)
    hashes = {content_hash(job)}
    if envelope.data.input is None:  # read from a URL: the API may have offloaded an input
        hashes.add(content_hash(replace(job, input=raw)))
    return Binding(envelope.source, frozenset(hashes))


def same_request(a: Binding, b: Binding) -> bool:
    return a.source == b.source and bool(a.hashes & b.hashes)


def printable(text: str) -> str:
    """PostgreSQL text cannot hold NUL: show it escaped, as the client wrote it."""
    return text.replace("\x00", "\\u0000")


def db_reason(error: Exception) -> str:
    """The database's own words (its first line), not SQLAlchemy's wrapper text."""
    orig = getattr(error, "orig", None) or error
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0][:300]


def new_job(envelope: JobEnvelope, config: ModelConfig | None) -> NewJob:
    request = envelope.data
    created = envelope.time or datetime.now(UTC)
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    expires = None
    if request.ttl_s is not None:
        expires = created + timedelta(seconds=request.ttl_s)
    return NewJob(
        id=envelope.id,
        model=request.model,
        version=config.version if config else request.version,
        input=request.input if request.input is not None else {"$input_url": request.input_url},
        priority=request.priority,
        expires_at=expires,
        metadata=request.metadata,
        webhook=request.webhook.model_dump(mode="json") if request.webhook else None,
        source=envelope.source,
        created_at=created,
    )
