"""The job store's reads: rows by id or key, pages, counts, backlog and queue statistics.

Each function runs on a connection the façade (store.py) opened; none writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from sqlalchemy import Connection, Select, func, literal, select, text, tuple_

from jobstore.records import JobRecord
from jobstore.sql import JOBS, chunked, decode_cursor, encode_cursor, row_record
from jobstore.tables import UTCDateTime
from schemas.jobs import JobStatus

MAX_PAGE = 1000
# accepted and not finished
_PENDING = [JobStatus.QUEUED.value, JobStatus.RUNNING.value]


def get(conn: Connection, job_id: str) -> JobRecord | None:
    row = conn.execute(select(JOBS).where(JOBS.c.id == job_id)).mappings().first()
    return None if row is None else row_record(row)


def by_key(conn: Connection, key: str) -> JobRecord | None:
    row = conn.execute(select(JOBS).where(JOBS.c.idempotency_key == key)).mappings().first()
    return None if row is None else row_record(row)


def get_many(conn: Connection, ids: Iterable[str]) -> dict[str, JobRecord]:
    return {r.id: r for r in read_records(conn, list(dict.fromkeys(ids)))}


def read_records(conn: Connection, ids: Sequence[str]) -> list[JobRecord]:
    records: list[JobRecord] = []
    for chunk in chunked(ids):
        rows = conn.execute(select(JOBS).where(JOBS.c.id.in_(chunk))).mappings()
        records.extend(row_record(row) for row in rows)
    return records


# The waiters' lookups: every watched id in one bound parameter (a JSON list on SQLite, an
# array on PostgreSQL), not an IN list of one parameter per id, whose expansion costs ~5 ms
# per thousand ids on every lookup.
_STATUSES = {
    "sqlite": text("SELECT id, status FROM jobs WHERE id IN (SELECT value FROM json_each(:ids))"),
    "postgresql": text("SELECT id, status FROM jobs WHERE id = ANY(:ids)"),
}


def statuses(conn: Connection, ids: Sequence[str]) -> dict[str, JobStatus]:
    if not ids:
        return {}
    sqlite = conn.dialect.name == "sqlite"
    rows = conn.execute(_STATUSES[conn.dialect.name], {"ids": json.dumps(ids) if sqlite else ids})
    return {job_id: JobStatus(status) for job_id, status in rows}


def page_query(
    *, status: JobStatus | None, model: str | None, limit: int, cursor: str | None
) -> Select[tuple[object, ...]]:
    """Newest first, by (created_at, id) descending, one row more than a page (is there a
    next one?). Built before any connection: a bad limit or cursor is the caller's error."""
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be within 1..{MAX_PAGE}, got {limit}")
    query = select(JOBS)
    if status is not None:
        query = query.where(JOBS.c.status == JobStatus(status).value)
    if model is not None:
        query = query.where(JOBS.c.model == model)
    if cursor is not None:
        created_at, last_id = decode_cursor(cursor)
        query = query.where(
            tuple_(JOBS.c.created_at, JOBS.c.id)
            < tuple_(literal(created_at, UTCDateTime()), literal(last_id))
        )
    return query.order_by(JOBS.c.created_at.desc(), JOBS.c.id.desc()).limit(limit + 1)


def read_page(
    conn: Connection, query: Select[tuple[object, ...]], limit: int
) -> tuple[list[JobRecord], str | None]:
    """Run a ``page_query``: the page and the cursor of the next one (None at the end)."""
    records = [row_record(row) for row in conn.execute(query).mappings()]
    if len(records) <= limit:
        return records, None
    page = records[:limit]
    return page, encode_cursor(page[-1].created_at, page[-1].id)


def counts(conn: Connection, model: str | None) -> dict[JobStatus, int]:
    query = select(JOBS.c.status, func.count()).group_by(JOBS.c.status)
    if model is not None:
        query = query.where(JOBS.c.model == model)
    totals = dict.fromkeys(JobStatus, 0)
    for status, count in conn.execute(query):
        totals[JobStatus(status)] = int(count)
    return totals


def backlog(conn: Connection) -> int:
    return int(conn.scalar(select(func.count()).where(JOBS.c.status.in_(_PENDING))) or 0)


def queue_stats(conn: Connection, now: datetime) -> dict[str, dict[str, float]]:
    query = (
        select(JOBS.c.model, JOBS.c.status, func.count(), func.min(JOBS.c.created_at))
        .where(JOBS.c.status.in_(_PENDING))
        .group_by(JOBS.c.model, JOBS.c.status)
    )
    stats: dict[str, dict[str, float]] = {}
    for model, status, count, oldest in conn.execute(query):
        entry = stats.setdefault(model, {"queued": 0, "running": 0, "oldest_queued_s": 0})
        entry[status] = int(count)
        if status == JobStatus.QUEUED and oldest is not None:
            if oldest.tzinfo is None:
                oldest = oldest.replace(tzinfo=UTC)
            entry["oldest_queued_s"] = max((now - oldest).total_seconds(), 0.0)
    return stats


def stale_running(conn: Connection, now: datetime, limit: int) -> list[JobRecord]:
    query = (
        select(JOBS)
        .where(JOBS.c.status == JobStatus.RUNNING.value, JOBS.c.lease_expires_at < now)
        .order_by(JOBS.c.lease_expires_at)
        .limit(limit)
    )
    return [row_record(row) for row in conn.execute(query).mappings()]
