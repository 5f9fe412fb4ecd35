"""Job events on SQS deployments: the SNS topic ``<queue>-events`` that `inferq queues create`
makes, published to by the relay, read from a user's own SQS queue subscribed to it (moto)."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import boto3
import pytest

from inferq.cli import main
from jobstore.records import NewJob, Outcome
from jobstore.store import JobStore
from schemas.jobs import JobStatus
from transports.sqs import SqsConfig, SqsTransport, delete_queues, dlq_name
from transports.sqs.sns import events_topic_name
from workers.events_relay import EventRelay

pytestmark = pytest.mark.sqs


def test_queues_create_makes_the_events_topic_and_the_relay_publishes_to_it(
    sqs_config: SqsConfig, aws_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = f"t-sns-{uuid.uuid4().hex[:8]}"
    for name, value in {
        "INFERQ_TRANSPORT": "sqs",
        "INFERQ_SQS_QUEUE": queue,
        "AWS_ENDPOINT_URL": aws_endpoint,
        "INFERQ_DATA_DIR": str(tmp_path),
    }.items():
        monkeypatch.setenv(name, value)
    assert main(["queues", "create"]) == 0
    sns = boto3.client("sns", endpoint_url=aws_endpoint)
    sqs = boto3.client("sqs", endpoint_url=aws_endpoint)
    topic = events_topic_name(queue)
    assert topic == f"{queue}-events"
    arn = next(t["TopicArn"] for t in sns.list_topics()["Topics"] if t["TopicArn"].endswith(topic))
    # a user's own queue, subscribed with raw delivery: the CloudEvent attributes come along
    mine = sqs.create_queue(QueueName=f"{queue}-mine")["QueueUrl"]
    mine_arn = sqs.get_queue_attributes(QueueUrl=mine, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    sns.subscribe(
        TopicArn=arn,
        Protocol="sqs",
        Endpoint=mine_arn,
        Attributes={"RawMessageDelivery": "true"},
    )
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    try:
        for job_id in ("s1", "s2"):
            store.create(NewJob(id=job_id, model="identity", version="1", input={"t": 1}))
        claimed = store.claim(["s1", "s2"], worker_id="w", lease_s=60).claimed
        attempts = {c.id: c.attempts for c in claimed}
        store.complete(
            [
                Outcome("s1", attempts["s1"], JobStatus.SUCCEEDED, result={"tensor": [1.0]}),
                Outcome("s2", attempts["s2"], JobStatus.FAILED, error_code="x", error_message="no"),
            ]
        )
        transport = SqsTransport(sqs_config, queue=queue)
        relay = EventRelay(
            store.event_log, transport.events_publisher("t"), transport.events, owner="t"
        )

        async def publish() -> int:
            await relay.publisher.start()
            try:
                return await relay.publish_once()
            finally:
                await relay.publisher.stop()

        assert asyncio.run(publish()) == 4
        received = []
        for _ in range(10):
            got = sqs.receive_message(
                QueueUrl=mine,
                MaxNumberOfMessages=10,
                MessageAttributeNames=["All"],
                WaitTimeSeconds=1,
            ).get("Messages", [])
            received.extend(got)
            if len(received) >= 4:
                break
        events = {}
        for m in received:
            attrs = {k: v["StringValue"] for k, v in m["MessageAttributes"].items()}
            body = json.loads(m["Body"])
            assert attrs["ce_subject"] == body["id"] and attrs["ce_specversion"] == "1.0"
            events[attrs["ce_id"]] = (attrs["ce_type"], body["status"])
        assert events == {
            "s1:2": ("inferq.job.started", "running"),
            "s1:3": ("inferq.job.succeeded", "succeeded"),
            "s2:2": ("inferq.job.started", "running"),
            "s2:3": ("inferq.job.failed", "failed"),
        }
    finally:
        store.close()
        asyncio.run(delete_queues(sqs_config, [queue, dlq_name(queue), f"{queue}-mine"]))
