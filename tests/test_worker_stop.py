"""A worker told to stop while the job store is down stops: its unstored outcomes stay
unacknowledged for redelivery, and nothing waits for room that will never come."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from dlq.router import DeadLetterRouter
from jobstore.errors import StoreUnavailable
from jobstore.store import JobStore
from tests.test_worker import DLQ, GROUP, TOPIC, Harness, job
from transports.memory import MemoryBroker, MemoryConsumer, MemoryPublisher
from workers.adapters import LoadedModel, load_model
from workers.loop import Worker, WorkerConfig
from workers.metrics import WorkerMetrics
from workers.repository import ModelRepository


@pytest.fixture
def bus(tmp_path: Path, model_repo: Path) -> Iterator[Harness]:
    """The in-memory bus of test_worker, the real models and a SQLite store."""
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    repo = ModelRepository(model_repo)
    models: dict[tuple[str, str], LoadedModel] = {
        c.key: load_model(repo, c, ["CPUExecutionProvider"], 1) for c in repo.configs()
    }
    yield Harness(MemoryBroker(), store, models)
    store.close()


@pytest.mark.timeout(60)
async def test_a_worker_full_of_work_stops_during_a_store_outage(
    bus: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(*args: Any, **kwargs: Any) -> None:
        raise StoreUnavailable("the database is down")

    monkeypatch.setattr(JobStore, "complete", down)  # rows are claimed, outcomes cannot land
    for i in range(8):
        await bus.publish(job(f"full-{i}", "identity", {"tensor": [float(i)]}))
    # one record a fetch: more than 4 x fetch_max_records in flight makes the loop wait
    worker = Worker(
        consumer=MemoryConsumer(bus.broker, TOPIC, GROUP),
        store=bus.store,
        models=bus.models,
        dead_letters=DeadLetterRouter(MemoryPublisher(bus.broker), DLQ),
        metrics=WorkerMetrics(CollectorRegistry()),
        config=WorkerConfig(worker_id="full", fetch_max_records=1, fetch_timeout_s=0.02),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    async with asyncio.timeout(20):
        while len(bus.store.get_many([f"full-{i}" for i in range(8)])) < 5:
            await asyncio.sleep(0.01)
    stop.set()
    async with asyncio.timeout(20):
        await task
    assert bus.committed() == 0  # nothing stored, so nothing acknowledged
