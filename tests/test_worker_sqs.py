"""The worker over SQS (moto_server), in-process: bad input, duplicates, retries to the DLQ."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import boto3
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from dlq.router import DeadLetterRouter, reason_from_headers
from jobstore.store import JobStore
from schemas.contracts import ModelConfig
from schemas.jobs import JobStatus
from transports.base import Delivery
from transports.sqs import SqsConfig, SqsConsumer, SqsPublisher, dlq_name
from workers.adapters import LoadedModel, load_model
from workers.errors import InferenceError
from workers.loop import Worker, WorkerConfig
from workers.metrics import WorkerMetrics
from workers.repository import ModelRepository

pytestmark = pytest.mark.sqs


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

    def send(self, body: str, **extra: Any) -> None:
        """A plain boto3 send_message, as another service would publish."""
        sqs = boto3.client("sqs", endpoint_url=self.config.endpoint_url)
        try:
            url = sqs.get_queue_url(QueueName=self.queue)["QueueUrl"]
            sqs.send_message(QueueUrl=url, MessageBody=body, **extra)
        finally:
            sqs.close()

    def event(self, job_id: str, data: dict[str, Any], **attrs: Any) -> str:
        doc = {
            "specversion": "1.0",
            "id": job_id,
            "source": "//test",
            "type": "inferq.job.requested",
        }
        doc.update(attrs)
        doc["data"] = data
        return json.dumps({k: v for k, v in doc.items() if v is not None})

    async def run_until(
        self, done: Callable[[], bool], limit_s: float = 40, **overrides: Any
    ) -> Worker:
        publisher = SqsPublisher(self.config)
        await publisher.start()
        worker = Worker(
            consumer=SqsConsumer(self.config, self.queue),
            store=self.store,
            models=self.models,
            dead_letters=DeadLetterRouter(publisher, dlq_name(self.queue)),
            metrics=WorkerMetrics(CollectorRegistry()),
            config=WorkerConfig(
                worker_id="sqs-test",
                fetch_timeout_s=1,
                max_deliveries=self.config.max_receive_count,
                **overrides,
            ),
        )
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        try:
            deadline = time.monotonic() + limit_s
            while not done():
                assert not task.done(), task.exception()
                assert time.monotonic() < deadline, "timed out"
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


async def test_a_direct_boto3_job_runs_once_even_when_sent_twice(harness: SqsHarness) -> None:
    for _ in range(2):
        harness.send(harness.event("direct-1", TENSOR))
    await harness.run_until(lambda: harness.status("direct-1") is JobStatus.SUCCEEDED)
    await asyncio.sleep(1.5)  # the second copy, if any, is acknowledged without running
    record = harness.store.get("direct-1")
    assert record is not None and record.attempts == 1
    assert record.result == {"tensor": [1.0, 2.0]} and record.source == "//test"


@pytest.mark.parametrize(
    ("body", "code", "job_id"),
    [
        ("this is { not json", "malformed_message", None),
        (
            json.dumps(
                {
                    "specversion": "1.0",
                    "source": "//t",
                    "type": "inferq.job.requested",
                    "data": TENSOR,
                }
            ),
            "invalid_envelope",
            None,
        ),
        (
            json.dumps({"specversion": "1.0", "id": "no-type", "source": "//t", "data": TENSOR}),
            "invalid_envelope",
            "no-type",
        ),
    ],
    ids=["body-not-json", "cloudevent-without-id", "cloudevent-without-type"],
)
async def test_bad_messages_go_to_the_dlq_with_their_reason_and_the_worker_goes_on(
    harness: SqsHarness, body: str, code: str, job_id: str | None
) -> None:
    harness.send(body)
    harness.send(harness.event("after-bad", TENSOR))
    await harness.run_until(lambda: harness.status("after-bad") is JobStatus.SUCCEEDED)
    [dead] = await harness.dead_letters(1)
    reason = reason_from_headers(dict(dead.headers))
    assert reason["code"] == code and dead.value == body.encode()
    if job_id is not None:  # the id is readable: its row says why
        record = harness.store.get(job_id)
        assert record is not None and record.status is JobStatus.FAILED
        assert record.error_code == code and "type" in (record.error_message or "")


async def test_a_job_that_keeps_failing_lands_in_the_dlq_after_max_receive_count(
    harness: SqsHarness,
) -> None:
    harness.send(harness.event("doomed", {"model": "broken", "input": {"tensor": [1.0]}}))
    limit = harness.config.max_receive_count
    await harness.run_until(
        lambda: harness.status("doomed") is JobStatus.FAILED,
        retry_backoff_s=0.2,
        retry_backoff_max_s=1.0,
    )
    record = harness.store.get("doomed")
    assert record is not None and record.attempts == limit
    assert record.error_code == "inference_failed"
    assert f"gave up after {limit} attempts" in (record.error_message or "")
    [dead] = await harness.dead_letters(1)
    reason = reason_from_headers(dict(dead.headers))
    assert reason["code"] == "inference_failed" and reason["attempts"] == str(limit)
    assert reason["job-id"] == "doomed"


async def test_a_message_received_past_the_limit_is_dead_lettered_unrun(
    harness: SqsHarness,
) -> None:
    # a queue whose redrive allows more receives than the worker does: the worker stops it
    harness.send(harness.event("too-often", TENSOR))
    config = replace(harness.config, visibility_timeout_s=1)
    async with SqsConsumer(config, harness.queue) as consumer:
        for _ in range(2):
            [d] = await consumer.fetch(1, 2)
            await consumer.nack(d, 0)
    await _run_with_limit(harness, "too-often", 2)
    record = harness.store.get("too-often")
    assert record is not None and record.error_code == "attempts_exhausted"
    assert record.attempts == 0  # never ran


async def _run_with_limit(h: SqsHarness, job_id: str, limit: int) -> None:
    config = replace(h.config, max_receive_count=limit)
    await replace(h, config=config).run_until(lambda: h.status(job_id) is JobStatus.FAILED)
