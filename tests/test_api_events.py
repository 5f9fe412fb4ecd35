"""`GET /v1/jobs/{id}/events` over a real HTTP server (uvicorn), a SQLite store and the
in-memory bus; the job's changes are made through the store, as a worker makes them."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry

from jobstore.records import NewJob, Outcome
from jobstore.store import JobStore
from producers.app import ApiConfig, ApiDeps, create_app
from producers.async_client import AsyncClient
from producers.client import InferqClient, InferqError
from producers.events import PollingFeed
from schemas.contracts import ModelConfig
from schemas.jobs import JobStatus
from transports.memory import MemoryBroker, MemoryPublisher

MODELS = [ModelConfig(name="identity", version="1", adapter="identity", default=True)]


class CountingFeed(PollingFeed):
    """The polling feed, counting the waits in progress (a hub's subscriptions)."""

    def __init__(self) -> None:
        super().__init__(0.02)
        self.waiting = 0

    async def wait_for_change(
        self,
        job_id: str,
        within: float,
        known: JobStatus | None,
    ) -> bool:
        self.waiting += 1
        try:
            return await super().wait_for_change(job_id, within, known)
        finally:
            self.waiting -= 1


@dataclass
class Server:
    url: str
    store: JobStore
    waiting: Callable[[], int]  # streams asleep on the change feed now
    loop_tasks: Callable[[], set[str]]

    def streams(self) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        line = next(x for x in text.splitlines() if x.startswith("inferq_event_streams "))
        return float(line.split()[1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(params=["hub", "polling"])
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    """The API on a SQLite file. "hub": streams sleep on the waiter hub (the default), whose
    sweep is too slow (30 s) to pass a test alone; "polling": a feed that counts its waits."""
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    feed = CountingFeed() if request.param == "polling" else None
    # a stream also reads its log at each heartbeat: a test of the feed itself makes it long
    slow = request.node.get_closest_marker("slow_heartbeat")
    heartbeat_s = 30.0 if slow else 0.3
    app = create_app(
        ApiDeps(
            store=store,
            publisher=MemoryPublisher(MemoryBroker()),
            models=lambda: MODELS,
            config=ApiConfig(
                topic="jobs", backlog_cache_s=0, sse_heartbeat_s=heartbeat_s, wait_sweep_s=30
            ),
            registry=CollectorRegistry(),
            changes=feed,
        )
    )
    hub = app.state.inferq.waiters
    port = _free_port()
    uv = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning", lifespan="on"))
    loops: list[asyncio.AbstractEventLoop] = []

    def run() -> None:
        loop = asyncio.new_event_loop()
        loops.append(loop)
        try:
            loop.run_until_complete(uv.serve())
        finally:
            loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)

    def tasks() -> set[str]:
        return {t.get_name() for t in asyncio.all_tasks(loops[0]) if not t.done()}

    def waiting() -> int:
        return feed.waiting if feed is not None else int(hub.waiting)

    yield Server(f"http://127.0.0.1:{port}", store, waiting, tasks)
    uv.should_exit = True
    thread.join(10)
    store.close()


def _new(store: JobStore, job_id: str) -> None:
    store.create(NewJob(id=job_id, model="identity", version="1", input={"tensor": [1.0]}))


def _run(store: JobStore, job_id: str, *, fail: bool = False) -> None:
    (claimed,) = store.claim([job_id], worker_id="w", lease_s=60).claimed
    if fail:
        outcome = Outcome(
            job_id, claimed.attempts, JobStatus.FAILED, error_code="x", error_message="no"
        )
    else:
        outcome = Outcome(job_id, claimed.attempts, JobStatus.SUCCEEDED, result={"tensor": [1.0]})
    store.complete([outcome])


def _frames(text: str) -> list[dict[str, str]]:
    out = []
    for block in text.split("\n\n"):
        fields = dict(
            line.split(": ", 1)
            for line in block.splitlines()
            if ": " in line and not line.startswith(":")
        )
        if "id" in fields:
            out.append(fields)
    return out


def test_a_stream_carries_every_change_in_order_then_ends(server: Server) -> None:
    _new(server.store, "s1")
    got: list[str] = []

    def later() -> None:
        time.sleep(0.3)
        _run(server.store, "s1")

    threading.Thread(target=later).start()
    with httpx.stream("GET", f"{server.url}/v1/jobs/s1/events", timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()  # returns: the server ended the stream after the terminal
    frames = _frames(body)
    got = [f["event"] for f in frames]
    assert got == ["job.queued", "job.started", "job.succeeded"]
    assert [f["id"] for f in frames] == ["s1:1", "s1:2", "s1:3"]
    import json

    jobs = [json.loads(f["data"]) for f in frames]
    assert [j["status"] for j in jobs] == ["queued", "running", "succeeded"]
    assert jobs[2]["result"] == {"tensor": [1.0]} and jobs[1]["result"] is None
    assert jobs[2] == httpx.get(f"{server.url}/v1/jobs/s1").json()


@pytest.mark.slow_heartbeat
def test_a_stream_is_woken_by_the_change_not_by_its_heartbeat(server: Server) -> None:
    _new(server.store, "w1")
    with httpx.stream("GET", f"{server.url}/v1/jobs/w1/events", timeout=10) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("event:")) == "event: job.queued"
        started = time.monotonic()
        _run(server.store, "w1")
        body = "\n".join(lines)  # the rest, up to the end of the stream after the terminal
    took = time.monotonic() - started
    assert "event: job.succeeded" in body
    # the heartbeat (30 s) and the hub's sweep (30 s) are far off: the change woke it
    assert took < 3, took


def test_last_event_id_resumes_after_that_event_only(server: Server) -> None:
    _new(server.store, "r1")
    _run(server.store, "r1", fail=True)
    r = httpx.get(f"{server.url}/v1/jobs/r1/events", headers={"Last-Event-ID": "r1:1"}, timeout=10)
    assert [f["event"] for f in _frames(r.text)] == ["job.started", "job.failed"]
    # after the terminal event: nothing more, and 204 so that an EventSource stops
    r = httpx.get(f"{server.url}/v1/jobs/r1/events", headers={"Last-Event-ID": "r1:3"}, timeout=10)
    assert r.status_code == 204
    with InferqClient(server.url) as client:
        assert [e.type for e in client.events("r1", last_event_id="r1:2")] == ["job.failed"]


@pytest.mark.parametrize("value", ["other:1", "r2", "r2:x", "r2:-1", "r2:1.5", "r2:99999999999"])
def test_a_bad_last_event_id_is_400(server: Server, value: str) -> None:
    _new(server.store, "r2")
    r = httpx.get(f"{server.url}/v1/jobs/r2/events", headers={"Last-Event-ID": value})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_last_event_id"
    assert r.json()["error"]["field"] == "Last-Event-ID"


@pytest.mark.parametrize("header", [None, "null", "nope:1", "x"])
def test_an_unknown_job_is_404(server: Server, header: str | None) -> None:
    # an unknown job is 404 whatever Last-Event-ID says (schemathesis: 400 for "null" here)
    headers = {"Last-Event-ID": header} if header is not None else {}
    r = httpx.get(f"{server.url}/v1/jobs/nope/events", headers=headers)
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
    with InferqClient(server.url) as client, pytest.raises(InferqError) as err:
        list(client.events("nope"))
    assert err.value.status == 404 and err.value.code == "job_not_found"


def test_an_idle_stream_has_heartbeats(server: Server) -> None:
    _new(server.store, "h1")
    seen = []
    with httpx.stream("GET", f"{server.url}/v1/jobs/h1/events", timeout=10) as r:
        started = time.monotonic()
        for line in r.iter_lines():
            seen.append(line)
            if line == ": heartbeat" or time.monotonic() - started > 5:
                break
    assert ": heartbeat" in seen and "event: job.queued" in seen


def test_a_client_that_disconnects_leaves_nothing_behind(server: Server) -> None:
    baseline = server.loop_tasks()
    for i in range(5):
        _new(server.store, f"d{i}")
    clients = [httpx.Client(timeout=10) for _ in range(5)]
    streams = [c.stream("GET", f"{server.url}/v1/jobs/d{i}/events") for i, c in enumerate(clients)]
    lines = [s.__enter__().iter_lines() for s in streams]  # kept: a dropped one disconnects
    assert {next(it) for it in lines} == {"retry: 1000"}  # the streams are open and waiting
    deadline = time.monotonic() + 5
    while server.streams() < 5:
        assert time.monotonic() < deadline, httpx.get(f"{server.url}/metrics").text[-3000:]
        time.sleep(0.02)
    assert server.waiting() > 0
    for s, c in zip(streams, clients, strict=True):
        s.__exit__(None, None, None)
        c.close()
    deadline = time.monotonic() + 5
    while server.streams() or server.waiting() or server.loop_tasks() - baseline:
        assert time.monotonic() < deadline, (
            server.streams(),
            server.waiting(),
            server.loop_tasks() - baseline,
        )
        time.sleep(0.05)


def test_the_clients_iterate_events_and_the_async_one_has_the_same_methods(server: Server) -> None:
    with InferqClient(server.url) as client:
        job = client.submit("identity", {"tensor": [2.0]})
        threading.Timer(0.2, _run, args=(server.store, job.id)).start()
        events = list(client.events(job.id, timeout=10))
    assert [e.type for e in events] == ["job.queued", "job.started", "job.succeeded"]
    assert events[-1].terminal and events[-1].job.status == JobStatus.SUCCEEDED
    sync_methods = {"submit", "get", "wait", "submit_many", "wait_many", "events", "cancel"}
    assert sync_methods <= set(dir(AsyncClient))

    async def go() -> None:
        async with AsyncClient(server.url) as ac:
            a = await ac.submit("identity", {"tensor": [3.0]})
            batch = await ac.submit_many([{"model": "identity", "input": {"tensor": [4.0]}}])
            b = batch[0]
            assert not isinstance(b, InferqError)
            for job_id in (a.id, b.id):
                await asyncio.to_thread(_run, server.store, job_id)
            done = await ac.wait_many([a.id, b.id], timeout=10)
            assert [j.status for j in done] == [JobStatus.SUCCEEDED] * 2
            assert (await ac.get(a.id)).status == JobStatus.SUCCEEDED
            assert [e.type async for e in ac.events(a.id)][-1] == "job.succeeded"
            assert (await ac.wait(b.id, timeout=5)).result == {"tensor": [1.0]}

    asyncio.run(go())


class Recording(httpx.HTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(f"{request.method} {request.url.path}?{request.url.query.decode()}")
        return super().handle_request(request)


class AsyncRecording(httpx.AsyncHTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(f"{request.method} {request.url.path}?{request.url.query.decode()}")
        return await super().handle_async_request(request)


def test_client_wait_follows_the_event_stream_and_keeps_its_timeout(server: Server) -> None:
    """``wait()`` rides the job's event stream (no polling); a job still queued comes back
    at its timeout (sync: within a heartbeat, 0.3 s here); an id not known yet is
    long-polled with ``?wait`` and is 404 once the time is up."""
    transport = Recording()
    with InferqClient(server.url, transport=transport) as client:
        job = client.submit("identity", {"tensor": [2.0]})
        threading.Timer(0.3, _run, args=(server.store, job.id)).start()
        done = client.wait(job.id, timeout=10)
        assert done.status is JobStatus.SUCCEEDED and done.result == {"tensor": [1.0]}
        assert transport.seen[1:] == [f"GET /v1/jobs/{job.id}/events?"], transport.seen
        idle = client.submit("identity", {"tensor": [3.0]})
        started = time.monotonic()
        still = client.wait(idle.id, timeout=1.0)
        took = time.monotonic() - started
        assert still.status is JobStatus.QUEUED and 1.0 <= took < 2.5, took
        transport.seen.clear()
        started = time.monotonic()
        with pytest.raises(InferqError) as info:
            client.wait("not-yet-known", timeout=1.0)
        assert info.value.status == 404 and time.monotonic() - started >= 0.9
        assert any("wait=" in r for r in transport.seen), transport.seen

    async def go() -> None:
        recording = AsyncRecording()
        async with AsyncClient(server.url, transport=recording) as ac:
            a = await ac.submit("identity", {"tensor": [4.0]})
            threading.Timer(0.3, _run, args=(server.store, a.id)).start()
            assert (await ac.wait(a.id, timeout=10)).status is JobStatus.SUCCEEDED
            assert recording.seen[1:] == [f"GET /v1/jobs/{a.id}/events?"], recording.seen
            b = await ac.submit("identity", {"tensor": [5.0]})
            started = time.monotonic()
            assert (await ac.wait(b.id, timeout=1.0)).status is JobStatus.QUEUED
            assert 1.0 <= time.monotonic() - started < 1.5  # on time
            # submit-and-wait in one request, as the sync client's run()
            threading.Timer(0.3, lambda: _run(server.store, _newest(server.store))).start()
            ran = await ac.run("identity", {"tensor": [6.0]}, timeout=10)
            assert ran.status is JobStatus.SUCCEEDED
            assert any(r.startswith("POST /v1/jobs?") for r in recording.seen)

    asyncio.run(go())


def _newest(store: JobStore) -> str:
    records, _ = store.list(status=JobStatus.QUEUED, limit=500)
    return max(records, key=lambda r: r.created_at).id
