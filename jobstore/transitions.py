"""The job state machine, written down once, and the one guarded UPDATE that moves rows.

``ALLOWED`` says which status may become which. Each change the store makes is a named
``Transition`` (checked against ``ALLOWED`` when it is defined), and ``move`` is the only
UPDATE that applies one: it touches a row only while its status is one of the transition's
sources, so a row that moved on concurrently is left alone and simply not returned. A
transition that ``emits`` also appends the job event of each moved row (jobstore/events.py)
in the same transaction, so no path can change a status without its event.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any

from sqlalchemy import ColumnElement, Connection, Update, update

from jobstore import events
from jobstore.records import JobRecord, utcnow
from jobstore.sql import JOBS, chunked, row_record
from schemas.jobs import JobStatus

_Q = JobStatus.QUEUED
_R = JobStatus.RUNNING

# status -> the statuses it may become. A status may "become" itself: a redelivered job is
# claimed again while running, and a waiting retry's not-before moves while it stays queued.
ALLOWED: Mapping[JobStatus, frozenset[JobStatus]] = MappingProxyType(
    {
        _Q: frozenset({_Q, _R, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED}),
        _R: frozenset({_R, _Q, JobStatus.SUCCEEDED, JobStatus.FAILED}),
        JobStatus.FAILED: frozenset({_Q}),  # a redrive from the dead-letter queue
        JobStatus.SUCCEEDED: frozenset(),
        JobStatus.CANCELLED: frozenset(),
        JobStatus.EXPIRED: frozenset(),
    }
)


@dataclass(frozen=True)
class Transition:
    """A move the store makes: a row in one of ``sources`` becomes one of ``targets``."""

    name: str
    sources: frozenset[JobStatus]
    targets: frozenset[JobStatus]
    # a state change that clients see (a job event); the retry pump's holds are not
    emits: bool = True

    def __post_init__(self) -> None:
        if not self.sources or not self.targets:
            raise ValueError(f"transition {self.name!r} needs a source and a target")
        illegal = sorted(
            f"{s} -> {t}" for s in self.sources for t in self.targets if t not in ALLOWED[s]
        )
        if illegal:
            raise ValueError(f"transition {self.name!r} is not allowed: {', '.join(illegal)}")

    def allows(self, status: str | JobStatus) -> bool:
        """Whether a row in ``status`` would move (the Python side of ``guard``)."""
        return JobStatus(status) in self.sources

    def guard(self) -> ColumnElement[bool]:
        """The WHERE clause on the row's current status."""
        if len(self.sources) == 1:
            # ``=``, not a one-element IN: an expanding IN cannot run executemany-style
            (only,) = self.sources
            return JOBS.c.status == only.value
        return JOBS.c.status.in_(sorted(s.value for s in self.sources))


def _transition(
    name: str, sources: Iterable[JobStatus], *targets: JobStatus, emits: bool = True
) -> Transition:
    return Transition(name, frozenset(sources), frozenset(targets), emits)


# Every move the store makes. A new one is added here, or it cannot be applied.
CLAIM = _transition("claim", {_Q, _R}, _R)  # running again: a redelivery, its owner died
EXPIRE = _transition("expire", {_Q}, JobStatus.EXPIRED)
COMPLETE = _transition("complete", {_R}, JobStatus.SUCCEEDED, JobStatus.FAILED)
RESCHEDULE = _transition("reschedule", {_R}, _Q)  # a retry waits out its backoff
HOLD_RETRY = _transition("hold_retry", {_Q}, _Q, emits=False)  # the pump takes a due retry
RELEASE_RETRY = _transition("release_retry", {_Q}, _Q, emits=False)  # ... and published it
# its message was lost: publish again
HOLD_STRANDED = _transition("hold_stranded", {_Q}, _Q, emits=False)
REDRIVE = _transition("redrive", {JobStatus.FAILED}, _Q)
RESTORE_FAILED = _transition("restore_failed", {_Q}, JobStatus.FAILED)  # its redrive failed
FAIL_UNSTARTED = _transition("fail_unstarted", {_Q, _R}, JobStatus.FAILED)  # poison message
CANCEL = _transition("cancel", {_Q}, JobStatus.CANCELLED)
ABANDON_UNPUBLISHED = _transition("abandon_unpublished", {_Q}, JobStatus.FAILED)
REQUEUE_STALE = _transition("requeue_stale", {_R}, _Q)  # its lease ran out
FAIL_STALE = _transition("fail_stale", {_R}, JobStatus.FAILED)  # ... after the last attempt

TRANSITIONS: tuple[Transition, ...] = (
    CLAIM,
    EXPIRE,
    COMPLETE,
    RESCHEDULE,
    HOLD_RETRY,
    RELEASE_RETRY,
    HOLD_STRANDED,
    REDRIVE,
    RESTORE_FAILED,
    FAIL_UNSTARTED,
    CANCEL,
    ABANDON_UNPUBLISHED,
    REQUEUE_STALE,
    FAIL_STALE,
)


def failure(code: str, message: str, now: datetime, *, retryable: bool) -> dict[str, Any]:
    """What a move to failed writes (a lease, if the job had one, is the caller's to clear)."""
    return {
        "error_code": code,
        "error_message": message,
        "error_retryable": retryable,
        "completed_at": now,
        "updated_at": now,
    }


def guarded(transition: Transition, *where: ColumnElement[bool]) -> Update:
    """UPDATE jobs WHERE <status is one of the sources> AND ``where``."""
    return update(JOBS).where(transition.guard(), *where)


def move(
    conn: Connection,
    transition: Transition,
    ids: Iterable[str],
    values: Mapping[str, Any],
    *where: ColumnElement[bool],
) -> list[JobRecord]:
    """Apply ``transition`` to those of ``ids`` still in a source status (and matching
    ``where``), in the caller's transaction; the records of the rows that moved, as now.
    Their job events are written too when the transition emits."""
    moved: list[JobRecord] = []
    for statement in _statements(transition, ids, values, where):
        rows = conn.execute(statement.returning(JOBS)).mappings()
        moved.extend(row_record(row) for row in rows)
    if transition.emits and moved:
        at = values.get("updated_at")
        events.write(conn, moved, at if isinstance(at, datetime) else utcnow())
    return moved


def move_ids(
    conn: Connection,
    transition: Transition,
    ids: Iterable[str],
    values: Mapping[str, Any],
    *where: ColumnElement[bool],
) -> list[str]:
    """``move``, returning only the ids of the rows that moved (no rows to decode, unless
    the transition emits: its events need them)."""
    if transition.emits:
        return [r.id for r in move(conn, transition, ids, values, *where)]
    moved: list[str] = []
    for statement in _statements(transition, ids, values, where):
        moved.extend(conn.scalars(statement.returning(JOBS.c.id)))
    return moved


def _statements(
    transition: Transition,
    ids: Iterable[str],
    values: Mapping[str, Any],
    where: Sequence[ColumnElement[bool]],
) -> Iterable[Update]:
    values = _with_status(transition, values)
    if transition.emits:
        values["event_seq"] = JOBS.c.event_seq + 1
    for chunk in chunked(list(dict.fromkeys(ids))):
        yield guarded(transition, JOBS.c.id.in_(chunk), *where).values(values)


def _with_status(transition: Transition, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with the target status set, refusing one that the transition lacks."""
    status = values.get("status")
    if status is None:
        if len(transition.targets) != 1:
            raise ValueError(f"transition {transition.name!r} needs a status among its targets")
        (target,) = transition.targets
        return {**values, "status": target.value}
    if JobStatus(status) not in transition.targets:
        raise ValueError(f"transition {transition.name!r} cannot set status {status!r}")
    return {**values, "status": JobStatus(status).value}
