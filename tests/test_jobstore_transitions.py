"""The job state machine: every move the store makes is one it allows, and nothing else moves.

Run on SQLite and on PostgreSQL (the ``store`` fixture of test_jobstore).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import ColumnElement, Update

import jobstore.transitions as transitions
from jobstore.errors import IllegalTransition
from jobstore.records import Outcome, Reschedule, utcnow
from jobstore.store import JobStore
from jobstore.transitions import (
    ALLOWED,
    CANCEL,
    CLAIM,
    COMPLETE,
    TRANSITIONS,
    Transition,
    move,
)
from schemas.jobs import JobStatus
from tests.test_jobstore import new_job, succeeded
from tests.test_jobstore import store as store

S = JobStatus


def test_the_machine_names_every_status_and_ends_in_the_terminal_ones() -> None:
    assert set(ALLOWED) == set(JobStatus)
    for status in JobStatus:
        if status.terminal and status is not S.FAILED:
            assert ALLOWED[status] == frozenset()
    # the one way out of a terminal status: a redrive of a failed job
    assert ALLOWED[S.FAILED] == {S.QUEUED}
    assert S.RUNNING not in ALLOWED[S.SUCCEEDED]


def test_every_named_transition_is_allowed_and_registered() -> None:
    for t in TRANSITIONS:
        for source in t.sources:
            assert t.targets <= ALLOWED[source], t.name
    defined = {v for v in vars(transitions).values() if isinstance(v, Transition)}
    assert defined == set(TRANSITIONS)
    assert len({t.name for t in TRANSITIONS}) == len(TRANSITIONS)


def test_a_disallowed_transition_cannot_be_defined() -> None:
    with pytest.raises(ValueError, match="succeeded -> running"):
        Transition("revive", frozenset({S.SUCCEEDED}), frozenset({S.RUNNING}))
    with pytest.raises(ValueError, match="cancelled -> queued"):
        Transition("uncancel", frozenset({S.CANCELLED, S.QUEUED}), frozenset({S.QUEUED}))


def test_a_succeeded_job_is_not_moved_to_running(store: JobStore) -> None:
    store.create(new_job("done"))
    (record,) = store.claim(["done"], worker_id="w", lease_s=60).claimed
    assert store.complete([succeeded("done", record.attempts)]) == ["done"]
    before = store.get("done")
    # through the helper directly: CLAIM's guard names queued and running only
    with store.writer.begin() as conn:
        assert move(conn, CLAIM, ["done"], {"lease_owner": "w2"}) == []
    # and through the store
    result = store.claim(["done"], worker_id="w2", lease_s=60)
    assert result.claimed == [] and result.skipped == {"done": S.SUCCEEDED}
    assert store.get("done") == before  # not a column changed


def test_a_move_refuses_a_status_outside_its_targets(store: JobStore) -> None:
    store.create(new_job("q"))
    with store.writer.begin() as conn:
        with pytest.raises(ValueError, match="cannot set status"):
            move(conn, CANCEL, ["q"], {"status": S.RUNNING.value})
        with pytest.raises(ValueError, match="needs a status"):
            move(conn, COMPLETE, ["q"], {})
    assert store.get("q").status is S.QUEUED  # type: ignore[union-attr]


class _Observer:
    """Runs store calls and records each (before, after) status change they made."""

    def __init__(self, store: JobStore, ids: Sequence[str]) -> None:
        self.store = store
        self.ids = list(ids)
        self.changes: set[tuple[JobStatus, JobStatus]] = set()

    def __call__(self, call: Callable[[], Any]) -> Any:
        before = self._statuses()
        result = call()
        after = self._statuses()
        for job_id, status in before.items():
            if job_id in after and after[job_id] is not status:
                self.changes.add((status, after[job_id]))
        return result

    def _statuses(self) -> dict[str, JobStatus]:
        return {i: r.status for i, r in self.store.get_many(self.ids).items()}


@pytest.fixture
def applied(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[str]]:
    """The names of the transitions that went through ``move``/``move_ids``."""
    names: set[str] = set()
    real = transitions._statements

    def spy(
        transition: Transition,
        ids: Iterable[str],
        values: Mapping[str, Any],
        where: Sequence[ColumnElement[bool]],
    ) -> Iterable[Update]:
        names.add(transition.name)
        return real(transition, ids, values, where)

    monkeypatch.setattr(transitions, "_statements", spy)
    yield names


def test_every_status_change_the_store_makes_is_allowed(store: JobStore, applied: set[str]) -> None:
    now = utcnow()
    later = now + timedelta(hours=1)
    ids = "abcdefghij"
    for job_id in ids:
        expires = now + timedelta(seconds=1) if job_id in "gh" else None
        store.create(new_job(job_id, created_at=now, expires_at=expires))
    assert store.ensure([new_job("k", created_at=now)]) == ["k"]
    see = _Observer(store, [*ids, "k"])

    def claim(job_id: str, **kwargs: Any) -> int:
        result = see(lambda: store.claim([job_id], worker_id="w", lease_s=1, **kwargs))
        return int(result.claimed[0].attempts) if result.claimed else -1

    # a: queued -> running -> running (redelivery) -> succeeded; a claim then skips it
    claim("a")
    attempt = claim("a")
    assert see(lambda: store.complete([succeeded("a", attempt)])) == ["a"]
    assert claim("a") == -1
    # b: running -> failed -> queued (redrive) -> failed (the redrive's publish failed)
    attempt = claim("b")
    failed = Outcome("b", attempt, S.FAILED, error_code="model_error", error_message="x")
    assert see(lambda: store.complete([failed])) == ["b"]
    assert [r.id for r in see(lambda: store.requeue_failed(["b"]))] == ["b"]
    assert see(lambda: store.restore_failed("b", "publish_failed", "broker down"))
    # c: running -> queued (a retry) -> held -> released -> running -> failed (poison)
    attempt = claim("c")
    retry = Reschedule("c", attempt, now + timedelta(seconds=60), "model_error", "again")
    assert see(lambda: store.complete([], [retry])) == ["c"]
    due = see(lambda: store.due_retries(now=now + timedelta(seconds=120)))
    assert [r.id for r in due] == ["c"]
    see(lambda: store.retries_published(["c"]))
    assert claim("c", due=["c"]) > 0
    assert see(lambda: store.fail_unstarted("c", "poison", "cannot decode"))
    # d: queued -> cancelled, and no further
    see(lambda: store.cancel("d"))
    with pytest.raises(IllegalTransition):
        see(lambda: store.cancel("d"))
    # e, f: a publish that was never acknowledged
    assert see(lambda: store.abandon_unpublished("e", "publish_failed", "no ack"))
    assert see(lambda: store.delete_unpublished("f"))
    # g, h: queued -> expired, at a claim and by the sweep
    assert see(lambda: store.claim(["g"], worker_id="w", lease_s=1, now=later)).skipped == {
        "g": S.EXPIRED
    }
    assert see(lambda: store.expire_overdue(now=later)) == ["h"]
    # i, j: a lapsed lease -> queued again, or failed after the last attempt
    attempt = claim("i")
    assert see(lambda: store.requeue_stale("i", attempt, now=later))
    attempt = claim("j")
    assert see(lambda: store.fail_stale("j", attempt, "lease ran out", now=later))
    # k: queued, untouched, its message lost: the pump takes it to publish it again
    look = see(lambda: store.stranded(idle_s=60, now=later, take=False))
    assert [r.id for r in look] == ["k"] and look[0].retry_at is None
    assert [r.id for r in see(lambda: store.stranded(idle_s=60, now=later))] == ["k"]
    assert see(lambda: store.purge_finished(before=later + timedelta(days=1))) == 8

    allowed = {(s, t) for s, targets in ALLOWED.items() for t in targets}
    assert see.changes <= allowed
    assert see.changes == {
        (S.QUEUED, S.RUNNING),
        (S.RUNNING, S.SUCCEEDED),
        (S.RUNNING, S.FAILED),
        (S.FAILED, S.QUEUED),
        (S.QUEUED, S.FAILED),
        (S.RUNNING, S.QUEUED),
        (S.QUEUED, S.CANCELLED),
        (S.QUEUED, S.EXPIRED),
    }
    # every transition but COMPLETE (a bulk statement on COMPLETE's guard) went through move
    assert applied == {t.name for t in TRANSITIONS} - {COMPLETE.name}
