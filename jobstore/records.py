"""The store's own records: what goes in and what comes out, free of ORM state."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from schemas.envelope import JobEnvelope
from schemas.jobs import JobError, JobRequest, JobResource, JobStatus, WebhookSpec


def utcnow() -> datetime:
    return datetime.now(UTC)


def require_aware(value: datetime, name: str) -> datetime:
    """Refuse naive datetimes: a guessed zone is a silent bug on the next DST change."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got {value!r}")
    return value.astimezone(UTC)


@dataclass(frozen=True)
class NewJob:
    id: str
    model: str
    version: str | None
    input: dict[str, Any]
    priority: int = 5
    expires_at: datetime | None = None
    metadata: dict[str, Any] | None = None
    webhook: dict[str, Any] | None = None
    source: str | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    created_at: datetime = field(default_factory=utcnow)
    # False for a placeholder row (a message whose request could not be stored as sent):
    # the row then binds its id to no content
    bound: bool = True

    def __post_init__(self) -> None:
        require_aware(self.created_at, "created_at")
        if self.expires_at is not None:
            require_aware(self.expires_at, "expires_at")


def content_hash(job: NewJob) -> str:
    """The request a job id is bound to, as a hash.

    The same request hashes the same however it travelled (API row, bus event, retry pump,
    sweep re-publish, DLQ redrive): only what the row keeps counts, not the event's time,
    ttl or encoding. The source is compared on its own, so a refusal can say which differs.
    """
    doc = {
        "model": job.model,
        "version": job.version,
        "input": job.input,
        "priority": job.priority,
        "metadata": job.metadata,
        "webhook": _webhook(job.webhook),
    }
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _webhook(spec: dict[str, Any] | None) -> Any:
    """A webhook as a bus event carries it (defaults filled in, URL normalised), so a row
    written with a bare ``{"url": ...}`` binds the same request as its re-published event."""
    if spec is None:
        return None
    try:
        return WebhookSpec.model_validate(spec).model_dump(mode="json")
    except ValueError:
        return spec


@dataclass(frozen=True)
class Binding:
    """What a bus event claims for its id: its source and the hashes of its request (an
    input read from a URL may hash as the URL or as its content)."""

    source: str | None
    hashes: frozenset[str]


@dataclass(frozen=True)
class JobRecord:
    """Everything in a job row; datetimes are timezone-aware UTC."""

    id: str
    status: JobStatus
    model: str
    version: str | None
    input: dict[str, Any]
    result: dict[str, Any] | None
    error_code: str | None
    error_message: str | None
    error_retryable: bool
    attempts: int
    priority: int
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    expires_at: datetime | None
    metadata: dict[str, Any] | None
    webhook: dict[str, Any] | None
    source: str | None
    idempotency_key: str | None
    request_hash: str | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    updated_at: datetime
    retry_at: datetime | None = None
    content_hash: str | None = None  # None: the id is bound to no content (older rows)
    event_seq: int = 0  # seq of its last job event (jobstore/events.py)

    @property
    def terminal(self) -> bool:
        return self.status.terminal

    def to_resource(self) -> JobResource:
        error = None
        if self.error_code is not None:
            error = JobError(
                code=self.error_code,
                message=self.error_message or "",
                retryable=self.error_retryable,
            )
        return JobResource(
            id=self.id,
            status=self.status,
            model=self.model,
            version=self.version,
            result=self.result,
            error=error,
            attempts=self.attempts,
            priority=self.priority,
            created_at=self.created_at,
            started_at=self.started_at,
            completed_at=self.completed_at,
            next_attempt_at=self.retry_at,
            expires_at=self.expires_at,
            metadata=self.metadata,
            source=self.source,
        )


@dataclass(frozen=True)
class Outcome:
    """The result of one attempt; applied only if that attempt still owns the job."""

    job_id: str
    attempt: int
    status: JobStatus  # SUCCEEDED or FAILED
    result: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None
    retryable: bool = False
    completed_at: datetime = field(default_factory=utcnow)

    def __post_init__(self) -> None:
        if self.status not in (JobStatus.SUCCEEDED, JobStatus.FAILED):
            raise ValueError(f"an outcome is succeeded or failed, not {self.status}")
        require_aware(self.completed_at, "completed_at")


@dataclass(frozen=True)
class ClaimResult:
    claimed: list[JobRecord]  # now running: attempts incremented, lease set
    skipped: dict[str, JobStatus]  # id -> the status that kept it from running
    missing: list[str]  # no such row
    # id -> why the event was refused: the id is bound to another request (row untouched)
    conflicts: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Reschedule:
    """A failed attempt that will be retried: running -> queued, not before ``retry_at``."""

    job_id: str
    attempt: int
    retry_at: datetime
    error_code: str
    error_message: str


# how a job row that was submitted with ``input_url`` keeps it in ``input``
INPUT_URL_KEY = "$input_url"


def envelope_of(record: JobRecord, default_source: str) -> JobEnvelope:
    """The bus event that runs ``record`` again: the same id, source, time and request
    (its ttl and its input or input_url), so a worker sees the request it was first given."""
    ttl_s = None
    if record.expires_at is not None:
        ttl_s = max(1, round((record.expires_at - record.created_at).total_seconds()))
    input_url = record.input.get(INPUT_URL_KEY) if len(record.input) == 1 else None
    request = JobRequest(
        model=record.model,
        version=record.version,
        input=None if isinstance(input_url, str) else record.input,
        input_url=input_url if isinstance(input_url, str) else None,
        webhook=WebhookSpec.model_validate(record.webhook) if record.webhook else None,
        priority=record.priority,
        ttl_s=ttl_s,
        metadata=record.metadata,
    )
    return JobEnvelope(
        id=record.id, source=record.source or default_source, time=record.created_at, data=request
    )
