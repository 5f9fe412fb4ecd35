"""Periodic chores of the control plane, as plain functions over the job store and outbox.

- expire queued jobs past their ``ttl_s``;
- requeue jobs stuck in ``running`` past their lease (a crashed worker): re-publish them onto
  the bus, then move them back to queued; fail them (``lease_expired``) after the attempt limit;
- purge finished jobs past the retention;
- the outbox's lost deliveries are picked up by the dispatcher itself (see ``claim_due``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from jobstore.records import JobRecord, utcnow
from jobstore.store import JobStore
from schemas.envelope import JobEnvelope, new_envelope
from schemas.jobs import JobRequest, WebhookSpec

log = logging.getLogger(__name__)

# Publishes the envelopes onto the jobs topic; returns once the broker acknowledged them all.
Republish = Callable[[Sequence[JobEnvelope]], None]


@dataclass(frozen=True)
class SweepReport:
    expired: int = 0
    requeued: int = 0
    failed: int = 0
    purged: int = 0


def envelope_for(record: JobRecord, source: str) -> JobEnvelope:
    """The bus event that runs ``record`` again (same id, same request)."""
    ttl_s = None
    if record.expires_at is not None:
        ttl_s = max(1, int((record.expires_at - record.created_at).total_seconds()))
    request = JobRequest(
        model=record.model,
        version=record.version,
        input=record.input,
        webhook=WebhookSpec.model_validate(record.webhook) if record.webhook else None,
        priority=record.priority,
        ttl_s=ttl_s,
        metadata=record.metadata,
    )
    # the job's own source: the worker binds an id to its first request and source
    return new_envelope(record.id, request, record.source or source)


def expire_queued(store: JobStore, now: datetime | None = None) -> int:
    return len(store.expire_overdue(now=now))


def requeue_stale(
    store: JobStore,
    republish: Republish | None,
    *,
    max_attempts: int,
    source: str = "urn:inferq:control",
    now: datetime | None = None,
) -> tuple[int, int]:
    """(requeued, failed). Publish first, then move the row: a crash in between leaves a
    running job with a lapsed lease (the next sweep tries again) and a copy on the bus that
    the worker's claim absorbs (running -> running is a legal redelivery)."""
    now = utcnow() if now is None else now
    stale = store.stale_running(now=now)
    failed = 0
    retry: list[JobRecord] = []
    for record in stale:
        if record.attempts >= max_attempts:
            message = (
                f"the job's worker lease lapsed on each of {record.attempts} attempts "
                "(the worker crashed or hung)"
            )
            if store.fail_stale(record.id, record.attempts, message, now=now):
                failed += 1
                log.warning("job %s dead after %d lapsed leases", record.id, record.attempts)
        else:
            retry.append(record)
    if not retry or republish is None:
        return 0, failed
    republish([envelope_for(r, source) for r in retry])
    requeued = sum(store.requeue_stale(r.id, r.attempts, now=now) for r in retry)
    return requeued, failed


def purge_finished(store: JobStore, retention_s: float, now: datetime | None = None) -> int:
    now = utcnow() if now is None else now
    total = 0
    while True:
        purged = store.purge_finished(before=now - timedelta(seconds=retention_s))
        total += purged
        if purged == 0:
            return total


def run_all(
    store: JobStore,
    republish: Republish | None,
    *,
    max_attempts: int,
    retention_s: float,
    now: datetime | None = None,
) -> SweepReport:
    expired = expire_queued(store, now)
    requeued, failed = requeue_stale(store, republish, max_attempts=max_attempts, now=now)
    purged = purge_finished(store, retention_s, now)
    return SweepReport(expired, requeued, failed, purged)
