"""JobStore: the façade over job rows, their state transitions and worker heartbeats.

Every method runs in its own transaction on a pooled connection, so one store is shared by
the API's threadpool and the workers' executors. A transition is a guarded UPDATE on the
status it starts from (jobstore/transitions.py): a row that moved on concurrently is
reported, never overwritten. The webhook outbox rows a transition calls for are written
here, in the same transaction; once it has committed, their ids go to ``on_outbox`` (when
given), which hands them to delivery at once instead of leaving them to the periodic sweep.

The work is done on the open connection by: queries.py (reads), claims.py (claim and
complete), requeue.py (retries and redrives), sweeps.py (expiry, lapsed leases, retention)
and heartbeats.py (live workers).
"""

from __future__ import annotations

import builtins
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, func, inspect, select
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlmodel import SQLModel

from jobstore import claims, creation, events, heartbeats, queries, requeue, sweeps
from jobstore.errors import (
    DuplicateJob,
    IllegalTransition,
    JobNotFound,
    JobStoreError,
    StoreUnavailable,
)
from jobstore.feeds import ChangeFeed, CommitFeed, PostgresFeed, SqliteFeed
from jobstore.notify import install_triggers
from jobstore.outbox import QUEUED, enqueue_job_events
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
    JOBS,
    in_memory,
    insert_values,
    postgres_engine,
    replay,
    row_record,
    sqlite_engine,
)
from jobstore.transitions import (
    ABANDON_UNPUBLISHED,
    CANCEL,
    FAIL_UNSTARTED,
    failure,
    move,
    move_ids,
)
from schemas.jobs import JobStatus

log = logging.getLogger(__name__)

_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_SCHEMA_LOCK_KEY = 0x696E66657271  # "inferq": an arbitrary, fixed advisory lock id


# Columns added after the first release: create_all creates missing tables, not columns.
_ADDED_COLUMNS = {"content_hash": "VARCHAR(64)", "event_seq": "INTEGER NOT NULL DEFAULT 0"}


def _add_missing_columns(conn: Connection) -> None:
    present = {c["name"] for c in inspect(conn).get_columns(JOBS.name)}
    for name, ddl in _ADDED_COLUMNS.items():
        if name not in present:
            conn.exec_driver_sql(f"ALTER TABLE {JOBS.name} ADD COLUMN {name} {ddl}")


def normalise_url(url: str) -> URL:
    """Accept ``postgresql://`` (and ``postgres://``) and pick the psycopg 3 driver for it."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _now(now: datetime | None) -> datetime:
    return utcnow() if now is None else require_aware(now, "now")


# Called with the ids of the webhook outbox rows a transaction wrote, after it committed; it
# must return at once and never raise (the rows are delivered by the sweep regardless).
OutboxListener = Callable[[Sequence[str]], None]


class JobStore:
    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 5,
        schema: str | None = None,
        connect_timeout_s: int = 5,
        on_outbox: OutboxListener | None = None,
    ) -> None:
        """Open (lazily) the database at ``url``.

        ``schema`` (PostgreSQL only) puts the tables in that schema via ``search_path``: one
        database can then hold several isolated stores (tests, tenants).
        ``connect_timeout_s`` (PostgreSQL) bounds a connection attempt: a server that does
        not answer is StoreUnavailable, not a hang.
        ``on_outbox`` hears of new webhook outbox rows once they are committed.
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
        self._on_outbox = on_outbox
        self._url, self._schema, self._connect_timeout_s = parsed, schema, connect_timeout_s

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
            if self._backend == "postgresql":
                install_triggers(conn)  # NOTIFY of each state change, for waiting clients

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
        now = utcnow()
        values = insert_values(job, now)
        record = row_record(values)
        try:
            with self._begin(write=True) as conn:
                conn.execute(JOBS.insert().values(values))
                events.write(conn, [record], now)
        except IntegrityError as exc:
            # A concurrent create won the unique constraint (key or id): judge against it.
            return self._after_conflict(job, exc), False
        return record, True

    def create_many(self, jobs: Sequence[NewJob]) -> builtins.list[creation.Created]:
        """``create`` for each job, in one transaction; per job its ``(record, created)``
        or the ``JobStoreError`` it met (``IdempotencyConflict``, or a row the database
        refused), in order. ``StoreUnavailable`` when the database cannot be reached: then
        nothing was written."""
        keys = [j.idempotency_key for j in jobs if j.idempotency_key is not None]
        try:
            with self._begin(write=True) as conn:
                now = utcnow()
                plan = creation.plan(jobs, creation.by_keys(conn, keys), now)
                creation.insert(conn, plan.rows)
                events.write(conn, [row_record(row) for row in plan.rows], now)
        except StoreUnavailable:
            raise  # rolled back, nothing written: the call fails as a whole
        except Exception:
            # a concurrent request took a key (or an id) in between, or the database refused
            # a row: judge each job alone, so that only the job at fault fails
            return [self._create_judged(job) for job in jobs]
        return creation.outcomes(jobs, plan)

    def _create_judged(self, job: NewJob) -> creation.Created:
        """``create``, with what went wrong as the job's outcome: the jobs before it may
        be written already, so nothing may escape that would hide their outcomes."""
        try:
            return self.create(job)
        except JobStoreError as exc:
            return exc
        except Exception as exc:  # a value the database cannot store, for one
            log.warning("job %s: the database refused its row: %s", job.id, exc)
            refused = JobStoreError(f"could not insert job {job.id!r}: {exc}")
            refused.__cause__ = exc
            return refused

    def ensure(self, jobs: Sequence[NewJob]) -> builtins.list[str]:
        """Insert the jobs whose id is absent, in one transaction; return the inserted ids.

        Rows that conflict on the id (or on an idempotency key) are left alone, so a job
        published twice onto the bus gets one row.
        """
        if not jobs:
            return []
        with self._begin(write=True) as conn:
            inserted = creation.ensure(conn, self._backend, jobs, utcnow())
        return [job_id for job_id in dict.fromkeys(j.id for j in jobs) if job_id in inserted]

    # --- reading --------------------------------------------------------------------------

    def events_after(self, job_id: str, seq: int = 0) -> builtins.list[events.JobEvent]:
        """The job's events after ``seq`` (0: all), in order; JobNotFound for an unknown id."""
        with self._begin(write=False) as conn:
            return events.after(conn, job_id, seq)

    @property
    def event_log(self) -> events.EventLog:
        """The relay's side of the job events (pending rows, marks, its lease)."""
        return events.EventLog(self._engine, writer=self._writer)

    def get(self, job_id: str) -> JobRecord | None:
        with self._begin(write=False) as conn:
            return queries.get(conn, job_id)

    def get_many(self, ids: Iterable[str]) -> dict[str, JobRecord]:
        with self._begin(write=False) as conn:
            return queries.get_many(conn, ids)

    def statuses(self, ids: Iterable[str]) -> dict[str, JobStatus]:
        """The status of each of ``ids`` that has a row, in one query."""
        with self._begin(write=False) as conn:
            return queries.statuses(conn, list(dict.fromkeys(ids)))

    def change_feed(self, *, poll_s: float = 0.005) -> ChangeFeed:
        """The feed that tells this process which jobs changed (jobstore/feeds.py):
        LISTEN on PostgreSQL; on SQLite ``data_version`` looked at every ``poll_s``."""
        if self._backend == "postgresql":
            return PostgresFeed(
                self._url, schema=self._schema, connect_timeout_s=self._connect_timeout_s
            )
        if in_memory(self._url) or self._url.database is None:
            return CommitFeed(self._engine)
        return SqliteFeed(self._url.database, poll_s=poll_s)

    def list(
        self,
        *,
        status: JobStatus | None = None,
        model: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[builtins.list[JobRecord], str | None]:
        """Newest first, by (created_at, id) descending; keyset pages with an opaque cursor."""
        query = queries.page_query(status=status, model=model, limit=limit, cursor=cursor)
        with self._begin(write=False) as conn:
            return queries.read_page(conn, query, limit)

    def counts(self, *, model: str | None = None) -> dict[JobStatus, int]:
        with self._begin(write=False) as conn:
            return queries.counts(conn, model)

    def backlog(self) -> int:
        """Jobs accepted and not finished: queued plus running."""
        with self._begin(write=False) as conn:
            return queries.backlog(conn)

    def queue_stats(self, *, now: datetime | None = None) -> dict[str, dict[str, float]]:
        """Per model: queued, running, and the age in seconds of the oldest queued job."""
        now = _now(now)
        with self._begin(write=False) as conn:
            return queries.queue_stats(conn, now)

    # --- the worker's transitions ---------------------------------------------------------

    def claim(
        self,
        ids: Sequence[str],
        *,
        worker_id: str,
        lease_s: float,
        now: datetime | None = None,
        due: Iterable[str] = (),
        bindings: Mapping[str, Binding] | None = None,
        ensure: Sequence[NewJob] = (),
    ) -> ClaimResult:
        """Move the batch to running for ``worker_id``, in one transaction (which first
        inserts the rows of ``ensure`` that are absent, as ``ensure()`` does).

        queued -> running; running -> running too (a redelivery means the previous owner
        died): attempts + 1 and a fresh lease either way. A queued job past ``expires_at``
        becomes expired instead. Terminal jobs are skipped, unknown ids reported missing.
        An id whose row is bound to another request than its ``bindings`` entry says is
        reported in ``conflicts`` and left alone, whatever its status.
        """
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        now = _now(now)
        wanted = builtins.list(dict.fromkeys(ids))
        # the pump's re-publish of a due retry: its row's not-before is the pump's hold
        due_ids = set(due)
        if not wanted:
            return ClaimResult(claimed=[], skipped={}, missing=[])
        with self._begin(write=True) as conn:
            if ensure:  # rows of jobs that came straight off the bus, in the same transaction
                creation.ensure(conn, self._backend, ensure, now)
            result, expired = claims.claim(
                conn,
                self._backend,
                wanted,
                worker_id=worker_id,
                lease_until=now + timedelta(seconds=lease_s),
                now=now,
                due_ids=due_ids,
                bindings=bindings or {},
            )
            enqueue_job_events(conn, expired, self._backend, now)
            # job.started, for the jobs that asked for it (once per job)
            enqueue_job_events(conn, result.claimed, self._backend, now)
        return result

    def complete(
        self, outcomes: Sequence[Outcome], retries: Sequence[Reschedule] = ()
    ) -> builtins.list[str]:
        """Record outcomes (and scheduled retries) in one transaction; return the ids applied.

        An outcome applies only while its job is running the same attempt, so a stale or
        duplicate worker cannot overwrite a newer attempt or a finished job.
        """
        if not outcomes and not retries:
            return []
        with self._begin(write=True) as conn:
            rescheduled = requeue.reschedule(conn, retries)
            now = utcnow()
            applied, hooked = claims.finish(conn, self._backend, outcomes, now)
            if hooked:
                # the webhook outbox rows commit with the outcomes, or not at all
                enqueue_job_events(conn, hooked, self._backend, now)
        return applied + rescheduled

    def fail_unstarted(
        self, job_id: str, code: str, message: str, binding: Binding | None = None
    ) -> bool:
        """Fail a queued or running job outright (a poison message); False if it was not.

        With ``binding``, only a row that is unbound or bound to that request is failed.
        """
        now = utcnow()
        where = [] if binding is None else [claims.bound_to(binding)]
        values = failure(code, message, now, retryable=False)
        values |= {"lease_owner": None, "lease_expires_at": None}
        with self._begin(write=True) as conn:
            failed = move(conn, FAIL_UNSTARTED, [job_id], values, *where)
            enqueue_job_events(conn, failed, self._backend, now)
        return bool(failed)

    # --- retries (the pump) and redrives (the dead-letter queue) --------------------------

    def due_retries(
        self, *, limit: int = 500, hold_s: float = 30.0, now: datetime | None = None
    ) -> builtins.list[JobRecord]:
        """Take the retries that are due, for re-publishing.

        Their not-before moves ``hold_s`` ahead in the same statement, so concurrent pumps
        never take the same job, and one that crashes before publishing is retried later.
        """
        now = _now(now)
        with self._begin(write=True) as conn:
            return requeue.take_due(conn, now, limit, hold_s)

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
        now = _now(now)
        with self._begin(write=take) as conn:
            return requeue.stranded(conn, now, idle_s, limit, hold_s, take=take)

    def retries_published(self, ids: Sequence[str]) -> None:
        """The pump published these retries: they now wait on the bus like new jobs."""
        now = utcnow()
        with self._begin(write=True) as conn:
            requeue.published(conn, ids, now)

    def requeue_failed(self, ids: Sequence[str]) -> builtins.list[JobRecord]:
        """failed -> queued for a redrive; attempts are kept, the result and error cleared."""
        now = utcnow()
        with self._begin(write=True) as conn:
            return requeue.redrive(conn, ids, now)

    def restore_failed(self, job_id: str, code: str, message: str) -> bool:
        """Undo ``requeue_failed`` for a redrive whose publish failed: queued -> failed again.

        No job events: the job already announced its failure, and nothing ran since.
        """
        now = utcnow()
        with self._begin(write=True) as conn:
            return requeue.restore_failed(conn, job_id, code, message, now)

    # --- the API's transitions ------------------------------------------------------------

    def cancel(self, job_id: str) -> JobRecord:
        """queued -> cancelled. Anything else raises IllegalTransition, unknown ids JobNotFound."""
        now = utcnow()
        with self._begin(write=True) as conn:
            cancelled = move(conn, CANCEL, [job_id], {"completed_at": now, "updated_at": now})
            if cancelled:
                enqueue_job_events(conn, cancelled, self._backend, now)
                return cancelled[0]
            current = conn.scalar(select(JOBS.c.status).where(JOBS.c.id == job_id))
        if current is None:
            raise JobNotFound(job_id)
        raise IllegalTransition(job_id, JobStatus(current), JobStatus.CANCELLED)

    def delete_unpublished(self, job_id: str) -> bool:
        """Remove a queued, never-attempted job whose publish failed; False if it moved on."""
        # a removal, not a move: the rows it takes are those abandon_unpublished would fail
        unpublished = (ABANDON_UNPUBLISHED.guard(), JOBS.c.attempts == 0)
        with self._begin(write=True) as conn:
            result = conn.execute(JOBS.delete().where(JOBS.c.id == job_id, *unpublished))
            if result.rowcount == 1:
                events.delete_for(conn, [job_id])
        return result.rowcount == 1

    def abandon_unpublished(self, job_id: str, code: str, message: str) -> bool:
        """A queued, never-attempted job whose publish was never acknowledged -> failed.

        The row stays (a late copy of the message then finds it terminal and does not run),
        and its idempotency key is released so the client's retry creates a fresh job.
        """
        values = failure(code, message, utcnow(), retryable=True) | {"idempotency_key": None}
        with self._begin(write=True) as conn:
            moved = move_ids(conn, ABANDON_UNPUBLISHED, [job_id], values, JOBS.c.attempts == 0)
        return bool(moved)

    # --- sweeps (run by the control plane) ----------------------------------------------

    def expire_overdue(
        self, *, now: datetime | None = None, limit: int = 1000
    ) -> builtins.list[str]:
        """queued jobs past ``expires_at`` -> expired (with their webhooks); their ids."""
        now = _now(now)
        with self._begin(write=True) as conn:
            records = sweeps.expire_overdue(conn, now, limit)
            enqueue_job_events(conn, records, self._backend, now)
        return [r.id for r in records]

    def stale_running(
        self, *, now: datetime | None = None, limit: int = 500
    ) -> builtins.list[JobRecord]:
        """Running jobs whose lease ran out: their worker died or hangs."""
        now = _now(now)
        with self._begin(write=False) as conn:
            return queries.stale_running(conn, now, limit)

    def requeue_stale(self, job_id: str, attempt: int, *, now: datetime | None = None) -> bool:
        """running -> queued, only while it is still the same lapsed attempt."""
        now = _now(now)
        with self._begin(write=True) as conn:
            return sweeps.requeue_stale(conn, job_id, attempt, now)

    def fail_stale(
        self, job_id: str, attempt: int, message: str, *, now: datetime | None = None
    ) -> bool:
        """running -> failed (lease_expired) after the attempt limit, same guard as above."""
        now = _now(now)
        with self._begin(write=True) as conn:
            failed = sweeps.fail_stale(conn, job_id, attempt, message, now)
            enqueue_job_events(conn, failed, self._backend, now)
        return bool(failed)

    def purge_finished(self, *, before: datetime, limit: int = 1000) -> int:
        """Delete terminal jobs completed before ``before``, with their webhook rows."""
        before = require_aware(before, "before")
        with self._begin(write=True) as conn:
            return sweeps.purge_finished(conn, before, limit)

    # --- workers --------------------------------------------------------------------------

    def heartbeat(
        self, worker_id: str, models: Sequence[Mapping[str, str]], *, now: datetime | None = None
    ) -> None:
        """Record that ``worker_id`` is alive and serves ``models`` ({name, version, provider})."""
        now = _now(now)
        with self._begin(write=True) as conn:
            heartbeats.beat(conn, self._backend, worker_id, models, now)

    def live_workers(
        self, *, max_age_s: float = 30.0, now: datetime | None = None
    ) -> dict[str, builtins.list[dict[str, str]]]:
        """worker id -> the models it reported, for workers with a fresh heartbeat."""
        since = _now(now) - timedelta(seconds=max_age_s)
        with self._begin(write=False) as conn:
            return heartbeats.live_workers(conn, since)

    def providers(
        self, *, max_age_s: float = 30.0, now: datetime | None = None
    ) -> dict[tuple[str, str], set[str]]:
        """(model, version) -> execution providers, from heartbeats fresher than max_age_s."""
        since = _now(now) - timedelta(seconds=max_age_s)
        with self._begin(write=False) as conn:
            return heartbeats.providers(conn, since)

    # --- internals ------------------------------------------------------------------------

    @contextmanager
    def _begin(self, *, write: bool) -> Iterator[Connection]:
        engine = self._writer if write else self._engine
        queued: list[str] = []
        try:
            with engine.begin() as conn:
                try:
                    yield conn
                finally:
                    # info lives with the pooled DBAPI connection: take it off either way
                    queued = conn.info.pop(QUEUED, [])
        except (OperationalError, InterfaceError) as exc:
            raise StoreUnavailable(f"job store unavailable: {exc.orig or exc}") from exc
        if queued and self._on_outbox is not None:  # committed: nothing can undo them now
            self._on_outbox(queued)

    def _get_by_key(self, key: str) -> JobRecord | None:
        with self._begin(write=False) as conn:
            return queries.by_key(conn, key)

    def _after_conflict(self, job: NewJob, exc: IntegrityError) -> JobRecord:
        if job.idempotency_key is not None:
            existing = self._get_by_key(job.idempotency_key)
            if existing is not None:
                return replay(existing, job)
        if self.get(job.id) is not None:
            raise DuplicateJob(job.id) from exc
        raise JobStoreError(f"could not insert job {job.id!r}: {exc.orig}") from exc
