"""SQLModel tables of the job store."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import JSON, Column, DateTime, Dialect, Index, Table
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, on every dialect.

    SQLite keeps no offset, so values are stored as naive UTC and made aware on the way out;
    PostgreSQL gets a ``timestamptz``.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: the job store needs aware datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _json() -> JSON:
    # none_as_null: a missing result is SQL NULL, not the JSON literal null
    return JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


class JobRow(SQLModel, table=True):
    __tablename__ = "jobs"
    # Every list/count query the API runs has an index that serves it in order, so a page
    # reads ~limit index entries at millions of rows: newest-first by (created_at, id), under
    # any mix of the status and model filters. (status, model, ...) also serves the per-model
    # queued/running counts through its prefix.
    __table_args__ = (
        Index("ix_jobs_status_created_id", "status", "created_at", "id"),
        Index("ix_jobs_model_created_id", "model", "created_at", "id"),
        Index("ix_jobs_status_model_created_id", "status", "model", "created_at", "id"),
        Index("ix_jobs_created_id", "created_at", "id"),
        Index("uq_jobs_idempotency_key", "idempotency_key", unique=True),
        Index("ix_jobs_status_retry_at", "status", "retry_at"),
    )

    id: str = Field(primary_key=True, max_length=128)
    status: str = Field(max_length=16)
    model: str = Field(max_length=64)
    version: str | None = Field(default=None, max_length=32)
    input: dict[str, Any] = Field(sa_column=Column(_json(), nullable=False))
    result: dict[str, Any] | None = Field(default=None, sa_column=Column(_json(), nullable=True))
    error_code: str | None = Field(default=None, max_length=64)
    error_message: str | None = Field(default=None)
    error_retryable: bool = Field(default=False)
    attempts: int = Field(default=0)
    priority: int = Field(default=5)
    created_at: datetime = Field(sa_type=UTCDateTime)
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    completed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # SQLModel owns the attribute name `metadata` (the MetaData); the column keeps the name
    metadata_: dict[str, Any] | None = Field(
        default=None, sa_column=Column("metadata", _json(), nullable=True)
    )
    webhook: dict[str, Any] | None = Field(default=None, sa_column=Column(_json(), nullable=True))
    source: str | None = Field(default=None)  # a CloudEvents URI-reference: no fixed bound
    idempotency_key: str | None = Field(default=None, max_length=256)
    request_hash: str | None = Field(default=None, max_length=128)
    # records.content_hash of the request the id was first bound to (NULL: unbound)
    content_hash: str | None = Field(default=None, max_length=64)
    lease_owner: str | None = Field(default=None, max_length=128)
    lease_expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # not-before of a scheduled retry: the job waits in the store, not on a partition
    retry_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)
    # seq of the job's last row in job_events: each state change bumps it in its own UPDATE,
    # so the event's seq comes back with the moved row (no read of job_events to number it)
    event_seq: int = Field(default=0)


class WorkerRow(SQLModel, table=True):
    """A worker's last heartbeat and the models it serves (name, version, provider)."""

    __tablename__ = "workers"

    worker_id: str = Field(primary_key=True, max_length=128)
    models: list[dict[str, str]] = Field(
        default_factory=list, sa_column=Column(_json(), nullable=False)
    )
    heartbeat_at: datetime = Field(sa_type=UTCDateTime)


def jobs_table() -> Table:
    return cast("Table", JobRow.__table__)  # type: ignore[attr-defined]


def workers_table() -> Table:
    return cast("Table", WorkerRow.__table__)  # type: ignore[attr-defined]
