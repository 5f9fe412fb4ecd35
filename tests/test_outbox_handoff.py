"""The pieces of the webhook handoff (issue 10): the job store names the outbox rows of each
transaction once it has committed, the outbox claims handed-over rows at most once (whichever
of the handoff and the sweep comes first), and the sender never holds up its caller."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from control.handoff import CelerySender, Handoff
from jobstore.outbox import AttemptResult, WebhookOutbox, enqueue_job_events, webhook_id
from jobstore.records import NewJob, Outcome, utcnow
from jobstore.store import JobStore
from schemas.jobs import JobStatus
from schemas.webhooks import DeliveryStatus
from tests.procs import wait_for
from webhooks.receiver import closed_port

HOOK: dict[str, object] = {"url": "https://example.com/hook"}


class Heard:
    """The store's listener: what it was told, and whether the rows were visible then."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.visible: list[bool] = []
        self.outbox: WebhookOutbox | None = None

    def __call__(self, ids: Sequence[str]) -> None:
        self.calls.append(list(ids))
        if self.outbox is not None:  # read on another connection: committed already?
            self.visible.append(all(self.outbox.get(i) is not None for i in ids))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def heard_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[JobStore, Heard]]:
    heard = Heard()
    if request.param == "sqlite":
        store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}", on_outbox=heard)
        store.create_schema()
        heard.outbox = WebhookOutbox(store.engine, writer=store.writer)
        yield store, heard
        store.close()
        return
    url: str = request.getfixturevalue("postgres_url")
    schema = f"t_{uuid.uuid4().hex}"
    admin = create_engine(url, poolclass=NullPool)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    store = JobStore(url, schema=schema, on_outbox=heard)
    try:
        store.create_schema()
        heard.outbox = WebhookOutbox(store.engine, writer=store.writer)
        yield store, heard
    finally:
        store.close()
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


def _run(store: JobStore, ids: list[str], webhook: dict[str, object] | None = HOOK) -> None:
    store.ensure(
        [NewJob(id=i, model="identity", version="1", input={}, webhook=webhook) for i in ids]
    )
    claimed = store.claim(ids, worker_id="w", lease_s=60).claimed
    store.complete([Outcome(r.id, r.attempts, JobStatus.SUCCEEDED, result={}) for r in claimed])


def test_store_names_committed_outbox_rows(heard_store: tuple[JobStore, Heard]) -> None:
    store, heard = heard_store
    _run(store, ["a", "b"])
    assert heard.calls == [[webhook_id("a", "job.succeeded"), webhook_id("b", "job.succeeded")]]
    assert heard.visible == [True]
    # started events are handed over from the claim's transaction, cancels from the API's
    _run(store, ["c"], {"url": HOOK["url"], "events": ["job.started"]})
    store.create(NewJob(id="d", model="identity", version="1", input={}, webhook=HOOK))
    store.cancel("d")
    assert heard.calls[1:] == [[webhook_id("c", "job.started")], [webhook_id("d", "job.cancelled")]]
    assert heard.visible == [True, True, True]


def test_store_names_nothing_without_webhooks(heard_store: tuple[JobStore, Heard]) -> None:
    store, heard = heard_store
    _run(store, ["x", "y"], webhook=None)
    store.heartbeat("w", [])
    assert heard.calls == []


def test_listener_is_not_told_of_rolled_back_rows(heard_store: tuple[JobStore, Heard]) -> None:
    store, heard = heard_store
    store.create(NewJob(id="z", model="identity", version="1", input={}, webhook=HOOK))
    # a transaction that wrote outbox rows and then failed: nothing is named, and the
    # connection (back in the pool) carries nothing over to the next transaction
    record = store.get("z")
    assert record is not None
    cancelled = replace(record, status=JobStatus.CANCELLED)
    with pytest.raises(RuntimeError), store._begin(write=True) as conn:
        enqueue_job_events(conn, [cancelled], conn.dialect.name)
        raise RuntimeError("rolled back")
    assert heard.calls == []
    store.heartbeat("w", [])
    assert heard.calls == []
    assert heard.outbox is not None and heard.outbox.for_job("z") == []


def test_handed_rows_are_claimed_once(heard_store: tuple[JobStore, Heard]) -> None:
    store, heard = heard_store
    outbox = heard.outbox
    assert outbox is not None
    _run(store, ["p", "q", "r"])
    ids = heard.calls[0]
    # the sweep got to one first: the handoff claims the others, and nothing twice
    swept = outbox.claim_due(limit=1, lease_s=60)
    assert len(swept) == 1
    handed = outbox.claim_ids([*ids, *ids], lease_s=60)
    assert sorted(c.id for c in handed) == sorted(set(ids) - {swept[0].id})
    assert outbox.claim_ids(ids, lease_s=60) == []
    assert outbox.claim_due(limit=10, lease_s=60) == []


def test_a_retry_waiting_for_its_time_is_not_handed_over(
    heard_store: tuple[JobStore, Heard],
) -> None:
    store, heard = heard_store
    outbox = heard.outbox
    assert outbox is not None
    _run(store, ["s"])
    (claim,) = outbox.claim_ids(heard.calls[0], lease_s=60)
    failed = AttemptResult(utcnow(), 500, 1.0, "HTTP 500")
    later = utcnow() + timedelta(minutes=5)
    assert outbox.record(claim, failed, outcome=DeliveryStatus.PENDING, next_attempt_at=later)
    assert outbox.claim_ids(heard.calls[0], lease_s=60) == []
    # but a claim whose lease lapsed is taken again, as the sweep would
    _run(store, ["t"])
    (first,) = outbox.claim_ids(heard.calls[1], lease_s=0.01)
    time.sleep(0.05)
    (again,) = outbox.claim_ids(heard.calls[1], lease_s=60)
    assert again.id == first.id and again.token != first.token


def test_handoff_returns_at_once_while_its_sender_hangs() -> None:
    release = threading.Event()
    sent: list[list[str]] = []

    def send(ids: list[str]) -> None:
        release.wait(10)
        sent.append(ids)

    handoff = Handoff(send, chunk=2, max_pending=5)
    started = time.perf_counter()
    handoff(["a", "b", "c"])
    handoff(["d", "e"])
    handoff(["f"])  # over max_pending while the sender hangs: dropped, for the sweep
    assert time.perf_counter() - started < 0.5
    release.set()
    handoff.close()
    assert handoff.dropped == 1
    assert sorted(i for part in sent for i in part) == ["a", "b", "c", "d", "e"]
    assert all(len(part) <= 2 for part in sent)
    handoff(["g"])  # after close: ignored, never raises
    assert handoff.sent == 5


def test_a_failing_sender_leaves_the_rows_to_the_sweep() -> None:
    calls = 0

    def send(ids: list[str]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("broker away")

    handoff = Handoff(send, chunk=1)
    handoff(["a"])
    wait_for(lambda: handoff.dropped == 1, 5, "the failed send")
    handoff(["b"])
    wait_for(lambda: handoff.sent == 1, 5, "the next send")
    handoff.close()


def test_celery_sender_fails_fast_without_a_broker() -> None:
    sender = CelerySender(f"redis://127.0.0.1:{closed_port()}/0", "nowhere")
    handoff = Handoff(sender, closing=sender.close)
    started = time.perf_counter()
    handoff(["a"])
    assert time.perf_counter() - started < 0.1
    wait_for(lambda: handoff.dropped == 1, 15, "the send to fail")
    handoff.close()


@pytest.mark.redis
def test_an_absent_control_plane_cannot_grow_redis_without_bound(redis_url: str) -> None:
    queue = f"test-handoff-{uuid.uuid4().hex[:8]}"
    sender = CelerySender(redis_url, queue, max_queued=5, check_every_s=60)
    handoff = Handoff(sender, closing=sender.close)
    client = redis.Redis.from_url(redis_url)
    try:
        for i in range(20):
            handoff([f"msg_{i}"])
        wait_for(lambda: handoff.sent + handoff.dropped == 20, 15, "every handoff settled")
        # nothing consumes the queue: it stops at its limit, the rest is left to the sweep
        assert client.llen(queue) == handoff.sent == 6
        assert handoff.dropped == 14
    finally:
        handoff.close()
        client.delete(queue)
        client.close()
