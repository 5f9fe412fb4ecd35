"""JobStore.create_many: the rows of a bulk submit in one transaction, each job judged as
``create`` would judge it alone (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading

from jobstore.errors import IdempotencyConflict
from jobstore.store import JobStore
from schemas.jobs import JobStatus
from tests.test_jobstore import new_job, store

__all__ = ["store"]  # the parametrized fixture (SQLite, PostgreSQL)


def test_creates_every_job_in_order(store: JobStore) -> None:
    out = store.create_many([new_job(f"j{i}") for i in range(5)])
    assert [(r.id, created) for r, created in out] == [(f"j{i}", True) for i in range(5)]  # type: ignore[misc]
    got = store.get_many([f"j{i}" for i in range(5)])
    assert {r.status for r in got.values()} == {JobStatus.QUEUED} and len(got) == 5


def test_replays_and_conflicts_against_existing_rows(store: JobStore) -> None:
    store.create(new_job("old", idempotency_key="k1", request_hash="h1"))
    out = store.create_many(
        [
            new_job("a", idempotency_key="k1", request_hash="h1"),  # a replay of "old"
            new_job("b", idempotency_key="k1", request_hash="other"),  # the key, another body
            new_job("c", idempotency_key="k2", request_hash="h2"),
        ]
    )
    assert out[0] == (store.get("old"), False)
    assert isinstance(out[1], IdempotencyConflict) and out[1].existing.id == "old"
    assert out[2][0].id == "c" and out[2][1] is True  # type: ignore[index]
    assert store.get("a") is None and store.get("b") is None


def test_the_same_key_twice_in_one_batch(store: JobStore) -> None:
    out = store.create_many(
        [
            new_job("first", idempotency_key="k", request_hash="h"),
            new_job("again", idempotency_key="k", request_hash="h"),
            new_job("differs", idempotency_key="k", request_hash="x"),
        ]
    )
    first = store.get("first")
    assert first is not None
    assert out[0] == (first, True)
    assert out[1] == (first, False)
    assert isinstance(out[2], IdempotencyConflict) and out[2].existing.id == "first"
    assert store.get("again") is None and store.get("differs") is None


def test_empty_batch_writes_nothing(store: JobStore) -> None:
    assert store.create_many([]) == []


def test_racing_batches_with_a_shared_key_make_one_job(store: JobStore) -> None:
    """Concurrent bulk requests carrying the same key: one inserts, the others replay it
    (the losing INSERT falls back to judging each job alone)."""
    results: list[object] = []

    def submit(n: int) -> None:
        results.extend(
            store.create_many(
                [new_job(f"r{n}", idempotency_key="shared", request_hash="same"), new_job(f"u{n}")]
            )
        )

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    keyed = [r for r in results if isinstance(r, tuple) and r[0].idempotency_key == "shared"]
    assert len(keyed) == 6
    assert len({r[0].id for r in keyed}) == 1  # one job for the key
    assert sum(1 for r in keyed if r[1]) == 1  # created once
    assert all(store.get(f"u{n}") is not None for n in range(6))  # the unkeyed ones all made
