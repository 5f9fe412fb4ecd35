"""Moves back to queued: retries that wait in the store, and redrives from the DLQ.

A failed attempt that will be retried goes back to queued with a not-before (``retry_at``);
the retry pump takes the due ones, publishes them and clears it. It takes a queued job that
is stranded (its message lost) the same way. A redrive moves a failed
job back to queued, and back to failed when its publish fails. Each function runs in the
caller's transaction; the moves go through jobstore/transitions.py like every other.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import Connection, select

from jobstore.queries import read_records
from jobstore.records import JobRecord, Reschedule, utcnow
from jobstore.sql import JOBS
from jobstore.transitions import (
    HOLD_RETRY,
    HOLD_STRANDED,
    REDRIVE,
    RELEASE_RETRY,
    RESCHEDULE,
    RESTORE_FAILED,
    failure,
    move,
    move_ids,
)


def reschedule(conn: Connection, retries: Sequence[Reschedule]) -> list[str]:
    """running -> queued until ``retry_at``, while the job runs the retried attempt."""
    done = []
    now = utcnow()
    for r in retries:
        values = {
            "retry_at": r.retry_at,
            "error_code": r.error_code,
            "error_message": r.error_message,
            "error_retryable": True,
            "lease_owner": None,
            "lease_expires_at": None,
            "updated_at": now,
        }
        if move_ids(conn, RESCHEDULE, [r.job_id], values, JOBS.c.attempts == r.attempt):
            done.append(r.job_id)
    return done


def take_due(conn: Connection, now: datetime, limit: int, hold_s: float) -> list[JobRecord]:
    """The due retries, oldest first, with their not-before moved ``hold_s`` ahead."""
    due = JOBS.c.retry_at <= now
    ids = list(
        conn.scalars(
            select(JOBS.c.id).where(HOLD_RETRY.guard(), due).order_by(JOBS.c.retry_at).limit(limit)
        )
    )
    held = {"retry_at": now + timedelta(seconds=hold_s), "updated_at": now}
    return move(conn, HOLD_RETRY, ids, held, due)


def stranded(
    conn: Connection, now: datetime, idle_s: float, limit: int, hold_s: float, *, take: bool
) -> list[JobRecord]:
    """Queued jobs that nothing has touched for ``idle_s`` (no retry waiting, no claim),
    longest idle first; with ``take``, held ``hold_s`` ahead as a due retry is."""
    stuck = (JOBS.c.retry_at.is_(None), JOBS.c.updated_at < now - timedelta(seconds=idle_s))
    ids = list(
        conn.scalars(
            select(JOBS.c.id)
            .where(HOLD_STRANDED.guard(), *stuck)
            .order_by(JOBS.c.updated_at)
            .limit(limit)
        )
    )
    if not ids or not take:
        return read_records(conn, ids)
    held = {"retry_at": now + timedelta(seconds=hold_s), "updated_at": now}
    return move(conn, HOLD_STRANDED, ids, held, *stuck)


def published(conn: Connection, ids: Iterable[str], now: datetime) -> None:
    move_ids(conn, RELEASE_RETRY, ids, {"retry_at": None, "updated_at": now})


def redrive(conn: Connection, ids: Iterable[str], now: datetime) -> list[JobRecord]:
    """failed -> queued; attempts are kept, the result and error cleared."""
    cleared = {
        "result": None,
        "error_code": None,
        "error_message": None,
        "error_retryable": False,
        "completed_at": None,
        "retry_at": None,
        "updated_at": now,
    }
    return move(conn, REDRIVE, ids, cleared)


def restore_failed(conn: Connection, job_id: str, code: str, message: str, now: datetime) -> bool:
    """queued -> failed again, for a redrive whose publish failed."""
    values = failure(code, message, now, retryable=False)
    return bool(move_ids(conn, RESTORE_FAILED, [job_id], values))
