"""Dead letters always fit their bus, and one message's dead-lettering never holds the others.

Over a real Kafka-protocol broker (noida-db, ~1 MiB message limit): a contract-breaking event
just under the broker's limit is accepted from a publisher, while its dead-letter copy (with
the reason headers added) would no longer fit.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry

from dlq.router import DeadLetterRouter, reason_from_headers
from dlq.store import DeadLetterFilter, DeadLetterStore
from jobstore.store import JobStore
from schemas.jobs import JobStatus
from tests.procs import Stack, wait_for
from transports.kafka import (
    EmbeddedKafka,
    KafkaConfig,
    KafkaConsumer,
    KafkaPublisher,
    ensure_topics,
)
from workers.adapters import LoadedModel, load_model
from workers.loop import Worker, WorkerConfig
from workers.metrics import WorkerMetrics
from workers.repository import ModelRepository

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

POISON_BYTES = 1_048_000  # accepted by the broker (limit ~1,048,588 per batch)


def _ce(job_id: str) -> list[tuple[str, bytes]]:
    return [
        ("ce_specversion", b"1.0"),
        ("ce_id", job_id.encode()),
        ("ce_source", b"//big-publisher"),
        ("ce_type", b"inferq.job.requested"),
        ("content-type", b"application/json"),
    ]


def _poison_value() -> bytes:
    """A binary-mode job whose input breaks the identity contract (text, not a tensor)."""
    head = b'{"model":"identity","input":{"text":"'
    tail = b'"}}'
    value = head + b"x" * (POISON_BYTES - len(head) - len(tail)) + tail
    assert len(value) == POISON_BYTES
    return value


async def _publish(bootstrap: str, topic: str, items: list[tuple[int, str, bytes]]) -> None:
    """(partition, job id, value) with a plain producer, as another service would."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", max_request_size=2 * 1024 * 1024
    )
    await producer.start()
    try:
        for partition, job_id, value in items:
            await producer.send_and_wait(
                topic, value, key=job_id.encode(), partition=partition, headers=_ce(job_id)
            )
    finally:
        await producer.stop()


async def _read_all(bootstrap: str, topic: str, count: int, limit_s: float = 20) -> list:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=2 * 1024 * 1024,
    )
    await consumer.start()
    got: list = []
    try:
        async with asyncio.timeout(limit_s):
            while len(got) < count:
                batches = await consumer.getmany(timeout_ms=200)
                for records in batches.values():
                    got += records
    finally:
        await consumer.stop()
    return got


def _good(tensor: list[float]) -> bytes:
    return json.dumps({"model": "identity", "input": {"tensor": tensor}}).encode()


@pytest.fixture(scope="module")
def identity(model_repo: Path) -> dict[tuple[str, str], LoadedModel]:
    repo = ModelRepository(model_repo)
    [config] = [c for c in repo.configs() if c.name == "identity"]
    return {config.key: load_model(repo, config, ["CPUExecutionProvider"], 1)}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    s = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    s.create_schema()
    DeadLetterStore(s.engine).create_schema()
    yield s
    s.close()


async def test_poison_just_under_the_broker_limit_is_dead_lettered_and_others_run(
    kafka_config: KafkaConfig,
    topic: str,
    store: JobStore,
    identity: dict[tuple[str, str], LoadedModel],
) -> None:
    dlq = f"{topic}.dlq"
    await ensure_topics(kafka_config, {dlq: 1})
    poison = _poison_value()
    await _publish(
        kafka_config.bootstrap,
        topic,
        [
            (0, "poison-big", poison),
            (0, "good-same", _good([1.0])),
            (1, "good-other", _good([2.0])),
        ],
    )
    letters = DeadLetterStore(store.engine)
    publisher = KafkaPublisher(kafka_config)
    await publisher.start()
    consumer = KafkaConsumer(kafka_config, topic, f"{topic}-workers")
    worker = Worker(
        consumer=consumer,
        store=store,
        models=identity,
        dead_letters=DeadLetterRouter(publisher, dlq, record=letters.add),
        metrics=WorkerMetrics(CollectorRegistry()),
        config=WorkerConfig(worker_id="size-test", fetch_timeout_s=0.05),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))

    def done() -> bool:
        rows = store.get_many(["good-same", "good-other"])
        return len(rows) == 2 and all(r.status is JobStatus.SUCCEEDED for r in rows.values())

    try:
        async with asyncio.timeout(30):
            while not done():
                assert not task.done(), task.exception()
                await asyncio.sleep(0.05)
            # every partition's offsets get committed past the poison
            while consumer.outstanding():
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await publisher.stop()

    row = store.get("poison-big")
    assert row is not None and row.status is JobStatus.FAILED and row.error_code == "invalid_input"

    sha = hashlib.sha256(poison).hexdigest()
    [record] = await _read_all(kafka_config.bootstrap, dlq, 1)
    reason = reason_from_headers(dict(record.headers))
    assert reason["code"] == "invalid_input" and reason["job-id"] == "poison-big"
    assert reason["payload-size"] == str(POISON_BYTES) and reason["payload-sha256"] == sha
    assert 0 < len(record.value) < POISON_BYTES and poison.startswith(record.value)
    assert dict(record.headers)["ce_id"] == b"poison-big"  # the original headers are kept

    [entry] = letters.list(DeadLetterFilter())
    assert entry.job_id == "poison-big" and entry.code == "invalid_input"
    assert entry.payload_size == POISON_BYTES and entry.payload_sha256 == sha
    assert entry.payload == record.value and entry.published

    # nothing is left behind on any partition for the group
    probe = AIOKafkaConsumer(bootstrap_servers=kafka_config.bootstrap, group_id=f"{topic}-workers")
    await probe.start()
    try:
        tps = [TopicPartition(topic, p) for p in (0, 1)]
        ends = await probe.end_offsets(tps)
        for tp in tps:
            assert await probe.committed(tp) == ends[tp], tp
    finally:
        await probe.stop()


@pytest.fixture
def stack(
    tmp_path: Path, kafka_broker: EmbeddedKafka, topic: str, model_repo: Path
) -> Iterator[Stack]:
    s = Stack(tmp_path, kafka_broker.bootstrap, topic, model_repo)
    yield s
    s.stop_all()


@pytest.mark.timeout(180)  # the worker 60 s, the job 30 s, SIGTERM 10 s
def test_worker_process_dead_letters_the_big_poison_and_stops_on_sigterm(stack: Stack) -> None:
    """The same poison, against `inferq worker`: later jobs run, and SIGTERM exits 0 at once."""
    proc = stack.worker()
    store = JobStore(f"sqlite:///{stack.data_dir / 'jobs.db'}")
    try:
        wait_for(lambda: "model identity" in stack.log("worker"), 60, "the worker to start")
        asyncio.run(
            _publish(
                stack.bootstrap,
                stack.topic,
                [(0, "poison-big", _poison_value()), (0, "after-1", _good([3.0]))],
            )
        )

        def ran() -> bool:
            assert proc.poll() is None, stack.log("worker")
            row = store.get("after-1")
            return row is not None and row.status is JobStatus.SUCCEEDED

        wait_for(ran, 30, "the job after the poison to run")
        os.killpg(proc.pid, signal.SIGTERM)
        started = time.monotonic()
        try:
            code = proc.wait(10)
        except subprocess.TimeoutExpired:
            raise AssertionError("worker ignored SIGTERM:\n" + stack.log("worker")) from None
        assert code == 0, stack.log("worker")
        assert time.monotonic() - started < 10
        letters = DeadLetterStore(store.engine).list(DeadLetterFilter())
        assert [e.job_id for e in letters] == ["poison-big"]
    finally:
        store.close()


async def test_a_broker_that_takes_less_than_configured_still_gets_a_letter(
    kafka_config: KafkaConfig, topic: str, tmp_path: Path
) -> None:
    """The producer is told 4 MiB, the broker takes ~1 MiB: the broker's refusal
    (MESSAGE_TOO_LARGE) is final for those bytes, so the letter is cut down once more."""
    from dataclasses import replace

    from dlq.router import DeadLetter
    from transports.base import Delivery

    dlq = f"{topic}.dlq"
    await ensure_topics(kafka_config, {dlq: 1})
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    letters = DeadLetterStore(store.engine)
    letters.create_schema()
    publisher = KafkaPublisher(replace(kafka_config, max_request_size=4 * 1024 * 1024))
    await publisher.start()
    original = b"q" * 1_100_000
    try:
        router = DeadLetterRouter(publisher, dlq, record=letters.add, head_bytes=2 * 1024 * 1024)
        routed = await router.send(
            DeadLetter(
                Delivery(original, b"k", {"ce_id": b"x"}, topic, "0@7"), "invalid_input", "m"
            )
        )
    finally:
        await publisher.stop()
    assert routed.acked and routed.published and routed.trimmed
    [record] = await _read_all(kafka_config.bootstrap, dlq, 1)
    reason = reason_from_headers(dict(record.headers))
    assert reason["payload-size"] == str(len(original)) and reason["payload-truncated"] == "true"
    assert 0 < len(record.value) <= 1024 and original.startswith(record.value)
    [entry] = letters.list(DeadLetterFilter())
    assert entry.published and entry.payload == record.value
    store.close()
