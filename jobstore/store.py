"""JobStore: job rows and their explicit, atomic state transitions (sync SQLAlchemy 2).

Every method runs in its own transaction on a pooled connection, so one store is shared by
the API's threadpool and the workers' executors. A transition is a conditional UPDATE on the
status it starts from: a row that moved on concurrently is reported, never overwritten.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    Boolean,
    Connection,
    Engine,
    Insert,
    Integer,
    Select,
    String,
    Update,
    bindparam,
    column,
    create_engine,
    event,
    func,
    literal,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.pool import StaticPool
from sqlmodel import SQLModel

from jobstore.errors import (
    DuplicateJob,
    IdempotencyConflict,
    IllegalTransition,
    InvalidCursor,
    JobNotFound,
    JobStoreError,
    StoreUnavailable,
)
from jobstore.outbox import ATTEMPTS, DELIVERIES, enqueue_job_events
from jobstore.records import (
    ClaimResult,
    JobRecord,
    NewJob,
    Outcome,
    Reschedule,
    require_aware,
    utcnow,
)
from jobstore.tables import UTCDateTime, jobs_table, workers_table
from schemas.errors import ErrorCode
from schemas.jobs import JobStatus

_T = TypeVar("_T")

# Ids per IN (...) list: far below every driver's limit on bind parameters (SQLite 32766,
# PostgreSQL 65535), and a batch the size a worker fetches is one statement.
_CHUNK = 500
_MAX_PAGE = 1000
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_BEGIN_OPTION = "inferq_sqlite_begin"
_SCHEMA_LOCK_KEY = 0x696E66657271  # "inferq": an arbitrary, fixed advisory lock id

_QUEUED = JobStatus.QUEUED.value
_RUNNING = JobStatus.RUNNING.value

_JOBS = jobs_table()
_WORKERS = workers_table()
# The columns that a NewJob fills in; the rest of a new row starts out the same for all.
_NEW_JOB_COLUMNS = (
    "id",
    "model",
    "version",
    "input",
    "priority",
    "created_at",
    "expires_at",
    "metadata",
    "webhook",
    "source",
    "idempotency_key",
    "request_hash",
)


def normalise_url(url: str) -> URL:
    """Accept ``postgresql://`` (and ``postgres://``) and pick the psycopg 3 driver for it."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


class JobStore:
    def __init__(self, url: str, *, pool_size: int = 5, schema: str | None = None) -> None:
        """Open (lazily) the database at ``url``.

        ``schema`` (PostgreSQL only) puts the tables in that schema via ``search_path``: one
        database can then hold several isolated stores (tests, tenants).
        """
        parsed = normalise_url(url)
        backend = parsed.get_backend_name()
        if schema is not None and not _SCHEMA_NAME.match(schema):
            raise ValueError(f"invalid schema name {schema!r}")
        if backend == "sqlite":
            if schema is not None:
                raise ValueError("schema= is only supported on PostgreSQL")
            self._engine: Engine = _sqlite_engine(parsed, pool_size)
            # SQLite takes the write lock at BEGIN IMMEDIATE; a deferred transaction that reads
            # then writes can get SQLITE_BUSY without waiting for busy_timeout.
            self._writer: Engine = self._engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})
        elif backend == "postgresql":
            self._engine = _postgres_engine(parsed, pool_size, schema)
            self._writer = self._engine
        else:
            raise ValueError(f"unsupported database {backend!r}: use sqlite or postgresql")
        self._backend = backend

    @property
    def engine(self) -> Engine:
        """The underlying engine, for neighbours that share the database (the outbox)."""
        return self._engine

    @property
    def writer(self) -> Engine:
        """The engine for read-then-write transactions (SQLite: BEGIN IMMEDIATE)."""
        return self._writer

    def create_schema(self) -> None:
        """Create the missing tables and indexes; safe to call from every process at start."""
        with self._begin(write=True) as conn:
            if self._backend == "postgresql":
                # Serialise concurrent starters: both would pass checkfirst, one CREATE fails.
                conn.execute(select(func.pg_advisory_xact_lock(_SCHEMA_LOCK_KEY)))
            SQLModel.metadata.create_all(conn, checkfirst=True)

    def close(self) -> None:
        self._engine.dispose()

    def ping(self) -> None:
        with self._begin(write=False) as conn:
            conn.execute(select(1))

    # --- creation -------------------------------------------------------------------------

    def create(self, job: NewJob) -> tuple[JobRecord, bool]:
        """Insert a queued job; ``(record, False)`` when its idempotency key replays one."""
        if job.idempotency_key is not None:
            # The cheap common case of a retried request: no failed INSERT needed.
            existing = self._get_by_key(job.idempotency_key)
            if existing is not None:
                return _replay(existing, job), False
        values = _insert_values(job, utcnow())
        try:
            with self._begin(write=True) as conn:
                conn.execute(_JOBS.insert().values(values))
        except IntegrityError as exc:
            # A concurrent create won the unique constraint (key or id): judge against it.
            return self._after_conflict(job, exc), False
        return _record(values), True

    def ensure(self, jobs: Sequence[NewJob]) -> builtins.list[str]:
        """Insert the jobs whose id is absent, in one transaction; return the inserted ids.

        Rows that conflict on the id (or on an idempotency key) are left alone, so a job
        published twice onto the bus gets one row.
        """
        unique = {job.id: job for job in reversed(jobs)}  # the first of duplicated ids wins
        if not unique:
            return []
        now = utcnow()
        # id order: concurrent batches then take index locks in the same order (no deadlock)
        rows = [_insert_values(unique[job_id], now) for job_id in sorted(unique)]
        with self._begin(write=True) as conn:
            if self._backend == "postgresql":
                batch = [{key: _jsonable(row[key]) for key in _NEW_JOB_COLUMNS} for row in rows]
                inserted = set(conn.scalars(_PG_ENSURE, {"batch": batch, "now": now}))
            else:
                # executemany with RETURNING: SQLAlchemy's "insertmanyvalues" batches the rows
                # into multi-row INSERTs without compiling a statement per call.
                inserted = set(conn.scalars(_SQLITE_ENSURE, rows))
        return [job_id for job_id in dict.fromkeys(j.id for j in jobs) if job_id in inserted]

    # --- reading --------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        with self._begin(write=False) as conn:
            row = conn.execute(select(_JOBS).where(_JOBS.c.id == job_id)).mappings().first()
        return None if row is None else _record(row)

    def get_many(self, ids: Iterable[str]) -> dict[str, JobRecord]:
        wanted = builtins.list(dict.fromkeys(ids))
        found: dict[str, JobRecord] = {}
        with self._begin(write=False) as conn:
            for chunk in _chunks(wanted):
                for row in conn.execute(select(_JOBS).where(_JOBS.c.id.in_(chunk))).mappings():
                    found[row["id"]] = _record(row)
        return found

    def list(
        self,
        *,
        status: JobStatus | None = None,
        model: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[builtins.list[JobRecord], str | None]:
        """Newest first, by (created_at, id) descending; keyset pages with an opaque cursor."""
        if not 1 <= limit <= _MAX_PAGE:
            raise ValueError(f"limit must be within 1..{_MAX_PAGE}, got {limit}")
        query = select(_JOBS)
        if status is not None:
            query = query.where(_JOBS.c.status == JobStatus(status).value)
        if model is not None:
            query = query.where(_JOBS.c.model == model)
        if cursor is not None:
            created_at, last_id = _decode_cursor(cursor)
            query = query.where(
                tuple_(_JOBS.c.created_at, _JOBS.c.id)
                < tuple_(literal(created_at, UTCDateTime()), literal(last_id))
            )
        query = query.order_by(_JOBS.c.created_at.desc(), _JOBS.c.id.desc()).limit(limit + 1)
        with self._begin(write=False) as conn:
            records = [_record(row) for row in conn.execute(query).mappings()]
        if len(records) <= limit:
            return records, None
        page = records[:limit]
        return page, _encode_cursor(page[-1].created_at, page[-1].id)

    def counts(self, *, model: str | None = None) -> dict[JobStatus, int]:
        query = select(_JOBS.c.status, func.count()).group_by(_JOBS.c.status)
        if model is not None:
            query = query.where(_JOBS.c.model == model)
        totals = dict.fromkeys(JobStatus, 0)
        with self._begin(write=False) as conn:
            for status, count in conn.execute(query):
                totals[JobStatus(status)] = int(count)
        return totals

    def backlog(self) -> int:
        """Jobs accepted and not finished: queued plus running."""
        query = select(func.count()).where(_JOBS.c.status.in_([_QUEUED, _RUNNING]))
        with self._begin(write=False) as conn:
            return int(conn.scalar(query) or 0)

    # --- transitions ----------------------------------------------------------------------

    def claim(
        self,
        ids: Sequence[str],
        *,
        worker_id: str,
        lease_s: float,
        now: datetime | None = None,
        due: Iterable[str] = (),
    ) -> ClaimResult:
        """Move the batch to running for ``worker_id``, in one transaction.

        queued -> running; running -> running too (a redelivery means the previous owner
        died): attempts + 1 and a fresh lease either way. A queued job past ``expires_at``
        becomes expired instead. Terminal jobs are skipped, unknown ids reported missing.
        """
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        now = utcnow() if now is None else require_aware(now, "now")
        wanted = builtins.list(dict.fromkeys(ids))
        # the pump's re-publish of a due retry: its row's not-before is the pump's hold
        due_ids = set(due)
        if not wanted:
            return ClaimResult(claimed=[], skipped={}, missing=[])
        skipped: dict[str, JobStatus] = {}
        to_expire: builtins.list[str] = []
        to_run: builtins.list[str] = []
        claimed: dict[str, JobRecord] = {}
        with self._begin(write=True) as conn:
            states = self._lock(conn, wanted, _JOBS.c.status, _JOBS.c.expires_at, _JOBS.c.retry_at)
            for job_id in wanted:
                if job_id not in states:
                    continue
                status, expires_at, retry_at = states[job_id]
                if status == _QUEUED and expires_at is not None and expires_at < now:
                    to_expire.append(job_id)
                elif (
                    status == _QUEUED
                    and retry_at is not None
                    and retry_at > now
                    and job_id not in due_ids
                ):
                    # a stale copy of a job waiting out its backoff: the retry pump owns it
                    skipped[job_id] = JobStatus.QUEUED
                elif status in (_QUEUED, _RUNNING):
                    to_run.append(job_id)
                else:
                    skipped[job_id] = JobStatus(status)
            for chunk in _chunks(to_expire):
                expired = conn.execute(
                    update(_JOBS)
                    .where(_JOBS.c.id.in_(chunk), _JOBS.c.status == _QUEUED)
                    .values(
                        status=JobStatus.EXPIRED.value,
                        completed_at=now,
                        error_code=ErrorCode.JOB_EXPIRED.value,
                        error_message="the job was not started before it expired",
                        error_retryable=False,
                        updated_at=now,
                    )
                    .returning(_JOBS)
                ).mappings()
                expired_records = [_record(row) for row in expired]
                skipped.update(dict.fromkeys((r.id for r in expired_records), JobStatus.EXPIRED))
                enqueue_job_events(conn, expired_records, self._backend, now)
            lease_until = now + timedelta(seconds=lease_s)
            for chunk in _chunks(to_run):
                rows = conn.execute(
                    update(_JOBS)
                    .where(_JOBS.c.id.in_(chunk), _JOBS.c.status.in_([_QUEUED, _RUNNING]))
                    .values(
                        status=_RUNNING,
                        retry_at=None,
                        attempts=_JOBS.c.attempts + 1,
                        started_at=func.coalesce(_JOBS.c.started_at, literal(now, UTCDateTime())),
                        lease_owner=worker_id,
                        lease_expires_at=lease_until,
                        updated_at=now,
                    )
                    .returning(_JOBS)
                ).mappings()
                records = [_record(row) for row in rows]
                claimed.update((r.id, r) for r in records)
                # job.started, for the jobs that asked for it (once per job)
                enqueue_job_events(conn, records, self._backend, now)
        return ClaimResult(
            claimed=[claimed[job_id] for job_id in wanted if job_id in claimed],
            skipped=skipped,
            missing=[job_id for job_id in wanted if job_id not in states],
        )

    def complete(
        self, outcomes: Sequence[Outcome], retries: Sequence[Reschedule] = ()
    ) -> builtins.list[str]:
        """Record outcomes (and scheduled retries) in one transaction; return the ids applied.

        An outcome applies only while its job is running the same attempt, so a stale or
        duplicate worker cannot overwrite a newer attempt or a finished job.
        """
        if not outcomes and not retries:
            return []
        applied: dict[str, Outcome] = {}
        with self._begin(write=True) as conn:
            rescheduled = self._reschedule(conn, retries)
            if not outcomes:
                return rescheduled
            # The rows are locked (FOR UPDATE / SQLite's write lock) from this read until the
            # commit, so the decision below is exactly what the guarded UPDATE will do.
            states = self._lock(
                conn,
                [o.job_id for o in outcomes],
                _JOBS.c.status,
                _JOBS.c.attempts,
                _JOBS.c.webhook,
            )
            for outcome in outcomes:
                state = states.get(outcome.job_id)
                if state is None or outcome.job_id in applied:
                    continue
                status, attempts, _webhook = state
                if status == _RUNNING and attempts == outcome.attempt:
                    applied[outcome.job_id] = outcome
            if applied:
                now = utcnow()
                self._apply_outcomes(conn, builtins.list(applied.values()), now)
                # the webhook outbox rows commit with the outcomes, or not at all
                hooked = [i for i in applied if states[i][2]]
                if hooked:
                    enqueue_job_events(conn, self._read(conn, hooked), self._backend, now)
        return builtins.list(applied) + rescheduled

    def _reschedule(self, conn: Connection, retries: Sequence[Reschedule]) -> builtins.list[str]:
        done = []
        now = utcnow()
        for r in retries:
            result = conn.execute(
                update(_JOBS)
                .where(
                    _JOBS.c.id == r.job_id,
                    _JOBS.c.status == _RUNNING,
                    _JOBS.c.attempts == r.attempt,
                )
                .values(
                    status=_QUEUED,
                    retry_at=r.retry_at,
                    error_code=r.error_code,
                    error_message=r.error_message,
                    error_retryable=True,
                    lease_owner=None,
                    lease_expires_at=None,
                    updated_at=now,
                )
            )
            if result.rowcount == 1:
                done.append(r.job_id)
        return done

    def due_retries(
        self, *, limit: int = 500, hold_s: float = 30.0, now: datetime | None = None
    ) -> builtins.list[JobRecord]:
        """Take the retries that are due, for re-publishing.

        Their not-before moves ``hold_s`` ahead in the same statement, so concurrent pumps
        never take the same job, and one that crashes before publishing is retried later.
        """
        now = utcnow() if now is None else require_aware(now, "now")
        with self._begin(write=True) as conn:
            ids = builtins.list(
                conn.scalars(
                    select(_JOBS.c.id)
                    .where(_JOBS.c.status == _QUEUED, _JOBS.c.retry_at <= now)
                    .order_by(_JOBS.c.retry_at)
                    .limit(limit)
                )
            )
            if not ids:
                return []
            rows = conn.execute(
                update(_JOBS)
                .where(_JOBS.c.id.in_(ids), _JOBS.c.status == _QUEUED, _JOBS.c.retry_at <= now)
                .values(retry_at=now + timedelta(seconds=hold_s), updated_at=now)
                .returning(_JOBS)
            ).mappings()
            return [_record(row) for row in rows]

    def retries_published(self, ids: Sequence[str]) -> None:
        """The pump published these retries: they now wait on the bus like new jobs."""
        now = utcnow()
        with self._begin(write=True) as conn:
            for chunk in _chunks(builtins.list(ids)):
                conn.execute(
                    update(_JOBS)
                    .where(_JOBS.c.id.in_(chunk), _JOBS.c.status == _QUEUED)
                    .values(retry_at=None, updated_at=now)
                )

    def requeue_failed(self, ids: Sequence[str]) -> builtins.list[JobRecord]:
        """failed -> queued for a redrive; attempts are kept, the result and error cleared."""
        now = utcnow()
        out: builtins.list[JobRecord] = []
        with self._begin(write=True) as conn:
            for chunk in _chunks(builtins.list(dict.fromkeys(ids))):
                rows = conn.execute(
                    update(_JOBS)
                    .where(_JOBS.c.id.in_(chunk), _JOBS.c.status == JobStatus.FAILED.value)
                    .values(
                        status=_QUEUED,
                        result=None,
                        error_code=None,
                        error_message=None,
                        error_retryable=False,
                        completed_at=None,
                        retry_at=None,
                        updated_at=now,
                    )
                    .returning(_JOBS)
                ).mappings()
                out.extend(_record(row) for row in rows)
        return out

    def queue_stats(self, *, now: datetime | None = None) -> dict[str, dict[str, float]]:
        """Per model: queued, running, and the age in seconds of the oldest queued job."""
        now = utcnow() if now is None else require_aware(now, "now")
        query = (
            select(_JOBS.c.model, _JOBS.c.status, func.count(), func.min(_JOBS.c.created_at))
            .where(_JOBS.c.status.in_([_QUEUED, _RUNNING]))
            .group_by(_JOBS.c.model, _JOBS.c.status)
        )
        stats: dict[str, dict[str, float]] = {}
        with self._begin(write=False) as conn:
            for model, status, count, oldest in conn.execute(query):
                entry = stats.setdefault(model, {"queued": 0, "running": 0, "oldest_queued_s": 0})
                entry[status] = int(count)
                if status == _QUEUED and oldest is not None:
                    if oldest.tzinfo is None:
                        oldest = oldest.replace(tzinfo=UTC)
                    entry["oldest_queued_s"] = max((now - oldest).total_seconds(), 0.0)
        return stats

    def fail_unstarted(self, job_id: str, code: str, message: str) -> bool:
        """Fail a queued or running job outright (a poison message); False if it was not."""
        now = utcnow()
        with self._begin(write=True) as conn:
            row = (
                conn.execute(
                    update(_JOBS)
                    .where(_JOBS.c.id == job_id, _JOBS.c.status.in_([_QUEUED, _RUNNING]))
                    .values(
                        status=JobStatus.FAILED.value,
                        error_code=code,
                        error_message=message,
                        error_retryable=False,
                        completed_at=now,
                        lease_owner=None,
                        lease_expires_at=None,
                        updated_at=now,
                    )
                    .returning(_JOBS)
                )
                .mappings()
                .first()
            )
            if row is not None:
                enqueue_job_events(conn, [_record(row)], self._backend, now)
        return row is not None

    def cancel(self, job_id: str) -> JobRecord:
        """queued -> cancelled. Anything else raises IllegalTransition, unknown ids JobNotFound."""
        now = utcnow()
        with self._begin(write=True) as conn:
            row = (
                conn.execute(
                    update(_JOBS)
                    .where(_JOBS.c.id == job_id, _JOBS.c.status == _QUEUED)
                    .values(status=JobStatus.CANCELLED.value, completed_at=now, updated_at=now)
                    .returning(_JOBS)
                )
                .mappings()
                .first()
            )
            if row is not None:
                record = _record(row)
                enqueue_job_events(conn, [record], self._backend, now)
                return record
            current = conn.scalar(select(_JOBS.c.status).where(_JOBS.c.id == job_id))
        if current is None:
            raise JobNotFound(job_id)
        raise IllegalTransition(job_id, JobStatus(current), JobStatus.CANCELLED)

    def delete_unpublished(self, job_id: str) -> bool:
        """Remove a queued, never-attempted job whose publish failed; False if it moved on."""
        with self._begin(write=True) as conn:
            result = conn.execute(
                _JOBS.delete().where(
                    _JOBS.c.id == job_id, _JOBS.c.status == _QUEUED, _JOBS.c.attempts == 0
                )
            )
        return result.rowcount == 1

    def abandon_unpublished(self, job_id: str, code: str, message: str) -> bool:
        """A queued, never-attempted job whose publish was never acknowledged -> failed.

        The row stays (a late copy of the message then finds it terminal and does not run),
        and its idempotency key is released so the client's retry creates a fresh job.
        """
        now = utcnow()
        with self._begin(write=True) as conn:
            result = conn.execute(
                update(_JOBS)
                .where(_JOBS.c.id == job_id, _JOBS.c.status == _QUEUED, _JOBS.c.attempts == 0)
                .values(
                    status=JobStatus.FAILED.value,
                    error_code=code,
                    error_message=message,
                    error_retryable=True,
                    completed_at=now,
                    idempotency_key=None,
                    updated_at=now,
                )
            )
        return result.rowcount == 1

    # --- sweeps (run by the control plane) ----------------------------------------------

    def expire_overdue(
        self, *, now: datetime | None = None, limit: int = 1000
    ) -> builtins.list[str]:
        """queued jobs past ``expires_at`` -> expired (with their webhooks); their ids."""
        now = utcnow() if now is None else require_aware(now, "now")
        with self._begin(write=True) as conn:
            ids = builtins.list(
                conn.scalars(
                    select(_JOBS.c.id)
                    .where(_JOBS.c.status == _QUEUED, _JOBS.c.expires_at < now)
                    .limit(limit)
                )
            )
            if not ids:
                return []
            rows = conn.execute(
                update(_JOBS)
                .where(_JOBS.c.id.in_(ids), _JOBS.c.status == _QUEUED, _JOBS.c.expires_at < now)
                .values(
                    status=JobStatus.EXPIRED.value,
                    completed_at=now,
                    error_code=ErrorCode.JOB_EXPIRED.value,
                    error_message="the job was not started before it expired",
                    error_retryable=False,
                    updated_at=now,
                )
                .returning(_JOBS)
            ).mappings()
            records = [_record(row) for row in rows]
            enqueue_job_events(conn, records, self._backend, now)
        return [r.id for r in records]

    def stale_running(
        self, *, now: datetime | None = None, limit: int = 500
    ) -> builtins.list[JobRecord]:
        """Running jobs whose lease ran out: their worker died or hangs."""
        now = utcnow() if now is None else require_aware(now, "now")
        query = (
            select(_JOBS)
            .where(_JOBS.c.status == _RUNNING, _JOBS.c.lease_expires_at < now)
            .order_by(_JOBS.c.lease_expires_at)
            .limit(limit)
        )
        with self._begin(write=False) as conn:
            return [_record(row) for row in conn.execute(query).mappings()]

    def requeue_stale(self, job_id: str, attempt: int, *, now: datetime | None = None) -> bool:
        """running -> queued, only while it is still the same lapsed attempt."""
        now = utcnow() if now is None else require_aware(now, "now")
        with self._begin(write=True) as conn:
            result = conn.execute(
                update(_JOBS)
                .where(
                    _JOBS.c.id == job_id,
                    _JOBS.c.status == _RUNNING,
                    _JOBS.c.attempts == attempt,
                    _JOBS.c.lease_expires_at < now,
                )
                .values(status=_QUEUED, lease_owner=None, lease_expires_at=None, updated_at=now)
            )
        return result.rowcount == 1

    def fail_stale(
        self, job_id: str, attempt: int, message: str, *, now: datetime | None = None
    ) -> bool:
        """running -> failed (lease_expired) after the attempt limit, same guard as above."""
        now = utcnow() if now is None else require_aware(now, "now")
        with self._begin(write=True) as conn:
            row = (
                conn.execute(
                    update(_JOBS)
                    .where(
                        _JOBS.c.id == job_id,
                        _JOBS.c.status == _RUNNING,
                        _JOBS.c.attempts == attempt,
                        _JOBS.c.lease_expires_at < now,
                    )
                    .values(
                        status=JobStatus.FAILED.value,
                        error_code=ErrorCode.LEASE_EXPIRED.value,
                        error_message=message,
                        error_retryable=False,
                        completed_at=now,
                        lease_owner=None,
                        lease_expires_at=None,
                        updated_at=now,
                    )
                    .returning(_JOBS)
                )
                .mappings()
                .first()
            )
            if row is not None:
                enqueue_job_events(conn, [_record(row)], self._backend, now)
        return row is not None

    def purge_finished(self, *, before: datetime, limit: int = 1000) -> int:
        """Delete terminal jobs completed before ``before``, with their webhook rows."""
        before = require_aware(before, "before")
        terminal = [s.value for s in JobStatus if s.terminal]
        with self._begin(write=True) as conn:
            ids = builtins.list(
                conn.scalars(
                    select(_JOBS.c.id)
                    .where(_JOBS.c.status.in_(terminal), _JOBS.c.completed_at < before)
                    .limit(limit)
                )
            )
            if not ids:
                return 0
            deliveries = select(DELIVERIES.c.id).where(DELIVERIES.c.job_id.in_(ids))
            conn.execute(ATTEMPTS.delete().where(ATTEMPTS.c.delivery_id.in_(deliveries)))
            conn.execute(DELIVERIES.delete().where(DELIVERIES.c.job_id.in_(ids)))
            conn.execute(_JOBS.delete().where(_JOBS.c.id.in_(ids)))
        return len(ids)

    # --- workers --------------------------------------------------------------------------

    def heartbeat(
        self, worker_id: str, models: Sequence[Mapping[str, str]], *, now: datetime | None = None
    ) -> None:
        """Record that ``worker_id`` is alive and serves ``models`` ({name, version, provider})."""
        now = utcnow() if now is None else require_aware(now, "now")
        served = [dict(m) for m in models]
        insert = postgresql.insert if self._backend == "postgresql" else sqlite.insert
        stmt = insert(_WORKERS).values(worker_id=worker_id, models=served, heartbeat_at=now)
        stmt = stmt.on_conflict_do_update(
            index_elements=[_WORKERS.c.worker_id],
            set_={"models": stmt.excluded.models, "heartbeat_at": stmt.excluded.heartbeat_at},
        )
        with self._begin(write=True) as conn:
            conn.execute(stmt)

    def live_workers(
        self, *, max_age_s: float = 30.0, now: datetime | None = None
    ) -> dict[str, builtins.list[dict[str, str]]]:
        """worker id -> the models it reported, for workers with a fresh heartbeat."""
        now = utcnow() if now is None else require_aware(now, "now")
        since = now - timedelta(seconds=max_age_s)
        query = select(_WORKERS.c.worker_id, _WORKERS.c.models).where(
            _WORKERS.c.heartbeat_at >= since
        )
        with self._begin(write=False) as conn:
            return {wid: builtins.list(models or []) for wid, models in conn.execute(query)}

    def providers(
        self, *, max_age_s: float = 30.0, now: datetime | None = None
    ) -> dict[tuple[str, str], set[str]]:
        """(model, version) -> execution providers, from heartbeats fresher than max_age_s."""
        now = utcnow() if now is None else require_aware(now, "now")
        since = now - timedelta(seconds=max_age_s)
        query = select(_WORKERS.c.models).where(_WORKERS.c.heartbeat_at >= since)
        served: dict[tuple[str, str], set[str]] = {}
        with self._begin(write=False) as conn:
            for models in conn.scalars(query):
                for entry in models or []:
                    name, version = entry.get("name"), entry.get("version")
                    provider = entry.get("provider")
                    if name and version and provider:
                        served.setdefault((name, version), set()).add(provider)
        return served

    # --- internals ------------------------------------------------------------------------

    @contextmanager
    def _begin(self, *, write: bool) -> Iterator[Connection]:
        engine = self._writer if write else self._engine
        try:
            with engine.begin() as conn:
                yield conn
        except (OperationalError, InterfaceError) as exc:
            raise StoreUnavailable(f"job store unavailable: {exc.orig or exc}") from exc

    def _lock(
        self, conn: Connection, ids: Iterable[str], *columns: Any
    ) -> dict[str, tuple[Any, ...]]:
        """Read (and on PostgreSQL row-lock) the given columns of the batch, keyed by id."""
        states: dict[str, tuple[Any, ...]] = {}
        # Sorted: concurrent batches lock overlapping rows in one global order (no deadlock).
        for chunk in _chunks(sorted(set(ids))):
            query: Select[Any] = (
                select(_JOBS.c.id, *columns).where(_JOBS.c.id.in_(chunk)).order_by(_JOBS.c.id)
            )
            if self._backend == "postgresql":
                query = query.with_for_update()
            for row in conn.execute(query):
                states[row[0]] = tuple(row[1:])
        return states

    def _read(self, conn: Connection, ids: Sequence[str]) -> builtins.list[JobRecord]:
        records: builtins.list[JobRecord] = []
        for chunk in _chunks(ids):
            rows = conn.execute(select(_JOBS).where(_JOBS.c.id.in_(chunk))).mappings()
            records.extend(_record(row) for row in rows)
        return records

    def _apply_outcomes(self, conn: Connection, outcomes: Sequence[Outcome], now: datetime) -> None:
        if self._backend == "postgresql":
            # One statement over a JSON batch: executemany costs a server round of parse,
            # bind and execute per row (~0.1 ms each), ten times slower at 1,000 outcomes.
            batch = [_outcome_params(o) for o in outcomes]
            for item in batch:
                item["completed_at"] = item["completed_at"].isoformat()
            conn.execute(_PG_COMPLETE, {"batch": batch, "now": now})
        else:
            conn.execute(
                _COMPLETE_MANY,
                [
                    {f"b_{k}": v for k, v in _outcome_params(o).items()} | {"b_now": now}
                    for o in outcomes
                ],
            )

    def _get_by_key(self, key: str) -> JobRecord | None:
        with self._begin(write=False) as conn:
            row = (
                conn.execute(select(_JOBS).where(_JOBS.c.idempotency_key == key)).mappings().first()
            )
        return None if row is None else _record(row)

    def _after_conflict(self, job: NewJob, exc: IntegrityError) -> JobRecord:
        if job.idempotency_key is not None:
            existing = self._get_by_key(job.idempotency_key)
            if existing is not None:
                return _replay(existing, job)
        if self.get(job.id) is not None:
            raise DuplicateJob(job.id) from exc
        raise JobStoreError(f"could not insert job {job.id!r}: {exc.orig}") from exc


def _sqlite_engine(url: URL, pool_size: int) -> Engine:
    memory = url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"
    if memory:
        # One shared connection: a pool would hand each connection its own empty database.
        engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        engine = create_engine(
            url,
            pool_size=pool_size,
            max_overflow=pool_size,
            connect_args={"check_same_thread": False},
        )
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, _connection_record: Any) -> None:
    # Take BEGIN away from the sqlite3 module (it defers it), so _sqlite_on_begin decides.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=5000")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    mode = conn.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
    conn.exec_driver_sql(f"BEGIN {mode}")


def _postgres_engine(url: URL, pool_size: int, schema: str | None) -> Engine:
    connect_args: dict[str, Any] = {}
    if schema is not None:
        connect_args["options"] = f"-csearch_path={schema}"
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        connect_args=connect_args,
    )


def _outcome_params(outcome: Outcome) -> dict[str, Any]:
    failed = outcome.status == JobStatus.FAILED
    return {
        "id": outcome.job_id,
        "attempt": outcome.attempt,
        "status": outcome.status.value,
        "result": outcome.result,
        "error_code": outcome.error_code if failed else None,
        "error_message": outcome.error_message if failed else None,
        "retryable": outcome.retryable if failed else False,
        "completed_at": outcome.completed_at,
    }


def _completion_values(source: Any) -> dict[str, Any]:
    """SET clause of a completion; ``source`` names the per-outcome values."""
    return {
        "status": source("status"),
        "result": source("result"),
        "error_code": source("error_code"),
        "error_message": source("error_message"),
        "error_retryable": source("retryable"),
        "completed_at": source("completed_at"),
        "lease_owner": None,
        "lease_expires_at": None,
    }


def _complete_many_statement() -> Update:
    """The guarded UPDATE run executemany-style, one parameter set an outcome (SQLite)."""
    c = _JOBS.c
    types = {
        "id": c.id.type,
        "attempt": c.attempts.type,
        "status": c.status.type,
        "result": c.result.type,
        "error_code": c.error_code.type,
        "error_message": c.error_message.type,
        "retryable": c.error_retryable.type,
        "completed_at": c.completed_at.type,
    }

    def param(name: str) -> Any:
        return bindparam(f"b_{name}", type_=types[name])

    return (
        update(_JOBS)
        .where(c.id == param("id"), c.status == _RUNNING, c.attempts == param("attempt"))
        .values(**_completion_values(param), updated_at=bindparam("b_now", type_=UTCDateTime()))
    )


def _pg_complete_statement() -> Update:
    """The guarded UPDATE joined to the batch, unpacked by jsonb_to_recordset (PostgreSQL)."""
    c = _JOBS.c
    batch = (
        func.jsonb_to_recordset(bindparam("batch", type_=postgresql.JSONB()))
        .table_valued(
            column("id", String()),
            column("attempt", Integer()),
            column("status", String()),
            column("result", postgresql.JSONB()),
            column("error_code", String()),
            column("error_message", String()),
            column("retryable", Boolean()),
            column("completed_at", postgresql.TIMESTAMP(timezone=True)),
        )
        .render_derived(name="outcome", with_types=True)
    )
    return (
        update(_JOBS)
        .where(c.id == batch.c.id, c.status == _RUNNING, c.attempts == batch.c.attempt)
        .values(
            **_completion_values(lambda name: batch.c[name]),
            updated_at=bindparam("now", type_=UTCDateTime()),
        )
    )


def _pg_ensure_statement() -> Insert:
    """INSERT ... SELECT from the batch as one JSON document, skipping conflicts (PostgreSQL).

    A multi-row VALUES of 500 jobs is 11,500 bind parameters: slow to compile and to parse.
    """
    given = [column(name, _JOBS.c[name].type) for name in _NEW_JOB_COLUMNS]
    batch = (
        func.jsonb_to_recordset(bindparam("batch", type_=postgresql.JSONB()))
        .table_valued(*given)
        .render_derived(name="job", with_types=True)
    )
    constants: dict[str, Any] = {
        "status": literal(_QUEUED),
        "attempts": literal(0),
        "error_retryable": literal(False),
        "updated_at": bindparam("now", type_=UTCDateTime()),
    }
    names = [c.name for c in given] + builtins.list(constants)
    rows = select(*(batch.c[c.name] for c in given), *constants.values())
    return (
        postgresql.insert(_JOBS)
        .from_select(names, rows)
        .on_conflict_do_nothing()
        .returning(_JOBS.c.id)
    )


_PG_ENSURE = _pg_ensure_statement()
_SQLITE_ENSURE = sqlite.insert(_JOBS).on_conflict_do_nothing().returning(_JOBS.c.id)
_COMPLETE_MANY = _complete_many_statement()
_PG_COMPLETE = _pg_complete_statement()


def _insert_values(job: NewJob, now: datetime) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": _QUEUED,
        "model": job.model,
        "version": job.version,
        "input": job.input,
        "result": None,
        "error_code": None,
        "error_message": None,
        "error_retryable": False,
        "attempts": 0,
        "priority": job.priority,
        "created_at": job.created_at.astimezone(UTC),
        "started_at": None,
        "completed_at": None,
        "expires_at": None if job.expires_at is None else job.expires_at.astimezone(UTC),
        "metadata": job.metadata,
        "webhook": job.webhook,
        "source": job.source,
        "idempotency_key": job.idempotency_key,
        "request_hash": job.request_hash,
        "lease_owner": None,
        "retry_at": None,
        "lease_expires_at": None,
        "updated_at": now,
    }


def _jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _record(row: Mapping[Any, Any]) -> JobRecord:
    return JobRecord(
        id=row["id"],
        status=JobStatus(row["status"]),
        model=row["model"],
        version=row["version"],
        input=row["input"],
        result=row["result"],
        error_code=row["error_code"],
        error_message=row["error_message"],
        error_retryable=bool(row["error_retryable"]),
        attempts=int(row["attempts"]),
        priority=int(row["priority"]),
        created_at=row["created_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        expires_at=row["expires_at"],
        metadata=row["metadata"],
        webhook=row["webhook"],
        source=row["source"],
        idempotency_key=row["idempotency_key"],
        request_hash=row["request_hash"],
        lease_owner=row["lease_owner"],
        lease_expires_at=row["lease_expires_at"],
        updated_at=row["updated_at"],
        retry_at=row["retry_at"],
    )


def _replay(existing: JobRecord, job: NewJob) -> JobRecord:
    if existing.request_hash != job.request_hash:
        raise IdempotencyConflict(existing)
    return existing


def _encode_cursor(created_at: datetime, job_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), job_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        decoded = json.loads(raw)
        if not (isinstance(decoded, list) and len(decoded) == 2):
            raise ValueError("a cursor is a [created_at, id] pair")
        created_at, job_id = decoded
        if not isinstance(created_at, str) or not isinstance(job_id, str):
            raise ValueError("cursor fields must be strings")
        return require_aware(datetime.fromisoformat(created_at), "cursor"), job_id
    except (binascii.Error, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise InvalidCursor(cursor) from exc


def _chunks(items: Sequence[_T], size: int = _CHUNK) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
