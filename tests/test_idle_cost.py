"""What an idle worker costs, measured from outside: CPU time of a real worker process (and of
the broker serving it) from /proc, over a window after it has joined and run one job."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from jobstore.store import JobStore
from schemas.jobs import JobStatus
from tests.procs import Stack, wait_for
from transports.kafka import EmbeddedKafka

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

WINDOW_S = 10.0
MAX_IDLE_CORE = 0.05  # an idle worker may use at most 5% of one core


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_share(pid: int, window_s: float) -> float:
    """The share of one core ``pid`` used over the next ``window_s`` seconds of wall time."""
    cpu0, wall0 = cpu_seconds(pid), time.monotonic()
    time.sleep(window_s)  # a measurement window, not a wait for an event
    return (cpu_seconds(pid) - cpu0) / (time.monotonic() - wall0)


@pytest.fixture
def stack(
    tmp_path: Path, kafka_broker: EmbeddedKafka, topic: str, model_repo: Path
) -> Iterator[Stack]:
    s = Stack(tmp_path, kafka_broker.bootstrap, topic, model_repo)
    yield s
    s.stop_all()


def _run_one_job(stack: Stack) -> None:
    async def publish() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(
                stack.topic,
                json.dumps({"model": "identity", "input": {"tensor": [1.0]}}).encode(),
                key=b"idle-warmup",
                headers=[
                    ("ce_specversion", b"1.0"),
                    ("ce_id", b"idle-warmup"),
                    ("ce_source", b"//tests"),
                    ("ce_type", b"inferq.job.requested"),
                    ("content-type", b"application/json"),
                ],
            )
        finally:
            await producer.stop()

    asyncio.run(publish())
    store = JobStore(f"sqlite:///{stack.data_dir / 'jobs.db'}")
    store.create_schema()
    try:

        def done() -> bool:
            record = store.get("idle-warmup")
            return record is not None and record.status == JobStatus.SUCCEEDED

        wait_for(done, 90, "the warm-up job to succeed")
    finally:
        store.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.timeout(180)  # the warm-up job 90 s, then the measurement window
def test_an_idle_worker_uses_almost_no_cpu(stack: Stack, kafka_broker: EmbeddedKafka) -> None:
    worker = stack.worker()
    _run_one_job(stack)  # joined the group, models loaded, one job through: now idle
    time.sleep(2.0)  # let the job's commit and write-behind settle before the window
    assert worker.poll() is None, stack.log("worker")
    broker_pid = getattr(kafka_broker, "pid", None)
    broker0 = cpu_seconds(broker_pid) if broker_pid else 0.0
    wall0 = time.monotonic()
    share = cpu_share(worker.pid, WINDOW_S)
    broker_share = (
        (cpu_seconds(broker_pid) - broker0) / (time.monotonic() - wall0) if broker_pid else 0
    )
    print(f"idle worker: {share:.1%} of a core; broker meanwhile: {broker_share:.1%}")
    assert worker.poll() is None, stack.log("worker")
    assert share < MAX_IDLE_CORE, (
        f"an idle worker used {share:.1%} of a core over {WINDOW_S:.0f}s "
        f"(bound {MAX_IDLE_CORE:.0%})"
    )
