"""JobStore: job rows and their explicit, atomic state transitions (sync SQLAlchemy 2).

Every method runs in its own transaction on a pooled connection, so one store is shared by
the API's threadpool and the workers' executors. A transition is a conditional UPDATE on the
status it starts from: a row that moved on concurrently is reported, never overwritten.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Select,
    and_,
    func,
    inspect,
    literal,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlmodel import SQLModel

from jobstore.errors import (
    DuplicateJob,
    IllegalTransition,
    JobNotFound,
    JobStoreError,
    StoreUnavailable,
)
from jobstore.outbox import ATTEMPTS, DELIVERIES, enqueue_job_events
from jobstore.records import (
    Binding,
    ClaimResult,
    JobRecord,
    NewJob,
    Outcome,
    Reschedule,
    require_aware,
    utcnow,
)
from jobstore.sql import (
    BEGIN_OPTION,
    COMPLETE_MANY,
    JOBS,
    NEW_JOB_COLUMNS,
    PG_COMPLETE,
    PG_ENSURE,
    SQLITE_ENSURE,
    chunked,
    decode_cursor,
    encode_cursor,
    insert_values,
    jsonable,
    outcome_params,
    postgres_engine,
    replay,
    row_record,
    sqlite_engine,
)
from jobstore.tables import UTCDateTime, workers_table
from schemas.errors import ErrorCode
from schemas.jobs import JobStatus

_MAX_PAGE = 1000
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_SCHEMA_LOCK_KEY = 0x696E66657271  # "inferq": an arbitrary, fixed advisory lock id

_QUEUED = JobStatus.QUEUED.value
_RUNNING = JobStatus.RUNNING.value

_WORKERS = workers_table()


# Columns added after the first release: create_all creates missing tables, not columns.
_ADDED_COLUMNS = {"content_hash": "VARCHAR(64)"}


def _add_missing_columns(conn: Connection) -> None:
    present = {c["name"] for c in inspect(conn).get_columns(JOBS.name)}
    for name, ddl in _ADDED_COLUMNS.items():
        if name not in present:
            conn.exec_driver_sql(f"ALTER TABLE {JOBS.name} ADD COLUMN {name} {ddl}")


def _conflict(
    job_id: str, binding: Binding | None, bound_to: str | None, source: str | None
) -> str | None:
    """Why an event may not run under ``job_id``, or None when it may (or is unbound)."""
    if binding is None or bound_to is None:
        return None
    if source is not None and binding.source != source:  # a row without one binds none
        return f"job id {job_id!r} is already bound to a request from another source"
    if bound_to not in binding.hashes:
        return f"job id {job_id!r} is already bound to a request with other content"
    return None


def normalise_url(url: str) -> URL:
    """Accept ``postgresql://`` (and ``postgres://``) and pick the psycopg 3 driver for it."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


class JobStore:
    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 5,
        schema: str | None = None,
        connect_timeout_s: int = 5,
    ) -> None:
        """Open (lazily) the database at ``url``.

        ``schema`` (PostgreSQL only) puts the tables in that schema via ``search_path``: one
        database can then hold several isolated stores (tests, tenants).
        ``connect_timeout_s`` (PostgreSQL) bounds a connection attempt: a server that does
        not answer is StoreUnavailable, not a hang.
        """
        parsed = normalise_url(url)
        backend = parsed.get_backend_name()
        if schema is not None and not _SCHEMA_NAME.match(schema):
            raise ValueError(f"invalid schema name {schema!r}")
        if backend == "sqlite":
            if schema is not None:
                raise ValueError("schema= is only supported on PostgreSQL")
            self._engine: Engine = sqlite_engine(parsed, pool_size)
            # SQLite takes the write lock at BEGIN IMMEDIATE; a deferred transaction that reads
            # then writes can get SQLITE_BUSY without waiting for busy_timeout.
            self._writer: Engine = self._engine.execution_options(**{BEGIN_OPTION: "IMMEDIATE"})
        elif backend == "postgresql":
            self._engine = postgres_engine(parsed, pool_size, schema, connect_timeout_s)
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
            _add_missing_columns(conn)

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
                return replay(existing, job), False
        values = insert_values(job, utcnow())
        try:
            with self._begin(write=True) as conn:
                conn.execute(JOBS.insert().values(values))
        except IntegrityError as exc:
            # A concurrent create won the unique constraint (key or id): judge against it.
            return self._after_conflict(job, exc), False
        return row_record(values), True

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
        rows = [insert_values(unique[job_id], now) for job_id in sorted(unique)]
        with self._begin(write=True) as conn:
            if self._backend == "postgresql":
                batch = [{key: jsonable(row[key]) for key in NEW_JOB_COLUMNS} for row in rows]
                inserted = set(conn.scalars(PG_ENSURE, {"batch": batch, "now": now}))
            else:
                # executemany with RETURNING: SQLAlchemy's "insertmanyvalues" batches the rows
                # into multi-row INSERTs without compiling a statement per call.
                inserted = set(conn.scalars(SQLITE_ENSURE, rows))
        return [job_id for job_id in dict.fromkeys(j.id for j in jobs) if job_id in inserted]

    # --- reading --------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        with self._begin(write=False) as conn:
            row = conn.execute(select(JOBS).where(JOBS.c.id == job_id)).mappings().first()
        return None if row is None else row_record(row)

    def get_many(self, ids: Iterable[str]) -> dict[str, JobRecord]:
        wanted = builtins.list(dict.fromkeys(ids))
        found: dict[str, JobRecord] = {}
        with self._begin(write=False) as conn:
            for chunk in chunked(wanted):
                for row in conn.execute(select(JOBS).where(JOBS.c.id.in_(chunk))).mappings():
                    found[row["id"]] = row_record(row)
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
        query = query.order_by(JOBS.c.created_at.desc(), JOBS.c.id.desc()).limit(limit + 1)
        with self._begin(write=False) as conn:
            records = [row_record(row) for row in conn.execute(query).mappings()]
        if len(records) <= limit:
            return records, None
        page = records[:limit]
        return page, encode_cursor(page[-1].created_at, page[-1].id)

    def counts(self, *, model: str | None = None) -> dict[JobStatus, int]:
        query = select(JOBS.c.status, func.count()).group_by(JOBS.c.status)
        if model is not None:
            query = query.where(JOBS.c.model == model)
        totals = dict.fromkeys(JobStatus, 0)
        with self._begin(write=False) as conn:
            for status, count in conn.execute(query):
                totals[JobStatus(status)] = int(count)
        return totals

    def backlog(self) -> int:
        """Jobs accepted and not finished: queued plus running."""
        query = select(func.count()).where(JOBS.c.status.in_([_QUEUED, _RUNNING]))
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
        bindings: Mapping[str, Binding] | None = None,
    ) -> ClaimResult:
        """Move the batch to running for ``worker_id``, in one transaction.

        queued -> running; running -> running too (a redelivery means the previous owner
        died): attempts + 1 and a fresh lease either way. A queued job past ``expires_at``
        becomes expired instead. Terminal jobs are skipped, unknown ids reported missing.
        An id whose row is bound to another request than its ``bindings`` entry says is
        reported in ``conflicts`` and left alone, whatever its status.
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
        conflicts: dict[str, str] = {}
        bindings = bindings or {}
        with self._begin(write=True) as conn:
            states = self._lock(
                conn,
                wanted,
                JOBS.c.status,
                JOBS.c.expires_at,
                JOBS.c.retry_at,
                JOBS.c.content_hash,
                JOBS.c.source,
            )
            for job_id in wanted:
                if job_id not in states:
                    continue
                status, expires_at, retry_at, bound_to, source = states[job_id]
                conflict = _conflict(job_id, bindings.get(job_id), bound_to, source)
                if conflict is not None:
                    conflicts[job_id] = conflict
                elif status == _QUEUED and expires_at is not None and expires_at < now:
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
            for chunk in chunked(to_expire):
                expired = conn.execute(
                    update(JOBS)
                    .where(JOBS.c.id.in_(chunk), JOBS.c.status == _QUEUED)
                    .values(
                        status=JobStatus.EXPIRED.value,
                        completed_at=now,
                        error_code=ErrorCode.JOB_EXPIRED.value,
                        error_message="the job was not started before it expired",
                        error_retryable=False,
                        updated_at=now,
                    )
                    .returning(JOBS)
                ).mappings()
                expired_records = [row_record(row) for row in expired]
                skipped.update(dict.fromkeys((r.id for r in expired_records), JobStatus.EXPIRED))
                enqueue_job_events(conn, expired_records, self._backend, now)
            lease_until = now + timedelta(seconds=lease_s)
            for chunk in chunked(to_run):
                rows = conn.execute(
                    update(JOBS)
                    .where(JOBS.c.id.in_(chunk), JOBS.c.status.in_([_QUEUED, _RUNNING]))
                    .values(
                        status=_RUNNING,
                        retry_at=None,
                        attempts=JOBS.c.attempts + 1,
                        started_at=func.coalesce(JOBS.c.started_at, literal(now, UTCDateTime())),
                        lease_owner=worker_id,
                        lease_expires_at=lease_until,
                        updated_at=now,
                    )
                    .returning(JOBS)
                ).mappings()
                records = [row_record(row) for row in rows]
                claimed.update((r.id, r) for r in records)
                # job.started, for the jobs that asked for it (once per job)
                enqueue_job_events(conn, records, self._backend, now)
        return ClaimResult(
            claimed=[claimed[job_id] for job_id in wanted if job_id in claimed],
            skipped=skipped,
            missing=[job_id for job_id in wanted if job_id not in states],
            conflicts=conflicts,
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
                JOBS.c.status,
                JOBS.c.attempts,
                JOBS.c.webhook,
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
                update(JOBS)
                .where(
                    JOBS.c.id == r.job_id,
                    JOBS.c.status == _RUNNING,
                    JOBS.c.attempts == r.attempt,
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
                    select(JOBS.c.id)
                    .where(JOBS.c.status == _QUEUED, JOBS.c.retry_at <= now)
                    .order_by(JOBS.c.retry_at)
                    .limit(limit)
                )
            )
            if not ids:
                return []
            rows = conn.execute(
                update(JOBS)
                .where(JOBS.c.id.in_(ids), JOBS.c.status == _QUEUED, JOBS.c.retry_at <= now)
                .values(retry_at=now + timedelta(seconds=hold_s), updated_at=now)
                .returning(JOBS)
            ).mappings()
            return [row_record(row) for row in rows]

    def stranded(
        self,
        *,
        idle_s: float,
        limit: int = 500,
        hold_s: float = 30.0,
        take: bool = True,
        now: datetime | None = None,
    ) -> builtins.list[JobRecord]:
        """Queued jobs that nothing has touched for ``idle_s``: no retry waiting, no claim.

        With ``take`` their not-before moves ``hold_s`` ahead in the same statement, as
        ``due_retries`` does (concurrent callers never take the same job; one that crashes
        before publishing leaves a due retry behind). ``take=False`` only looks (up to
        ``limit`` rows, unchanged), for a caller that checks something else first.
        """
        now = utcnow() if now is None else require_aware(now, "now")
        idle_since = now - timedelta(seconds=idle_s)
        stuck = (
            JOBS.c.status == _QUEUED,
            JOBS.c.retry_at.is_(None),
            JOBS.c.updated_at < idle_since,
        )
        with self._begin(write=take) as conn:
            ids = builtins.list(
                conn.scalars(
                    select(JOBS.c.id).where(*stuck).order_by(JOBS.c.updated_at).limit(limit)
                )
            )
            if not ids or not take:
                return self._read(conn, ids)
            rows = conn.execute(
                update(JOBS)
                .where(JOBS.c.id.in_(ids), *stuck)
                .values(retry_at=now + timedelta(seconds=hold_s), updated_at=now)
                .returning(JOBS)
            ).mappings()
            return [row_record(row) for row in rows]

    def retries_published(self, ids: Sequence[str]) -> None:
        """The pump published these retries: they now wait on the bus like new jobs."""
        now = utcnow()
        with self._begin(write=True) as conn:
            for chunk in chunked(builtins.list(ids)):
                conn.execute(
                    update(JOBS)
                    .where(JOBS.c.id.in_(chunk), JOBS.c.status == _QUEUED)
                    .values(retry_at=None, updated_at=now)
                )

    def requeue_failed(self, ids: Sequence[str]) -> builtins.list[JobRecord]:
        """failed -> queued for a redrive; attempts are kept, the result and error cleared."""
        now = utcnow()
        out: builtins.list[JobRecord] = []
        with self._begin(write=True) as conn:
            for chunk in chunked(builtins.list(dict.fromkeys(ids))):
                rows = conn.execute(
                    update(JOBS)
                    .where(JOBS.c.id.in_(chunk), JOBS.c.status == JobStatus.FAILED.value)
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
                    .returning(JOBS)
                ).mappings()
                out.extend(row_record(row) for row in rows)
        return out

    def restore_failed(self, job_id: str, code: str, message: str) -> bool:
        """Undo ``requeue_failed`` for a redrive whose publish failed: queued -> failed again.

        No job events: the job already announced its failure, and nothing ran since.
        """
        now = utcnow()
        with self._begin(write=True) as conn:
            result = conn.execute(
                update(JOBS)
                .where(JOBS.c.id == job_id, JOBS.c.status == _QUEUED)
                .values(
                    status=JobStatus.FAILED.value,
                    error_code=code,
                    error_message=message,
                    error_retryable=False,
                    completed_at=now,
                    updated_at=now,
                )
            )
        return result.rowcount == 1

    def queue_stats(self, *, now: datetime | None = None) -> dict[str, dict[str, float]]:
        """Per model: queued, running, and the age in seconds of the oldest queued job."""
        now = utcnow() if now is None else require_aware(now, "now")
        query = (
            select(JOBS.c.model, JOBS.c.status, func.count(), func.min(JOBS.c.created_at))
            .where(JOBS.c.status.in_([_QUEUED, _RUNNING]))
            .group_by(JOBS.c.model, JOBS.c.status)
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

    def fail_unstarted(
        self, job_id: str, code: str, message: str, binding: Binding | None = None
    ) -> bool:
        """Fail a queued or running job outright (a poison message); False if it was not.

        With ``binding``, only a row that is unbound or bound to that request is failed.
        """
        now = utcnow()
        where = [JOBS.c.id == job_id, JOBS.c.status.in_([_QUEUED, _RUNNING])]
        if binding is not None:
            where.append(
                or_(
                    JOBS.c.content_hash.is_(None),
                    and_(
                        JOBS.c.content_hash.in_(sorted(binding.hashes)),
                        or_(JOBS.c.source.is_(None), JOBS.c.source == binding.source),
                    ),
                )
            )
        with self._begin(write=True) as conn:
            row = (
                conn.execute(
                    update(JOBS)
                    .where(*where)
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
                    .returning(JOBS)
                )
                .mappings()
                .first()
            )
            if row is not None:
                enqueue_job_events(conn, [row_record(row)], self._backend, now)
        return row is not None

    def cancel(self, job_id: str) -> JobRecord:
        """queued -> cancelled. Anything else raises IllegalTransition, unknown ids JobNotFound."""
        now = utcnow()
        with self._begin(write=True) as conn:
            row = (
                conn.execute(
                    update(JOBS)
                    .where(JOBS.c.id == job_id, JOBS.c.status == _QUEUED)
                    .values(status=JobStatus.CANCELLED.value, completed_at=now, updated_at=now)
                    .returning(JOBS)
                )
                .mappings()
                .first()
            )
            if row is not None:
                record = row_record(row)
                enqueue_job_events(conn, [record], self._backend, now)
                return record
            current = conn.scalar(select(JOBS.c.status).where(JOBS.c.id == job_id))
        if current is None:
            raise JobNotFound(job_id)
        raise IllegalTransition(job_id, JobStatus(current), JobStatus.CANCELLED)

    def delete_unpublished(self, job_id: str) -> bool:
        """Remove a queued, never-attempted job whose publish failed; False if it moved on."""
        with self._begin(write=True) as conn:
            result = conn.execute(
                JOBS.delete().where(
                    JOBS.c.id == job_id, JOBS.c.status == _QUEUED, JOBS.c.attempts == 0
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
                update(JOBS)
                .where(JOBS.c.id == job_id, JOBS.c.status == _QUEUED, JOBS.c.attempts == 0)
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
                    select(JOBS.c.id)
                    .where(JOBS.c.status == _QUEUED, JOBS.c.expires_at < now)
                    .limit(limit)
                )
            )
            if not ids:
                return []
            rows = conn.execute(
                update(JOBS)
                .where(JOBS.c.id.in_(ids), JOBS.c.status == _QUEUED, JOBS.c.expires_at < now)
                .values(
                    status=JobStatus.EXPIRED.value,
                    completed_at=now,
                    error_code=ErrorCode.JOB_EXPIRED.value,
                    error_message="the job was not started before it expired",
                    error_retryable=False,
                    updated_at=now,
                )
                .returning(JOBS)
            ).mappings()
            records = [row_record(row) for row in rows]
            enqueue_job_events(conn, records, self._backend, now)
        return [r.id for r in records]

    def stale_running(
        self, *, now: datetime | None = None, limit: int = 500
    ) -> builtins.list[JobRecord]:
        """Running jobs whose lease ran out: their worker died or hangs."""
        now = utcnow() if now is None else require_aware(now, "now")
        query = (
            select(JOBS)
            .where(JOBS.c.status == _RUNNING, JOBS.c.lease_expires_at < now)
            .order_by(JOBS.c.lease_expires_at)
            .limit(limit)
        )
        with self._begin(write=False) as conn:
            return [row_record(row) for row in conn.execute(query).mappings()]

    def requeue_stale(self, job_id: str, attempt: int, *, now: datetime | None = None) -> bool:
        """running -> queued, only while it is still the same lapsed attempt."""
        now = utcnow() if now is None else require_aware(now, "now")
        with self._begin(write=True) as conn:
            result = conn.execute(
                update(JOBS)
                .where(
                    JOBS.c.id == job_id,
                    JOBS.c.status == _RUNNING,
                    JOBS.c.attempts == attempt,
                    JOBS.c.lease_expires_at < now,
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
                    update(JOBS)
                    .where(
                        JOBS.c.id == job_id,
                        JOBS.c.status == _RUNNING,
                        JOBS.c.attempts == attempt,
                        JOBS.c.lease_expires_at < now,
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
                    .returning(JOBS)
                )
                .mappings()
                .first()
            )
            if row is not None:
                enqueue_job_events(conn, [row_record(row)], self._backend, now)
        return row is not None

    def purge_finished(self, *, before: datetime, limit: int = 1000) -> int:
        """Delete terminal jobs completed before ``before``, with their webhook rows."""
        before = require_aware(before, "before")
        terminal = [s.value for s in JobStatus if s.terminal]
        with self._begin(write=True) as conn:
            ids = builtins.list(
                conn.scalars(
                    select(JOBS.c.id)
                    .where(JOBS.c.status.in_(terminal), JOBS.c.completed_at < before)
                    .limit(limit)
                )
            )
            if not ids:
                return 0
            deliveries = select(DELIVERIES.c.id).where(DELIVERIES.c.job_id.in_(ids))
            conn.execute(ATTEMPTS.delete().where(ATTEMPTS.c.delivery_id.in_(deliveries)))
            conn.execute(DELIVERIES.delete().where(DELIVERIES.c.job_id.in_(ids)))
            conn.execute(JOBS.delete().where(JOBS.c.id.in_(ids)))
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
        for chunk in chunked(sorted(set(ids))):
            query: Select[Any] = (
                select(JOBS.c.id, *columns).where(JOBS.c.id.in_(chunk)).order_by(JOBS.c.id)
            )
            if self._backend == "postgresql":
                query = query.with_for_update()
            for row in conn.execute(query):
                states[row[0]] = tuple(row[1:])
        return states

    def _read(self, conn: Connection, ids: Sequence[str]) -> builtins.list[JobRecord]:
        records: builtins.list[JobRecord] = []
        for chunk in chunked(ids):
            rows = conn.execute(select(JOBS).where(JOBS.c.id.in_(chunk))).mappings()
            records.extend(row_record(row) for row in rows)
        return records

    def _apply_outcomes(self, conn: Connection, outcomes: Sequence[Outcome], now: datetime) -> None:
        if self._backend == "postgresql":
            # One statement over a JSON batch: executemany costs a server round of parse,
            # bind and execute per row (~0.1 ms each), ten times slower at 1,000 outcomes.
            batch = [outcome_params(o) for o in outcomes]
            for item in batch:
                item["completed_at"] = item["completed_at"].isoformat()
            conn.execute(PG_COMPLETE, {"batch": batch, "now": now})
        else:
            conn.execute(
                COMPLETE_MANY,
                [
                    {f"b_{k}": v for k, v in outcome_params(o).items()} | {"b_now": now}
                    for o in outcomes
                ],
            )

    def _get_by_key(self, key: str) -> JobRecord | None:
        with self._begin(write=False) as conn:
            row = conn.execute(select(JOBS).where(JOBS.c.idempotency_key == key)).mappings().first()
        return None if row is None else row_record(row)

    def _after_conflict(self, job: NewJob, exc: IntegrityError) -> JobRecord:
        if job.idempotency_key is not None:
            existing = self._get_by_key(job.idempotency_key)
            if existing is not None:
                return replay(existing, job)
        if self.get(job.id) is not None:
            raise DuplicateJob(job.id) from exc
        raise JobStoreError(f"could not insert job {job.id!r}: {exc.orig}") from exc
