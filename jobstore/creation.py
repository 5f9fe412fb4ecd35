"""Creating the rows of many submitted jobs in one transaction (``POST /v1/jobs/batch``).

Each job is judged against the rows that already hold its idempotency key, and against
the jobs before it in the same batch, before anything is written: a replay returns the
earlier job, a key reused with another body is a conflict, and every other job is inserted
in one multi-row INSERT. The caller falls back to one transaction per job when a
concurrent request won a key in between (the INSERT then violates the unique key), or the
database refused a row: only that job then fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from jobstore import events
from jobstore.errors import IdempotencyConflict, JobStoreError
from jobstore.records import JobRecord, NewJob
from jobstore.sql import (
    JOBS,
    NEW_JOB_COLUMNS,
    PG_ENSURE,
    SQLITE_ENSURE,
    chunked,
    insert_values,
    jsonable,
    row_record,
)

# one created job: (its row, True when this call inserted it), or why it was not created
# (an IdempotencyConflict, or another JobStoreError: a row the database refused)
Created = tuple[JobRecord, bool] | JobStoreError


@dataclass(frozen=True)
class _Insert:
    row: int  # index into the rows to insert


@dataclass(frozen=True)
class _SameKey:
    position: int  # the earlier job of this batch with the same key


@dataclass(frozen=True)
class _Known:
    created: Created  # decided against a row that already existed


@dataclass(frozen=True)
class Plan:
    rows: list[dict[str, Any]]  # to insert, in batch order
    steps: list[_Insert | _SameKey | _Known]  # one per job


def by_keys(conn: Connection, keys: Sequence[str]) -> dict[str, JobRecord]:
    found: dict[str, JobRecord] = {}
    for part in chunked(list(dict.fromkeys(keys))):
        rows = conn.execute(select(JOBS).where(JOBS.c.idempotency_key.in_(part))).mappings()
        for row in rows:
            found[row["idempotency_key"]] = row_record(row)
    return found


def plan(jobs: Sequence[NewJob], existing: dict[str, JobRecord], now: datetime) -> Plan:
    rows: list[dict[str, Any]] = []
    steps: list[_Insert | _SameKey | _Known] = []
    first_with_key: dict[str, int] = {}
    for position, job in enumerate(jobs):
        key = job.idempotency_key
        if key is not None and key in existing:
            steps.append(_Known(_judge(existing[key], job)))
        elif key is not None and key in first_with_key:
            steps.append(_SameKey(first_with_key[key]))
        else:
            if key is not None:
                first_with_key[key] = position
            steps.append(_Insert(len(rows)))
            rows.append(insert_values(job, now))
    return Plan(rows, steps)


def insert(conn: Connection, rows: list[dict[str, Any]]) -> None:
    if rows:
        conn.execute(JOBS.insert(), rows)


def outcomes(jobs: Sequence[NewJob], p: Plan) -> list[Created]:
    out: list[Created] = []
    for job, step in zip(jobs, p.steps, strict=True):
        if isinstance(step, _Insert):
            out.append((row_record(p.rows[step.row]), True))
        elif isinstance(step, _Known):
            out.append(step.created)
        else:
            earlier = out[step.position]
            out.append(earlier if isinstance(earlier, JobStoreError) else _judge(earlier[0], job))
    return out


def _judge(before: JobRecord, job: NewJob) -> Created:
    """A job whose key an earlier job holds: its replay (same body), else a conflict."""
    if before.request_hash == job.request_hash:
        return before, False
    return IdempotencyConflict(before)


def ensure(conn: Connection, backend: str, jobs: Sequence[NewJob], now: datetime) -> set[str]:
    """Insert the jobs whose id is absent (with their job events); the ids inserted. Rows
    that conflict on the id or an idempotency key are left alone."""
    unique = {job.id: job for job in reversed(jobs)}  # the first of duplicated ids wins
    if not unique:
        return set()
    # id order: concurrent batches then take index locks in the same order (no deadlock)
    rows = [insert_values(unique[job_id], now) for job_id in sorted(unique)]
    if backend == "postgresql":
        batch = [{key: jsonable(row[key]) for key in NEW_JOB_COLUMNS} for row in rows]
        inserted = set(conn.scalars(PG_ENSURE, {"batch": batch, "now": now}))
    else:
        # executemany with RETURNING: SQLAlchemy's "insertmanyvalues" batches the rows into
        # multi-row INSERTs without compiling a statement per call.
        inserted = set(conn.scalars(SQLITE_ENSURE, rows))
    events.write(conn, [row_record(r) for r in rows if r["id"] in inserted], now)
    return inserted
