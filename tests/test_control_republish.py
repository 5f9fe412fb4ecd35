"""The control plane's stale-lease requeue publishes on the configured transport."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import boto3
import pytest
from confluent_kafka import Consumer

from inferq.control import control_config
from inferq.settings import Settings
from schemas.envelope import JobEnvelope, decode_message, new_envelope
from schemas.jobs import JobRequest
from transports.kafka import KafkaConfig
from transports.sqs import SqsConfig


def _envelope(job_id: str) -> JobEnvelope:
    return new_envelope(job_id, JobRequest(model="identity", input={"tensor": [1]}), "urn:test")


@pytest.mark.sqs
def test_republish_goes_to_the_sqs_queue_under_sqs(
    tmp_path: Path, sqs_config: SqsConfig, queue: str
) -> None:
    settings = Settings(
        transport="sqs",
        data_dir=tmp_path,
        sqs_queue=queue,
        aws_endpoint_url=sqs_config.endpoint_url,
        kafka_bootstrap=None,
    )
    republish = control_config(settings).republish
    assert republish is not None, "no republisher under SQS: stale jobs would never run again"
    republish([_envelope("stale-sqs-1")])
    sqs = boto3.client("sqs", endpoint_url=sqs_config.endpoint_url)
    url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
    got = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=2, MaxNumberOfMessages=10)
    bodies = [json.loads(m["Body"]) for m in got.get("Messages", [])]
    assert [b["id"] for b in bodies] == ["stale-sqs-1"]
    assert bodies[0]["specversion"] == "1.0" and bodies[0]["data"]["model"] == "identity"


@pytest.mark.kafka
def test_republish_goes_to_the_topic_under_kafka(
    tmp_path: Path, kafka_config: KafkaConfig, topic: str
) -> None:
    settings = Settings(
        transport="kafka", data_dir=tmp_path, kafka_bootstrap=kafka_config.bootstrap,
        kafka_topic=topic,
    )  # fmt: skip
    republish = control_config(settings).republish
    assert republish is not None
    republish([_envelope("stale-kafka-1")])
    consumer = Consumer(
        {
            "bootstrap.servers": kafka_config.bootstrap,
            "group.id": f"{topic}-check",
            "auto.offset.reset": "earliest",
        }
    )
    try:
        consumer.subscribe([topic])
        messages = []
        for _ in range(40):
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                messages.append(message)
                break
        assert len(messages) == 1
        m = messages[0]
        raw = cast(list[tuple[str, bytes]], m.headers() or [])  # its stubs say less
        headers = dict(raw)
        envelope = decode_message(headers, m.value())
        assert envelope.id == "stale-kafka-1"
    finally:
        consumer.close()
