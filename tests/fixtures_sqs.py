"""SQS worker harness: an in-process Worker over moto_server, a store and real models."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from dlq.router import DeadLetterRouter
from jobstore.store import JobStore
from schemas.contracts import ModelConfig
from schemas.jobs import JobStatus
from transports.base import Delivery
from transports.blobs import ClaimCheck
from transports.sqs import SqsConfig, SqsConsumer, SqsPublisher, dlq_name
from workers.adapters import LoadedModel, load_model
from workers.errors import InferenceError
from workers.loop import Worker, WorkerConfig
from workers.metrics import WorkerMetrics
from workers.repository import ModelRepository
from workers.retry import RetryPolicy


@dataclass
class AlwaysRetryable:
    """A model whose every batch fails with a retryable error (a runtime that keeps failing)."""

    config: ModelConfig = field(
        default_factory=lambda: ModelConfig(
            name="broken", version="1", adapter="identity", max_batch_size=8, max_wait_ms=5
        )
    )
    provider: str = "CPUExecutionProvider"
    calls: int = 0

    def run(self, inputs: list[BaseModel]) -> list[dict[str, Any]]:
        self.calls += 1
        raise InferenceError("device lost", retryable=True)


@dataclass
class SqsHarness:
    config: SqsConfig
    queue: str
    store: JobStore
    models: dict[tuple[str, str], LoadedModel]
    claim_check: ClaimCheck | None = None

    def send(self, body: str, **extra: Any) -> None:
        """A plain boto3 send_message, as another service would publish."""
        sqs = boto3.client("sqs", endpoint_url=self.config.endpoint_url)
        try:
            url = sqs.get_queue_url(QueueName=self.queue)["QueueUrl"]
            sqs.send_message(QueueUrl=url, MessageBody=body, **extra)
        finally:
            sqs.close()

    def messages_left(self) -> int:
        """Messages still on the queue: visible, in flight (received, not deleted), delayed."""
        sqs = boto3.client("sqs", endpoint_url=self.config.endpoint_url)
        try:
            url = sqs.get_queue_url(QueueName=self.queue)["QueueUrl"]
            names = ["", "NotVisible", "Delayed"]
            attrs = sqs.get_queue_attributes(
                QueueUrl=url, AttributeNames=[f"ApproximateNumberOfMessages{n}" for n in names]
            )["Attributes"]
        finally:
            sqs.close()
        return sum(int(v) for v in attrs.values())

    def event(self, job_id: str, data: dict[str, Any], **attrs: Any) -> str:
        doc: dict[str, Any] = {
            "specversion": "1.0",
            "id": job_id,
            "source": "//test",
            "type": "inferq.job.requested",
        }
        doc.update(attrs)
        doc["data"] = data
        return json.dumps({k: v for k, v in doc.items() if v is not None})

    async def run_until(
        self,
        done: Callable[[], bool],
        limit_s: float = 40,
        retry_backoff_s: float = 1.0,
        retry_backoff_max_s: float = 300.0,
        **overrides: Any,
    ) -> Worker:
        publisher = SqsPublisher(self.config)
        await publisher.start()
        worker = Worker(
            consumer=SqsConsumer(self.config, self.queue),
            store=self.store,
            models=self.models,
            dead_letters=DeadLetterRouter(publisher, dlq_name(self.queue)),
            metrics=WorkerMetrics(CollectorRegistry()),
            claim_check=self.claim_check,
            config=WorkerConfig(
                worker_id="sqs-test",
                fetch_timeout_s=1,
                max_deliveries=self.config.max_receive_count,
                redelivers=True,  # as SqsTransport's capabilities say
                **overrides,
            ),
            retry=RetryPolicy(
                max_attempts=100, base_delay_s=retry_backoff_s, max_delay_s=retry_backoff_max_s
            ),
        )
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        try:
            deadline = time.monotonic() + limit_s
            while not done():
                assert not task.done(), task.exception()
                assert time.monotonic() < deadline, (
                    f"timed out after {limit_s}s waiting for {done.__doc__ or done}"
                )
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            await publisher.stop()
        return worker

    async def dead_letters(self, count: int) -> list[Delivery]:
        got: list[Delivery] = []
        async with SqsConsumer(self.config, dlq_name(self.queue)) as dlq:
            deadline = time.monotonic() + 15
            while len(got) < count and time.monotonic() < deadline:
                got += await dlq.fetch(10, 1)
        return got

    def status(self, job_id: str) -> JobStatus | None:
        record = self.store.get(job_id)
        return record.status if record else None


@pytest.fixture(scope="module")
def identity_model(model_repo: Path) -> LoadedModel:
    repo = ModelRepository(model_repo)
    [config] = [c for c in repo.configs() if c.name == "identity"]
    return load_model(repo, config, ["CPUExecutionProvider"], 1)


@pytest_asyncio.fixture
async def harness(
    sqs_config: SqsConfig, queue: str, tmp_path: Path, identity_model: LoadedModel
) -> AsyncIterator[SqsHarness]:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    broken = AlwaysRetryable()
    models = {identity_model.config.key: identity_model, broken.config.key: broken}
    yield SqsHarness(sqs_config, queue, store, models)
    store.close()


TENSOR = {"model": "identity", "input": {"tensor": [1.0, 2.0]}}
