"""The relay of stored job events onto the bus, on the in-memory twin and SQLite/PostgreSQL:
in order, once each (again with the same id after a crash), one relay at a time."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from datetime import datetime

import pytest

from jobstore.events import EventLog, JobEvent
from jobstore.records import Outcome
from jobstore.store import JobStore
from schemas.jobs import JobStatus
from tests.test_jobstore import new_job, succeeded
from tests.test_jobstore import store as store
from transports.memory import MemoryBroker, MemoryPublisher
from workers.events_relay import EventRelay, RelayConfig

TOPIC = "inferq.jobs.events"


def _relay(store: JobStore, broker: MemoryBroker, owner: str = "w1") -> EventRelay:
    return EventRelay(
        store.event_log,
        MemoryPublisher(broker),
        TOPIC,
        owner=owner,
        config=RelayConfig(interval_s=0.01, batch=3),
    )


def _messages(broker: MemoryBroker) -> list[tuple[bytes | None, dict, dict[str, bytes]]]:
    return [(k, json.loads(v or b""), h) for k, v, h in broker.messages(TOPIC)]


def _finish(store: JobStore, ids: list[str], *, fail: str | None = None) -> None:
    claimed = store.claim(ids, worker_id="w", lease_s=60).claimed
    outcomes = [
        Outcome(c.id, c.attempts, JobStatus.FAILED, error_code="x", error_message="bad")
        if c.id == fail
        else succeeded(c.id, c.attempts)
        for c in claimed
    ]
    store.complete(outcomes)


def test_stored_changes_go_out_as_binary_cloudevents_in_order(store: JobStore) -> None:
    broker = MemoryBroker()
    store.create_many([new_job("a"), new_job("b")])
    _finish(store, ["a", "b"], fail="b")
    store.create(new_job("c"))
    store.cancel("c")
    relay = _relay(store, broker)

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(relay.run(stop))
        while relay.published < 5:
            await asyncio.sleep(0.01)
        stop.set()
        await task

    asyncio.run(go())
    got = _messages(broker)
    by_job: dict[str, list[str]] = {}
    for key, data, headers in got:
        assert headers["ce_subject"] == key and headers["ce_specversion"] == b"1.0"
        assert headers["ce_id"].startswith(key + b":")
        assert data["id"] == key.decode()
        by_job.setdefault(key.decode(), []).append(headers["ce_type"].decode())
    assert by_job == {
        "a": ["inferq.job.started", "inferq.job.succeeded"],
        "b": ["inferq.job.started", "inferq.job.failed"],
        "c": ["inferq.job.cancelled"],
    }
    done = next(d for _, d, h in got if h["ce_type"] == b"inferq.job.succeeded")
    assert done["status"] == "succeeded" and done["result"] == {"vector": [0.5, 0.25]}
    assert len({h["ce_id"] for _, _, h in got}) == len(got)  # one message per event
    assert store.event_log.unpublished() == 0


def test_a_crash_before_the_mark_publishes_again_with_the_same_ids(store: JobStore) -> None:
    broker = MemoryBroker()
    store.create(new_job("x"))
    _finish(store, ["x"])

    class Crashing(EventLog):
        def mark_published(self, positions: Sequence[int], now: datetime | None = None) -> None:
            raise RuntimeError("killed before the mark")

    crashing = EventRelay(
        Crashing(store.engine, writer=store.writer), MemoryPublisher(broker), TOPIC, owner="w1"
    )
    with pytest.raises(RuntimeError):
        asyncio.run(crashing.publish_once())
    asyncio.run(_relay(store, broker).publish_once())
    ids = [h["ce_id"] for _, _, h in _messages(broker)]
    assert ids == [b"x:2", b"x:3", b"x:2", b"x:3"]  # duplicates, by the same event id only


def test_one_relay_publishes_at_a_time(store: JobStore) -> None:
    broker = MemoryBroker()
    first, second = _relay(store, broker, "w1"), _relay(store, broker, "w2")

    async def go() -> None:
        stop1, stop2 = asyncio.Event(), asyncio.Event()
        t1 = asyncio.create_task(first.run(stop1))
        await asyncio.sleep(0.05)  # w1 takes the lease
        t2 = asyncio.create_task(second.run(stop2))
        for i in range(6):
            store.create(new_job(f"j{i}"))
            _finish(store, [f"j{i}"])
            await asyncio.sleep(0.02)
        while store.event_log.unpublished():
            await asyncio.sleep(0.01)
        assert first.published == 12 and second.published == 0
        stop1.set()
        await t1  # w1 lets go of the lease: w2 takes over
        store.create(new_job("late"))
        _finish(store, ["late"])
        while second.published < 2:
            await asyncio.sleep(0.01)
        stop2.set()
        await t2

    asyncio.run(asyncio.wait_for(go(), 30))


def test_an_idle_relay_looks_seldom_and_a_write_here_wakes_it_at_once(store: JobStore) -> None:
    """Idle, the relay backs off to one look a second (an idle worker costs almost nothing);
    a store write in its process (``wake``) publishes without waiting for that look."""
    broker = MemoryBroker()
    looks = 0

    class Counting(EventLog):
        def pending(self, limit: int) -> list[JobEvent]:
            nonlocal looks
            looks += 1
            return super().pending(limit)

    relay = EventRelay(
        Counting(store.engine, writer=store.writer),
        MemoryPublisher(broker),
        TOPIC,
        owner="w1",
        config=RelayConfig(interval_s=0.05, idle_interval_s=5.0),
    )

    async def go() -> float:
        stop = asyncio.Event()
        task = asyncio.create_task(relay.run(stop))
        # idle: looks at 0.05, 0.15, 0.35, 0.75, 1.55, 3.15 s; the next one at 6.35 s
        await asyncio.sleep(3.3)
        idle_looks = looks
        store.create(new_job("woken"))
        _finish(store, ["woken"])
        started = time.monotonic()
        relay.wake()
        while relay.published < 2:
            await asyncio.sleep(0.005)
        took = time.monotonic() - started
        stop.set()
        await task
        assert idle_looks <= 8, idle_looks  # at a fixed 0.05 s it would be 66
        return took

    took = asyncio.run(asyncio.wait_for(go(), 30))
    assert took < 1.0, took  # not the next idle look, 3 s away
