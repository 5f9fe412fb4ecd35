"""A Kafka consumer that has been idle must still see the next message.

The consumer pauses its partitions between empty fetches so that an idle worker does not
spin against a broker that answers empty fetches at once (noida-db). A caller that polls
with a timeout equal to the longest pause (the worker polls every 100 ms) once fell into
step with the pauses: each resume came right at the caller's deadline, the fetch window
shrank to 0 ms, the partitions were paused again before aiokafka sent a fetch, and the
consumer never fetched again. Messages sat unread on a partition it owned, for good.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from transports.kafka import KafkaConfig, KafkaConsumer, KafkaPublisher

pytestmark = pytest.mark.asyncio


@pytest.mark.timeout(90)
@pytest.mark.parametrize("poll_timeout_s", [0.1, 0.05, 0.25])
async def test_a_message_after_an_idle_spell_is_delivered(
    kafka_config: KafkaConfig, topic: str, poll_timeout_s: float
) -> None:
    consumer = KafkaConsumer(kafka_config, topic, f"idle-{uuid.uuid4().hex[:8]}")
    publisher = KafkaPublisher(kafka_config)
    await publisher.start()
    await consumer.start()
    received: list[bytes] = []

    async def poll() -> None:  # the worker's loop: short fetches, ack and commit each batch
        while True:
            for delivery in await consumer.fetch(64, poll_timeout_s):
                assert delivery.value is not None
                received.append(delivery.value)
                consumer.ack(delivery)
            await consumer.commit()

    task = asyncio.create_task(poll())
    try:
        for n, idle_s in enumerate([0.5, 2.0, 3.0]):
            await asyncio.sleep(idle_s)  # long enough for the pause to reach its maximum
            await publisher.publish(topic, b"m%d" % n, key=uuid.uuid4().bytes)
            async with asyncio.timeout(15):  # without the fix it never comes
                while len(received) <= n:
                    await asyncio.sleep(0.02)
        assert received == [b"m0", b"m1", b"m2"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await consumer.stop()
        await publisher.stop()
