"""An input_url that cannot be read for now (S3 down) is retried with backoff, then
dead-lettered; it never holds its partition's commit (it used to be neither acked nor
nacked)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry

from dlq.router import DeadLetterRouter, reason_from_headers
from jobstore.store import JobStore
from schemas.envelope import new_envelope
from schemas.jobs import JobRequest, JobStatus
from transports.blobs import BlobError, ClaimCheck, MemoryBlobs
from transports.memory import MemoryBroker, MemoryConsumer, MemoryPublisher
from workers.adapters import LoadedModel, load_model
from workers.loop import Worker, WorkerConfig
from workers.metrics import WorkerMetrics
from workers.repository import ModelRepository
from workers.retry import RetryPolicy, RetryPump

TOPIC, DLQ, GROUP = "jobs", "jobs.dlq", "workers"


@dataclass
class FlakyS3(MemoryBlobs):
    """S3 that is unreachable for the first ``down`` reads."""

    down: int = 0
    reads: int = field(default=0)

    async def get(self, bucket: str, key: str, max_bytes: int) -> bytes:
        self.reads += 1
        if self.reads <= self.down:
            raise BlobError("S3 is unreachable (injected)")
        return await super().get(bucket, key, max_bytes)


async def _run(tmp_path: Path, model_repo: Path, down: int, attempts: int) -> tuple:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    repo = ModelRepository(model_repo)
    config = next(c for c in repo.configs() if c.name == "identity" and c.default)
    models: dict[tuple[str, str], LoadedModel] = {
        config.key: load_model(repo, config, ["CPUExecutionProvider"], 1)
    }
    blobs = FlakyS3({"inputs": {"x.json": json.dumps({"tensor": [4]}).encode()}}, down=down)
    broker = MemoryBroker()
    publisher = MemoryPublisher(broker)
    env = new_envelope(
        "s3-job", JobRequest(model="identity", input_url="s3://inputs/x.json"), "urn:test"
    )
    headers, value = env.to_binary()
    await publisher.publish(TOPIC, value, key=b"s3-job", headers=headers)
    after = new_envelope("after", JobRequest(model="identity", input={"tensor": [1]}), "urn:t")
    headers2, value2 = after.to_binary()
    await publisher.publish(TOPIC, value2, key=b"after", headers=headers2)
    policy = RetryPolicy(max_attempts=attempts, base_delay_s=0.05, max_delay_s=0.1, jitter=0)
    worker = Worker(
        consumer=MemoryConsumer(broker, TOPIC, GROUP),
        store=store,
        models=models,
        dead_letters=DeadLetterRouter(publisher, DLQ),
        metrics=WorkerMetrics(CollectorRegistry()),
        config=WorkerConfig(worker_id="w", fetch_timeout_s=0.02),
        retry=policy,
        retry_pump=RetryPump(store, publisher, TOPIC, interval_s=0.05),
        claim_check=ClaimCheck(blobs, bucket=None, allowed_buckets=frozenset({"inputs"})),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))

    def settled() -> bool:
        rows = store.get_many(["s3-job", "after"])
        done = len(rows) == 2 and all(r.status.terminal for r in rows.values())
        # every message on the topic acknowledged and committed: nothing holds the partition
        topic = broker.topic(TOPIC)
        return done and topic.committed.get(GROUP, 0) == len(topic.messages)

    try:
        async with asyncio.timeout(20):
            while not settled():
                if task.done():
                    task.result()
                await asyncio.sleep(0.02)
    finally:
        stop.set()
        await task
    rows = store.get_many(["s3-job", "after"])
    letters = [reason_from_headers(h) for _, _, h in broker.messages(DLQ)]
    store.close()
    return rows, letters, blobs


async def test_an_unreadable_input_url_is_retried_and_runs_when_s3_is_back(
    tmp_path: Path, model_repo: Path
) -> None:
    rows, letters, blobs = await _run(tmp_path, model_repo, down=2, attempts=5)
    assert rows["after"].status is JobStatus.SUCCEEDED
    assert rows["s3-job"].status is JobStatus.SUCCEEDED, rows["s3-job"]
    assert rows["s3-job"].result == {"tensor": [4.0]}
    assert letters == [] and blobs.reads == 3


async def test_an_input_url_unreadable_on_every_attempt_is_dead_lettered(
    tmp_path: Path, model_repo: Path
) -> None:
    rows, letters, blobs = await _run(tmp_path, model_repo, down=100, attempts=3)
    assert rows["after"].status is JobStatus.SUCCEEDED
    job = rows["s3-job"]
    assert job.status is JobStatus.FAILED and job.error_code == "input_unavailable", job
    assert [letter["code"] for letter in letters] == ["input_unavailable"]
    assert blobs.reads == 3
