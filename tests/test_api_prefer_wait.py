"""Submit and wait in one request: ``POST /v1/jobs`` with ``Prefer: wait=N`` (RFC 7240), on
the in-memory bus and a SQLite store, with the app's lifespan (and so its waiter hub)
running. A stand-in worker finishes queued jobs from another connection after a delay."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from jobstore.records import Outcome
from jobstore.store import JobStore
from producers.app import ApiConfig, ApiDeps, create_app
from schemas.contracts import ModelConfig
from schemas.jobs import JobStatus
from transports.memory import MemoryBroker, MemoryPublisher

MODELS = [ModelConfig(name="identity", version="1", adapter="identity", default=True)]
BODY = {"model": "identity", "input": {"tensor": [2]}}


@dataclass
class Finisher:
    """Completes every queued job ``delay`` seconds after it first sees it (from its own
    JobStore on the same file, as a worker process would)."""

    store: JobStore
    delay: float = 0.2
    stop: threading.Event = field(default_factory=threading.Event)
    seen: dict[str, float] = field(default_factory=dict)

    def run(self) -> None:
        while not self.stop.is_set():
            queued, _ = self.store.list(status=JobStatus.QUEUED, limit=100)
            now = time.monotonic()
            for record in queued:
                first = self.seen.setdefault(record.id, now)
                if now - first >= self.delay:
                    [claimed] = self.store.claim([record.id], worker_id="w", lease_s=60).claimed
                    result = {"tensor": [float(x) for x in record.input["tensor"]]}
                    self.store.complete(
                        [Outcome(record.id, claimed.attempts, JobStatus.SUCCEEDED, result=result)]
                    )
            self.stop.wait(0.01)


@dataclass
class Api:
    client: httpx.AsyncClient
    finisher: Finisher

    async def submit(self, prefer: str | list[str] | None, **headers: str) -> httpx.Response:
        sent: list[tuple[str, str]] = list(headers.items())
        for value in [prefer] if isinstance(prefer, str) else prefer or []:
            sent.append(("Prefer", value))
        return await self.client.post("/v1/jobs", json=BODY, headers=sent)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    store = JobStore(url)
    store.create_schema()
    app = create_app(
        ApiDeps(
            store=store,
            publisher=MemoryPublisher(MemoryBroker()),
            models=lambda: MODELS,
            config=ApiConfig(topic="jobs", backlog_cache_s=0, wait_sweep_s=5),
            registry=CollectorRegistry(),
        )
    )
    finisher = Finisher(JobStore(url))
    thread = threading.Thread(target=finisher.run, daemon=True)
    thread.start()
    transport = httpx.ASGITransport(app=app)
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://api", timeout=90) as client,
        ):
            yield Api(client, finisher)
    finally:
        finisher.stop.set()
        thread.join(5)
        finisher.store.close()
        store.close()


async def test_prefer_wait_answers_200_with_the_finished_job(api: Api) -> None:
    started = time.monotonic()
    r = await api.submit("wait=10")
    took = time.monotonic() - started
    assert r.status_code == 200, r.text
    assert r.headers["Preference-Applied"] == "wait=10"
    job = r.json()
    assert job["status"] == "succeeded" and job["result"] == {"tensor": [2.0]}
    assert r.headers["Location"] == f"/v1/jobs/{job['id']}"
    # finished 0.2 s after it was queued; the sweep (5 s) would have been far later
    assert 0.2 <= took < 2, took


async def test_prefer_wait_that_runs_out_answers_202_as_without_it(api: Api) -> None:
    api.finisher.delay = 30
    started = time.monotonic()
    r = await api.submit("wait=1")
    took = time.monotonic() - started
    assert r.status_code == 202, r.text
    assert "Preference-Applied" not in r.headers
    assert r.json()["status"] == "queued"
    assert r.headers["Location"] == f"/v1/jobs/{r.json()['id']}"
    assert 1 <= took < 2.5, took  # it waited its second, and no more


@pytest.mark.parametrize(
    "prefer",
    [
        "wait",
        "wait=",
        "wait=soon",
        "wait=-3",
        "wait=1.5",
        'wait="2',
        ";;,;",
        "w\u00e4it=2",
        "respond-async",
        "wait=abc, wait=5",
    ],
)
async def test_a_malformed_prefer_is_ignored(api: Api, prefer: str) -> None:
    api.finisher.delay = 30
    started = time.monotonic()
    r = await api.client.post("/v1/jobs", json=BODY, headers=[(b"Prefer", prefer.encode("utf-8"))])
    assert r.status_code == 202, r.text  # as if it had not been sent
    assert "Preference-Applied" not in r.headers
    assert time.monotonic() - started < 1  # and nothing waited


async def test_wait_over_60_is_capped_not_refused(api: Api) -> None:
    r = await api.submit("wait=999")
    assert r.status_code == 200, r.text
    assert r.headers["Preference-Applied"] == "wait=60"
    assert r.json()["status"] == "succeeded"


async def test_prefer_among_other_preferences_and_fields(api: Api) -> None:
    r = await api.submit(["return=minimal", "respond-async; x=1, wait=5"])
    assert r.status_code == 200 and r.headers["Preference-Applied"] == "wait=5"


async def test_an_idempotent_replay_honours_prefer_wait(api: Api) -> None:
    api.finisher.delay = 1.0
    first = await api.submit(None, **{"Idempotency-Key": "order-7"})
    assert first.status_code == 202 and first.json()["status"] == "queued"
    # the replay waits for the job the key names, and answers it finished
    again = await api.submit("wait=10", **{"Idempotency-Key": "order-7"})
    assert again.status_code == 200, again.text
    assert again.headers["Preference-Applied"] == "wait=10"
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["status"] == "succeeded"
    # a replay of a finished job with Prefer answers at once; without it, a plain replay
    started = time.monotonic()
    third = await api.submit("wait=10", **{"Idempotency-Key": "order-7"})
    assert third.status_code == 200 and third.headers["Preference-Applied"] == "wait=10"
    assert time.monotonic() - started < 1
    plain = await api.submit(None, **{"Idempotency-Key": "order-7"})
    assert plain.status_code == 200 and "Preference-Applied" not in plain.headers


async def test_a_replay_still_running_past_its_wait_is_a_plain_replay(api: Api) -> None:
    api.finisher.delay = 30
    first = await api.submit(None, **{"Idempotency-Key": "order-8"})
    again = await api.submit("wait=1", **{"Idempotency-Key": "order-8"})
    assert again.status_code == 200 and "Preference-Applied" not in again.headers
    assert again.json()["id"] == first.json()["id"] and again.json()["status"] == "queued"


async def test_many_submit_and_wait_at_once(api: Api) -> None:
    api.finisher.delay = 0.1
    answers = await asyncio.gather(*(api.submit("wait=20") for _ in range(50)))
    assert [r.status_code for r in answers] == [200] * 50
    assert {r.json()["status"] for r in answers} == {"succeeded"}
    metrics = (await api.client.get("/metrics")).text
    assert "inferq_api_waiters 0.0" in metrics  # every waiter is gone with its request
