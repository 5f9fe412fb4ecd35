"""Job store errors: one small hierarchy under JobStoreError."""

from __future__ import annotations

from typing import TYPE_CHECKING

from schemas.jobs import JobStatus

if TYPE_CHECKING:
    from jobstore.records import JobRecord


class JobStoreError(Exception):
    """Base of everything the job store raises on purpose."""


class JobNotFound(JobStoreError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id!r} not found")
        self.job_id = job_id


class IllegalTransition(JobStoreError):
    def __init__(self, job_id: str, current: JobStatus, target: JobStatus) -> None:
        super().__init__(f"job {job_id!r} is {current}, it cannot become {target}")
        self.job_id = job_id
        self.current = current
        self.target = target


class IdempotencyConflict(JobStoreError):
    """The idempotency key is taken by a job created from a different request."""

    def __init__(self, existing: JobRecord) -> None:
        super().__init__(
            f"idempotency key {existing.idempotency_key!r} was used for job {existing.id!r} "
            "with a different request"
        )
        self.existing = existing


class DuplicateJob(JobStoreError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id!r} already exists")
        self.job_id = job_id


class InvalidCursor(JobStoreError):
    def __init__(self, cursor: str) -> None:
        super().__init__("malformed pagination cursor")
        self.cursor = cursor


class StoreUnavailable(JobStoreError):
    """The database cannot be reached or refused the work for now; worth retrying."""
