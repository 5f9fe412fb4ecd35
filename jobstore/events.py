"""The job events log: one row per state change, written in the transaction that made it.

Every change of a job's status (its creation included) appends a row to ``job_events``:
``(job_id, seq)`` with seq 1, 2, ... per job, the event type (``job.queued``,
``job.started``, ``job.succeeded``, ...), and a snapshot of what changed (status, attempts,
times, error). The job's other fields never change after creation and a result is only
written by the one terminal success, so the snapshot and the job's row rebuild the job
resource as it was at that event. The seq comes from the job row's ``event_seq``, bumped in
the same UPDATE that moves the row, so numbering an event costs no read.

Two readers: ``events_after`` (a client's stream, resumable by seq) and the relay that
publishes the rows onto the bus (``EventLog.pending`` / ``mark_published``, one relay at a
time by a lease). ``job.queued`` rows are for the stream only: they are written as
published already.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Index,
    Insert,
    Integer,
    String,
    Table,
    bindparam,
    case,
    column,
    func,
    null,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Field, SQLModel

from jobstore.errors import JobNotFound
from jobstore.records import JobRecord, utcnow
from jobstore.sql import JOBS, chunked, row_record
from jobstore.tables import UTCDateTime
from schemas.jobs import JobError, JobResource, JobStatus

# the event a job's new status is
EVENT_TYPES: dict[JobStatus, str] = {
    JobStatus.QUEUED: "job.queued",
    JobStatus.RUNNING: "job.started",
    JobStatus.SUCCEEDED: "job.succeeded",
    JobStatus.FAILED: "job.failed",
    JobStatus.CANCELLED: "job.cancelled",
    JobStatus.EXPIRED: "job.expired",
}
TERMINAL_EVENTS = frozenset(EVENT_TYPES[s] for s in JobStatus if s.terminal)
# kept for the stream, not published on the bus (the bus carries a job's progress and
# outcome; its acceptance is the 202 or the publisher's own message)
STREAM_ONLY = frozenset({"job.queued"})


class JobEventRow(SQLModel, table=True):
    __tablename__ = "job_events"
    __table_args__ = (
        Index("uq_job_events_job_seq", "job_id", "seq", unique=True),
        # the relay's queue: only the rows not yet published, in the order written
        Index(
            "ix_job_events_unpublished",
            "position",
            postgresql_where=text("published_at IS NULL"),
            sqlite_where=text("published_at IS NULL"),
        ),
    )

    # the order rows were written in (per job it follows seq: a job's row lock orders them)
    position: int | None = Field(
        default=None,
        sa_column=Column(
            BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
    )
    job_id: str = Field(max_length=128)
    seq: int
    type: str = Field(max_length=32)
    state: dict[str, Any] = Field(
        sa_column=Column(JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False)
    )
    created_at: datetime = Field(sa_type=UTCDateTime)
    published_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class EventRelayRow(SQLModel, table=True):
    """Who publishes the events now: one relay at a time keeps each job's events in order."""

    __tablename__ = "event_relays"

    name: str = Field(primary_key=True, max_length=64)
    owner: str = Field(max_length=128)
    expires_at: datetime = Field(sa_type=UTCDateTime)


EVENTS = cast("Table", JobEventRow.__table__)  # type: ignore[attr-defined]
RELAYS = cast("Table", EventRelayRow.__table__)  # type: ignore[attr-defined]


def event_id(job_id: str, seq: int) -> str:
    """Unique per event; a stream resumes after it (``Last-Event-ID``)."""
    return f"{job_id}:{seq}"


def parse_event_id(job_id: str, value: str) -> int | None:
    """The seq of ``value`` when it is an event id of ``job_id``, else None."""
    prefix, _, seq = value.rpartition(":")
    if prefix != job_id or not seq.isascii() or not seq.isdigit() or len(seq) > 9:
        return None
    return int(seq)


@dataclass(frozen=True)
class JobEvent:
    id: str  # event_id(job_id, seq)
    job_id: str
    seq: int
    type: str
    created_at: datetime
    job: JobResource  # the job resource as it was at this event (results not resolved)
    position: int = 0

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _time(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


# the columns an event is written from: a moved row returns only these where it can
SNAPSHOT_COLUMNS = (
    "id",
    "status",
    "attempts",
    "started_at",
    "completed_at",
    "retry_at",
    "error_code",
    "error_message",
    "error_retryable",
    "event_seq",
)


def columns_of(record: JobRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in SNAPSHOT_COLUMNS}


def snapshot(row: Mapping[str, Any]) -> dict[str, Any]:
    """What an event keeps: the fields that change after creation (the result aside)."""
    error = None
    if row["error_code"] is not None:
        error = [row["error_code"], row["error_message"] or "", bool(row["error_retryable"])]
    return {
        "status": JobStatus(row["status"]).value,
        "attempts": int(row["attempts"]),
        "started_at": _iso(row["started_at"]),
        "completed_at": _iso(row["completed_at"]),
        "next_attempt_at": _iso(row["retry_at"]),
        "error": error,
    }


def rebuild(record: JobRecord, seq: int, type_: str, state: dict[str, Any]) -> JobResource:
    """The job resource at event ``seq`` from its snapshot and the job's row now."""
    error = state.get("error")
    changed = {
        "status": JobStatus(state["status"]),
        "attempts": int(state["attempts"]),
        "started_at": _time(state.get("started_at")),
        "completed_at": _time(state.get("completed_at")),
        "next_attempt_at": _time(state.get("next_attempt_at")),
        "error": None
        if error is None
        else JobError(code=error[0], message=error[1], retryable=error[2]),
        # written once, by the success, and never changed after it
        "result": record.result if type_ == "job.succeeded" else None,
    }
    return record.to_resource().model_copy(update=changed)


def write(conn: Connection, records: Iterable[JobRecord], now: datetime) -> int:
    """Append the event of each record's current state (its ``event_seq``), in the
    caller's transaction."""
    return write_rows(conn, [columns_of(r) for r in records], now)


def write_rows(conn: Connection, rows: Sequence[Mapping[str, Any]], now: datetime) -> int:
    """``write`` from rows holding ``SNAPSHOT_COLUMNS``: one statement for the batch."""
    if not rows:
        return 0
    events = []
    for row in rows:
        kind = EVENT_TYPES[JobStatus(row["status"])]
        events.append(
            {
                "job_id": row["id"],
                "seq": int(row["event_seq"]),
                "type": kind,
                "state": snapshot(row),
                "stream_only": kind in STREAM_ONLY,
            }
        )
    if conn.dialect.name == "postgresql":
        # one statement over a JSON batch: executemany is a server round per row
        conn.execute(PG_INSERT, {"batch": events, "now": now})
    else:
        for event in events:
            event["created_at"] = now
            event["published_at"] = now if event.pop("stream_only") else None
        conn.execute(EVENTS.insert(), events)
    return len(events)


def _pg_insert() -> Insert:
    batch = (
        func.jsonb_to_recordset(bindparam("batch", type_=postgresql.JSONB()))
        .table_valued(
            column("job_id", String()),
            column("seq", Integer()),
            column("type", String()),
            column("state", postgresql.JSONB()),
            column("stream_only", Boolean()),
        )
        .render_derived(name="event", with_types=True)
    )
    now = bindparam("now", type_=UTCDateTime())
    published = case((batch.c.stream_only, now), else_=null())
    names = ["job_id", "seq", "type", "state", "created_at", "published_at"]
    rows = select(batch.c.job_id, batch.c.seq, batch.c.type, batch.c.state, now, published)
    return EVENTS.insert().from_select(names, rows)


def delete_for(conn: Connection, job_ids: Sequence[str]) -> None:
    """A job's events go with its row (retention, an unpublished job removed)."""
    for chunk in chunked(list(job_ids)):
        conn.execute(EVENTS.delete().where(EVENTS.c.job_id.in_(chunk)))


def after(conn: Connection, job_id: str, seq: int) -> list[JobEvent]:
    """The job's events after ``seq``, in order; JobNotFound for an unknown job."""
    row = conn.execute(select(JOBS).where(JOBS.c.id == job_id)).mappings().first()
    if row is None:
        raise JobNotFound(job_id)
    record = row_record(row)
    if record.event_seq <= seq:
        return []  # the common case of a stream that is up to date: one read, by key
    e = EVENTS.c
    query = (
        select(e.position, e.seq, e.type, e.state, e.created_at)
        .where(e.job_id == job_id, e.seq > seq)
        .order_by(e.seq)
    )
    return [_event(record, *r) for r in conn.execute(query)]


def _event(
    record: JobRecord, position: int, seq: int, type_: str, state: dict[str, Any], at: datetime
) -> JobEvent:
    return JobEvent(
        id=event_id(record.id, seq),
        job_id=record.id,
        seq=seq,
        type=type_,
        created_at=at,
        job=rebuild(record, seq, type_, state),
        position=position,
    )


class EventLog:
    """The relay's side of the events log; shares the job store's engines."""

    def __init__(self, engine: Engine, *, writer: Engine | None = None) -> None:
        self._engine = engine
        self._writer = writer or engine
        self._backend = engine.dialect.name

    def after(self, job_id: str, seq: int) -> list[JobEvent]:
        with self._engine.begin() as conn:
            return after(conn, job_id, seq)

    def pending(self, limit: int) -> list[JobEvent]:
        """Events not yet published, in the order written, at most ``limit``."""
        e = EVENTS.c
        with self._engine.begin() as conn:
            rows = list(
                conn.execute(
                    select(e.position, e.job_id, e.seq, e.type, e.state, e.created_at)
                    .where(e.published_at.is_(None))
                    .order_by(e.position)
                    .limit(limit)
                )
            )
            ids = list(dict.fromkeys(r.job_id for r in rows))
            jobs: dict[str, JobRecord] = {}
            for chunk in chunked(ids):
                for job in conn.execute(select(JOBS).where(JOBS.c.id.in_(chunk))).mappings():
                    jobs[job["id"]] = row_record(job)
        return [
            _event(jobs[r.job_id], r.position, r.seq, r.type, r.state, r.created_at)
            for r in rows
            if r.job_id in jobs  # its job was purged meanwhile: its rows are going too
        ]

    def mark_published(self, positions: Sequence[int], now: datetime | None = None) -> None:
        now = utcnow() if now is None else now
        e = EVENTS.c
        with self._writer.begin() as conn:
            for chunk in chunked(list(positions)):
                conn.execute(update(EVENTS).where(e.position.in_(chunk)).values(published_at=now))

    def unpublished(self) -> int:
        from sqlalchemy import func

        with self._engine.begin() as conn:
            query = select(func.count()).where(EVENTS.c.published_at.is_(None))
            return int(conn.scalar(query) or 0)

    def hold_lease(self, name: str, owner: str, ttl_s: float, now: datetime | None = None) -> bool:
        """Take or renew the lease ``name`` for ``owner``; False while another holds it."""
        now = utcnow() if now is None else now
        until = now + timedelta(seconds=ttl_s)
        r = RELAYS.c
        insert = postgresql.insert if self._backend == "postgresql" else sqlite.insert
        with self._writer.begin() as conn:
            conn.execute(
                insert(RELAYS)
                .values(name=name, owner=owner, expires_at=now - timedelta(seconds=1))
                .on_conflict_do_nothing(index_elements=["name"])
            )
            taken = conn.execute(
                update(RELAYS)
                .where(r.name == name, (r.owner == owner) | (r.expires_at < now))
                .values(owner=owner, expires_at=until)
            ).rowcount
        return bool(taken)

    def release_lease(self, name: str, owner: str) -> None:
        r = RELAYS.c
        with self._writer.begin() as conn:
            conn.execute(
                update(RELAYS)
                .where(r.name == name, r.owner == owner)
                .values(expires_at=utcnow() - timedelta(seconds=1))
            )


PG_INSERT = _pg_insert()
