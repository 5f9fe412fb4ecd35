"""The consume loop on the in-memory bus with real ONNX models and a SQLite store."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from dlq.router import DeadLetterRouter, reason_from_headers
from jobstore.store import JobStore
from schemas.contracts import ModelConfig, TensorInput
from schemas.envelope import JobEnvelope, new_envelope
from schemas.jobs import JobRequest, JobStatus
from transports.memory import MemoryBroker, MemoryConsumer, MemoryPublisher
from workers.adapters import LoadedModel, load_model
from workers.loop import Worker, WorkerConfig
from workers.metrics import WorkerMetrics
from workers.repository import ModelRepository

TOPIC, DLQ, GROUP = "jobs", "jobs.dlq", "workers"


@dataclass
class FlakyIdentity:
    """Fails any batch that holds the value 13, to show batch splitting."""

    config: ModelConfig = field(
        default_factory=lambda: ModelConfig(
            name="flaky", version="1", adapter="identity", max_batch_size=64, max_wait_ms=20
        )
    )
    provider: str = "CPUExecutionProvider"
    batches: list[int] = field(default_factory=list)

    def run(self, inputs: list[BaseModel]) -> list[dict[str, Any]]:
        self.batches.append(len(inputs))
        tensors = [i.tensor for i in inputs if isinstance(i, TensorInput)]
        if any(13.0 in t for t in tensors):
            raise RuntimeError("unlucky input")
        return [{"tensor": t} for t in tensors]


@dataclass
class Harness:
    broker: MemoryBroker
    store: JobStore
    models: dict[tuple[str, str], LoadedModel]
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    async def publish(self, envelope: JobEnvelope, *, binary: bool = True) -> None:
        pub = MemoryPublisher(self.broker)
        if binary:
            headers, value = envelope.to_binary()
            await pub.publish(TOPIC, value, key=envelope.id.encode(), headers=headers)
        else:
            await pub.publish(
                TOPIC,
                envelope.to_structured(),
                key=envelope.id.encode(),
                headers=[("content-type", b"application/cloudevents+json")],
            )

    async def raw(self, value: bytes, headers: list[tuple[str, bytes]] | None = None) -> None:
        await MemoryPublisher(self.broker).publish(TOPIC, value, headers=headers or [])

    def worker(self) -> Worker:
        self.registry = CollectorRegistry()  # one per worker, as in a process
        return Worker(
            consumer=MemoryConsumer(self.broker, TOPIC, GROUP),
            store=self.store,
            models=self.models,
            dead_letters=DeadLetterRouter(MemoryPublisher(self.broker), DLQ),
            metrics=WorkerMetrics(self.registry),
            config=WorkerConfig(worker_id="test-worker", fetch_timeout_s=0.02),
        )

    async def run_until(self, done: Callable[[], bool], limit_s: float = 30) -> Worker:
        worker = self.worker()
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        try:
            async with asyncio.timeout(limit_s):
                while not done():
                    if task.done():
                        task.result()
                    await asyncio.sleep(0.01)
        finally:
            stop.set()
            await task
        return worker

    def dead_letters(self) -> list[dict[str, str]]:
        return [reason_from_headers(h) for _, _, h in self.broker.messages(DLQ)]

    def committed(self) -> int:
        return self.broker.topic(TOPIC).committed.get(GROUP, 0)


@pytest.fixture
async def harness(tmp_path: Path, model_repo: Path) -> AsyncIterator[Harness]:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    repo = ModelRepository(model_repo)
    models: dict[tuple[str, str], LoadedModel] = {
        c.key: load_model(repo, c, ["CPUExecutionProvider"], 2) for c in repo.configs()
    }
    flaky = FlakyIdentity()
    models[flaky.config.key] = flaky
    yield Harness(MemoryBroker(), store, models)
    store.close()


def job(job_id: str, model: str, inp: dict[str, Any], **kw: Any) -> JobEnvelope:
    return new_envelope(job_id, JobRequest(model=model, input=inp, **kw), "urn:test")


def _status(store: JobStore, ids: list[str]) -> dict[str, JobStatus]:
    return {i: r.status for i, r in store.get_many(ids).items()}


async def test_direct_publish_in_both_modes_runs_and_creates_rows(harness: Harness) -> None:
    await harness.publish(job("bin-1", "identity", {"tensor": [1, 2, 3]}), binary=True)
    await harness.publish(job("struct-1", "identity", {"tensor": [4.5]}), binary=False)
    await harness.publish(job("text-1", "minilm", {"text": "a direct publish"}))
    ids = ["bin-1", "struct-1", "text-1"]
    await harness.run_until(
        lambda: (
            all(s is JobStatus.SUCCEEDED for s in _status(harness.store, ids).values())
            and len(_status(harness.store, ids)) == 3
        )
    )
    records = harness.store.get_many(ids)
    assert records["bin-1"].result == {"tensor": [1.0, 2.0, 3.0]}
    assert records["struct-1"].result == {"tensor": [4.5]}
    text_result = records["text-1"].result
    assert text_result is not None
    emb = np.array(text_result["embedding"])
    assert emb.shape == (384,) and abs(np.linalg.norm(emb) - 1) < 1e-4
    assert all(r.attempts == 1 and r.source == "urn:test" for r in records.values())
    assert harness.committed() == 3


async def test_same_event_twice_runs_once(harness: Harness) -> None:
    envelope = job("dup-1", "identity", {"tensor": [7]})
    await harness.publish(envelope)
    await harness.publish(envelope, binary=False)
    await harness.run_until(lambda: harness.committed() == 2)
    record = harness.store.get("dup-1")
    assert record is not None and record.status is JobStatus.SUCCEEDED and record.attempts == 1
    # and again later, after it is terminal: acknowledged without running
    await harness.publish(envelope)
    await harness.run_until(lambda: harness.committed() == 3)
    record = harness.store.get("dup-1")
    assert record is not None and record.attempts == 1
    assert harness.dead_letters() == []


def _ce_binary(job_id: str) -> list[tuple[str, bytes]]:
    return [
        ("ce_specversion", b"1.0"),
        ("ce_id", job_id.encode()),
        ("ce_source", b"//test"),
        ("ce_type", b"inferq.job.requested"),
        ("content-type", b"application/json"),
    ]


@pytest.mark.parametrize(
    ("value", "headers", "code", "job_id"),
    [
        (b"this is not json", [], "malformed_message", None),
        (b'{"specversion": "1.0", "id": "t-1", "so', [], "malformed_message", None),
        (b"\xff\xfe\x00", [], "malformed_message", None),
        (b"", [], "malformed_message", None),
        (b"[1, 2]", [], "invalid_envelope", None),
        # binary mode: the id is readable in its header although the body is not
        (b"{not json", _ce_binary("bin-bad-body"), "malformed_message", "bin-bad-body"),
        (b"\xff\xfe", _ce_binary("bin-not-utf8"), "malformed_message", "bin-not-utf8"),
        (b"", _ce_binary("bin-empty"), "malformed_message", "bin-empty"),
        (
            b'{"model": "identity", "input": {"tensor": [1]}}',
            [*_ce_binary("bin-bad-header"), ("ce_subject", b"\xff")],
            "malformed_message",
            "bin-bad-header",
        ),
        # an id that no GET /v1/jobs/{id} could name gets no row
        (b"{not json", _ce_binary("bad/id!"), "malformed_message", None),
        (
            json.dumps(
                {
                    "specversion": "1.0",
                    "source": "s",
                    "type": "inferq.job.requested",
                    "data": {"model": "identity", "input": {"tensor": [1]}},
                }
            ).encode(),
            [],
            "invalid_envelope",
            None,
        ),
        (
            json.dumps(
                {
                    "specversion": "1.0",
                    "id": "wrong-type",
                    "source": "s",
                    "type": "com.example.other",
                    "data": {},
                }
            ).encode(),
            [],
            "unsupported_event_type",
            "wrong-type",
        ),
        (
            json.dumps({"model": "identity", "input": {"tensor": [1]}}).encode(),
            [("ce_specversion", b"1.0"), ("ce_source", b"s"), ("ce_type", b"inferq.job.requested")],
            "invalid_envelope",
            None,
        ),
        (
            json.dumps(
                {
                    "specversion": "1.0",
                    "id": "no-model",
                    "source": "s",
                    "type": "inferq.job.requested",
                    "data": {"input": {}},
                }
            ).encode(),
            [],
            "invalid_input",
            "no-model",
        ),
        (
            json.dumps(
                {
                    "specversion": "1.0",
                    "id": "bad/id!",
                    "source": "s",
                    "type": "inferq.job.requested",
                    "data": {"model": "identity", "input": {"tensor": [1]}},
                }
            ).encode(),
            [],
            "invalid_envelope",
            None,
        ),
    ],
)
async def test_undecodable_messages_go_to_the_dlq_and_the_loop_goes_on(
    harness: Harness,
    value: bytes,
    headers: list[tuple[str, bytes]],
    code: str,
    job_id: str | None,
) -> None:
    await harness.raw(value, headers)
    await harness.publish(job("after-poison", "identity", {"tensor": [1]}))
    await harness.run_until(lambda: harness.committed() == 2)
    [letter] = harness.dead_letters()
    assert letter["code"] == code, letter
    assert letter["origin"] == TOPIC and letter["position"] == "0@0" and letter["message"]
    assert harness.broker.messages(DLQ)[0][1] == value  # the original bytes are kept
    after = harness.store.get("after-poison")
    assert after is not None and after.status is JobStatus.SUCCEEDED
    assert letter.get("job-id") == job_id
    if job_id:  # what GET /v1/jobs/{id} shows the publisher
        row = harness.store.get(job_id)
        assert row is not None and row.status is JobStatus.FAILED and row.error_code == code
        assert row.error_message == letter["message"]


@pytest.mark.parametrize(
    ("model", "inp", "code", "version"),
    [
        ("no-such-model", {"text": "x"}, "unknown_model", None),
        ("identity", {"tensor": [1]}, "unknown_version", "7"),
        ("minilm", {"tensor": [1.0]}, "invalid_input", None),
        ("minilm", {"text": ""}, "invalid_input", None),
        ("identity", {"tensor": ["nan"]}, "invalid_input", None),
    ],
)
async def test_contract_breakers_fail_with_reason_and_go_to_dlq(
    harness: Harness, model: str, inp: dict[str, Any], code: str, version: str | None
) -> None:
    await harness.publish(job("breaker", model, inp, version=version))
    await harness.run_until(lambda: harness.committed() == 1)
    row = harness.store.get("breaker")
    assert row is not None and row.status is JobStatus.FAILED
    assert row.error_code == code and row.error_message
    [letter] = harness.dead_letters()
    assert letter["code"] == code and letter["job-id"] == "breaker" and letter["model"] == model


async def test_one_bad_item_does_not_fail_its_batch_neighbours(harness: Harness) -> None:
    ids = [f"n-{i}" for i in range(20)]
    for i, jid in enumerate(ids):
        await harness.publish(job(jid, "flaky", {"tensor": [13 if i == 7 else 100 + i]}))
    await harness.run_until(lambda: harness.committed() == 20)
    statuses = _status(harness.store, ids)
    assert statuses.pop("n-7") is JobStatus.FAILED
    assert set(statuses.values()) == {JobStatus.SUCCEEDED}
    bad = harness.store.get("n-7")
    assert bad is not None and bad.error_code == "inference_failed"
    assert "unlucky input" in (bad.error_message or "")
    flaky = harness.models[("flaky", "1")]
    assert isinstance(flaky, FlakyIdentity) and max(flaky.batches) > 1  # it did batch
    assert [d["code"] for d in harness.dead_letters()] == ["inference_failed"]


async def test_cancelled_and_expired_jobs_do_not_run(harness: Harness) -> None:
    from jobstore.records import NewJob

    harness.store.create(NewJob(id="c-1", model="identity", version="1", input={"tensor": [1]}))
    harness.store.cancel("c-1")
    await harness.publish(job("c-1", "identity", {"tensor": [1]}))
    old = job("e-1", "identity", {"tensor": [1]}, ttl_s=1)
    old = old.model_copy(update={"time": old.time.replace(year=2020)})  # type: ignore[union-attr]
    await harness.publish(old)
    await harness.run_until(lambda: harness.committed() == 2)
    assert _status(harness.store, ["c-1", "e-1"]) == {
        "c-1": JobStatus.CANCELLED,
        "e-1": JobStatus.EXPIRED,
    }


async def test_uncommitted_work_is_redelivered_to_the_next_worker(harness: Harness) -> None:
    """A worker that stops before storing anything leaves its messages to the next one."""
    for i in range(5):
        await harness.publish(job(f"r-{i}", "identity", {"tensor": [i]}))
    consumer = MemoryConsumer(harness.broker, TOPIC, GROUP)
    await consumer.start()
    assert len(await consumer.fetch(10, 0.1)) == 5  # fetched, never acked: a crash
    await harness.run_until(lambda: harness.committed() == 5)
    assert set(_status(harness.store, [f"r-{i}" for i in range(5)]).values()) == {
        JobStatus.SUCCEEDED
    }


async def test_metrics_are_namespaced(harness: Harness) -> None:
    await harness.publish(job("m-1", "identity", {"tensor": [1]}))
    await harness.run_until(lambda: harness.committed() == 1)
    from prometheus_client import generate_latest

    text = generate_latest(harness.registry).decode()
    assert 'inferq_jobs_processed_total{model="identity",outcome="succeeded"} 1.0' in text
    assert "inferq_batch_size_jobs_bucket" in text
    assert 'inferq_model_info{model="minilm",provider="CPUExecutionProvider",version="1"}' in text
    names = {
        line.split("{")[0].split(" ")[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert all(n.startswith("inferq_") for n in names), names


@dataclass
class ShortModel:
    """An adapter bug: returns fewer results than inputs."""

    config: ModelConfig = field(
        default_factory=lambda: ModelConfig(
            name="short", version="1", adapter="identity", max_batch_size=8, max_wait_ms=20
        )
    )
    provider: str = "CPUExecutionProvider"

    def run(self, inputs: list[BaseModel]) -> list[dict[str, Any]]:
        return []


async def test_a_model_that_breaks_its_contract_fails_its_jobs_and_the_loop_goes_on(
    harness: Harness,
) -> None:
    short = ShortModel()
    harness.models[short.config.key] = short
    await harness.publish(job("short-1", "short", {"tensor": [1]}))
    await harness.publish(job("short-2", "short", {"tensor": [2]}))
    await harness.publish(job("after", "identity", {"tensor": [3]}))
    ids = ["short-1", "short-2", "after"]
    await harness.run_until(
        lambda: (
            len(_status(harness.store, ids)) == 3
            and all(s.terminal for s in _status(harness.store, ids).values())
        ),
        limit_s=15,
    )
    records = harness.store.get_many(ids)
    assert records["after"].status is JobStatus.SUCCEEDED
    for i in ("short-1", "short-2"):
        assert records[i].status is JobStatus.FAILED
        assert records[i].error_code == "inference_failed"
        assert "results" in (records[i].error_message or "")
    assert harness.committed() == 3
