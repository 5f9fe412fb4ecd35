"""Retries that don't block the partition, poison to the DLQ, and redrive, on the in-memory bus."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from dlq.redrive import Redriver
from dlq.router import DeadLetterRouter
from dlq.store import DeadLetterFilter, DeadLetterStore
from jobstore.store import JobStore
from schemas.contracts import ModelConfig, TensorInput
from schemas.envelope import new_envelope
from schemas.jobs import JobRequest, JobStatus
from transports.kafka import KafkaConfig, KafkaConsumer, KafkaPublisher
from transports.memory import MemoryBroker, MemoryConsumer, MemoryPublisher
from workers.errors import InferenceError
from workers.loop import Worker, WorkerConfig
from workers.metrics import WorkerMetrics
from workers.retry import RetryPolicy, RetryPump

TOPIC, DLQ, GROUP = "jobs", "jobs.dlq", "workers"


@dataclass
class Scripted:
    """Identity-like model: value 13 always fails (poison); value 7 fails until the model
    "recovers" (a busy GPU), whether it runs in a batch or alone."""

    config: ModelConfig = field(
        default_factory=lambda: ModelConfig(
            name="scripted", version="1", adapter="identity", max_batch_size=16, max_wait_ms=2
        )
    )
    provider: str = "CPUExecutionProvider"
    calls: dict[float, int] = field(default_factory=dict)
    broken: bool = True
    done_at: dict[float, float] = field(default_factory=dict)
    recover_at: float = field(default_factory=lambda: time.monotonic() + 1.5)

    def run(self, inputs: list[BaseModel]) -> list[dict[str, Any]]:
        out = []
        for i in inputs:
            assert isinstance(i, TensorInput)
            v = i.tensor[0]
            self.calls[v] = self.calls.get(v, 0) + 1
            if v == 13 and self.broken:
                raise InferenceError("model cannot handle 13", retryable=False)
            if v == 7 and time.monotonic() < self.recover_at:
                raise InferenceError("GPU busy, try again", retryable=True)
            self.done_at[v] = time.monotonic()
            out.append({"tensor": i.tensor})
        return out


@dataclass
class Rig:
    broker: MemoryBroker
    store: JobStore
    letters: DeadLetterStore
    model: Scripted

    def worker(self, policy: RetryPolicy) -> Worker:
        pub = MemoryPublisher(self.broker)
        return Worker(
            consumer=MemoryConsumer(self.broker, TOPIC, GROUP),
            store=self.store,
            models={self.model.config.key: self.model},
            dead_letters=DeadLetterRouter(pub, DLQ, record=self.letters.add),
            metrics=WorkerMetrics(CollectorRegistry()),
            config=WorkerConfig(worker_id="w", fetch_timeout_s=0.02),
            retry=policy,
            retry_pump=RetryPump(self.store, pub, TOPIC, interval_s=0.02),
        )

    async def run_until(self, policy: RetryPolicy, done: Callable[[], bool]) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(self.worker(policy).run(stop))
        try:
            async with asyncio.timeout(30):
                while not done():
                    if task.done():
                        task.result()
                    await asyncio.sleep(0.01)
        finally:
            stop.set()
            await task

    def status(self, job_id: str) -> JobStatus | None:
        record = self.store.get(job_id)
        return record.status if record else None


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    letters = DeadLetterStore(store.engine)
    letters.create_schema()
    yield Rig(MemoryBroker(), store, letters, Scripted())
    store.close()


async def _publish(rig: Rig, job_id: str, value: float) -> None:
    env = new_envelope(job_id, JobRequest(model="scripted", input={"tensor": [value]}), "urn:t")
    headers, body = env.to_binary()
    await MemoryPublisher(rig.broker).publish(TOPIC, body, key=job_id.encode(), headers=headers)


def test_policy_backoff_grows_is_capped_and_jittered() -> None:
    fixed = RetryPolicy(base_delay_s=1, max_delay_s=10, jitter=0.5, rng=lambda: 1.0)
    assert [fixed.delay_s(a) for a in (1, 2, 3, 4, 5, 6)] == [1, 2, 4, 8, 10, 10]
    low = RetryPolicy(base_delay_s=1, max_delay_s=10, jitter=0.5, rng=lambda: 0.0)
    assert low.delay_s(3) == 2.0  # half of the 4 s is jitter
    policy = RetryPolicy(max_attempts=3)
    assert policy.should_retry("inference_failed", True, 1)
    assert not policy.should_retry("inference_failed", True, 3)  # exhausted
    assert not policy.should_retry("inference_failed", False, 1)  # permanent
    assert not policy.should_retry("invalid_input", True, 1)  # never retried


async def test_transient_retries_poison_dead_letters_and_good_jobs_are_not_held_up(
    rig: Rig,
) -> None:
    # attempt 1 at ~0 s and 2 at ~1 s fail (still busy), 3 at ~3 s succeeds
    policy = RetryPolicy(max_attempts=4, base_delay_s=1.0, max_delay_s=5, jitter=0)
    await _publish(rig, "transient", 7)
    await _publish(rig, "poison", 13)
    good = [f"good-{i}" for i in range(30)]
    started = time.monotonic()
    for i, job_id in enumerate(good):
        await _publish(rig, job_id, 100 + i)
    await rig.run_until(
        policy,
        lambda: all(
            rig.status(j) in (JobStatus.SUCCEEDED, JobStatus.FAILED)
            for j in ["transient", "poison", *good]
        ),
    )
    # good jobs published behind the failing ones finished before the first backoff ended
    slowest_good = max(rig.model.done_at[100 + i] for i in range(30)) - started
    assert slowest_good < policy.delay_s(1), slowest_good
    transient = rig.store.get("transient")
    assert transient is not None and transient.status is JobStatus.SUCCEEDED
    assert transient.attempts >= 2  # it failed, waited, and passed on a retry
    poison = rig.store.get("poison")
    assert poison is not None and poison.status is JobStatus.FAILED
    assert poison.error_code == "inference_failed" and "13" in (poison.error_message or "")
    assert poison.attempts == 1 and rig.model.calls[13] == 1  # permanent: never retried
    [letter] = rig.letters.list(DeadLetterFilter())
    assert letter.job_id == "poison" and letter.code == "inference_failed"
    assert letter.model == "scripted" and letter.attempts == 1


async def test_exhausted_retries_go_to_the_dlq_with_attempts(rig: Rig) -> None:
    policy = RetryPolicy(max_attempts=2, base_delay_s=0.05, jitter=0)
    rig.model.recover_at = float("inf")  # busy for good: the retries run out
    await _publish(rig, "transient", 7)
    await rig.run_until(policy, lambda: rig.status("transient") is JobStatus.FAILED)
    record = rig.store.get("transient")
    assert record is not None and record.attempts == 2 and record.error_retryable
    [letter] = rig.letters.list(DeadLetterFilter(code="inference_failed"))
    assert letter.attempts == 2


async def test_redrive_after_the_fix_succeeds_and_is_idempotent(rig: Rig) -> None:
    policy = RetryPolicy(max_attempts=1)
    await _publish(rig, "poison", 13)
    await rig.run_until(policy, lambda: rig.status("poison") is JobStatus.FAILED)
    [letter] = rig.letters.list(DeadLetterFilter(model="scripted"))
    redriver = Redriver(rig.letters, MemoryPublisher(rig.broker), TOPIC, rig.store)
    rig.model.broken = False  # the model is fixed
    first = await redriver.redrive([letter.id])
    second = await redriver.redrive([letter.id])
    assert first.redriven == [letter.id] and second.already_redriven == [letter.id]
    assert len(rig.broker.messages(TOPIC)) == 2  # the original and exactly one redrive
    record = rig.store.get("poison")
    assert record is not None and record.status is JobStatus.QUEUED and record.attempts == 1
    await rig.run_until(policy, lambda: rig.status("poison") is JobStatus.SUCCEEDED)
    record = rig.store.get("poison")
    assert record is not None and record.attempts == 2  # history kept: same id, 2nd attempt
    assert rig.letters.list(DeadLetterFilter()) == []  # nothing waiting any more
    assert len(rig.letters.list(DeadLetterFilter(include_redriven=True))) == 1
    assert rig.letters.purge(DeadLetterFilter(model="nothing-matches")) == 0


async def test_stale_copy_of_a_job_in_backoff_is_not_run_early(rig: Rig) -> None:
    policy = RetryPolicy(max_attempts=5, base_delay_s=60, jitter=0)
    await _publish(rig, "transient", 7)
    await rig.run_until(
        policy,
        lambda: (
            rig.status("transient") is JobStatus.QUEUED
            and getattr(rig.store.get("transient"), "retry_at", None) is not None
        ),
    )
    await _publish(rig, "transient", 7)  # e.g. a redelivery of the original
    await rig.run_until(policy, lambda: rig.broker.topic(TOPIC).committed.get(GROUP) == 2)
    assert rig.model.calls[7] == 1
    record = rig.store.get("transient")
    assert record is not None and record.status is JobStatus.QUEUED
    assert record.to_resource().next_attempt_at is not None


@pytest.mark.kafka
async def test_transient_and_poison_on_a_real_broker(
    tmp_path: Path, kafka_config: KafkaConfig, topic: str
) -> None:
    """The same stream over Kafka: the retry waits in the store, not on its partition."""
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    letters = DeadLetterStore(store.engine)
    letters.create_schema()
    model = Scripted()
    publisher = KafkaPublisher(kafka_config)
    await publisher.start()
    policy = RetryPolicy(max_attempts=4, base_delay_s=1.0, max_delay_s=5, jitter=0)
    worker = Worker(
        consumer=KafkaConsumer(kafka_config, topic, f"{topic}-g"),
        store=store,
        models={model.config.key: model},
        dead_letters=DeadLetterRouter(publisher, f"{topic}.dlq", record=letters.add),
        metrics=WorkerMetrics(CollectorRegistry()),
        config=WorkerConfig(worker_id="kafka-retries", fetch_timeout_s=0.05),
        retry=policy,
        retry_pump=RetryPump(store, publisher, topic, interval_s=0.05),
    )
    ids = ["transient", "poison", *(f"good-{i}" for i in range(40))]
    values = [7.0, 13.0, *(100.0 + i for i in range(40))]
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        started = time.monotonic()
        for job_id, value in zip(ids, values, strict=True):  # failing ones first, same key
            env = new_envelope(
                job_id, JobRequest(model="scripted", input={"tensor": [value]}), "urn:t"
            )
            headers, body = env.to_binary()
            await publisher.publish(topic, body, key=b"one-partition", headers=headers)

        def finished() -> bool:
            records = store.get_many(ids)
            return len(records) == len(ids) and all(r.status.terminal for r in records.values())

        async with asyncio.timeout(60):
            while not finished():
                if task.done():
                    task.result()
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
        await publisher.stop()
    # the good jobs, queued behind the failing ones on the same partition, did not wait for
    # the first backoff (1 s)
    slowest_good = max(model.done_at[100.0 + i] for i in range(40)) - started
    assert slowest_good < policy.delay_s(1), slowest_good
    records = store.get_many(ids)
    assert records["transient"].status is JobStatus.SUCCEEDED
    assert records["transient"].attempts >= 2  # it failed, waited, and passed on a retry
    assert records["poison"].status is JobStatus.FAILED and records["poison"].attempts == 1
    assert all(records[f"good-{i}"].status is JobStatus.SUCCEEDED for i in range(40))
    [letter] = letters.list(DeadLetterFilter())
    assert letter.job_id == "poison" and letter.origin == topic
    store.close()


def test_claim_takes_the_pumps_republish_but_not_a_stale_copy(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from jobstore.records import NewJob, Reschedule

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    store.create(NewJob(id="j", model="scripted", version="1", input={"tensor": [7]}))
    [first] = store.claim(["j"], worker_id="w", lease_s=60).claimed
    later = datetime.now(UTC) + timedelta(seconds=60)
    store.complete([], [Reschedule("j", first.attempts, later, "inference_failed", "busy")])
    # a redelivered copy of the original message does not jump the backoff
    assert store.claim(["j"], worker_id="w", lease_s=60).skipped == {"j": JobStatus.QUEUED}
    # the pump takes it when due (its hold pushes the not-before on) and re-publishes it
    [due] = store.due_retries(now=later + timedelta(seconds=1))
    assert due.id == "j" and due.retry_at is not None
    # the worker may claim that re-publish before the pump clears the hold
    [again] = store.claim(["j"], worker_id="w", lease_s=60, due={"j"}).claimed
    assert again.attempts == 2 and again.retry_at is None
    store.close()


async def test_stranded_queued_jobs_are_published_again_only_without_a_backlog(
    tmp_path: Path,
) -> None:
    """A queued row whose message the broker lost (acknowledged, then dropped by a kill -9):
    the pump publishes it again once it is idle past the threshold and nothing waits on the
    bus; a row waiting in a backlog, a retry in backoff and a fresh row are left alone."""
    from datetime import UTC, datetime, timedelta

    from jobstore.records import NewJob, Reschedule

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    for job_id in ("lost", "backoff", "done"):
        store.create(NewJob(id=job_id, model="scripted", version="1", input={"tensor": [1]}))
    [claimed] = store.claim(["backoff"], worker_id="w", lease_s=60).claimed
    later = datetime.now(UTC) + timedelta(hours=1)
    store.complete([], [Reschedule("backoff", claimed.attempts, later, "inference_failed", "x")])
    store.claim(["done"], worker_id="w", lease_s=60)
    broker = MemoryBroker()
    backlog = [3]

    async def depth() -> int:
        return backlog[0]

    pump = RetryPump(store, MemoryPublisher(broker), TOPIC, backlog=depth, stranded_after_s=0.2)
    assert await pump.rescue_stranded() == 0  # not idle long enough yet
    await asyncio.sleep(0.3)
    assert await pump.rescue_stranded() == 0  # a backlog: its message may be in it
    backlog[0] = 0
    assert await pump.rescue_stranded() == 1
    assert [key for key, _, _ in broker.messages(TOPIC)] == [b"lost"]
    record = store.get("lost")
    assert record is not None and record.status is JobStatus.QUEUED and record.retry_at is None
    assert await pump.rescue_stranded() == 0  # its clock started over with the publish
    # the copy runs once; a late original is absorbed by the guarded claim
    assert [r.id for r in store.claim(["lost"], worker_id="w", lease_s=60).claimed] == ["lost"]
    store.close()


async def test_a_member_the_group_forgot_commits_nothing() -> None:
    """After the coordinator forgot the member (aiokafka reset it to generation -1, as when a
    broker restart lost the group), neither the revoke hook nor commit() sends a commit: it
    would be a group-less commit, accepted by an empty group, that could move the group's
    position past the restored log end of a broker that lost its tail."""
    from aiokafka import TopicPartition

    commits: list[dict[TopicPartition, int]] = []

    class FakeAiokafka:
        def __init__(self) -> None:
            self._coordinator = type("C", (), {"generation": -1})()

        def assignment(self) -> set[TopicPartition]:
            return {tp}

        async def commit(self, offsets: dict[TopicPartition, int]) -> None:
            commits.append(offsets)

    tp = TopicPartition(TOPIC, 0)
    consumer = KafkaConsumer(KafkaConfig("127.0.0.1:1"), TOPIC, GROUP)
    fake = FakeAiokafka()
    consumer._consumer = fake
    for offset in (5, 6):
        consumer._tracker.delivered(tp, offset)
        consumer._tracker.done(tp, offset)
    await consumer.commit()
    assert commits == [] and consumer._tracker.committable() == {}
    consumer._tracker.delivered(tp, 7)
    consumer._tracker.done(tp, 7)
    await consumer._on_revoked({tp})
    assert commits == []
    fake._coordinator.generation = 3  # a member again: commits go out
    consumer._tracker.delivered(tp, 8)
    consumer._tracker.done(tp, 8)
    await consumer.commit()
    assert commits == [{tp: 9}]


async def test_an_idle_pump_looks_seldom_yet_its_own_retry_goes_out_when_due(
    tmp_path: Path,
) -> None:
    """Idle, the pump backs off to one look every ``idle_interval_s`` (each look is a write
    transaction); a retry this process scheduled (``expect``) still leaves when it is due."""
    from datetime import UTC, datetime, timedelta

    from jobstore.records import NewJob, Reschedule

    class Counting(JobStore):
        looks = 0

        def due_retries(self, **kw: Any) -> list[Any]:
            self.looks += 1
            return super().due_retries(**kw)

    store = Counting(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    broker = MemoryBroker()
    pump = RetryPump(store, MemoryPublisher(broker), TOPIC, interval_s=0.05, idle_interval_s=10.0)
    stop = asyncio.Event()
    task = asyncio.create_task(pump.run(stop))
    try:
        await asyncio.sleep(3.3)  # looks at 0, 0.05, 0.15, 0.35, 0.75, 1.55, 3.15 s
        assert store.looks <= 8, store.looks  # a fixed 0.05 s would be 66
        store.create(NewJob(id="j", model="scripted", version="1", input={"tensor": [7]}))
        [claimed] = store.claim(["j"], worker_id="w", lease_s=60).claimed
        due = datetime.now(UTC) + timedelta(seconds=0.5)
        store.complete([], [Reschedule("j", claimed.attempts, due, "inference_failed", "busy")])
        pump.expect(due)
        async with asyncio.timeout(5):  # the next idle look is 3 s away
            while not broker.messages(TOPIC):
                await asyncio.sleep(0.01)
        late = (datetime.now(UTC) - due).total_seconds()
        assert -0.05 < late < 0.5, late
    finally:
        stop.set()
        await task
        store.close()
