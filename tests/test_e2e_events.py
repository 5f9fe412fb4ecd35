"""Job events end to end over a real Kafka-protocol broker, with the API and a worker as real
processes: a Kafka client we did not write (confluent-kafka) reads the events topic, and SSE
clients stream through a restart of the API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Consumer

from producers.client import InferqClient, StreamEvent
from tests.procs import Stack, free_port, wait_for
from transports.kafka import EmbeddedKafka

pytestmark = pytest.mark.kafka

TERMINAL = {
    b"inferq.job.succeeded",
    b"inferq.job.failed",
    b"inferq.job.cancelled",
    b"inferq.job.expired",
}


@pytest.fixture
def stack(
    tmp_path: Path, kafka_broker: EmbeddedKafka, topic: str, model_repo: Path
) -> Iterator[Stack]:
    s = Stack(tmp_path, kafka_broker.bootstrap, topic, model_repo)
    yield s
    s.stop_all()


def _consume_events(bootstrap: str, topic: str, want: set[str], timeout: float) -> list:
    """Every message of ``topic`` from the beginning, until each job in ``want`` has a
    terminal event (and a little longer, to catch duplicates)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    messages = []
    done: set[str] = set()
    deadline = time.monotonic() + timeout
    quiet_until = None
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                if quiet_until is not None and time.monotonic() > quiet_until:
                    break
                continue
            assert msg.error() is None, msg.error()
            headers = dict(msg.headers() or [])
            messages.append((msg.partition(), msg.offset(), msg.key(), headers, msg.value()))
            if headers.get("ce_type") in TERMINAL:
                done.add((msg.key() or b"").decode())
            if want <= done and quiet_until is None:
                quiet_until = time.monotonic() + 3
    finally:
        consumer.close()
    return messages


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_plain_kafka_consumer_sees_one_terminal_event_per_job(stack: Stack) -> None:
    _, url = stack.api()
    stack.worker()
    with InferqClient(url, timeout=60) as client:
        requests = [{"model": "identity", "input": {"tensor": [float(i)]}} for i in range(300)]
        jobs = client.submit_many(requests)
        ids = [j.id for j in jobs if not isinstance(j, Exception)]
        assert len(ids) == 300
        finished = client.wait_many(ids, timeout=120)
    assert {j.status.value for j in finished} == {"succeeded"}, stack.log("worker")
    messages = _consume_events(stack.bootstrap, f"{stack.topic}.events", set(ids), 90)
    terminal: dict[str, set[bytes]] = {}
    order: dict[str, list[bytes]] = {}
    for _partition, _offset, key, headers, value in messages:
        job_id = key.decode()
        data = json.loads(value)
        assert headers["ce_subject"] == key and headers["ce_specversion"] == b"1.0"
        assert headers["ce_source"] and headers["ce_time"]
        assert data["id"] == job_id
        order.setdefault(job_id, []).append(headers["ce_type"])
        if headers["ce_type"] in TERMINAL:
            terminal.setdefault(job_id, set()).add(headers["ce_id"])
            assert data["status"] == "succeeded"
            assert data["result"] == {"tensor": [float(ids.index(job_id))]}
    assert set(terminal) == set(ids), set(ids) - set(terminal)
    # one terminal event per job: a copy (a relay retried) only ever has the same id
    assert {job_id: len(v) for job_id, v in terminal.items() if len(v) != 1} == {}
    for job_id in ids:  # keyed by job id: a job's events in order on its partition
        seen = order[job_id]
        assert seen[0] == b"inferq.job.started" and seen[-1] == b"inferq.job.succeeded"


def _api_on(stack: Stack, port: int) -> tuple[subprocess.Popen[bytes], str]:
    proc = stack.spawn(["api", "--port", str(port)], "api")
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, stack.log("api")
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 60, "the API")
    return proc, url


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sse_clients_resume_across_an_api_restart_and_miss_no_event(stack: Stack) -> None:
    port = free_port()
    api, url = _api_on(stack, port)
    # no worker yet: the jobs change only while the API is away
    with InferqClient(url, timeout=30) as client:
        ids = [client.submit("identity", {"tensor": [float(i)]}).id for i in range(20)]
    streams: dict[str, list[StreamEvent]] = {i: [] for i in ids}
    errors: list[BaseException] = []

    def follow(job_id: str) -> None:
        try:
            with InferqClient(url, timeout=5) as c:
                for event in c.events(job_id, timeout=180):
                    streams[job_id].append(event)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=follow, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    wait_for(lambda: all(streams.values()), 30, "every stream's job.queued")
    # the API goes away while the streams are open; jobs change meanwhile
    os.killpg(api.pid, signal.SIGKILL)
    api.wait(10)
    stack.worker()
    time.sleep(3)
    _, url2 = _api_on(stack, port)  # the same address: the clients reconnect to it
    for t in threads:
        t.join(180)
    assert not errors, errors
    with httpx.Client(base_url=url2) as http:
        for job_id in ids:
            stored = http.get(f"/v1/jobs/{job_id}/events").text
            want = [
                line.removeprefix("id: ") for line in stored.splitlines() if line.startswith("id: ")
            ]
            got = [e.id for e in streams[job_id]]
            assert got == want, (job_id, got, want)  # every event, once, in order
            assert [e.type for e in streams[job_id]] == [
                "job.queued",
                "job.started",
                "job.succeeded",
            ]
