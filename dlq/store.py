"""Dead letters as records: the bus keeps the message, this table keeps it findable.

A dead-letter topic is fine for replay but poor for "show me the invalid_input failures of
minilm since Tuesday"; every dead letter is therefore also written here, with its reason.
"""

from __future__ import annotations

import base64
import builtins
import json
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    delete,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine

from dlq.router import DeadLetter
from schemas.storable import check_json

PREVIEW_MAX_DEPTH = 64  # well inside what the response serialiser takes

_META = MetaData()
DEAD_LETTERS = Table(
    "dead_letters",
    _META,
    Column("id", String(40), primary_key=True),
    Column("job_id", String(128), nullable=True),
    Column("model", String(64), nullable=True),
    Column("version", String(32), nullable=True),
    Column("code", String(64), nullable=False),
    Column("message", Text, nullable=False),
    Column("exception", String(128), nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("origin", String(256), nullable=False),
    Column("position", String(128), nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("headers", JSON, nullable=False),
    Column("key", LargeBinary, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("redriven_at", DateTime(timezone=True), nullable=True),
    # added later (create_schema adds them to an older table): the original payload's size
    # and hash when ``payload`` holds only its head, where the whole of it is, and whether
    # the letter reached the dead-letter destination or lives only here
    Column("payload_size", Integer, nullable=True),
    Column("payload_sha256", String(64), nullable=True),
    Column("payload_url", String(1100), nullable=True),
    Column("published", Boolean, nullable=True),
    Index("ix_dead_letters_created", "created_at", "id"),
    Index("ix_dead_letters_model_code", "model", "code", "created_at"),
    Index("ix_dead_letters_job", "job_id"),
)


@dataclass(frozen=True)
class DeadLetterFilter:
    model: str | None = None
    code: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    include_redriven: bool = False

    @property
    def empty(self) -> bool:
        return not (self.model or self.code or self.since or self.until)


@dataclass(frozen=True)
class DeadLetterRecord:
    id: str
    job_id: str | None
    model: str | None
    version: str | None
    code: str
    message: str
    exception: str | None
    attempts: int
    origin: str
    position: str
    payload: bytes
    headers: dict[str, bytes]
    key: bytes | None
    created_at: datetime
    redriven_at: datetime | None
    payload_size: int | None = None
    payload_sha256: str | None = None
    payload_url: str | None = None
    published: bool = True

    @property
    def trimmed(self) -> bool:
        """``payload`` is only the head of the original message."""
        return self.payload_size is not None and len(self.payload) < self.payload_size


_LATER_COLUMNS = ("payload_size", "payload_sha256", "payload_url", "published")


def _utc(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _record(row: Any) -> DeadLetterRecord:
    return DeadLetterRecord(
        id=row.id,
        job_id=row.job_id,
        model=row.model,
        version=row.version,
        code=row.code,
        message=row.message,
        exception=row.exception,
        attempts=row.attempts,
        origin=row.origin,
        position=row.position,
        payload=bytes(row.payload),
        headers={k: base64.b64decode(v) for k, v in (row.headers or {}).items()},
        key=bytes(row.key) if row.key is not None else None,
        created_at=_utc(row.created_at) or datetime.now(UTC),
        redriven_at=_utc(row.redriven_at),
        payload_size=row.payload_size,
        payload_sha256=row.payload_sha256,
        payload_url=row.payload_url,
        published=row.published is not False,
    )


class DeadLetterStore:
    """Shares the job store's engine; owns only the ``dead_letters`` table."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create_schema(self) -> None:
        _META.create_all(self.engine)
        self._add_later_columns()

    def _add_later_columns(self) -> None:
        """Nullable columns added after the table's first release, for an existing table."""
        have = {c["name"] for c in inspect(self.engine).get_columns("dead_letters")}
        missing = [name for name in _LATER_COLUMNS if name not in have]
        if not missing:
            return
        dialect = self.engine.dialect
        with self._begin() as conn:
            for name in missing:
                column = DEAD_LETTERS.c[name]
                kind = column.type.compile(dialect=dialect)
                # two roles may start at once; SQLite has no IF NOT EXISTS here, but its
                # "duplicate column" is an OperationalError, which open_store retries
                guard = "IF NOT EXISTS " if dialect.name == "postgresql" else ""
                conn.exec_driver_sql(f"ALTER TABLE dead_letters ADD COLUMN {guard}{name} {kind}")

    @contextmanager
    def _begin(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    def add(self, letter: DeadLetter) -> str:
        entry_id = uuid.uuid4().hex
        d = letter.delivery
        with self._begin() as conn:
            conn.execute(
                DEAD_LETTERS.insert().values(
                    id=entry_id,
                    job_id=letter.job_id,
                    model=letter.model,
                    version=letter.version,
                    code=letter.code,
                    message=letter.message[:4000],
                    exception=letter.exception,
                    attempts=letter.attempts,
                    origin=d.source,
                    position=d.position,
                    payload=letter.value,
                    key=d.key,
                    headers={k: base64.b64encode(v).decode() for k, v in d.headers.items()},
                    created_at=datetime.now(UTC),
                    payload_size=letter.payload_size,
                    payload_sha256=letter.payload_sha256,
                    payload_url=letter.payload_url,
                    published=letter.published,
                )
            )
        return entry_id

    def _where(self, f: DeadLetterFilter) -> list[Any]:
        c = DEAD_LETTERS.c
        clauses: list[Any] = []
        if f.model:
            clauses.append(c.model == f.model)
        if f.code:
            clauses.append(c.code == f.code)
        if f.since:
            clauses.append(c.created_at >= f.since)
        if f.until:
            clauses.append(c.created_at < f.until)
        if not f.include_redriven:
            clauses.append(c.redriven_at.is_(None))
        return clauses

    def list(
        self, f: DeadLetterFilter, *, limit: int = 100, offset: int = 0
    ) -> builtins.list[DeadLetterRecord]:
        query = (
            select(DEAD_LETTERS)
            .where(*self._where(f))
            .order_by(DEAD_LETTERS.c.created_at.desc(), DEAD_LETTERS.c.id.desc())
            .limit(limit)
            .offset(offset)
        )
        with self._begin() as conn:
            return [_record(r) for r in conn.execute(query)]

    def ids(self, f: DeadLetterFilter) -> builtins.list[str]:
        query = select(DEAD_LETTERS.c.id).where(*self._where(f)).order_by(DEAD_LETTERS.c.created_at)
        with self._begin() as conn:
            return builtins.list(conn.scalars(query))

    def get_many(self, ids: Sequence[str]) -> dict[str, DeadLetterRecord]:
        with self._begin() as conn:
            rows = conn.execute(
                select(DEAD_LETTERS).where(DEAD_LETTERS.c.id.in_(builtins.list(ids)))
            )
            return {r.id: _record(r) for r in rows}

    def mark_redriven(self, entry_id: str) -> bool:
        """Claim an entry for redrive; False when it was redriven already (idempotence)."""
        with self._begin() as conn:
            result = conn.execute(
                update(DEAD_LETTERS)
                .where(DEAD_LETTERS.c.id == entry_id, DEAD_LETTERS.c.redriven_at.is_(None))
                .values(redriven_at=datetime.now(UTC))
            )
        return result.rowcount == 1

    def unmark_redriven(self, entry_id: str) -> None:
        with self._begin() as conn:
            conn.execute(
                update(DEAD_LETTERS).where(DEAD_LETTERS.c.id == entry_id).values(redriven_at=None)
            )

    def purge(self, f: DeadLetterFilter) -> int:
        f = DeadLetterFilter(f.model, f.code, f.since, f.until, include_redriven=True)
        with self._begin() as conn:
            return conn.execute(delete(DEAD_LETTERS).where(*self._where(f))).rowcount

    def counts(self) -> dict[str, int]:
        from sqlalchemy import func

        query = (
            select(DEAD_LETTERS.c.code, func.count())
            .where(DEAD_LETTERS.c.redriven_at.is_(None))
            .group_by(DEAD_LETTERS.c.code)
        )
        with self._begin() as conn:
            return {code: int(n) for code, n in conn.execute(query)}


def headers_json(headers: dict[str, bytes]) -> dict[str, str]:
    """Headers for display: UTF-8 where they are text, base64 otherwise."""
    out = {}
    for k, v in headers.items():
        try:
            out[k] = v.decode("utf-8")
        except UnicodeDecodeError:
            out[k] = "base64:" + base64.b64encode(v).decode()
    return out


def payload_preview(payload: bytes, limit: int = 2000) -> Any:
    """The message as JSON when it is JSON a response can carry, else as (cut) text."""
    try:
        doc = json.loads(payload)
        check_json(doc, "payload", max_depth=PREVIEW_MAX_DEPTH)
        return doc
    except (UnicodeDecodeError, RecursionError, ValueError):  # JSONDecodeError, Unstorable
        return payload[:limit].decode("utf-8", "replace")
