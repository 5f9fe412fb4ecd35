"""Each transport object builds every part of its bus, and wiring picks the transport from the
settings in one place. None of this needs a server: parts are built, not started."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from inferq.settings import Settings
from inferq.wiring import TRANSPORTS, ConfigError, transport_of
from schemas.envelope import decode_message, new_envelope
from schemas.jobs import JobRequest
from transports.base import Consumer, DepthProbe, Publisher
from transports.kafka import KafkaConfig, KafkaTransport
from transports.memory import MemoryTransport
from transports.sqs import SqsConfig, SqsTransport
from transports.transport import Capabilities, Transport

OBJECTS: list[Transport] = [
    MemoryTransport(topic="jobs"),
    KafkaTransport(KafkaConfig(bootstrap="127.0.0.1:1"), topic="jobs", partitions=3),
    SqsTransport(SqsConfig(endpoint_url="http://127.0.0.1:1", region="us-east-1"), queue="jobs"),
]


@pytest.mark.parametrize("transport", OBJECTS, ids=lambda t: t.name)
def test_a_transport_object_builds_every_part(transport: Transport, tmp_path: Path) -> None:
    assert isinstance(transport.capabilities, Capabilities)
    assert transport.missing is None
    assert isinstance(transport.publisher("test"), Publisher)
    consumer = transport.consumer("test", member="w-1")
    assert isinstance(consumer, Consumer) and consumer.source == "jobs"
    assert transport.consumer("test", source=transport.dead_letters).source != "jobs"
    assert isinstance(transport.depth("test"), DepthProbe)
    assert transport.dead_letters not in ("", transport.jobs)

    envelope = new_envelope("job-1", JobRequest(model="m", input={"x": 1}), "urn:test")
    value, headers = transport.encode(envelope)
    assert decode_message(dict(headers), value) == envelope  # what its worker will read
    structured = dict(headers).get("content-type") == b"application/cloudevents+json"
    assert structured == transport.capabilities.structured_events

    doc = transport.asyncapi()
    assert doc["asyncapi"].startswith("3.")
    addresses = {c["address"] for c in doc["channels"].values()}
    assert {transport.jobs, transport.dead_letters} <= addresses
    assert transport.describe("local").split()[0]


@pytest.mark.parametrize("transport", OBJECTS[1:], ids=lambda t: t.name)
def test_a_server_transport_has_a_local_server_for_dev(
    transport: Transport, tmp_path: Path
) -> None:
    server = transport.local_server(tmp_path, 12345)
    assert not server.running and server.pid is None  # built, never started here
    assert "12345" in server.address
    assert tmp_path in server.log_path.parents
    local = transport.on_local_server(server.address)
    assert local.address == server.address
    assert local.environment()["INFERQ_TRANSPORT"] == transport.name
    assert server.address in local.environment().values()
    assert transport.local.option.startswith("--")


def test_a_kafka_transport_without_a_broker_says_what_to_set() -> None:
    transport = KafkaTransport(None)
    assert transport.address is None
    assert transport.missing is not None and "INFERQ_KAFKA_BOOTSTRAP" in transport.missing
    with pytest.raises(Exception, match="INFERQ_KAFKA_BOOTSTRAP"):
        transport.publisher("test")


def test_capabilities_say_how_each_transport_retries() -> None:
    kafka, sqs = OBJECTS[1].capabilities, OBJECTS[2].capabilities
    assert not kafka.redelivers_itself and kafka.max_consumers == 3
    assert sqs.redelivers_itself and sqs.max_deliveries == SqsConfig().max_receive_count
    assert sqs.fetch_timeout_s == SqsConfig().wait_time_s  # its long poll


def test_wiring_picks_the_transport_from_the_settings(tmp_path: Path) -> None:
    kafka = transport_of(Settings(data_dir=tmp_path, kafka_bootstrap="h:9", kafka_topic="t"))
    assert isinstance(kafka, KafkaTransport)
    assert (kafka.jobs, kafka.dead_letters, kafka.address) == ("t", "t.dlq", "h:9")
    settings = Settings(transport="sqs", data_dir=tmp_path, sqs_queue="q", sqs_fifo=True)
    sqs = transport_of(settings)
    assert isinstance(sqs, SqsTransport)
    assert (sqs.jobs, sqs.dead_letters) == (settings.sqs_queue_name, settings.sqs_dlq)
    # a name (the CLI's --transport) goes through the same function
    assert isinstance(transport_of(settings, "kafka"), KafkaTransport)
    with pytest.raises(ConfigError, match="unknown transport"):
        transport_of(settings, "carrier-pigeon")
    assert set(TRANSPORTS) == {"kafka", "sqs"}


_ROOT = Path(__file__).resolve().parent.parent
_PACKAGES = ("inferq", "producers", "workers", "control", "dlq", "webhooks", "transports")
_NAME_CHECK = re.compile(r'transport == |== "sqs"|== "kafka"|isinstance\([^)]*Redelivering')


def test_no_code_outside_transport_of_compares_a_transport_name() -> None:
    found = [
        f"{path.relative_to(_ROOT)}:{n}: {line.strip()}"
        for package in _PACKAGES
        for path in sorted((_ROOT / package).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        if _NAME_CHECK.search(line)
    ]
    assert found == []
