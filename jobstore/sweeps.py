"""The store's side of the control plane's sweeps: expiry, lapsed leases, retention.

Each function runs in the caller's transaction (the façade, store.py, opens it and adds the
webhook rows); the moves go through jobstore/transitions.py like every other.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ColumnElement, Connection, select

from jobstore import events
from jobstore.claims import expire
from jobstore.outbox import ATTEMPTS, DELIVERIES
from jobstore.records import JobRecord
from jobstore.sql import JOBS
from jobstore.transitions import EXPIRE, FAIL_STALE, REQUEUE_STALE, failure, move, move_ids
from schemas.errors import ErrorCode
from schemas.jobs import JobStatus

_TERMINAL = [s.value for s in JobStatus if s.terminal]


def expire_overdue(conn: Connection, now: datetime, limit: int) -> list[JobRecord]:
    """queued jobs past ``expires_at`` -> expired, at most ``limit``: their records."""
    overdue = JOBS.c.expires_at < now
    ids = list(conn.scalars(select(JOBS.c.id).where(EXPIRE.guard(), overdue).limit(limit)))
    return expire(conn, ids, now, overdue) if ids else []


def requeue_stale(conn: Connection, job_id: str, attempt: int, now: datetime) -> bool:
    """running -> queued, only while it is still the same lapsed attempt."""
    released = {"lease_owner": None, "lease_expires_at": None, "updated_at": now}
    return bool(move_ids(conn, REQUEUE_STALE, [job_id], released, *_lapsed(attempt, now)))


def fail_stale(
    conn: Connection, job_id: str, attempt: int, message: str, now: datetime
) -> list[JobRecord]:
    """running -> failed (lease_expired), with the same guard as ``requeue_stale``."""
    values = failure(ErrorCode.LEASE_EXPIRED.value, message, now, retryable=False)
    values |= {"lease_owner": None, "lease_expires_at": None}
    return move(conn, FAIL_STALE, [job_id], values, *_lapsed(attempt, now))


def purge_finished(conn: Connection, before: datetime, limit: int) -> int:
    """Delete terminal jobs completed before ``before``, with their webhook rows."""
    ids = list(
        conn.scalars(
            select(JOBS.c.id)
            .where(JOBS.c.status.in_(_TERMINAL), JOBS.c.completed_at < before)
            .limit(limit)
        )
    )
    if not ids:
        return 0
    deliveries = select(DELIVERIES.c.id).where(DELIVERIES.c.job_id.in_(ids))
    conn.execute(ATTEMPTS.delete().where(ATTEMPTS.c.delivery_id.in_(deliveries)))
    conn.execute(DELIVERIES.delete().where(DELIVERIES.c.job_id.in_(ids)))
    conn.execute(JOBS.delete().where(JOBS.c.id.in_(ids)))
    events.delete_for(conn, ids)
    return len(ids)


def _lapsed(attempt: int, now: datetime) -> tuple[ColumnElement[bool], ...]:
    """Still the attempt that the sweep saw lapse: a renewed or newer one is left alone."""
    return (JOBS.c.attempts == attempt, JOBS.c.lease_expires_at < now)
