"""/readyz and store outages in process: which check fails, degraded versus not ready, and
503 store_unavailable (never 500) from every route while the database cannot be reached."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from dlq.http import make_router
from dlq.redrive import Redriver
from dlq.store import DeadLetterStore
from jobstore.store import JobStore
from producers.app import ApiConfig, ApiDeps, create_app
from schemas.contracts import ModelConfig
from tests.procs import free_port
from transports.base import TransportError
from transports.memory import MemoryBroker, MemoryPublisher

MODELS = [
    ModelConfig(name="minilm", version="1", adapter="text-embedding", default=True),
    ModelConfig(name="identity", version="1", adapter="identity", default=True),
]
CPU = "CPUExecutionProvider"


class UnreachableBus(MemoryPublisher):
    """A publisher whose broker does not answer (what KafkaPublisher.check reports)."""

    async def check(self) -> None:
        raise TransportError("Kafka at 127.0.0.1:1 does not answer")


def _client(store: JobStore, publisher: MemoryPublisher) -> httpx.AsyncClient:
    app = create_app(
        ApiDeps(
            store=store,
            publisher=publisher,
            models=lambda: MODELS,
            config=ApiConfig(topic="jobs", backlog_cache_s=0, readiness_timeout_s=2),
            registry=CollectorRegistry(),
        )
    )
    letters = DeadLetterStore(store.engine)
    redriver = Redriver(letters, publisher, "jobs", store)
    app.include_router(make_router(letters, redriver))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    s = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    s.create_schema()
    DeadLetterStore(s.engine).create_schema()
    return s


@pytest.fixture
async def client(store: JobStore) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(store, MemoryPublisher(MemoryBroker())) as c:
        yield c


async def test_no_live_worker_is_degraded_not_unready_and_strict_makes_it_503(
    client: httpx.AsyncClient, store: JobStore
) -> None:
    r = await client.get("/readyz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "degraded" and body["degraded"] == ["workers"], body
    assert body["failing"] == []
    assert body["checks"]["workers"]["live"] == 0
    assert body["checks"]["store"]["status"] == "ok"
    assert body["checks"]["models"]["models"] == ["minilm/1", "identity/1"]
    strict = await client.get("/readyz", params={"strict": "true"})
    assert strict.status_code == 503 and strict.json()["status"] == "degraded"
    # jobs are accepted meanwhile: they wait on the bus for a worker
    job = {"model": "identity", "input": {"tensor": [1.0]}}
    submitted = await client.post("/v1/jobs", json=job)
    assert submitted.status_code == 202

    store.heartbeat("w1", [{"name": "identity", "version": "1", "provider": CPU}])
    body = (await client.get("/readyz")).json()
    assert body["status"] == "degraded"
    assert body["checks"]["workers"]["models_without_worker"] == ["minilm/1"]

    store.heartbeat("w2", [{"name": "minilm", "version": "1", "provider": CPU}])
    r = await client.get("/readyz", params={"strict": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ready" and body["degraded"] == [] and body["failing"] == []
    assert body["checks"]["workers"]["providers"] == {"identity/1": [CPU], "minilm/1": [CPU]}


async def test_a_bus_that_cannot_publish_makes_readyz_503_naming_the_publisher(
    store: JobStore,
) -> None:
    async with _client(store, UnreachableBus(MemoryBroker())) as client:
        r = await client.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "not_ready" and body["failing"] == ["publisher"], body
    assert "does not answer" in body["checks"]["publisher"]["error"]
    assert body["checks"]["store"]["status"] == "ok"


@pytest.fixture
async def down_client() -> AsyncIterator[httpx.AsyncClient]:
    # a PostgreSQL URL where nothing listens: every statement fails to connect
    store = JobStore(f"postgresql://postgres@127.0.0.1:{free_port()}/test")
    async with _client(store, MemoryPublisher(MemoryBroker())) as c:
        yield c
    store.close()


ROUTES = [
    ("POST", "/v1/jobs", {"json": {"model": "identity", "input": {"tensor": [1]}}}),
    ("GET", "/v1/jobs/some-id", {}),
    ("GET", "/v1/jobs/some-id", {"params": {"wait": 0.5}}),
    ("GET", "/v1/jobs", {"params": {"status": "queued"}}),
    ("POST", "/v1/jobs/some-id/cancel", {}),
    ("GET", "/v1/jobs/some-id/webhooks", {}),
    ("POST", "/v1/jobs/some-id/webhooks/replay", {}),
    ("GET", "/v1/dlq", {}),
    ("GET", "/v1/dlq/some-letter", {}),
    ("POST", "/v1/dlq/redrive", {"json": {"ids": ["some-letter"]}}),
    ("GET", "/v1/models", {}),
    ("GET", "/v1/autoscale", {}),
]


@pytest.mark.parametrize(("method", "path", "kw"), ROUTES)
async def test_every_store_route_answers_503_store_unavailable_while_the_store_is_down(
    down_client: httpx.AsyncClient, method: str, path: str, kw: dict
) -> None:
    r = await down_client.request(method, path, **kw)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "store_unavailable"
    assert int(r.headers["Retry-After"]) > 0


async def test_readyz_fails_on_the_store_and_metrics_still_serve(
    down_client: httpx.AsyncClient,
) -> None:
    r = await down_client.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["failing"] == ["store"], body
    assert body["checks"]["workers"]["status"] == "unknown"
    await down_client.post("/v1/jobs", json={"model": "identity", "input": {"tensor": [1]}})
    metrics = await down_client.get("/metrics")
    assert metrics.status_code == 200
    assert 'inferq_jobs_rejected_total{code="store_unavailable"} 1.0' in metrics.text


async def test_a_database_that_never_answers_is_503_within_the_connect_timeout() -> None:
    """A server that accepts TCP and says nothing (a partition, a wedged host): without a
    connect timeout libpq waits as long as TCP does and every request hangs."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # the kernel completes handshakes; nobody ever answers
        port = silent.getsockname()[1]
        store = JobStore(f"postgresql://postgres@127.0.0.1:{port}/test", connect_timeout_s=1)
        try:
            async with _client(store, MemoryPublisher(MemoryBroker())) as client:
                started = time.monotonic()
                r = await client.get("/v1/jobs/some-id")
                elapsed = time.monotonic() - started
        finally:
            store.close()
    assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
    assert elapsed < 5, elapsed
