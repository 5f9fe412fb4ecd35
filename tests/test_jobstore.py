"""JobStore contract, run on SQLite and on PostgreSQL (each test in a fresh schema)."""

from __future__ import annotations

import base64
import json
import random
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event
from sqlalchemy.pool import NullPool

from jobstore.errors import (
    DuplicateJob,
    IdempotencyConflict,
    IllegalTransition,
    InvalidCursor,
    JobNotFound,
    StoreUnavailable,
)
from jobstore.records import ClaimResult, NewJob, Outcome
from jobstore.store import JobStore, normalise_url
from schemas.jobs import JobResource, JobStatus

T0 = datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    if request.param == "sqlite":
        sqlite_store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
        sqlite_store.create_schema()
        yield sqlite_store
        sqlite_store.close()
        return
    url: str = request.getfixturevalue("postgres_url")
    schema = f"t_{uuid.uuid4().hex}"
    admin = create_engine(url, poolclass=NullPool)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    pg_store = JobStore(url, schema=schema)
    try:
        pg_store.create_schema()
        yield pg_store
    finally:
        pg_store.close()
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


def new_job(job_id: str, **overrides: Any) -> NewJob:
    fields: dict[str, Any] = {
        "id": job_id,
        "model": "minilm",
        "version": "1",
        "input": {"text": f"hello {job_id}"},
        "created_at": T0,
    }
    fields.update(overrides)
    return NewJob(**fields)


def succeeded(job_id: str, attempt: int, **overrides: Any) -> Outcome:
    fields: dict[str, Any] = {
        "job_id": job_id,
        "attempt": attempt,
        "status": JobStatus.SUCCEEDED,
        "result": {"vector": [0.5, 0.25]},
    }
    fields.update(overrides)
    return Outcome(**fields)


# --- create / get ---------------------------------------------------------------------------


def test_create_get_round_trip_keeps_aware_utc(store: JobStore) -> None:
    plus_two = timezone(timedelta(hours=2))
    job = new_job(
        "job-1",
        created_at=datetime(2030, 1, 2, 5, 4, 5, 123456, tzinfo=plus_two),
        expires_at=datetime(2030, 1, 2, 6, 0, tzinfo=plus_two),
        metadata={"tenant": "acme", "nested": {"a": [1, 2]}},
        webhook={"url": "https://example.com/hook", "events": ["job.succeeded"]},
        source="urn:svc:test",
        priority=7,
    )
    created, was_created = store.create(job)
    assert was_created
    fetched = store.get("job-1")
    assert fetched == created
    assert fetched.status is JobStatus.QUEUED
    assert fetched.attempts == 0
    assert fetched.input == {"text": "hello job-1"}
    assert fetched.metadata == {"tenant": "acme", "nested": {"a": [1, 2]}}
    assert fetched.webhook == {"url": "https://example.com/hook", "events": ["job.succeeded"]}
    assert fetched.source == "urn:svc:test"
    assert fetched.priority == 7
    assert fetched.result is None and fetched.error_code is None
    assert fetched.created_at == T0
    assert fetched.created_at.tzinfo is UTC
    assert fetched.expires_at == datetime(2030, 1, 2, 4, 0, tzinfo=UTC)
    assert fetched.expires_at is not None and fetched.expires_at.tzinfo is UTC
    assert fetched.updated_at.tzinfo is UTC
    resource = fetched.to_resource()
    assert isinstance(resource, JobResource)
    assert resource.error is None
    assert resource.metadata == {"tenant": "acme", "nested": {"a": [1, 2]}}
    assert store.get("nope") is None
    assert store.get_many(["job-1", "nope", "job-1"]) == {"job-1": fetched}


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        new_job("naive", created_at=datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="succeeded or failed"):
        Outcome("x", 1, JobStatus.RUNNING)


def test_duplicate_id_is_refused(store: JobStore) -> None:
    store.create(new_job("dup"))
    with pytest.raises(DuplicateJob):
        store.create(new_job("dup", input={"text": "other"}))
    record = store.get("dup")
    assert record is not None and record.input == {"text": "hello dup"}


def test_idempotency_replay_and_conflict(store: JobStore) -> None:
    first, created = store.create(new_job("a", idempotency_key="key-1", request_hash="h1"))
    assert created
    replay, created = store.create(new_job("b", idempotency_key="key-1", request_hash="h1"))
    assert not created
    assert replay == first
    assert store.get("b") is None
    with pytest.raises(IdempotencyConflict) as info:
        store.create(new_job("c", idempotency_key="key-1", request_hash="h2"))
    assert info.value.existing.id == "a"
    assert store.get("c") is None
    # Different keys, same body: two jobs.
    _, created = store.create(new_job("d", idempotency_key="key-2", request_hash="h1"))
    assert created


def test_concurrent_creates_with_one_key_make_one_row(store: JobStore) -> None:
    threads = 8
    barrier = threading.Barrier(threads)
    results: list[tuple[str, bool]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def submit(n: int) -> None:
        try:
            barrier.wait()
            record, created = store.create(
                new_job(f"race-{n}", idempotency_key="shared", request_hash="same")
            )
            with lock:
                results.append((record.id, created))
        except BaseException as exc:
            with lock:
                errors.append(exc)

    workers = [threading.Thread(target=submit, args=(n,)) for n in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert errors == []
    assert sum(created for _, created in results) == 1
    assert len({job_id for job_id, _ in results}) == 1
    assert store.counts()[JobStatus.QUEUED] == 1


# --- ensure ----------------------------------------------------------------------------------


def test_ensure_inserts_only_absent_rows(store: JobStore) -> None:
    store.create(new_job("present", input={"text": "original"}))
    inserted = store.ensure(
        [
            new_job("present", input={"text": "replaced?"}),
            new_job("fresh-1"),
            new_job("fresh-2"),
            new_job("fresh-1", input={"text": "second copy"}),
        ]
    )
    assert inserted == ["fresh-1", "fresh-2"]
    present = store.get("present")
    assert present is not None and present.input == {"text": "original"}
    fresh = store.get("fresh-1")
    assert fresh is not None and fresh.input == {"text": "hello fresh-1"}
    assert store.ensure([new_job("fresh-1"), new_job("fresh-2")]) == []
    assert store.ensure([]) == []
    # A taken idempotency key is a conflict too: the row is skipped, the batch goes on.
    store.create(new_job("keyed", idempotency_key="k", request_hash="h"))
    assert store.ensure([new_job("same-key", idempotency_key="k"), new_job("free")]) == ["free"]
    assert store.get("same-key") is None


# --- claim -----------------------------------------------------------------------------------


def test_claim_queued_then_redelivered(store: JobStore) -> None:
    store.create(new_job("j"))
    now = T0 + timedelta(seconds=10)
    first = store.claim(["j"], worker_id="w1", lease_s=30, now=now)
    assert first.skipped == {} and first.missing == []
    (running,) = first.claimed
    assert running.status is JobStatus.RUNNING
    assert running.attempts == 1
    assert running.started_at == now
    assert running.lease_owner == "w1"
    assert running.lease_expires_at == now + timedelta(seconds=30)
    assert store.get("j") == running

    later = now + timedelta(minutes=5)
    second = store.claim(["j"], worker_id="w2", lease_s=30, now=later)
    (again,) = second.claimed
    assert again.attempts == 2
    assert again.started_at == now  # the first start is kept
    assert again.lease_owner == "w2"
    assert again.lease_expires_at == later + timedelta(seconds=30)


def test_claim_skips_terminal_cancelled_and_expired(store: JobStore) -> None:
    now = T0 + timedelta(hours=1)
    store.create(new_job("done"))
    store.create(new_job("cancelled"))
    store.create(new_job("stale", expires_at=now - timedelta(seconds=1)))
    store.create(new_job("fresh", expires_at=now + timedelta(seconds=60)))
    store.claim(["done"], worker_id="w", lease_s=30, now=now)
    assert store.complete([succeeded("done", 1)]) == ["done"]
    store.cancel("cancelled")

    result = store.claim(
        ["done", "cancelled", "stale", "fresh", "ghost", "fresh", "ghost"],
        worker_id="w",
        lease_s=30,
        now=now,
    )
    assert [r.id for r in result.claimed] == ["fresh"]
    assert result.claimed[0].attempts == 1
    assert result.skipped == {
        "done": JobStatus.SUCCEEDED,
        "cancelled": JobStatus.CANCELLED,
        "stale": JobStatus.EXPIRED,
    }
    assert result.missing == ["ghost"]
    stale = store.get("stale")
    assert stale is not None
    assert stale.status is JobStatus.EXPIRED
    assert stale.error_code == "job_expired"
    assert stale.completed_at == now
    assert stale.attempts == 0
    assert stale.to_resource().error is not None


def test_claim_duplicates_in_input_claimed_once(store: JobStore) -> None:
    store.ensure([new_job(f"d{i}") for i in range(3)])
    result = store.claim(["d0", "d1", "d0", "d2", "d1"], worker_id="w", lease_s=5)
    assert [r.id for r in result.claimed] == ["d0", "d1", "d2"]
    assert all(r.attempts == 1 for r in result.claimed)
    assert store.claim([], worker_id="w", lease_s=5) == ClaimResult([], {}, [])


def test_concurrent_claims_never_lose_an_attempt(store: JobStore) -> None:
    ids = [f"c{i:03d}" for i in range(200)]
    store.ensure([new_job(i) for i in ids])
    claimers = 4
    barrier = threading.Barrier(claimers)
    errors: list[BaseException] = []

    def claim(n: int) -> None:
        batch = ids[:]
        random.Random(n).shuffle(batch)  # overlapping batches in different orders
        try:
            barrier.wait()
            store.claim(batch, worker_id=f"w{n}", lease_s=30)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(claimers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert {r.attempts for r in store.get_many(ids).values()} == {claimers}


# --- complete --------------------------------------------------------------------------------


def test_complete_applies_once_and_refuses_stale_attempts(store: JobStore) -> None:
    store.ensure([new_job("ok"), new_job("bad"), new_job("stale"), new_job("queued")])
    store.claim(["ok", "bad", "stale"], worker_id="w1", lease_s=30)
    store.claim(["stale"], worker_id="w2", lease_s=30)  # redelivered: attempt 2 owns it
    failed = Outcome(
        "bad",
        1,
        JobStatus.FAILED,
        error_code="invalid_input",
        error_message="text too long",
        retryable=False,
        completed_at=T0,
    )
    applied = store.complete(
        [
            succeeded("ok", 1, completed_at=T0),
            failed,
            succeeded("stale", 1),  # the crashed first attempt reports late
            succeeded("queued", 1),  # never claimed
            succeeded("ghost", 1),
            succeeded("ok", 1, result={"second": True}),  # duplicate in the batch
        ]
    )
    assert applied == ["ok", "bad"]
    ok = store.get("ok")
    assert ok is not None
    assert ok.status is JobStatus.SUCCEEDED
    assert ok.result == {"vector": [0.5, 0.25]}
    assert ok.completed_at == T0
    assert ok.lease_owner is None and ok.lease_expires_at is None
    assert ok.error_code is None
    bad = store.get("bad")
    assert bad is not None
    assert bad.status is JobStatus.FAILED
    assert bad.result is None
    assert (bad.error_code, bad.error_message, bad.error_retryable) == (
        "invalid_input",
        "text too long",
        False,
    )
    error = bad.to_resource().error
    assert error is not None and error.code == "invalid_input"
    stale = store.get("stale")
    assert stale is not None and stale.status is JobStatus.RUNNING and stale.attempts == 2

    # A second completion of the same attempt is refused: exactly one result stands.
    assert store.complete([succeeded("ok", 1, result={"again": True})]) == []
    ok_again = store.get("ok")
    assert ok_again is not None and ok_again.result == {"vector": [0.5, 0.25]}
    assert store.complete([succeeded("stale", 2)]) == ["stale"]
    assert store.complete([]) == []


def test_complete_bulk_thousand_outcomes(store: JobStore) -> None:
    ids = [f"bulk-{i:04d}" for i in range(1000)]
    store.ensure([new_job(i) for i in ids])
    claimed = store.claim(ids, worker_id="w", lease_s=60)
    assert len(claimed.claimed) == 1000
    outcomes = [succeeded(i, 1, result={"n": n}) for n, i in enumerate(ids)]
    started = time.perf_counter()
    applied = store.complete(outcomes)
    elapsed = time.perf_counter() - started
    print(f"\ncomplete() of 1000 outcomes on {store.engine.dialect.name}: {elapsed * 1000:.1f} ms")
    assert applied == ids
    assert store.counts()[JobStatus.SUCCEEDED] == 1000
    assert store.get("bulk-0999") is not None
    record = store.get("bulk-0999")
    assert record is not None and record.result == {"n": 999}


# --- other transitions -----------------------------------------------------------------------


def test_cancel(store: JobStore) -> None:
    store.ensure([new_job("q"), new_job("r")])
    cancelled = store.cancel("q")
    assert cancelled.status is JobStatus.CANCELLED
    assert cancelled.completed_at is not None
    assert store.get("q") == cancelled
    store.claim(["r"], worker_id="w", lease_s=30)
    with pytest.raises(IllegalTransition) as info:
        store.cancel("r")
    assert info.value.current is JobStatus.RUNNING
    running = store.get("r")
    assert running is not None and running.status is JobStatus.RUNNING
    with pytest.raises(IllegalTransition) as info:
        store.cancel("q")
    assert info.value.current is JobStatus.CANCELLED
    with pytest.raises(JobNotFound):
        store.cancel("ghost")


def test_fail_unstarted(store: JobStore) -> None:
    store.ensure([new_job("q"), new_job("r"), new_job("done")])
    store.claim(["r", "done"], worker_id="w", lease_s=30)
    store.complete([succeeded("done", 1)])
    assert store.fail_unstarted("q", "malformed_message", "not JSON")
    assert store.fail_unstarted("r", "invalid_envelope", "no data")
    assert not store.fail_unstarted("done", "malformed_message", "late")
    assert not store.fail_unstarted("ghost", "malformed_message", "none")
    q = store.get("q")
    assert q is not None
    assert (q.status, q.error_code, q.error_message) == (
        JobStatus.FAILED,
        "malformed_message",
        "not JSON",
    )
    r = store.get("r")
    assert r is not None and r.status is JobStatus.FAILED and r.lease_owner is None
    done = store.get("done")
    assert done is not None and done.status is JobStatus.SUCCEEDED


def test_delete_unpublished_only_touches_fresh_queued_rows(store: JobStore) -> None:
    store.ensure([new_job("fresh"), new_job("taken")])
    store.claim(["taken"], worker_id="w", lease_s=30)
    assert store.delete_unpublished("fresh")
    assert store.get("fresh") is None
    assert not store.delete_unpublished("taken")
    assert store.get("taken") is not None
    assert not store.delete_unpublished("ghost")


# --- list / counts ---------------------------------------------------------------------------


def _seed_for_listing(store: JobStore) -> list[NewJob]:
    jobs = []
    for n in range(23):
        # Groups of three share a created_at, so the id tiebreak decides their order.
        created_at = T0 + timedelta(seconds=n // 3)
        model = "minilm" if n % 2 == 0 else "identity"
        jobs.append(new_job(f"job-{n:02d}", created_at=created_at, model=model))
    random.Random(7).shuffle(jobs)
    store.ensure(jobs)
    return jobs


def _walk(store: JobStore, **filters: Any) -> tuple[list[str], int]:
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        page, cursor = store.list(limit=5, cursor=cursor, **filters)
        pages += 1
        seen.extend(r.id for r in page)
        if cursor is None:
            return seen, pages
        assert pages < 50


def test_list_pages_newest_first_without_gaps(store: JobStore) -> None:
    jobs = _seed_for_listing(store)
    expected = [j.id for j in sorted(jobs, key=lambda j: (j.created_at, j.id), reverse=True)]
    seen, pages = _walk(store)
    assert seen == expected
    assert len(seen) == len(set(seen)) == 23
    assert pages == 5

    seen_minilm, _ = _walk(store, model="minilm")
    assert seen_minilm == [i for i in expected if int(i[-2:]) % 2 == 0]

    store.claim(["job-00", "job-05", "job-10"], worker_id="w", lease_s=30)
    running, _ = _walk(store, status=JobStatus.RUNNING)
    assert running == ["job-10", "job-05", "job-00"]
    queued_minilm, _ = _walk(store, status=JobStatus.QUEUED, model="minilm")
    assert queued_minilm == [i for i in seen_minilm if i not in {"job-00", "job-10"}]

    exact, cursor = store.list(limit=23)
    assert len(exact) == 23 and cursor is None
    empty, cursor = store.list(model="nothing")
    assert empty == [] and cursor is None


@pytest.mark.parametrize(
    "cursor",
    [
        "not base64 !!",
        base64.urlsafe_b64encode(b"not json").decode(),
        base64.urlsafe_b64encode(b'{"a": 1, "b": 2}').decode(),
        base64.urlsafe_b64encode(json.dumps(["2030-01-01T00:00:00", "x"]).encode()).decode(),
        base64.urlsafe_b64encode(json.dumps(["yesterday", "x"]).encode()).decode(),
        base64.urlsafe_b64encode(json.dumps([1, 2]).encode()).decode(),
        "",
    ],
)
def test_malformed_cursor(store: JobStore, cursor: str) -> None:
    with pytest.raises(InvalidCursor):
        store.list(cursor=cursor)


def test_counts_and_backlog(store: JobStore) -> None:
    store.ensure([new_job(f"m{i}") for i in range(4)] + [new_job("other", model="identity")])
    store.claim(["m0", "m1", "other"], worker_id="w", lease_s=30)
    store.complete([succeeded("m0", 1)])
    store.cancel("m2")
    counts = store.counts()
    assert set(counts) == set(JobStatus)
    assert counts[JobStatus.QUEUED] == 1
    assert counts[JobStatus.RUNNING] == 2
    assert counts[JobStatus.SUCCEEDED] == 1
    assert counts[JobStatus.CANCELLED] == 1
    assert counts[JobStatus.FAILED] == counts[JobStatus.EXPIRED] == 0
    assert store.counts(model="identity")[JobStatus.RUNNING] == 1
    assert store.counts(model="identity")[JobStatus.QUEUED] == 0
    assert store.backlog() == 3


# --- workers ---------------------------------------------------------------------------------


def test_heartbeat_upsert_and_provider_freshness(store: JobStore) -> None:
    now = T0
    store.heartbeat(
        "w1",
        [
            {"name": "minilm", "version": "1", "provider": "CUDAExecutionProvider"},
            {"name": "identity", "version": "1", "provider": "CPUExecutionProvider"},
        ],
        now=now - timedelta(seconds=5),
    )
    store.heartbeat(
        "w2",
        [{"name": "minilm", "version": "1", "provider": "CPUExecutionProvider"}],
        now=now - timedelta(seconds=120),
    )
    assert store.providers(max_age_s=30, now=now) == {
        ("minilm", "1"): {"CUDAExecutionProvider"},
        ("identity", "1"): {"CPUExecutionProvider"},
    }
    # w2 beats again (upsert), now serving version 2 only.
    store.heartbeat(
        "w2", [{"name": "minilm", "version": "2", "provider": "CPUExecutionProvider"}], now=now
    )
    assert store.providers(max_age_s=30, now=now) == {
        ("minilm", "1"): {"CUDAExecutionProvider"},
        ("minilm", "2"): {"CPUExecutionProvider"},
        ("identity", "1"): {"CPUExecutionProvider"},
    }
    assert store.providers(max_age_s=30, now=now + timedelta(minutes=10)) == {}


# --- plumbing --------------------------------------------------------------------------------


def test_ping_and_schema_are_idempotent(store: JobStore) -> None:
    store.ping()
    store.create_schema()
    store.ping()


def test_unreachable_databases_raise_store_unavailable(tmp_path: Path) -> None:
    pg = JobStore("postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(StoreUnavailable) as info:
        pg.ping()
    assert info.value.__cause__ is not None
    pg.close()
    lite = JobStore(f"sqlite:///{tmp_path / 'missing-dir' / 'jobs.db'}")
    with pytest.raises(StoreUnavailable):
        lite.ping()
    lite.close()


def test_url_normalisation() -> None:
    assert normalise_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalise_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert normalise_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"
    assert normalise_url("sqlite:///x.db").drivername == "sqlite"
    with pytest.raises(ValueError):
        JobStore("sqlite:///x.db", schema="s")
    with pytest.raises(ValueError):
        JobStore("postgresql://u@h/db", schema="bad; drop")


def _plans(store: JobStore, **list_args: Any) -> list[str]:
    """EXPLAIN QUERY PLAN of the SELECT that store.list() really sends."""
    captured: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            captured.append((statement, params))

    event.listen(store.engine, "before_cursor_execute", capture)
    try:
        store.list(**list_args)
    finally:
        event.remove(store.engine, "before_cursor_execute", capture)
    ((statement, params),) = captured
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", params).all()
    return [row[-1] for row in rows]


def test_sqlite_list_queries_use_indexes(tmp_path: Path) -> None:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    try:
        _seed_for_listing(store)
        _, cursor = store.list(limit=5)
        cases: list[dict[str, Any]] = [
            {},
            {"status": JobStatus.QUEUED},
            {"status": JobStatus.QUEUED, "cursor": cursor},
            {"model": "minilm"},
            {"model": "minilm", "cursor": cursor},
            {"cursor": cursor},
            {"status": JobStatus.QUEUED, "model": "minilm", "cursor": cursor},
        ]
        for args in cases:
            plan = _plans(store, **args)
            assert any("USING INDEX" in step or "USING COVERING INDEX" in step for step in plan), (
                args,
                plan,
            )
            # No full scan of the table, and no sort of every matching row.
            assert "SCAN jobs" not in plan, (args, plan)
            assert not any("TEMP B-TREE" in step for step in plan), (args, plan)
    finally:
        store.close()
