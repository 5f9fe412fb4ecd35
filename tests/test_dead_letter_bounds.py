"""Dead-lettering over SQS (moto_server): letters fit the dead-letter queue's size limit, the
whole payload goes to S3 when a claim-check bucket is set, and a dead-letter queue that
stays unreachable neither holds the other messages nor stops SIGTERM from working."""

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

import boto3
import httpx
import pytest
from prometheus_client import CollectorRegistry

from dlq.router import DeadLetterRouter, reason_from_headers
from dlq.store import DeadLetterFilter, DeadLetterStore
from jobstore.store import JobStore
from schemas.jobs import JobStatus
from tests.fixtures_sqs import SqsHarness
from tests.procs import free_port, wait_for
from tests.test_e2e_sqs import SqsStack
from transports.blobs import ClaimCheck, S3Blobs
from transports.sqs import SqsConsumer, SqsPublisher, dlq_name
from workers.loop import Worker, WorkerConfig
from workers.metrics import WorkerMetrics

pytestmark = pytest.mark.sqs

SQS_LIMIT = 256 * 1024
BIG = 300_000  # the jobs queue takes it (moto's queues take 1 MiB); a 256 KiB DLQ does not


def _big_breaker(harness: SqsHarness, job_id: str) -> str:
    """A structured event whose input breaks the identity contract (text, not a tensor)."""
    body = harness.event(job_id, {"model": "identity", "input": {"text": ""}})
    return body.replace('"text": ""', '"text": "' + "y" * (BIG - len(body)) + '"')


def _limit_dlq(harness: SqsHarness, size: int) -> None:
    sqs = boto3.client("sqs", endpoint_url=harness.config.endpoint_url)
    try:
        url = sqs.get_queue_url(QueueName=dlq_name(harness.queue))["QueueUrl"]
        sqs.set_queue_attributes(QueueUrl=url, Attributes={"MaximumMessageSize": str(size)})
    finally:
        sqs.close()


async def _run(harness: SqsHarness, claim_check: ClaimCheck | None, ids: list[str]) -> None:
    harness.store.create_schema()
    letters = DeadLetterStore(harness.store.engine)
    letters.create_schema()
    publisher = SqsPublisher(harness.config)
    await publisher.start()
    worker = Worker(
        consumer=SqsConsumer(harness.config, harness.queue),
        store=harness.store,
        models=harness.models,
        dead_letters=DeadLetterRouter(
            publisher, dlq_name(harness.queue), record=letters.add, offload=claim_check
        ),
        metrics=WorkerMetrics(CollectorRegistry()),
        claim_check=claim_check,
        config=WorkerConfig(
            worker_id="sqs-size", fetch_timeout_s=1, max_deliveries=5, redelivers=True
        ),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        async with asyncio.timeout(30):
            while not all(harness.status(i) is JobStatus.SUCCEEDED for i in ids):
                assert not task.done(), task.exception()
                await asyncio.sleep(0.05)
            while len(letters.list(DeadLetterFilter())) < 1:
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await publisher.stop()


async def test_a_dead_letter_fits_a_256_kib_dead_letter_queue(harness: SqsHarness) -> None:
    _limit_dlq(harness, SQS_LIMIT)
    body = _big_breaker(harness, "big-sqs")
    harness.send(body)
    harness.send(harness.event("after-big", {"model": "identity", "input": {"tensor": [1.0]}}))
    await _run(harness, None, ["after-big"])
    [letter] = await harness.dead_letters(1)
    reason = reason_from_headers(dict(letter.headers))
    original = body.encode()
    assert reason["code"] == "invalid_input" and reason["job-id"] == "big-sqs"
    assert reason["payload-size"] == str(len(original)) and reason["payload-truncated"] == "true"
    assert reason["payload-sha256"] == hashlib.sha256(original).hexdigest()
    assert letter.value and original.startswith(letter.value) and len(letter.value) < SQS_LIMIT
    assert "payload-url" not in reason  # no claim-check bucket: only the head is kept
    [entry] = DeadLetterStore(harness.store.engine).list(DeadLetterFilter())
    assert entry.trimmed and entry.payload == letter.value and entry.payload_url is None


async def test_the_whole_payload_goes_to_s3_when_a_bucket_is_set(
    harness: SqsHarness, aws_endpoint: str
) -> None:
    s3 = boto3.client("s3", endpoint_url=aws_endpoint)
    s3.create_bucket(Bucket="dlq-keep")
    _limit_dlq(harness, SQS_LIMIT)
    body = _big_breaker(harness, "big-s3")
    harness.send(body)
    harness.send(harness.event("after-s3", {"model": "identity", "input": {"tensor": [2.0]}}))
    claim = ClaimCheck(S3Blobs(endpoint_url=aws_endpoint), bucket="dlq-keep")
    await _run(harness, claim, ["after-s3"])
    [letter] = await harness.dead_letters(1)
    reason = reason_from_headers(dict(letter.headers))
    url = reason["payload-url"]
    assert url.startswith("s3://dlq-keep/inferq/dead-letters/")
    bucket, key = url.removeprefix("s3://").split("/", 1)
    kept = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert kept == body.encode()  # byte for byte
    [entry] = DeadLetterStore(harness.store.engine).list(DeadLetterFilter())
    assert entry.payload_url == url and entry.trimmed
    s3.close()


# --- a dead-letter queue that stays unreachable, against `inferq worker` ------------------------


@pytest.fixture
def stack(tmp_path: Path, sqs_config, queue: str, model_repo: Path) -> Iterator[SqsStack]:
    s = SqsStack(tmp_path, sqs_config.endpoint_url, queue, model_repo)
    yield s
    s.stop_all()


def _event(job_id: str, data: dict) -> str:
    return json.dumps(
        {"specversion": "1.0", "id": job_id, "source": "//t", "type": "inferq.job.requested"}
        | {"data": data}
    )


def _metric(port: int, line_start: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_unreachable_dead_letter_queue_is_bounded_and_sigterm_still_stops(
    stack: SqsStack,
) -> None:
    endpoint = stack.bootstrap
    metrics_port = free_port()
    proc = stack.spawn(
        ["worker"],
        "worker",
        INFERQ_WORKER_ID="bounded",
        INFERQ_WORKER_METRICS_PORT=str(metrics_port),
        INFERQ_DLQ_PUBLISH_DEADLINE_S="3",
    )
    sqs = boto3.client("sqs", endpoint_url=endpoint)
    store = JobStore(f"sqlite:///{stack.data_dir / 'jobs.db'}")
    try:
        wait_for(lambda: "model identity" in stack.log("worker"), 90, "the worker's store")
        url = sqs.get_queue_url(QueueName=stack.topic)["QueueUrl"]
        good = {"model": "identity", "input": {"tensor": [1]}}

        def status(job_id: str) -> JobStatus | None:
            assert proc.poll() is None, stack.log("worker")
            row = store.get(job_id)
            return row.status if row else None

        # once the worker consumes (its queue setup is over), the dead-letter queue goes away
        # (deleted, or a policy that denies us): every dead-letter publish fails from then on
        sqs.send_message(QueueUrl=url, MessageBody=_event("warm-1", good))
        wait_for(lambda: status("warm-1") is JobStatus.SUCCEEDED, 90, "the worker to consume")
        sqs.delete_queue(QueueUrl=sqs.get_queue_url(QueueName=dlq_name(stack.topic))["QueueUrl"])
        sqs.send_message(
            QueueUrl=url, MessageBody=_event("poison-1", {"model": "nope", "input": {"text": "x"}})
        )
        sqs.send_message(QueueUrl=url, MessageBody=_event("good-1", good))

        # the good job does not wait for the poison's dead letter
        wait_for(lambda: status("good-1") is JobStatus.SUCCEEDED, 30, "good-1 to run")
        assert status("poison-1") is JobStatus.FAILED
        letters = DeadLetterStore(store.engine)
        # bounded: after the deadline the letter is kept in the table, and the message acked
        wait_for(lambda: len(letters.list(DeadLetterFilter())) == 1, 30, "the letter in the table")
        [entry] = letters.list(DeadLetterFilter())
        assert entry.job_id == "poison-1" and entry.code == "unknown_model"
        assert not entry.published
        assert _metric(metrics_port, 'inferq_dlq_unpublished_total{reason="unreachable"}') == 1

        def queue_empty() -> bool:
            attrs = sqs.get_queue_attributes(
                QueueUrl=url,
                AttributeNames=[
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible",
                ],
            )["Attributes"]
            return attrs == {
                "ApproximateNumberOfMessages": "0",
                "ApproximateNumberOfMessagesNotVisible": "0",
            }

        wait_for(queue_empty, 15, "the poison to be deleted from the jobs queue")

        # SIGTERM while the next dead-letter publish is retrying
        before = stack.log("worker").count("dead-letter publish failed, retrying")
        poison_2 = _event("poison-2", {"model": "nope", "input": {"text": "x"}})
        sqs.send_message(QueueUrl=url, MessageBody=poison_2)
        wait_for(
            lambda: stack.log("worker").count("dead-letter publish failed, retrying") > before,
            30,
            "the dead-letter publish of poison-2 to be retrying",
        )
        os.killpg(proc.pid, signal.SIGTERM)
        started = time.monotonic()
        try:
            code = proc.wait(10)
        except subprocess.TimeoutExpired:
            raise AssertionError("worker ignored SIGTERM:\n" + stack.log("worker")) from None
        took = time.monotonic() - started
        assert code == 0, stack.log("worker")
        assert took < 8, took
        kept = {e.job_id: e for e in letters.list(DeadLetterFilter())}
        assert set(kept) == {"poison-1", "poison-2"} and not kept["poison-2"].published
        assert kept["poison-2"].payload == poison_2.encode()  # the original bytes are kept
    finally:
        store.close()
        sqs.close()
