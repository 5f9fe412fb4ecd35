"""What only SQS has: visibility timeouts, heartbeats, nack, redrive, FIFO, batch deletes,
the attribute mapping; against moto_server, except the pure mapping and the partial-failure
bookkeeping."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import pytest

from dlq.router import DeadLetter, DeadLetterRouter, reason_from_headers
from transports.base import Delivery, QueueDepth
from transports.sqs import (
    QueueNotFound,
    SqsConfig,
    SqsConsumer,
    SqsDepth,
    SqsPublisher,
    delete_queues,
    dlq_name,
    ensure_queues,
)
from transports.sqs.wire import decode, encode


async def _fetch(consumer: SqsConsumer, count: int, within_s: float = 15.0) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + within_s
    while len(got) < count and time.monotonic() < deadline:
        got += await consumer.fetch(count - len(got), 1)
    return got


# --- the attribute mapping (no server) ------------------------------------------------------


def _roundtrip(value: bytes, key: bytes | None, headers: list[tuple[str, bytes]]) -> Any:
    body, attributes = encode(value, key, headers)
    assert len(attributes) <= 10 and body
    wire = {
        name: {"BinaryValue": a["BinaryValue"]}
        if "BinaryValue" in a
        else {"StringValue": a["StringValue"]}
        for name, a in attributes.items()
    }
    return decode(body, wire)


@pytest.mark.parametrize(
    ("value", "key", "headers"),
    [
        (b'{"a": 1}', b"job-1", [("content-type", b"application/cloudevents+json")]),
        (b"\x00\xffbinary", None, []),
        (b"", None, [("empty", b""), ("AWS.reserved", b"x"), ("bin", b"\xfe")]),
        (b"x", b"k", [(f"h{i}", str(i).encode()) for i in range(15)]),
    ],
    ids=["json", "binary-body", "odd-headers", "fifteen-headers"],
)
def test_wire_mapping_is_exact_both_ways(
    value: bytes, key: bytes | None, headers: list[tuple[str, bytes]]
) -> None:
    assert _roundtrip(value, key, headers) == (value, key, dict(headers))


def test_a_plain_message_decodes_as_body_alone() -> None:
    assert decode("hello", {}) == (b"hello", None, {})


# --- partial batch-delete failures (fake client, no server) --------------------------------


async def test_commit_keeps_transiently_failed_deletes_for_the_next_commit() -> None:
    consumer = SqsConsumer(SqsConfig(), "q")
    consumer._url = "http://fake/q"
    calls: list[list[str]] = []
    replies = [
        {
            "Successful": [{"Id": "0"}],
            "Failed": [
                {"Id": "1", "SenderFault": False, "Code": "InternalError"},
                {"Id": "2", "SenderFault": True, "Code": "ReceiptHandleIsInvalid"},
            ],
        },
        {"Successful": [{"Id": "0"}], "Failed": []},
    ]

    async def call(operation: str, **kwargs: Any) -> dict[str, Any]:
        assert operation == "delete_message_batch"
        calls.append([e["ReceiptHandle"] for e in kwargs["Entries"]])
        reply: dict[str, Any] = replies[len(calls) - 1]  # type: ignore[assignment]
        return reply

    consumer._client.call = call  # type: ignore[method-assign]
    deliveries = [
        consumer._delivery({"ReceiptHandle": h, "MessageId": h, "Body": h}, 0.0)
        for h in ("a", "b", "c")
    ]
    for d in deliveries:
        consumer.ack(d)
    await consumer.commit()
    assert consumer.outstanding() == 1  # "b" failed transiently; "c" can never be deleted
    await consumer.commit()
    assert calls == [["a", "b", "c"], ["b"]]
    assert consumer.outstanding() == 0


# --- against moto_server ---------------------------------------------------------------------


@pytest.mark.sqs
async def test_a_crashed_consumers_messages_reappear_after_the_visibility_timeout(
    sqs_config: SqsConfig, queue: str
) -> None:
    # 5 s: the stop and the successor's start took over 2 s once in CI, and the message was
    # visible again before the "still invisible" look
    config = replace(sqs_config, visibility_timeout_s=5, release_on_stop=False)
    async with SqsPublisher(config) as publisher:
        await publisher.publish(queue, b"m")
    crashed = SqsConsumer(config, queue)
    await crashed.start()
    [first] = await _fetch(crashed, 1)
    await crashed.stop()  # no release: as if the process died
    async with SqsConsumer(config, queue) as successor:
        assert await successor.fetch(10, 0) == []  # still invisible
        [again] = await _fetch(successor, 1)
    assert (again.value, again.receive_count) == (b"m", 2)
    assert again.position == first.position


@pytest.mark.sqs
async def test_the_heartbeat_keeps_a_slow_message_invisible(
    sqs_config: SqsConfig, queue: str
) -> None:
    config = replace(sqs_config, visibility_timeout_s=1, heartbeat_s=0.3)
    async with SqsPublisher(config) as publisher:
        await publisher.publish(queue, b"slow")
    async with SqsConsumer(config, queue) as holder, SqsConsumer(config, queue) as other:
        [held] = await _fetch(holder, 1)
        seen = []
        deadline = time.monotonic() + 3  # three visibility timeouts
        while time.monotonic() < deadline:
            seen += await other.fetch(10, 1)
        assert seen == []
        holder.ack(held)
        await holder.commit()
    assert (await SqsDepth(config, queue).depth()).backlog == 0


@pytest.mark.sqs
async def test_nack_hands_a_message_back_after_the_delay(sqs_config: SqsConfig, queue: str) -> None:
    async with SqsPublisher(sqs_config) as publisher:
        await publisher.publish(queue, b"retry-me")
    async with SqsConsumer(sqs_config, queue) as consumer:
        [first] = await _fetch(consumer, 1)
        await consumer.nack(first, 1)
        assert consumer.outstanding() == 0
        [again] = await _fetch(consumer, 1)
        assert again.receive_count == 2


@pytest.mark.sqs
async def test_redrive_moves_a_message_to_the_dlq_after_max_receive_count(
    sqs_config: SqsConfig, queue: str
) -> None:
    async with SqsPublisher(sqs_config) as publisher:
        await publisher.publish(queue, b"poison")
    counts = []
    async with SqsConsumer(sqs_config, queue) as consumer:
        for _ in range(sqs_config.max_receive_count):
            [d] = await _fetch(consumer, 1)
            counts.append(d.receive_count)
            await consumer.nack(d, 0)
        assert await consumer.fetch(10, 1) == []
    assert counts == [1, 2, 3]
    async with SqsConsumer(sqs_config, dlq_name(queue)) as dlq:
        [dead] = await _fetch(dlq, 1)
    assert dead.value == b"poison"


@pytest.mark.sqs
async def test_dead_letter_reasons_travel_as_message_attributes(
    sqs_config: SqsConfig, queue: str
) -> None:
    async with SqsPublisher(sqs_config) as publisher:
        await publisher.publish(
            queue, b"{}", key=b"job-9", headers=[("content-type", b"application/json")]
        )
        async with SqsConsumer(sqs_config, queue) as consumer:
            [delivery] = await _fetch(consumer, 1)
            letter = DeadLetter(
                delivery, "invalid_input", "input.text: too short", job_id="job-9", model="m"
            )
            await DeadLetterRouter(publisher, dlq_name(queue)).send(letter)
    async with SqsConsumer(sqs_config, dlq_name(queue)) as dlq:
        [dead] = await _fetch(dlq, 1)
    reason = reason_from_headers(dict(dead.headers))
    assert reason["code"] == "invalid_input" and reason["job-id"] == "job-9"
    assert reason["origin"] == queue and reason["position"] == delivery.position
    assert dead.headers["content-type"] == b"application/json"
    assert (dead.value, dead.key) == (b"{}", b"job-9")


@pytest.mark.sqs
async def test_fifo_queue_deduplicates_by_key_and_keeps_a_keys_order(
    sqs_config: SqsConfig,
) -> None:
    queue = f"t-fifo-{time.monotonic_ns()}.fifo"
    await ensure_queues(sqs_config, queue)
    try:
        async with SqsPublisher(sqs_config) as publisher:
            await publisher.publish(queue, b"first", key=b"job-1")
            await publisher.publish(queue, b"again", key=b"job-1")  # same job id: dropped
            await publisher.publish(queue, b"other", key=b"job-2")
        async with SqsConsumer(sqs_config, queue) as consumer:
            got = await _fetch(consumer, 2)
            assert sorted(d.value or b"" for d in got) == [b"first", b"other"]
            assert await consumer.fetch(10, 1) == []
    finally:
        await delete_queues(sqs_config, [queue, dlq_name(queue)])


@pytest.mark.sqs
async def test_a_missing_queue_is_named_in_a_clear_error(sqs_config: SqsConfig) -> None:
    with pytest.raises(QueueNotFound, match="'no-such-queue' does not exist"):
        await SqsConsumer(sqs_config, "no-such-queue").start()
    with pytest.raises(QueueNotFound, match="no-such-queue"):
        await SqsDepth(sqs_config, "no-such-queue").depth()


@pytest.mark.sqs
async def test_ensure_queues_is_idempotent(sqs_config: SqsConfig, queue: str) -> None:
    await ensure_queues(sqs_config, queue)
    assert await SqsDepth(sqs_config, dlq_name(queue)).depth() == QueueDepth(
        dlq_name(queue), 0, partitions={"visible": 0, "in_flight": 0, "delayed": 0}
    )


@pytest.mark.sqs
async def test_stop_hands_held_messages_back_at_once(sqs_config: SqsConfig, queue: str) -> None:
    async with SqsPublisher(sqs_config) as publisher:
        await publisher.publish(queue, b"m")
    first = SqsConsumer(sqs_config, queue)
    await first.start()
    await _fetch(first, 1)
    await first.stop()
    async with SqsConsumer(sqs_config, queue) as second:
        got = await asyncio.wait_for(second.fetch(10, 1), 5)
    assert [d.value for d in got] == [b"m"]
