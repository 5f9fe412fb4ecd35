"""The job events log: every path that changes a job's status writes its event, in order,
with the job as it was then. Run on SQLite and on PostgreSQL (``store`` of test_jobstore)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select

from jobstore.errors import JobNotFound
from jobstore.events import EVENTS, parse_event_id
from jobstore.records import Outcome, Reschedule, utcnow
from jobstore.store import JobStore
from schemas.jobs import JobStatus
from tests.test_jobstore import new_job, succeeded
from tests.test_jobstore import store as store

S = JobStatus


def types(store: JobStore, job_id: str) -> list[str]:
    return [e.type for e in store.events_after(job_id)]


def test_a_job_run_to_success_has_queued_started_succeeded(store: JobStore) -> None:
    store.create(new_job("a"))
    (claimed,) = store.claim(["a"], worker_id="w", lease_s=60).claimed
    store.complete([succeeded("a", claimed.attempts)])
    events = store.events_after("a")
    assert [(e.id, e.seq, e.type) for e in events] == [
        ("a:1", 1, "job.queued"),
        ("a:2", 2, "job.started"),
        ("a:3", 3, "job.succeeded"),
    ]
    # each carries the job as it was at that event
    queued, started, done = (e.job for e in events)
    assert (queued.status, queued.attempts, queued.started_at) == (S.QUEUED, 0, None)
    assert (started.status, started.attempts, started.result) == (S.RUNNING, 1, None)
    assert started.started_at is not None and started.completed_at is None
    assert (done.status, done.result) == (S.SUCCEEDED, {"vector": [0.5, 0.25]})
    assert done.completed_at is not None and done.model == "minilm"
    now = store.get("a")
    assert now is not None and now.to_resource() == done  # the last event is the job now
    assert [e.seq for e in store.events_after("a", 1)] == [2, 3]
    assert store.events_after("a", 3) == []


def test_creation_paths_write_job_queued(store: JobStore) -> None:
    store.create(new_job("one"))
    created = store.create_many([new_job(f"m{i}") for i in range(3)])
    assert all(not isinstance(c, Exception) and c[1] for c in created)
    assert store.ensure([new_job("e1"), new_job("one")]) == ["e1"]  # "one" exists already
    for job_id in ("one", "m0", "m1", "m2", "e1"):
        assert types(store, job_id) == ["job.queued"], job_id
    # a replayed idempotency key writes nothing
    store.create(new_job("k1", idempotency_key="key", request_hash="h"))
    assert store.create(new_job("k2", idempotency_key="key", request_hash="h"))[1] is False
    assert types(store, "k1") == ["job.queued"]
    with pytest.raises(JobNotFound):
        store.events_after("k2")


def test_failures_retries_and_redelivery(store: JobStore) -> None:
    store.create_many([new_job("f"), new_job("r"), new_job("p")])
    claim = store.claim(["f", "r"], worker_id="w", lease_s=60)
    attempts = {c.id: c.attempts for c in claim.claimed}
    later = utcnow() + timedelta(seconds=30)
    store.complete(
        [Outcome("f", attempts["f"], S.FAILED, error_code="inference_failed", error_message="x")],
        [Reschedule("r", attempts["r"], later, "inference_failed", "flaky")],
    )
    assert types(store, "f") == ["job.queued", "job.started", "job.failed"]
    failed = store.events_after("f", 2)[0].job
    assert failed.error is not None and failed.error.code == "inference_failed"
    assert types(store, "r") == ["job.queued", "job.started", "job.queued"]
    waiting = store.events_after("r", 2)[0].job
    assert waiting.next_attempt_at is not None and waiting.error is not None
    # the retry pump's holds and releases are not state changes
    store.due_retries(now=later + timedelta(seconds=1))
    store.retries_published(["r"])
    store.stranded(idle_s=0, now=utcnow() + timedelta(hours=1))
    assert types(store, "r") == ["job.queued", "job.started", "job.queued"]
    # a redelivered claim (its owner died) is another start
    store.claim(["r"], worker_id="w", lease_s=60, due=["r"])
    store.claim(["r"], worker_id="w2", lease_s=60)
    assert types(store, "r")[-2:] == ["job.started", "job.started"]
    assert store.events_after("r", 4)[0].job.attempts == 3
    # a poison message
    assert store.fail_unstarted("p", "invalid_input", "bad")
    assert types(store, "p") == ["job.queued", "job.failed"]


def test_cancel_expiry_and_lapsed_leases(store: JobStore) -> None:
    now = utcnow()
    store.create_many(
        [
            new_job("c"),
            new_job("x", expires_at=now - timedelta(seconds=1)),
            new_job("y", expires_at=now - timedelta(seconds=1)),
            new_job("s1"),
            new_job("s2"),
        ]
    )
    store.cancel("c")
    assert types(store, "c") == ["job.queued", "job.cancelled"]
    assert sorted(store.expire_overdue(now=now)) == ["x", "y"]
    for job_id in ("x", "y"):
        assert types(store, job_id) == ["job.queued", "job.expired"]
        assert store.events_after(job_id, 1)[0].job.error is not None
    # the claim that finds a job too late expires it too
    store.create(new_job("z", expires_at=now - timedelta(seconds=1)))
    store.claim(["z"], worker_id="w", lease_s=60)
    assert types(store, "z") == ["job.queued", "job.expired"]
    # the sweeps of lapsed leases: back to queued, or failed after the last attempt
    store.claim(["s1", "s2"], worker_id="w", lease_s=1, now=now)
    after = now + timedelta(seconds=5)
    assert store.requeue_stale("s1", 1, now=after)
    assert store.fail_stale("s2", 1, "lapsed", now=after)
    assert types(store, "s1") == ["job.queued", "job.started", "job.queued"]
    assert types(store, "s2") == ["job.queued", "job.started", "job.failed"]


def test_redrive_abandon_delete_and_purge(store: JobStore) -> None:
    store.create_many([new_job("d"), new_job("ab"), new_job("gone"), new_job("old")])
    assert store.fail_unstarted("d", "attempts_exhausted", "dead")
    assert [r.id for r in store.requeue_failed(["d"])] == ["d"]
    assert store.restore_failed("d", "publish_unavailable", "redrive publish failed")
    assert types(store, "d") == ["job.queued", "job.failed", "job.queued", "job.failed"]
    assert store.abandon_unpublished("ab", "publish_unavailable", "never acknowledged")
    assert types(store, "ab") == ["job.queued", "job.failed"]
    # a job removed, or purged, takes its events with it
    assert store.delete_unpublished("gone")
    with pytest.raises(JobNotFound):
        store.events_after("gone")
    (claimed,) = store.claim(["old"], worker_id="w", lease_s=60).claimed
    store.complete([succeeded("old", claimed.attempts)])
    assert store.purge_finished(before=utcnow() + timedelta(days=1)) >= 1
    with store.engine.begin() as conn:
        left = set(conn.scalars(select(EVENTS.c.job_id).distinct()))
    assert "old" not in left and "gone" not in left


def test_a_batch_of_outcomes_numbers_each_job_on_its_own(store: JobStore) -> None:
    ids = [f"b{i}" for i in range(40)]
    store.create_many([new_job(i) for i in ids])
    claimed = store.claim(ids, worker_id="w", lease_s=60).claimed
    store.complete([succeeded(c.id, c.attempts) for c in claimed])
    with store.engine.begin() as conn:
        total = conn.scalar(select(func.count()).select_from(EVENTS))
    assert total == 3 * len(ids)
    for job_id in ids:
        assert [e.seq for e in store.events_after(job_id)] == [1, 2, 3]


def test_the_relay_sees_unpublished_events_in_order_without_job_queued(store: JobStore) -> None:
    log = store.event_log
    store.create_many([new_job("j1"), new_job("j2")])
    assert log.pending(100) == []  # job.queued is for the stream only
    claimed = store.claim(["j1", "j2"], worker_id="w", lease_s=60).claimed
    store.complete([succeeded(c.id, c.attempts) for c in claimed])
    pending = log.pending(100)
    assert [(e.job_id, e.type) for e in pending if e.job_id == "j1"] == [
        ("j1", "job.started"),
        ("j1", "job.succeeded"),
    ]
    assert [e.position for e in pending] == sorted(e.position for e in pending)
    log.mark_published([e.position for e in pending[:2]])
    assert log.pending(100) == pending[2:]
    log.mark_published([e.position for e in pending[2:]])
    assert log.pending(100) == [] and log.unpublished() == 0


def test_one_relay_holds_the_lease_at_a_time(store: JobStore) -> None:
    log = store.event_log
    now = utcnow()
    assert log.hold_lease("events", "a", 10, now=now)
    assert not log.hold_lease("events", "b", 10, now=now)
    assert log.hold_lease("events", "a", 10, now=now + timedelta(seconds=5))  # renewed
    assert not log.hold_lease("events", "b", 10, now=now + timedelta(seconds=12))
    assert log.hold_lease("events", "b", 10, now=now + timedelta(seconds=16))  # it lapsed
    log.release_lease("events", "b")
    assert log.hold_lease("events", "a", 10)


@pytest.mark.parametrize(
    ("value", "seq"),
    [
        ("job-1:0", 0),
        ("job-1:7", 7),
        ("job-1:x", None),
        ("job-2:1", None),
        ("", None),
        ("job-1:-1", None),
        ("job-1:1e3", None),
        ("job-1:99999999999", None),
        ("job-1:٣", None),
    ],
)
def test_event_ids_parse_only_for_their_job(value: str, seq: int | None) -> None:
    assert parse_event_id("job-1", value) == seq
