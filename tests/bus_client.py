"""A Kafka client inferq did not write (confluent-kafka, librdkafka) for tests that publish
straight onto the bus and read the dead-letter topic from outside."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True)
class Message:
    """One message to publish; ``value=None`` is a tombstone."""

    value: bytes | None
    key: bytes | None = None
    headers: Headers = field(default_factory=list)
    partition: int | None = None


@dataclass(frozen=True)
class Stored:
    """A message as the broker holds it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]


def producer(bootstrap: str, **extra: Any) -> Producer:
    config = {
        "bootstrap.servers": bootstrap,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 2,
        # room for the ~1 MB poison messages; the broker decides whether they fit
        "message.max.bytes": 2_000_000,
        "message.timeout.ms": 30_000,
    }
    config.update(extra)
    return Producer(config)


def publish(bootstrap: str, topic: str, messages: Sequence[Message]) -> list[tuple[int, int]]:
    """Publish in order and wait for every ack; returns (partition, offset) per message.

    Raises if any message was refused: a test must know what the broker actually holds.
    """
    p = producer(bootstrap)
    results: list[tuple[int, int] | str | None] = [None] * len(messages)

    def report(i: int) -> Any:
        def cb(err: KafkaError | None, msg: Any) -> None:
            results[i] = str(err) if err is not None else (msg.partition(), msg.offset())

        return cb

    for i, m in enumerate(messages):
        kwargs: dict[str, Any] = {"key": m.key, "headers": m.headers, "on_delivery": report(i)}
        if m.partition is not None:
            kwargs["partition"] = m.partition
        while True:
            try:
                p.produce(topic, m.value, **kwargs)
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    left = p.flush(60)
    if left:
        raise AssertionError(f"{left} messages were not acknowledged within 60s")
    refused = [(i, r) for i, r in enumerate(results) if not isinstance(r, tuple)]
    if refused:
        raise AssertionError(f"the broker refused {len(refused)} messages: {refused[:5]}")
    return [r for r in results if isinstance(r, tuple)]


def job_event(job_id: str, data: dict[str, Any], source: str = "//fuzz") -> bytes:
    """A structured-mode CloudEvent of a job request."""
    return json.dumps(
        {
            "specversion": "1.0",
            "id": job_id,
            "source": source,
            "type": "inferq.job.requested",
            "datacontenttype": "application/json",
            "data": data,
        }
    ).encode()


STRUCTURED: Headers = [("content-type", b"application/cloudevents+json")]


def binary_headers(job_id: str, source: str = "//fuzz") -> Headers:
    return [
        ("ce_specversion", b"1.0"),
        ("ce_id", job_id.encode()),
        ("ce_source", source.encode()),
        ("ce_type", b"inferq.job.requested"),
        ("content-type", b"application/json"),
    ]


def read_all(bootstrap: str, topic: str, *, expect: int = 0, timeout: float = 30) -> list[Stored]:
    """Every message on every partition of ``topic`` from the start, read with a fresh group;
    waits until at least ``expect`` are there (or ``timeout``), then reads to the end: to
    each partition's high watermark as the broker reports it then, not until a quiet spell."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"inferq-test-reader-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "fetch.max.bytes": 8_000_000,
            "max.partition.fetch.bytes": 4_000_000,
            "receive.message.max.bytes": 9_000_000,
        }
    )
    out: list[Stored] = []
    try:
        meta = c.list_topics(topic, timeout=10)
        parts = sorted(meta.topics[topic].partitions) if topic in meta.topics else []
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        deadline = time.monotonic() + timeout
        next_offset = {
            p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[0] for p in parts
        }

        def at_end() -> bool:
            for p in parts:
                _, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                if next_offset[p] < high:
                    return False
            return True

        while time.monotonic() < deadline:
            msg = c.poll(0.2)
            if msg is None:
                # done once we have what we expect and every partition is read to its end
                if len(out) >= expect and at_end():
                    break
                continue
            error = msg.error()
            if error is not None:
                if error.code() in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
                    continue
                raise AssertionError(f"reading {topic}: {error}")
            next_offset[int(msg.partition() or 0)] = int(msg.offset() or 0) + 1
            raw = msg.headers() or []
            pairs = list(raw.items()) if isinstance(raw, dict) else raw
            headers = {k: v for k, v in pairs if isinstance(v, bytes)}
            out.append(
                Stored(
                    str(msg.topic()),
                    int(msg.partition() or 0),
                    int(msg.offset() or 0),
                    msg.key(),
                    msg.value(),
                    headers,
                )
            )
    finally:
        c.close()
    return out


def ids_of(messages: Iterable[Stored], header: str) -> dict[str, Stored]:
    return {m.headers[header].decode(): m for m in messages if header in m.headers}
