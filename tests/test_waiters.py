"""The waiter hub on real stores (SQLite file, PostgreSQL): woken by the change itself, a
lost notification caught by the sweep, idle waiters that cost (almost) nothing, waiters
that leave nothing behind, and a LISTEN connection that is killed and comes back.

The writes come from a second JobStore on the same database (other connections, as another
process would use), never through the hub's own store.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.pool import NullPool

from jobstore.feeds import ChangeFeed, PostgresFeed, SqliteFeed
from jobstore.notify import TRIGGER_NAMES, channel_for
from jobstore.records import NewJob, Outcome
from jobstore.store import JobStore
from producers.waiters import WaiterHub
from schemas.jobs import JobStatus

Q, R, S = JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED


@dataclass
class Db:
    """The hub's store and a writer on the same database; ``schema`` on PostgreSQL."""

    store: JobStore
    writer: JobStore
    backend: str
    schema: str | None = None
    admin_url: str | None = None

    def add(self, *ids: str) -> None:
        self.writer.ensure([NewJob(id=i, model="identity", version="1", input={}) for i in ids])

    def claim(self, job_id: str) -> int:
        [claimed] = self.writer.claim([job_id], worker_id="w", lease_s=60).claimed
        return claimed.attempts

    def finish(self, job_id: str, attempt: int) -> None:
        self.writer.complete([Outcome(job_id=job_id, attempt=attempt, status=S, result={})])

    def feed(self, **kw: Any) -> ChangeFeed:
        return self.store.change_feed(**kw)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    yield from _db(request, tmp_path)


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres)])
def pg_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    yield from _db(request, tmp_path)


def _db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
        store, writer = JobStore(url), JobStore(url)
        store.create_schema()
        yield Db(store, writer, "sqlite")
        store.close()
        writer.close()
        return
    url = request.getfixturevalue("postgres_url")
    schema = f"t_{uuid.uuid4().hex}"
    admin = create_engine(url, poolclass=NullPool)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    store, writer = JobStore(url, schema=schema), JobStore(url, schema=schema)
    try:
        store.create_schema()
        yield Db(store, writer, "postgres", schema, url)
    finally:
        store.close()
        writer.close()
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


@pytest.fixture
async def running() -> AsyncIterator[list[WaiterHub]]:
    """Hubs a test started; stopped after it."""
    hubs: list[WaiterHub] = []
    yield hubs
    for hub in hubs:
        await hub.stop()


async def _start(db: Db, hubs: list[WaiterHub], feed: ChangeFeed, sweep_s: float) -> WaiterHub:
    hub = WaiterHub(db.store.statuses, feed, sweep_s=sweep_s)
    hub.start()
    hubs.append(hub)
    if isinstance(feed, PostgresFeed):  # LISTEN is up before the test writes
        deadline = time.monotonic() + 10
        while feed.connects < 1:
            assert time.monotonic() < deadline, "the LISTEN connection did not come up"
            await asyncio.sleep(0.01)
    return hub


async def _heard(
    hub: WaiterHub, job_id: str, known: JobStatus, change: Any, until: JobStatus
) -> float:
    """Run ``change`` (in a thread) while waiting on ``job_id`` as a request does (a stale
    notification of an earlier status only moves ``known``); the seconds from the change's
    commit to hearing ``until``."""
    with hub.watch(job_id) as waiter:

        async def wait() -> None:
            current: JobStatus | None = known
            while current is not until:
                current = await waiter.changed(current, 10)
                assert current is not None, f"{job_id}: nothing heard"

        waiting = asyncio.create_task(wait())
        await asyncio.sleep(0.05)
        await asyncio.to_thread(change)
        committed = time.monotonic()
        await waiting
        return time.monotonic() - committed


async def test_a_waiter_is_woken_by_the_state_change_not_the_sweep(
    db: Db, running: list[WaiterHub]
) -> None:
    hub = await _start(db, running, db.feed(), sweep_s=30)  # the sweep cannot explain it
    db.add("a")
    claim_s = await _heard(hub, "a", Q, lambda: db.claim("a"), R)
    finish_s = await _heard(hub, "a", R, lambda: db.finish("a", 1), S)
    print(f"\n[waiters] {db.backend}: woken {claim_s * 1000:.1f} ms after the claim, "
          f"{finish_s * 1000:.1f} ms after the outcome")  # fmt: skip
    assert claim_s < 0.25 and finish_s < 0.25, (claim_s, finish_s)


async def test_a_job_that_appears_wakes_the_waiter_of_its_id(
    db: Db, running: list[WaiterHub]
) -> None:
    hub = await _start(db, running, db.feed(), sweep_s=30)
    with hub.watch("later") as waiter:
        waiting = asyncio.create_task(waiter.changed(None, 10))
        await asyncio.sleep(0.05)
        await asyncio.to_thread(db.add, "later")
        assert await asyncio.wait_for(waiting, 1) is Q


def _write_without_notifying(db: Db, job_id: str) -> None:
    """The job succeeds, and no notification says so: PostgreSQL with its triggers off for
    the one transaction; SQLite by a feed that looks once an hour (below)."""
    update = text("UPDATE jobs SET status = 'succeeded' WHERE id = :id")
    with db.writer.writer.begin() as conn:
        if db.backend == "postgres":
            for name in TRIGGER_NAMES:
                conn.exec_driver_sql(f"ALTER TABLE jobs DISABLE TRIGGER {name}")
        conn.execute(update, {"id": job_id})
        if db.backend == "postgres":
            for name in TRIGGER_NAMES:
                conn.exec_driver_sql(f"ALTER TABLE jobs ENABLE TRIGGER {name}")


async def test_a_lost_notification_is_caught_by_the_sweep(
    db: Db, running: list[WaiterHub], tmp_path: Path
) -> None:
    feed = (
        db.feed()
        if db.backend == "postgres"
        else SqliteFeed(str(tmp_path / "jobs.db"), poll_s=3600)  # looks once, then sleeps
    )
    hub = await _start(db, running, feed, sweep_s=0.5)
    db.add("lost")
    db.claim("lost")
    waited = await _heard(hub, "lost", R, lambda: _write_without_notifying(db, "lost"), S)
    # at most one sweep interval (0.5 s) plus its query, on a busy machine
    assert waited < 1.5, waited


async def test_a_thousand_idle_waiters_leave_the_store_alone(
    db: Db, running: list[WaiterHub]
) -> None:
    hub = await _start(db, running, db.feed(), sweep_s=1.0)
    ids = [f"idle-{i:04d}" for i in range(1000)]
    db.add(*ids)
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "jobs" in statement:  # SQLite's BEGIN of each lookup is no query of its own
            statements.append(statement)

    async def wait(job_id: str) -> JobStatus | None:
        with hub.watch(job_id) as waiter:
            return await waiter.changed(Q, 30)

    tasks = [asyncio.create_task(wait(i)) for i in ids]
    while hub.waiting < len(ids):
        await asyncio.sleep(0.01)
    event.listen(db.store.engine, "before_cursor_execute", count)
    try:
        cpu, started = time.process_time(), time.monotonic()
        await asyncio.sleep(3)
        cpu, elapsed = time.process_time() - cpu, time.monotonic() - started
    finally:
        event.remove(db.store.engine, "before_cursor_execute", count)
    print(
        f"\n[waiters] {db.backend}: 1000 idle waiters for {elapsed:.1f}s: "
        f"{len(statements)} store queries, {cpu * 1000:.0f} ms CPU"
    )
    # one lookup of all 1000 ids per sweep (3 s: 3 sweeps, one more at an edge)
    assert len(statements) <= 4, statements
    assert all("WHERE id" in s for s in statements), statements
    assert cpu < 0.3 * elapsed, f"{cpu:.3f}s CPU in {elapsed:.1f}s for idle waiters"
    # a change still reaches its one waiter among the thousand
    db.claim("idle-0500")
    assert await asyncio.wait_for(tasks[500], 2) is R
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert hub.waiting == 0  # cancelled waits (a client gone) leave nothing registered


async def test_writes_to_other_jobs_do_not_look_up_a_thousand_waiters(
    db: Db, running: list[WaiterHub]
) -> None:
    """A busy store with many waiters: each commit elsewhere must not cost a lookup of all
    watched jobs (on SQLite the feed reads the events committed since its last look)."""
    hub = await _start(db, running, db.feed(), sweep_s=30)
    ids = [f"held-{i:04d}" for i in range(1000)]
    db.add(*ids)
    lookups: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "jobs" in statement and "WHERE id" in statement:
            lookups.append(statement)

    async def wait(job_id: str) -> JobStatus | None:
        with hub.watch(job_id) as waiter:
            return await waiter.changed(Q, 30)

    tasks = [asyncio.create_task(wait(i)) for i in ids]
    while hub.waiting < len(ids):
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # the feed's first look (a lookup of everything) is behind us
    event.listen(db.store.engine, "before_cursor_execute", count)
    try:
        for n in range(50):  # 50 commits of other jobs, as other clients' traffic
            await asyncio.to_thread(db.add, f"other-{n}")
            await asyncio.sleep(0.01)
        db.claim("held-0500")
        assert await asyncio.wait_for(tasks[500], 2) is R  # the one it concerns is heard
    finally:
        event.remove(db.store.engine, "before_cursor_execute", count)
    print(f"\n[waiters] {db.backend}: 51 commits while 1000 wait: {len(lookups)} lookups")
    assert len(lookups) <= 2, lookups  # a sweep at an edge at most, never one per commit
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_waiters_of_one_job_are_woken_together_and_leave_nothing(
    db: Db, running: list[WaiterHub]
) -> None:
    hub = await _start(db, running, db.feed(), sweep_s=30)
    db.add("shared")

    async def wait() -> JobStatus | None:
        with hub.watch("shared") as waiter:
            return await waiter.changed(Q, 5)

    tasks = [asyncio.create_task(wait()) for _ in range(20)]
    await asyncio.sleep(0.1)
    assert hub.waiting == 20
    await asyncio.to_thread(db.claim, "shared")
    assert await asyncio.wait_for(asyncio.gather(*tasks), 1) == [R] * 20
    assert hub.waiting == 0


async def test_a_killed_listen_connection_comes_back_and_misses_nothing(
    pg_db: Db, running: list[WaiterHub]
) -> None:
    db = pg_db
    feed = db.feed()
    assert isinstance(feed, PostgresFeed)
    hub = await _start(db, running, feed, sweep_s=30)  # only the feed can wake in time
    db.add("gap", "after")
    assert db.schema is not None and db.admin_url is not None
    admin = create_engine(db.admin_url, poolclass=NullPool)

    def kill_then_finish() -> None:
        with admin.begin() as conn:
            killed = conn.scalar(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = 'inferq-waiters' AND query LIKE :listen"
                ),
                {"listen": f'LISTEN "{channel_for(db.schema or "")}"'},
            )
        assert killed == 1
        db.claim("gap")  # while nobody listens: its notification is lost

    try:
        waited = await _heard(hub, "gap", Q, kill_then_finish, R)
        assert waited < 2, waited  # the check after reconnecting
        deadline = time.monotonic() + 10
        while feed.connects < 2:
            assert time.monotonic() < deadline, "the feed did not reconnect"
            await asyncio.sleep(0.01)
        waited = await _heard(hub, "after", Q, lambda: db.claim("after"), R)
        assert waited < 0.25, waited  # notifications flow again
    finally:
        admin.dispose()


async def test_terminal_rows_are_read_in_one_query_for_all_woken_waiters(
    db: Db, running: list[WaiterHub]
) -> None:
    """Forty jobs finishing in one commit wake their forty waiters with their rows, read in
    one query by the hub, not forty reads by the waiters."""
    ids = [f"batch-{i}" for i in range(40)]
    db.add(*ids)
    attempts = {i: db.claim(i) for i in ids}
    fetches: list[int] = []

    def fetch(wanted: Any) -> Any:
        fetches.append(len(wanted))
        return db.store.get_many(wanted)

    hub = WaiterHub(db.store.statuses, db.feed(), fetch=fetch, sweep_s=30)
    hub.start()
    running.append(hub)
    if db.backend == "postgres":
        await asyncio.sleep(0.5)  # LISTEN up

    async def wait(job_id: str) -> Any:
        with hub.watch(job_id) as waiter:
            assert await waiter.changed(R, 20) is S
            return waiter.record

    waiting = [asyncio.create_task(wait(i)) for i in ids]
    await asyncio.sleep(0.1)
    await asyncio.to_thread(
        db.writer.complete,
        [Outcome(job_id=i, attempt=attempts[i], status=S, result={"i": i}) for i in ids],
    )
    records = await asyncio.wait_for(asyncio.gather(*waiting), 20)
    assert [r.id for r in records] == ids
    assert all(r.status is S and r.result == {"i": r.id} for r in records)
    assert sum(fetches) == 40 and len(fetches) <= 2, fetches
