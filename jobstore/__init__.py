"""The job store: job rows, their state transitions, and worker heartbeats (SQLite/PostgreSQL)."""

from jobstore.errors import (
    DuplicateJob,
    IdempotencyConflict,
    IllegalTransition,
    InvalidCursor,
    JobNotFound,
    JobStoreError,
    StoreUnavailable,
)
from jobstore.records import ClaimResult, JobRecord, NewJob, Outcome, utcnow
from jobstore.store import JobStore, normalise_url

__all__ = [
    "ClaimResult",
    "DuplicateJob",
    "IdempotencyConflict",
    "IllegalTransition",
    "InvalidCursor",
    "JobNotFound",
    "JobRecord",
    "JobStore",
    "JobStoreError",
    "NewJob",
    "Outcome",
    "StoreUnavailable",
    "normalise_url",
    "utcnow",
]
