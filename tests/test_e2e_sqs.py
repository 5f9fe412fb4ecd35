"""End to end over SQS (moto_server), with the API and workers as real processes."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest

from jobstore.store import JobStore
from schemas.jobs import JobStatus
from tests.procs import Stack, wait_for
from transports.sqs import SqsConfig

pytestmark = pytest.mark.sqs


class SqsStack(Stack):
    """A Stack whose processes use SQS: the queue is ``topic``, the endpoint ``bootstrap``."""

    def env(self, **extra: str) -> dict[str, str]:
        env = super().env()
        env.update(
            {
                "INFERQ_TRANSPORT": "sqs",
                "AWS_ENDPOINT_URL": self.bootstrap,
                "INFERQ_SQS_QUEUE": self.topic,
                "INFERQ_SQS_VISIBILITY_TIMEOUT_S": "3",
                "INFERQ_SQS_WAIT_TIME_S": "1",
                "INFERQ_SQS_MAX_RECEIVE_COUNT": "4",
            }
        )
        env.update(extra)
        return env


@pytest.fixture
def stack(tmp_path: Path, sqs_config: SqsConfig, queue: str, model_repo: Path) -> Iterator[Stack]:
    assert sqs_config.endpoint_url is not None
    s = SqsStack(tmp_path, sqs_config.endpoint_url, queue, model_repo)
    yield s
    s.stop_all()


def _send(endpoint: str, queue: str, bodies: list[str]) -> None:
    sqs = boto3.client("sqs", endpoint_url=endpoint)
    try:
        url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
        for i in range(0, len(bodies), 10):
            entries = [{"Id": str(j), "MessageBody": b} for j, b in enumerate(bodies[i : i + 10])]
            sqs.send_message_batch(QueueUrl=url, Entries=entries)
    finally:
        sqs.close()


def _event(job_id: str, data: dict) -> str:
    return json.dumps(
        {
            "specversion": "1.0",
            "id": job_id,
            "source": "//billing",
            "type": "inferq.job.requested",
            "data": data,
        }
    )


@pytest.mark.timeout(180)  # the API 60 s, two ?wait=30
def test_http_and_direct_boto3_jobs_run_over_sqs(stack: Stack) -> None:
    _, url = stack.api()
    stack.worker()
    _send(
        stack.bootstrap,
        stack.topic,
        [
            _event("svc-1", {"model": "minilm", "input": {"text": "straight onto the queue"}}),
            "\x01 not json",
        ],
    )
    with httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/v1/jobs", json={"model": "identity", "input": {"tensor": [3.5]}})
        assert r.status_code == 202, r.text
        job = client.get(r.headers["location"], params={"wait": 30}).json()
        assert job["status"] == "succeeded", stack.log("worker")
        assert job["result"] == {"tensor": [3.5]}
        direct = client.get("/v1/jobs/svc-1", params={"wait": 30}).json()
        assert direct["status"] == "succeeded", stack.log("worker")
        assert len(direct["result"]["embedding"]) == 384 and direct["source"] == "//billing"


@pytest.mark.timeout(180)  # each role's exit, 60 s each
def test_a_missing_queue_stops_api_and_worker_with_its_name(stack: Stack) -> None:
    env = {"INFERQ_SQS_QUEUE": "no-such-queue", "INFERQ_SQS_CREATE_QUEUES": "false"}
    roles = (["api", "--port", "0"], ["worker"])
    # both start at once (each spends most of its time importing the stack)
    procs = [stack.spawn(role, f"missing-{role[0]}", **env) for role in roles]
    for role, proc in zip(roles, procs, strict=True):
        assert proc.wait(60) == 2, stack.log(f"missing-{role[0]}")
        out = stack.log(f"missing-{role[0]}")
        assert "'no-such-queue' does not exist" in out and "Traceback" not in out, out


def _count(store: JobStore, ids: list[str], status: JobStatus) -> int:
    return sum(1 for r in store.get_many(ids).values() if r.status is status)


@pytest.mark.slow
@pytest.mark.timeout(300)  # progress 90 s, then all jobs 150 s
def test_kill_9_worker_mid_batch_messages_reappear_and_run_once(stack: Stack) -> None:
    ids = [f"k9-{i}" for i in range(600)]  # enough that a quiet machine is busy at the kill
    texts = [f"sentence number {i} for the crash test" for i in range(len(ids))]
    _send(
        stack.bootstrap,
        stack.topic,
        [
            _event(i, {"model": "minilm", "input": {"text": t}})
            for i, t in zip(ids, texts, strict=True)
        ],
    )
    store = JobStore(f"sqlite:///{stack.data_dir / 'jobs.db'}")
    store.create_schema()
    first = stack.worker("worker-1")
    wait_for(lambda: _count(store, ids, JobStatus.SUCCEEDED) >= 10, 90, "progress", 0.02)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert _count(store, ids, JobStatus.SUCCEEDED) < len(ids), "finished before the kill"
    stack.worker("worker-2")
    wait_for(
        lambda: _count(store, ids, JobStatus.SUCCEEDED) == len(ids), 150, "all jobs after restart"
    )
    records = store.get_many(ids)
    assert all(r.status is JobStatus.SUCCEEDED and r.result for r in records.values())
    assert any(r.attempts >= 2 for r in records.values()), "nothing was in flight at the kill"
    store.close()
