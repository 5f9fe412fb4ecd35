"""The worker over SQS (moto_server), in-process: bad input, duplicates, retries to the DLQ."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from dlq.router import reason_from_headers
from schemas.jobs import JobStatus
from tests.fixtures_sqs import TENSOR, SqsHarness
from transports.sqs import SqsConsumer

pytestmark = pytest.mark.sqs


async def test_a_direct_boto3_job_runs_once_even_when_sent_twice(harness: SqsHarness) -> None:
    for _ in range(2):
        harness.send(harness.event("direct-1", TENSOR))

    def both_copies_handled() -> bool:
        """the job succeeded and both copies were deleted from the queue"""
        done = harness.status("direct-1") is JobStatus.SUCCEEDED
        return done and harness.messages_left() == 0

    # the second copy is acknowledged (deleted) without running: once the queue is empty,
    # there is nothing left that could run the job again
    await harness.run_until(both_copies_handled)
    record = harness.store.get("direct-1")
    assert record is not None and record.attempts == 1
    assert record.result == {"tensor": [1.0, 2.0]} and record.source == "//test"


@pytest.mark.parametrize(
    ("body", "code", "job_id"),
    [
        ("this is { not json", "malformed_message", None),
        (
            json.dumps(
                {
                    "specversion": "1.0",
                    "source": "//t",
                    "type": "inferq.job.requested",
                    "data": TENSOR,
                }
            ),
            "invalid_envelope",
            None,
        ),
        (
            json.dumps({"specversion": "1.0", "id": "no-type", "source": "//t", "data": TENSOR}),
            "invalid_envelope",
            "no-type",
        ),
    ],
    ids=["body-not-json", "cloudevent-without-id", "cloudevent-without-type"],
)
async def test_bad_messages_go_to_the_dlq_with_their_reason_and_the_worker_goes_on(
    harness: SqsHarness, body: str, code: str, job_id: str | None
) -> None:
    harness.send(body)
    harness.send(harness.event("after-bad", TENSOR))
    await harness.run_until(lambda: harness.status("after-bad") is JobStatus.SUCCEEDED)
    [dead] = await harness.dead_letters(1)
    reason = reason_from_headers(dict(dead.headers))
    assert reason["code"] == code and dead.value == body.encode()
    if job_id is not None:  # the id is readable: its row says why
        record = harness.store.get(job_id)
        assert record is not None and record.status is JobStatus.FAILED
        assert record.error_code == code and "type" in (record.error_message or "")


async def test_a_job_that_keeps_failing_lands_in_the_dlq_after_max_receive_count(
    harness: SqsHarness,
) -> None:
    harness.send(harness.event("doomed", {"model": "broken", "input": {"tensor": [1.0]}}))
    limit = harness.config.max_receive_count
    await harness.run_until(
        lambda: harness.status("doomed") is JobStatus.FAILED,
        retry_backoff_s=0.2,
        retry_backoff_max_s=1.0,
    )
    record = harness.store.get("doomed")
    assert record is not None and record.attempts == limit
    assert record.error_code == "inference_failed"
    assert f"gave up after {limit} attempts" in (record.error_message or "")
    [dead] = await harness.dead_letters(1)
    reason = reason_from_headers(dict(dead.headers))
    assert reason["code"] == "inference_failed" and reason["attempts"] == str(limit)
    assert reason["job-id"] == "doomed"


async def test_a_message_received_past_the_limit_is_dead_lettered_unrun(
    harness: SqsHarness,
) -> None:
    # a queue whose redrive allows more receives than the worker does: the worker stops it
    harness.send(harness.event("too-often", TENSOR))
    config = replace(harness.config, visibility_timeout_s=1)
    async with SqsConsumer(config, harness.queue) as consumer:
        for _ in range(2):
            [d] = await consumer.fetch(1, 2)
            await consumer.nack(d, 0)
    await _run_with_limit(harness, "too-often", 2)
    record = harness.store.get("too-often")
    assert record is not None and record.error_code == "attempts_exhausted"
    assert record.attempts == 0  # never ran


async def _run_with_limit(h: SqsHarness, job_id: str, limit: int) -> None:
    config = replace(h.config, max_receive_count=limit)
    await replace(h, config=config).run_until(lambda: h.status(job_id) is JobStatus.FAILED)
