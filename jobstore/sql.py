"""The job store's SQL: engines per backend, the bulk inserts, and the mapping between rows
and records. The JobStore (store.py) decides what to do; this module says how."""

from __future__ import annotations

import base64
import binascii
import builtins
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    Insert,
    bindparam,
    column,
    create_engine,
    event,
    func,
    literal,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL
from sqlalchemy.pool import StaticPool

from jobstore.errors import (
    IdempotencyConflict,
    InvalidCursor,
)
from jobstore.records import (
    JobRecord,
    NewJob,
    content_hash,
    require_aware,
)
from jobstore.tables import UTCDateTime, jobs_table
from schemas.jobs import JOB_ID_PATTERN, JobStatus

_T = TypeVar("_T")

# Ids per IN (...) list: far below every driver's limit on bind parameters (SQLite 32766,
# PostgreSQL 65535), and a batch the size a worker fetches is one statement.
CHUNK = 500
BEGIN_OPTION = "inferq_sqlite_begin"

_QUEUED = JobStatus.QUEUED.value

JOBS = jobs_table()
# The columns that a NewJob fills in; the rest of a new row starts out the same for all.
NEW_JOB_COLUMNS = (
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
    "content_hash",
)


def in_memory(url: URL) -> bool:
    """An SQLite URL of a database in memory: only this process ever sees it."""
    return url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"


def sqlite_engine(url: URL, pool_size: int) -> Engine:
    if in_memory(url):
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
    mode = conn.get_execution_options().get(BEGIN_OPTION, "DEFERRED")
    conn.exec_driver_sql(f"BEGIN {mode}")


def postgres_engine(
    url: URL, pool_size: int, schema: str | None, connect_timeout_s: int = 5
) -> Engine:
    connect_args: dict[str, Any] = {}
    if schema is not None:
        connect_args["options"] = f"-csearch_path={schema}"
    if "connect_timeout" not in url.query:
        # libpq waits for an unreachable server as long as TCP does (minutes): every request
        # would hang on it, holding an API thread, instead of answering 503 store_unavailable
        connect_args["connect_timeout"] = connect_timeout_s
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        connect_args=connect_args,
    )


def pg_ensure_statement() -> Insert:
    """INSERT ... SELECT from the batch as one JSON document, skipping conflicts (PostgreSQL).

    A multi-row VALUES of 500 jobs is 11,500 bind parameters: slow to compile and to parse.
    """
    given = [column(name, JOBS.c[name].type) for name in NEW_JOB_COLUMNS]
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
        "event_seq": literal(1),
    }
    names = [c.name for c in given] + builtins.list(constants)
    rows = select(*(batch.c[c.name] for c in given), *constants.values())
    return (
        postgresql.insert(JOBS)
        .from_select(names, rows)
        .on_conflict_do_nothing()
        .returning(JOBS.c.id)
    )


PG_ENSURE = pg_ensure_statement()
SQLITE_ENSURE = sqlite.insert(JOBS).on_conflict_do_nothing().returning(JOBS.c.id)


def insert_values(job: NewJob, now: datetime) -> dict[str, Any]:
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
        "content_hash": content_hash(job) if job.bound else None,
        "lease_owner": None,
        "retry_at": None,
        "lease_expires_at": None,
        "updated_at": now,
        "event_seq": 1,  # its job.queued event, written in the same transaction
    }


def jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def row_record(row: Mapping[Any, Any]) -> JobRecord:
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
        content_hash=row["content_hash"],
        event_seq=int(row["event_seq"]),
    )


def replay(existing: JobRecord, job: NewJob) -> JobRecord:
    if existing.request_hash != job.request_hash:
        raise IdempotencyConflict(existing)
    return existing


def encode_cursor(created_at: datetime, job_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), job_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        decoded = json.loads(raw)
        if not (isinstance(decoded, list) and len(decoded) == 2):
            raise ValueError("a cursor is a [created_at, id] pair")
        created_at, job_id = decoded
        if not isinstance(created_at, str) or not isinstance(job_id, str):
            raise ValueError("cursor fields must be strings")
        # a tampered id (NUL, a lone surrogate) must not reach the store's comparison
        if re.fullmatch(JOB_ID_PATTERN, job_id) is None:
            raise ValueError("cursor id is not a job id")
        return require_aware(datetime.fromisoformat(created_at), "cursor"), job_id
    except (binascii.Error, UnicodeDecodeError, ValueError, TypeError, OverflowError) as exc:
        # OverflowError: a date at the edge of the calendar, shifted out of it by its offset
        raise InvalidCursor(cursor) from exc


def chunked(items: Sequence[_T], size: int = CHUNK) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
