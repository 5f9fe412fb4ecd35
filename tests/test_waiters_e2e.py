"""Waiting without polling, seen from outside a real API process (Kafka-protocol broker,
SQLite file or PostgreSQL): ``?wait`` and ``Prefer: wait`` woken by the worker's outcome
long before the sweep, a thousand idle waiters that cost the API almost nothing, clients
that disconnect leaving no waiter behind, and a LISTEN connection killed under the API.

The API runs with a 10 s sweep here (``INFERQ_WAIT_SWEEP_S``), so an answer that comes
within a fraction of a second came from the change feed.
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from producers.client import InferqClient
from schemas.jobs import JobStatus
from tests.fixtures_servers import fresh_database
from tests.procs import Stack, wait_for
from transports.kafka import EmbeddedKafka

pytestmark = pytest.mark.kafka

SWEEP = {"INFERQ_WAIT_SWEEP_S": "10"}
IDENTITY = {"model": "identity", "input": {"tensor": [1.0, 2.0]}}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """None (the API's SQLite file in its data dir) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield None
        return
    yield from _fresh_postgres(request.getfixturevalue("postgres_url"))


@pytest.fixture
def pg_database(postgres_url: str) -> Iterator[str]:
    yield from _fresh_postgres(postgres_url)


def _fresh_postgres(postgres_url: str) -> Iterator[str]:
    with fresh_database(postgres_url, "inferq_wait") as url:
        yield url


def _stack(
    tmp_path: Path, broker: EmbeddedKafka, topic: str, models: Path, db: str | None
) -> Stack:
    return Stack(tmp_path, broker.bootstrap, topic, models, database_url=db)


def _metric(url: str, name: str) -> float:
    """The sum of a metric's samples on /metrics (all label values)."""
    body = httpx.get(f"{url}/metrics", timeout=5).text
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", re.M)
    return sum(float(v) for v in pattern.findall(body))


def _cpu_s(pid: int) -> float:
    """User plus system CPU seconds of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _late_s(job: dict[str, object], received: datetime) -> float:
    """Seconds from the job's completion (stored by the worker) to the answer's arrival."""
    completed = datetime.fromisoformat(str(job["completed_at"]))
    return (received - completed).total_seconds()


@pytest.mark.timeout(180)
def test_wait_and_prefer_wait_are_woken_by_the_outcome_not_the_sweep(
    tmp_path: Path,
    kafka_broker: EmbeddedKafka,
    topic: str,
    model_repo: Path,
    database: str | None,
) -> None:
    stack = _stack(tmp_path, kafka_broker, topic, model_repo, database)
    try:
        _, url = stack.api(**SWEEP)
        stack.worker()
        with httpx.Client(base_url=url, timeout=60) as client:
            # the first job waits for the worker to start; it is not measured
            r = client.post("/v1/jobs", json=IDENTITY, headers={"Prefer": "wait=60"})
            assert r.status_code == 200, (r.text, stack.log("worker"))
            prefer_late, get_late = [], []
            for _ in range(10):
                r = client.post("/v1/jobs", json=IDENTITY, headers={"Prefer": "wait=30"})
                received = datetime.now(UTC)
                assert r.status_code == 200 and r.headers["Preference-Applied"] == "wait=30"
                assert r.json()["status"] == "succeeded"
                prefer_late.append(_late_s(r.json(), received))
                r = client.post("/v1/jobs", json=IDENTITY)
                assert r.status_code == 202
                r = client.get(f"/v1/jobs/{r.json()['id']}", params={"wait": 30})
                received = datetime.now(UTC)
                assert r.json()["status"] == "succeeded"
                get_late.append(_late_s(r.json(), received))
        with InferqClient(url) as sdk:  # the Python client's submit-and-wait, one request
            job = sdk.run("identity", {"tensor": [4.0]}, timeout=30)
            assert job.status is JobStatus.SUCCEEDED and job.result == {"tensor": [4.0]}
            assert sdk.submit("identity", {"tensor": [5.0]}, wait=30).status.terminal
        backend = "postgres" if database else "sqlite"
        print(
            f"\n[waiters] {backend}: answer after completion, p50 Prefer: wait "
            f"{statistics.median(prefer_late) * 1000:.1f} ms, ?wait "
            f"{statistics.median(get_late) * 1000:.1f} ms (sweep 10 s)"
        )
        assert statistics.median(prefer_late) < 0.25, prefer_late
        assert statistics.median(get_late) < 0.25, get_late
        assert max(prefer_late + get_late) < 2, (prefer_late, get_late)
    finally:
        stack.stop_all()


async def _hold(
    url: str, ids: list[str], wait: float
) -> tuple[httpx.AsyncClient, list[asyncio.Task[httpx.Response]]]:
    """Open one ``?wait`` request per id, each on a connection of its own."""
    client = httpx.AsyncClient(
        base_url=url,
        timeout=wait + 30,
        limits=httpx.Limits(max_connections=len(ids) + 10, max_keepalive_connections=0),
    )
    tasks = [
        asyncio.create_task(client.get(f"/v1/jobs/{job_id}", params={"wait": wait}))
        for job_id in ids
    ]
    return client, tasks


async def _posts(url: str, pid: int, n: int = 50) -> tuple[float, float]:
    """``n`` POSTs one after another: their p50 latency and the API's CPU seconds per POST
    (CPU is what a busy shared machine blurs least)."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        took = []
        cpu = _cpu_s(pid)
        for _ in range(n):
            started = time.perf_counter()
            r = await client.post("/v1/jobs", json=IDENTITY)
            took.append(time.perf_counter() - started)
            assert r.status_code == 202, r.text
        return statistics.median(took), (_cpu_s(pid) - cpu) / n


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_thousand_idle_waiters_cost_the_api_almost_nothing_and_leave_nothing(
    tmp_path: Path,
    kafka_broker: EmbeddedKafka,
    topic: str,
    model_repo: Path,
    database: str | None,
) -> None:
    stack = _stack(tmp_path, kafka_broker, topic, model_repo, database)
    try:
        proc, url = stack.api(**SWEEP)  # no worker: the jobs stay queued
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            r = await client.post("/v1/jobs/batch", json={"jobs": [IDENTITY] * 1000})
            assert r.status_code == 200, r.text
            ids = [item["job"]["id"] for item in r.json()["data"]]
        post_alone, post_cpu_alone = await _posts(url, proc.pid)
        cpu, started = _cpu_s(proc.pid), time.monotonic()
        await asyncio.sleep(3)
        idle_alone = (_cpu_s(proc.pid) - cpu) / (time.monotonic() - started)

        client, tasks = await _hold(url, ids, wait=60)
        deadline = time.monotonic() + 60
        while _metric(url, "inferq_api_waiters") < len(ids):
            assert time.monotonic() < deadline, "the waiters did not all arrive"
            assert not any(t.done() for t in tasks), [t.result() for t in tasks if t.done()][:1]
            await asyncio.sleep(0.2)
        await asyncio.sleep(1)  # the arrivals' own work is over
        lookups = _metric(url, "inferq_api_wait_lookups_total")
        cpu, started = _cpu_s(proc.pid), time.monotonic()
        await asyncio.sleep(3)
        elapsed = time.monotonic() - started
        idle_waiting = (_cpu_s(proc.pid) - cpu) / elapsed
        lookups = _metric(url, "inferq_api_wait_lookups_total") - lookups
        post_waiting, post_cpu_waiting = await _posts(url, proc.pid)
        backend = "postgres" if database else "sqlite"
        print(
            f"\n[waiters] {backend}: API CPU idle {idle_alone * 100:.1f}% alone, "
            f"{idle_waiting * 100:.1f}% with 1000 waiters; {lookups:.0f} store lookups in "
            f"{elapsed:.1f}s; POST p50 {post_alone * 1000:.1f} ms alone, "
            f"{post_waiting * 1000:.1f} ms with 1000 waiters; API CPU per POST "
            f"{post_cpu_alone * 1000:.1f} ms alone, {post_cpu_waiting * 1000:.1f} ms with them"
        )
        assert not any(t.done() for t in tasks), "a wait ended before its time"
        # the 10 s sweep did not come round; a change feed that polled rows would show here
        assert lookups <= 1, lookups
        assert idle_waiting < idle_alone + 0.05, (idle_alone, idle_waiting)
        # a commit costs the waiters what it changed: PostgreSQL's notifications name the
        # job, and the SQLite feed reads the job events since its last look (it looked up
        # all 1,000 watched ids per commit before: 5 -> 18 ms of API CPU per POST). Generous
        # bounds: the machine is shared.
        extra = 0.002
        assert post_cpu_waiting < post_cpu_alone * 2 + extra, (
            post_cpu_alone,
            post_cpu_waiting,
        )
        assert post_waiting < post_alone * 3 + 0.02, (post_alone, post_waiting)

        # every client goes away: no waiter is left behind in the API
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()
        wait_for(lambda: _metric(url, "inferq_api_waiters") == 0, 10, "the waiters to be gone")
    finally:
        stack.stop_all()


@pytest.mark.postgres
@pytest.mark.timeout(180)
def test_a_killed_listen_connection_under_the_api_recovers(
    tmp_path: Path,
    kafka_broker: EmbeddedKafka,
    topic: str,
    model_repo: Path,
    pg_database: str,
) -> None:
    stack = _stack(tmp_path, kafka_broker, topic, model_repo, pg_database)
    admin = create_engine(pg_database, isolation_level="AUTOCOMMIT")
    try:
        _, url = stack.api(**SWEEP)
        stack.worker()
        listeners = text(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'inferq-waiters'"
            " AND datname = current_database() AND query LIKE 'LISTEN %'"
        )
        with httpx.Client(base_url=url, timeout=60) as client:
            r = client.post("/v1/jobs", json=IDENTITY, headers={"Prefer": "wait=60"})
            assert r.status_code == 200, (r.text, stack.log("worker"))
            with admin.connect() as conn:
                [pid] = conn.scalars(listeners).all()
                assert conn.scalar(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            # a job that finishes while the feed reconnects, then the ones after it
            for _ in range(5):
                started = time.monotonic()
                r = client.post("/v1/jobs", json=IDENTITY, headers={"Prefer": "wait=30"})
                assert r.status_code == 200, r.text
                assert time.monotonic() - started < 3  # well inside the 10 s sweep
            with admin.connect() as conn:
                [again] = conn.scalars(listeners).all()
            assert again != pid  # a new LISTEN connection
        assert "job change feed" in stack.log("api")  # the drop was logged
    finally:
        admin.dispose()
        stack.stop_all()
