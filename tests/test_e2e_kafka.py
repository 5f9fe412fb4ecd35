"""End to end over a real Kafka-protocol broker, with the API and workers as real processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from aiokafka import AIOKafkaProducer

from jobstore.store import JobStore
from producers.client import InferqClient, InferqError
from schemas.jobs import JobResource, JobStatus
from tests.fixtures_servers import fresh_database
from tests.procs import Stack, free_port, wait_for
from transports.kafka import EmbeddedKafka

pytestmark = pytest.mark.kafka

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "inferq runs ONNX models behind an asynchronous API.",
    "A much longer sentence, written to make sure that padding to the longest item in a "
    "batch does not change the embedding of the shorter ones next to it in the same batch.",
    "héllo wörld — unicode survives the trip",
]


@pytest.fixture
def stack(
    tmp_path: Path, kafka_broker: EmbeddedKafka, topic: str, model_repo: Path
) -> Iterator[Stack]:
    s = Stack(tmp_path, kafka_broker.bootstrap, topic, model_repo)
    yield s
    s.stop_all()


def _store(stack: Stack) -> JobStore:
    store = JobStore(f"sqlite:///{stack.data_dir / 'jobs.db'}")
    store.create_schema()
    return store


def _cos(a: list[float], b: np.ndarray) -> float:
    va = np.asarray(a, dtype=np.float64)
    return float(va @ b / (np.linalg.norm(va) * np.linalg.norm(b)))


@pytest.mark.timeout(180)  # the API 60 s, the jobs' ?wait=30 (submitted together), heartbeats 20 s
def test_http_jobs_run_to_succeeded_with_reference_embeddings(
    stack: Stack, minilm_reference
) -> None:
    _, url = stack.api()
    stack.worker()
    with httpx.Client(base_url=url, timeout=60) as client:
        accepted = []
        for text in TEXTS:
            r = client.post("/v1/jobs", json={"model": "minilm", "input": {"text": text}})
            assert r.status_code == 202, r.text
            assert r.json()["status"] == "queued"
            accepted.append(r.json()["id"])
        reference = minilm_reference(TEXTS)
        for job_id, ref in zip(accepted, reference, strict=True):
            job = client.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()
            assert job["status"] == "succeeded", (job, stack.log("worker"))
            emb = job["result"]["embedding"]
            assert len(emb) == 384
            assert _cos(emb, ref) > 1 - 1e-4
            assert job["started_at"] <= job["completed_at"] and job["attempts"] == 1
        models = client.get("/v1/models").json()["data"]
        assert {m["name"] for m in models} >= {"minilm", "identity"}
        wait_for(
            lambda: all(m["providers"] for m in client.get("/v1/models").json()["data"]),
            20,
            "worker heartbeats",
        )
        assert client.get("/readyz").status_code == 200
        assert client.get("/asyncapi.json").json()["channels"]


@pytest.mark.timeout(180)  # the API 60 s, ?wait=30 for the bus jobs, the SDK's wait 30 s
def test_direct_publish_with_a_plain_kafka_producer(stack: Stack) -> None:
    _, url = stack.api()
    stack.worker()

    async def publish() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, acks="all")
        await producer.start()
        try:
            data = {"model": "identity", "input": {"tensor": [1.5, 2.5]}}
            # binary mode: ce_* headers, the data as the value
            for _ in range(2):  # published twice: runs once
                await producer.send_and_wait(
                    stack.topic,
                    json.dumps(data).encode(),
                    key=b"svc-bin-1",
                    headers=[
                        ("ce_specversion", b"1.0"),
                        ("ce_id", b"svc-bin-1"),
                        ("ce_source", b"//billing"),
                        ("ce_type", b"inferq.job.requested"),
                        ("content-type", b"application/json"),
                    ],
                )
            # structured mode
            event = {
                "specversion": "1.0",
                "id": "svc-struct-1",
                "source": "//billing",
                "type": "inferq.job.requested",
                "datacontenttype": "application/json",
                "data": {"model": "minilm", "input": {"text": "straight onto the topic"}},
            }
            await producer.send_and_wait(
                stack.topic,
                json.dumps(event).encode(),
                headers=[("content-type", b"application/cloudevents+json")],
            )
            # garbage, which must not stop the worker
            await producer.send_and_wait(stack.topic, b"\x00not json at all")
        finally:
            await producer.stop()

    asyncio.run(publish())
    with httpx.Client(base_url=url, timeout=60) as client:
        binary = client.get("/v1/jobs/svc-bin-1", params={"wait": 30}).json()
        assert binary["status"] == "succeeded", stack.log("worker")
        assert binary["result"] == {"tensor": [1.5, 2.5]}
        assert binary["attempts"] == 1 and binary["source"] == "//billing"
        structured = client.get("/v1/jobs/svc-struct-1", params={"wait": 30}).json()
        assert structured["status"] == "succeeded"
        assert len(structured["result"]["embedding"]) == 384
        listed = client.get("/v1/jobs", params={"model": "identity"}).json()["data"]
        assert [j["id"] for j in listed] == ["svc-bin-1"]
        metrics = client.get("/metrics")
        assert metrics.status_code == 200

    # the Python client, against the same live API
    with InferqClient(url) as sdk:
        job = sdk.submit("identity", {"tensor": [9.0]}, idempotency_key="sdk-1")
        done = sdk.wait(job.id, timeout=30)
        assert done.status is JobStatus.SUCCEEDED and done.result == {"tensor": [9.0]}
        assert sdk.submit("identity", {"tensor": [9.0]}, idempotency_key="sdk-1").id == job.id
        assert job.id in {j.id for j in sdk.list(model="identity", limit=1)}
        with pytest.raises(InferqError) as info:
            sdk.submit("identity", {"text": "no"})
        assert info.value.code == "invalid_input" and info.value.field == "input.tensor"
        # bulk: valid requests accepted beside an invalid one, then waited for together
        answers = sdk.submit_many(
            [
                {"model": "identity", "input": {"tensor": [1.0]}},
                {"model": "identity", "input": {"text": "no"}},
                {"model": "identity", "input": {"tensor": [2.0]}, "idempotency_key": "sdk-2"},
            ]
        )
        assert isinstance(answers[1], InferqError) and answers[1].field == "jobs[1].input.tensor"
        accepted = [a for a in answers if isinstance(a, JobResource)]
        assert len(accepted) == 2
        finished = sdk.wait_many([a.id for a in accepted], timeout=30)
        assert [j.result for j in finished] == [{"tensor": [1.0]}, {"tensor": [2.0]}]


def _submit_direct(bootstrap: str, topic: str, texts: list[str], prefix: str) -> list[str]:
    async def go() -> list[str]:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        ids = []
        try:
            futures = []
            for i, text in enumerate(texts):
                job_id = f"{prefix}-{i}"
                ids.append(job_id)
                event = {
                    "specversion": "1.0",
                    "id": job_id,
                    "source": "urn:test",
                    "type": "inferq.job.requested",
                    "data": {"model": "minilm", "input": {"text": text}},
                }
                futures.append(
                    await producer.send(topic, json.dumps(event).encode(), key=job_id.encode())
                )
            await asyncio.gather(*futures)
        finally:
            await producer.stop()
        return ids

    return asyncio.run(go())


def _corpus(n: int) -> list[str]:
    return [f"{TEXTS[i % len(TEXTS)]} (job number {i})" for i in range(n)]


def _assert_all_succeeded_once(
    store: JobStore, ids: list[str], texts: list[str], reference
) -> None:
    records = store.get_many(ids)
    assert len(records) == len(ids)
    statuses: dict[JobStatus, int] = {}
    for r in records.values():
        statuses[r.status] = statuses.get(r.status, 0) + 1
    assert statuses == {JobStatus.SUCCEEDED: len(ids)}, statuses
    assert all(r.result is not None and r.error_code is None for r in records.values())
    assert all(1 <= r.attempts <= 3 for r in records.values())
    # each result is the right one for its own input (spot-check against the reference)
    sample = list(range(0, len(ids), max(1, len(ids) // 8)))
    refs = reference([texts[i] for i in sample])
    for i, ref in zip(sample, refs, strict=True):
        result = records[ids[i]].result
        assert result is not None and _cos(result["embedding"], ref) > 1 - 1e-4


def _count(store: JobStore, ids: list[str], status: JobStatus) -> int:
    return sum(1 for r in store.get_many(ids).values() if r.status is status)


@pytest.mark.slow
@pytest.mark.timeout(270)  # progress 90 s, then all jobs 120 s
def test_kill_9_worker_mid_run_loses_nothing(stack: Stack, minilm_reference) -> None:
    texts = _corpus(300)
    ids = _submit_direct(stack.bootstrap, stack.topic, texts, "k9")
    store = _store(stack)
    first = stack.worker("worker-1")
    wait_for(
        lambda: _count(store, ids, JobStatus.SUCCEEDED) >= 40, 90, "some progress", interval=0.02
    )
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    done_at_kill = _count(store, ids, JobStatus.SUCCEEDED)
    assert done_at_kill < len(ids), "the worker finished before it could be killed"
    stack.worker("worker-1")  # the same worker identity starts again (static membership)
    wait_for(
        lambda: _count(store, ids, JobStatus.SUCCEEDED) == len(ids),
        120,
        "all jobs after the restart",
    )
    _assert_all_succeeded_once(store, ids, texts, minilm_reference)
    assert any(r.attempts == 2 for r in store.get_many(ids).values()), (
        "no job was in flight at the kill: the test did not test a crash"
    )
    store.close()


@pytest.mark.slow
@pytest.mark.timeout(300)  # progress 90 s, the 2 s outage, then all jobs 150 s
def test_broker_restart_mid_run_loses_nothing(
    tmp_path: Path, topic: str, model_repo: Path, minilm_reference
) -> None:
    broker = EmbeddedKafka(tmp_path / "broker", free_port())
    broker.start()
    stack = Stack(tmp_path, broker.bootstrap, topic, model_repo)
    try:
        texts = _corpus(300)
        ids = _submit_direct(broker.bootstrap, topic, texts, "br")
        store = _store(stack)
        stack.worker()
        wait_for(
            lambda: _count(store, ids, JobStatus.SUCCEEDED) >= 40,
            90,
            "some progress",
            interval=0.02,
        )
        broker.stop()
        stopped_at = _count(store, ids, JobStatus.SUCCEEDED)
        time.sleep(2)
        broker.start()
        wait_for(
            lambda: _count(store, ids, JobStatus.SUCCEEDED) == len(ids),
            150,
            "all jobs after the broker restart",
        )
        assert stopped_at < len(ids), "the run ended before the broker stopped"
        _assert_all_succeeded_once(store, ids, texts, minilm_reference)
        store.close()
    finally:
        stack.stop_all()
        broker.stop()


@pytest.fixture
def postgres_database(postgres_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    with fresh_database(postgres_url, "inferq_e2e") as url:
        yield url


@pytest.mark.postgres
@pytest.mark.timeout(180)  # the API 60 s, ?wait=30 (the 40 jobs run together)
def test_api_and_worker_on_a_postgres_job_store(
    tmp_path: Path,
    kafka_broker: EmbeddedKafka,
    topic: str,
    model_repo: Path,
    postgres_database: str,
) -> None:
    stack = Stack(
        tmp_path, kafka_broker.bootstrap, topic, model_repo, database_url=postgres_database
    )
    try:
        _, url = stack.api()
        stack.worker()
        with httpx.Client(base_url=url, timeout=60) as client:
            ids = []
            for i in range(40):
                r = client.post("/v1/jobs", json={"model": "identity", "input": {"tensor": [i]}})
                assert r.status_code == 202, r.text
                ids.append(r.json()["id"])
            for i, job_id in enumerate(ids):
                job = client.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()
                assert job["status"] == "succeeded", stack.log("worker")
                assert job["result"] == {"tensor": [float(i)]}
            page = client.get("/v1/jobs", params={"status": "succeeded", "limit": 500}).json()
            assert {j["id"] for j in page["data"]} == set(ids)
        store = JobStore(postgres_database)
        assert store.counts()[JobStatus.SUCCEEDED] == 40
        store.close()
    finally:
        stack.stop_all()
