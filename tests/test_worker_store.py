"""The worker's claim/store path: one job the store cannot keep, a store outage and a reused
job id must each stay that job's problem (or nobody's), never the pipeline's."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from jobstore.store import JobStore
from producers.app import ApiConfig, ApiDeps, create_app
from schemas.contracts import ModelConfig, TensorInput
from schemas.envelope import JobEnvelope, decode_message
from schemas.jobs import JobRequest, JobStatus
from tests.fixtures_servers import fresh_database
from tests.local_servers import LocalPostgres
from tests.procs import Stack, free_port, wait_for
from tests.test_worker import TOPIC, FlakyIdentity, Harness
from transports.kafka import EmbeddedKafka
from transports.memory import MemoryBroker, MemoryPublisher
from workers.adapters import LoadedModel, load_model
from workers.errors import InferenceError
from workers.repository import ModelRepository

HELD = "held"  # the API's topic in the reuse test: its message waits here, "behind a backlog"


def _binary(job_id: str, data: dict, source: str = "//tests") -> tuple[list, bytes]:
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", job_id.encode()),
        ("ce_source", source.encode()),
        ("ce_type", b"inferq.job.requested"),
        ("content-type", b"application/json"),
    ]
    return headers, json.dumps(data).encode()


# --- item 6: a job id is bound to its first request ----------------------------------------


@pytest.fixture
def harness(tmp_path: Path, model_repo: Path) -> Iterator[Harness]:
    """The in-memory bus of test_worker with the real models and a SQLite store."""
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


async def test_an_event_reusing_a_job_id_is_refused_and_the_owner_still_runs(
    harness: Harness, model_repo: Path
) -> None:
    app = create_app(
        ApiDeps(
            store=harness.store,
            publisher=MemoryPublisher(harness.broker),
            models=lambda: ModelRepository(model_repo).configs(),
            config=ApiConfig(topic=HELD, backlog_cache_s=0),
            registry=CollectorRegistry(),
        )
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        r = await client.post(
            "/v1/jobs",
            json={"model": "identity", "input": {"tensor": [1.0, 2.0]}, "metadata": {"k": None}},
        )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    # Two events reuse the id before the owner's message is consumed: other content from
    # another source, and other content claiming the API's own source.
    for source in ("//mallory", "urn:inferq:api"):
        evil = JobEnvelope(
            id=job_id,
            source=source,
            data=JobRequest(model="identity", input={"tensor": [666.0]}),
        )
        await harness.publish(evil)
    await harness.run_until(lambda: harness.committed() == 2)
    letters = harness.dead_letters()
    assert [d["code"] for d in letters] == ["job_id_conflict", "job_id_conflict"], letters
    assert all(job_id in d["message"] for d in letters)
    record = harness.store.get(job_id)
    assert record is not None and record.status is JobStatus.QUEUED and record.attempts == 0
    assert record.input == {"tensor": [1.0, 2.0]}

    # the owner's message arrives: it runs under its id, with its own content
    pub = MemoryPublisher(harness.broker)
    for key, value, headers in harness.broker.messages(HELD):
        await pub.publish(TOPIC, value or b"", key=key, headers=list(headers.items()))
    await harness.run_until(lambda: harness.store.get(job_id).status.terminal)  # type: ignore[union-attr]
    done = harness.store.get(job_id)
    assert done is not None and done.status is JobStatus.SUCCEEDED, done
    assert done.result == {"tensor": [1.0, 2.0]}

    # a late impostor after the result: refused too, the result stays
    await harness.publish(
        JobEnvelope(id=job_id, source="//mallory", data=JobRequest(model="identity", input={}))
    )
    late = JobEnvelope(
        id=job_id, source="//mallory", data=JobRequest(model="identity", input={"tensor": [7]})
    )
    await harness.publish(late)
    await harness.run_until(lambda: harness.committed() == 5)
    codes = [d["code"] for d in harness.dead_letters()]
    assert codes[-1] == "job_id_conflict", codes
    assert harness.store.get(job_id).result == {"tensor": [1.0, 2.0]}  # type: ignore[union-attr]


async def test_the_same_request_published_twice_in_one_batch_runs_once(harness: Harness) -> None:
    event = JobEnvelope(
        id="twice-1", source="//svc", data=JobRequest(model="identity", input={"tensor": [3]})
    )
    other = JobEnvelope(
        id="twice-1", source="//svc", data=JobRequest(model="identity", input={"tensor": [4]})
    )
    for e in (event, other, event):
        await harness.publish(e)
    await harness.run_until(lambda: harness.committed() == 3)
    record = harness.store.get("twice-1")
    assert record is not None and record.result == {"tensor": [3.0]} and record.attempts == 1
    assert [d["code"] for d in harness.dead_letters()] == ["job_id_conflict"]


@dataclass
class BusyOnce:
    """Fails its first batch retryably (a runtime hiccup), then echoes."""

    config: ModelConfig = field(
        default_factory=lambda: ModelConfig(name="busy", version="1", adapter="identity")
    )
    provider: str = "CPUExecutionProvider"
    calls: int = 0

    def run(self, inputs: list[BaseModel]) -> list[dict[str, Any]]:
        self.calls += 1
        if self.calls == 1:
            raise InferenceError("busy, try again", retryable=True)
        return [{"tensor": i.tensor} for i in inputs if isinstance(i, TensorInput)]


async def test_api_jobs_and_their_republishes_run_under_their_binding(
    harness: Harness, model_repo: Path
) -> None:
    """The row the API creates and the event it publishes agree, also when the API moved
    the input to S3 and published only its URL; the retry pump's re-publish runs too."""
    from tests.test_claim_check import _policy
    from transports.blobs import MemoryBlobs
    from workers.retry import RetryPump

    blobs = MemoryBlobs({"ours": {}, "theirs": {}})
    policy = _policy(blobs, inline_result_max_bytes=100_000)
    busy = BusyOnce()
    harness.models[busy.config.key] = busy
    app = create_app(
        ApiDeps(
            store=harness.store,
            publisher=MemoryPublisher(harness.broker),
            models=lambda: [*ModelRepository(model_repo).configs(), busy.config],
            config=ApiConfig(topic=TOPIC, backlog_cache_s=0),
            registry=CollectorRegistry(),
            claim_check=policy,
        )
    )
    big = [float(i) for i in range(100)]  # over the 200-byte inline limit: offloaded
    bodies = [
        {"model": "identity", "input": {"tensor": big}},
        {"model": "identity", "input": {"tensor": [1.0]}, "priority": 7, "metadata": {"a": [1]}},
        # fails retryably once: the retry pump re-publishes it from its row
        {"model": "busy", "input": {"tensor": [2.0]}, "webhook": None},
    ]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        ids = []
        for body in bodies:
            r = await client.post("/v1/jobs", json=body)
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
    assert decode_message(*_first(harness, ids[0])).data.input_url  # it travelled by URL

    worker = harness.worker()
    worker.claim_check = policy
    worker.retry_pump = RetryPump(
        harness.store, MemoryPublisher(harness.broker), TOPIC, interval_s=0.05
    )
    worker.retry = replace(worker.retry, base_delay_s=0.01, max_attempts=2)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        async with asyncio.timeout(30):
            while not all(harness.store.get(i).status.terminal for i in ids):  # type: ignore[union-attr]
                assert not task.done()
                await asyncio.sleep(0.02)
    finally:
        stop.set()
        await task
    offloaded, small, retried = (harness.store.get(i) for i in ids)
    assert offloaded is not None and offloaded.status is JobStatus.SUCCEEDED, offloaded
    assert offloaded.result == {"tensor": big}
    assert small is not None and small.result == {"tensor": [1.0]}
    # the retry ran (attempt 2) instead of being refused as a stranger
    assert retried is not None and retried.status is JobStatus.SUCCEEDED, retried
    assert retried.attempts == 2 and retried.result == {"tensor": [2.0]}
    codes = [d["code"] for d in harness.dead_letters()]
    assert "job_id_conflict" not in codes, harness.dead_letters()


async def test_a_stale_job_republished_by_the_control_plane_still_runs(harness: Harness) -> None:
    from datetime import timedelta

    from control.sweeps import requeue_stale
    from jobstore.records import NewJob, utcnow

    job = NewJob(id="stale-1", model="identity", version="1", input={"tensor": [9]})
    harness.store.create(replace(job, source="urn:inferq:api"))
    harness.store.claim(["stale-1"], worker_id="dead-worker", lease_s=1)
    sent: list[JobEnvelope] = []
    later = utcnow() + timedelta(seconds=5)
    assert requeue_stale(harness.store, sent.extend, max_attempts=3, now=later) == (1, 0)
    [envelope] = sent
    await harness.publish(envelope)
    await harness.run_until(lambda: harness.store.get("stale-1").status.terminal)  # type: ignore[union-attr]
    record = harness.store.get("stale-1")
    assert record is not None and record.status is JobStatus.SUCCEEDED, harness.dead_letters()
    assert record.result == {"tensor": [9.0]} and record.attempts == 2


def _first(harness: Harness, job_id: str) -> tuple[dict[str, bytes], bytes | None]:
    for key, value, headers in harness.broker.messages(TOPIC):
        if key == job_id.encode():
            return headers, value
    raise AssertionError(f"no message for {job_id}")


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_an_existing_job_table_gains_the_binding_column(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    import uuid

    from sqlalchemy import create_engine, inspect
    from sqlalchemy.pool import NullPool

    from jobstore.records import NewJob

    schema = None
    if backend == "sqlite":
        store = JobStore(f"sqlite:///{tmp_path / 'old.db'}")
    else:
        url: str = request.getfixturevalue("postgres_url")
        schema = f"t_{uuid.uuid4().hex}"
        admin = create_engine(url, poolclass=NullPool)
        with admin.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        store = JobStore(url, schema=schema)
    try:
        store.create_schema()
        with store.engine.begin() as conn:  # a table from before the column existed
            conn.exec_driver_sql("ALTER TABLE jobs DROP COLUMN content_hash")
        store.create_schema()
        store.create_schema()  # and again: nothing left to add
        with store.engine.connect() as conn:
            assert "content_hash" in {c["name"] for c in inspect(conn).get_columns("jobs")}
        store.ensure([NewJob(id="j", model="identity", version="1", input={"tensor": [1]})])
        record = store.get("j")
        assert record is not None and record.content_hash is not None
    finally:
        store.close()
        if schema is not None:
            with admin.begin() as conn:
                conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
            admin.dispose()


# --- item 2: a row PostgreSQL cannot keep ---------------------------------------------------


@pytest.fixture
def pg_stack(
    tmp_path: Path, kafka_broker: EmbeddedKafka, topic: str, model_repo: Path, postgres_url: str
) -> Iterator[tuple[Stack, str]]:
    with fresh_database(postgres_url, "inferq_ws") as url:
        stack = Stack(tmp_path, kafka_broker.bootstrap, topic, model_repo, database_url=url)
        try:
            yield stack, url
        finally:
            stack.stop_all()


def _produce(bootstrap: str, topic: str, messages: list[tuple[list, bytes]], key: bytes) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    for headers, value in messages:
        producer.produce(topic, value, key=key, headers=headers)
    assert producer.flush(30) == 0


@pytest.mark.postgres
@pytest.mark.kafka
@pytest.mark.timeout(210)  # four jobs 90 s, one more 60 s
def test_a_nul_character_fails_that_job_alone_on_postgres(pg_stack: tuple[Stack, str]) -> None:
    stack, url = pg_stack
    worker = stack.worker()
    messages = [
        _binary("nul-1", {"model": "minilm", "input": {"text": "a\u0000b"}}),
        # a poison message whose failed row cannot be stored as sent either
        _binary("nul-2", {"model": "nope", "input": {"text": "\u0000"}}),
        _binary("nul-3", {"model": "identity", "input": {"tensor": [1]}}, source="//a\u0000b"),
        _binary("good-1", {"model": "identity", "input": {"tensor": [5]}}),
    ]
    assert "\\u0000" in messages[0][1].decode()  # the escape as a client sends it
    _produce(stack.bootstrap, stack.topic, messages, key=b"one-partition")
    store = JobStore(url)
    try:

        def finished() -> bool:
            assert worker.poll() is None, stack.log("worker")
            try:
                jobs = store.get_many(["nul-1", "nul-2", "nul-3", "good-1"])
            except Exception:  # the worker creates the schema when it starts
                return False
            return len(jobs) == 4 and all(j.status.terminal for j in jobs.values())

        wait_for(finished, 90, "all four jobs to finish", interval=0.2)
        good = store.get("good-1")
        assert good is not None and good.status is JobStatus.SUCCEEDED, stack.log("worker")
        assert good.result == {"tensor": [5.0]}
        # NUL in the request is refused by the request contract itself (as over HTTP)
        for job_id in ("nul-1", "nul-2"):
            bad = store.get(job_id)
            assert bad is not None and bad.status is JobStatus.FAILED, bad
            assert bad.error_code == "invalid_input" and "input.text" in (bad.error_message or "")
            assert "\x00" not in (bad.error_message or "")
        # NUL where no contract looks (the CloudEvents source): the store refuses it, and
        # that job alone fails
        bad = store.get("nul-3")
        assert bad is not None and bad.status is JobStatus.FAILED
        assert bad.error_code == "job_unstorable" and bad.error_message, bad
        assert "\x00" not in bad.error_message
        # still running, and it still takes work
        _produce(
            stack.bootstrap,
            stack.topic,
            [_binary("good-2", {"model": "identity", "input": {"tensor": [6]}})],
            key=b"one-partition",
        )
        wait_for(
            lambda: (j := store.get("good-2")) is not None and j.status is JobStatus.SUCCEEDED,
            60,
            "a job after the bad ones",
            interval=0.2,
        )
        assert worker.poll() is None
    finally:
        store.close()


# --- item 4: the store goes away for a while ------------------------------------------------


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.kafka
@pytest.mark.timeout(300)  # jobs 90 s, the 20 s outage, recovery 120 s, heartbeat 10 s
def test_the_worker_rides_out_a_store_outage(
    tmp_path: Path,
    kafka_broker: EmbeddedKafka,
    topic: str,
    model_repo: Path,
    throwaway_postgres: LocalPostgres,
) -> None:
    from confluent_kafka import Producer

    pg = throwaway_postgres
    stack = Stack(tmp_path, kafka_broker.bootstrap, topic, model_repo, database_url=pg.url)
    worker = stack.spawn(
        ["worker"],
        "worker",
        INFERQ_WORKER_METRICS_PORT=str(free_port()),
        INFERQ_WORKER_ID="outage-worker",
        INFERQ_WORKER_HEARTBEAT_S="0.5",
    )
    store = JobStore(pg.url)
    ids: list[str] = []
    producer = Producer({"bootstrap.servers": stack.bootstrap, "acks": "all"})

    def publish(n: int) -> None:
        job_id = f"out-{n}"
        headers, value = _binary(job_id, {"model": "identity", "input": {"tensor": [n]}})
        producer.produce(stack.topic, value, key=job_id.encode(), headers=headers)
        producer.flush(10)
        ids.append(job_id)

    def all_done() -> bool:
        assert worker.poll() is None, stack.log("worker")
        try:
            jobs = store.get_many(ids)
        except Exception:
            return False
        return len(jobs) == len(ids) and all(j.status.terminal for j in jobs.values())

    stop_publishing = threading.Event()
    feeder: threading.Thread | None = None
    try:
        for n in range(20):
            publish(n)
        wait_for(all_done, 90, "the jobs before the outage", interval=0.2)

        # jobs keep coming while the store is down for ~20 s

        def keep_publishing() -> None:
            n = 20
            while not stop_publishing.is_set():
                publish(n)
                n += 1
                time.sleep(0.25)

        pg.stop()
        down_at = time.monotonic()
        feeder = threading.Thread(target=keep_publishing)
        feeder.start()
        while time.monotonic() - down_at < 20:
            assert worker.poll() is None, "worker exited while the store was down\n" + stack.log(
                "worker"
            )
            time.sleep(0.5)
        pg.start()
        up_at = time.monotonic()
        stop_publishing.set()
        feeder.join()
        publish(len(ids))  # one after the store came back
        wait_for(all_done, 120, "every job after the store came back", interval=0.1)
        recovered_s = time.monotonic() - up_at
        print(
            f"\nstore outage {up_at - down_at:.1f}s; all {len(ids)} jobs terminal "
            f"{recovered_s:.1f}s after PostgreSQL was back"
        )

        jobs = store.get_many(ids)
        assert len(jobs) == len(ids) == len(set(ids))
        for job_id, job in jobs.items():
            n = int(job_id.split("-")[1])
            assert job.status is JobStatus.SUCCEEDED, job
            assert job.result == {"tensor": [float(n)]}
            assert job.attempts == 1, job  # ran once: no claim or outcome was repeated
        assert store.counts()[JobStatus.SUCCEEDED] == len(ids)
        # the heartbeat loop came back too
        wait_for(
            lambda: "outage-worker" in store.live_workers(max_age_s=2.0),
            10,
            "a heartbeat after the outage",
        )
        assert worker.poll() is None
    finally:
        stop_publishing.set()
        if feeder is not None:
            feeder.join()
        store.close()
        stack.stop_all()
