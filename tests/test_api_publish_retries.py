"""`inferq_publish_retries_total` counts the retries that happened, each once, however many
submissions are publishing at the same time through the one shared publisher."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from jobstore.store import JobStore
from producers.app import ApiConfig, ApiDeps, create_app
from schemas.contracts import ModelConfig
from transports.base import Headers, PublishError
from transports.memory import MemoryBroker, MemoryPublisher

TOPIC = "jobs"
MODELS = [ModelConfig(name="identity", version="1", adapter="identity", default=True)]
JOB = {"model": "identity", "input": {"tensor": [1]}}
STEP_S = 5.0  # the most any one step below waits for the other request


class OneFlakyPublisher(MemoryPublisher):
    """The job marked ``flaky`` loses its first attempt, and only once the other job's
    publish is under way; the other job's publish is held until the flaky one's retry went
    through. So the other request is publishing for the whole of the retry."""

    def __init__(self, broker: MemoryBroker) -> None:
        super().__init__(broker)
        self.other_started = asyncio.Event()
        self.flaky_done = asyncio.Event()
        self.failed = False
        self.calls = 0

    async def publish(
        self, destination: str, value: bytes, *, key: bytes | None = None, headers: Headers = ()
    ) -> None:
        self.calls += 1
        if b'"flaky"' not in value:
            self.other_started.set()
            await asyncio.wait_for(self.flaky_done.wait(), STEP_S)
        elif not self.failed:
            await asyncio.wait_for(self.other_started.wait(), STEP_S)
            self.failed = True
            raise PublishError("the first attempt was lost")
        await super().publish(destination, value, key=key, headers=headers)
        if b'"flaky"' in value:
            self.flaky_done.set()


@pytest.fixture
async def setup(
    tmp_path: Path,
) -> AsyncIterator[tuple[httpx.AsyncClient, OneFlakyPublisher, CollectorRegistry]]:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    publisher = OneFlakyPublisher(MemoryBroker())
    registry = CollectorRegistry()
    # a per-try timeout (timeout / attempts) well past the waits above: the only retry is
    # the one the publisher injects
    config = ApiConfig(
        topic=TOPIC, publish_attempts=3, publish_timeout_s=3 * 3 * STEP_S, backlog_cache_s=0
    )
    app = create_app(
        ApiDeps(
            store=store,
            publisher=publisher,
            models=lambda: MODELS,
            config=config,
            registry=registry,
        )
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        yield client, publisher, registry
    store.close()


async def test_retry_metric_counts_only_the_retries_that_happened(
    setup: tuple[httpx.AsyncClient, OneFlakyPublisher, CollectorRegistry],
) -> None:
    client, publisher, registry = setup
    flaky, steady = await asyncio.gather(
        client.post("/v1/jobs", json={**JOB, "metadata": {"case": "flaky"}}),
        client.post("/v1/jobs", json=JOB),
    )
    assert (flaky.status_code, steady.status_code) == (202, 202), (flaky.text, steady.text)
    retries = publisher.calls - 2  # one attempt each, and every further attempt a retry
    assert retries == 1
    assert registry.get_sample_value("inferq_publish_retries_total") == retries
