"""In-memory twin of the bus, for unit tests: topics, consumer groups, committed offsets.

It keeps Kafka's semantics that the workers rely on: a consumer of a group starts at the
group's committed offset, so whatever was fetched but not committed is delivered again to the
next consumer, as after a crash.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from transports.base import Delivery, Headers, PublishError, QueueDepth, TransportError
from transports.offsets import OffsetTracker


@dataclass
class _Topic:
    messages: list[tuple[bytes | None, bytes | None, dict[str, bytes]]] = field(
        default_factory=list
    )
    committed: dict[str, int] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


class MemoryBroker:
    """Shared by the publishers and consumers of one test."""

    def __init__(self) -> None:
        self.topics: dict[str, _Topic] = {}
        self.fail_publishes = 0  # the next N publishes fail, to test the API's retries

    def topic(self, name: str) -> _Topic:
        return self.topics.setdefault(name, _Topic())

    def messages(self, name: str) -> list[tuple[bytes | None, bytes | None, dict[str, bytes]]]:
        return list(self.topic(name).messages)


class MemoryPublisher:
    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def publish(
        self, destination: str, value: bytes, *, key: bytes | None = None, headers: Headers = ()
    ) -> None:
        if self.broker.fail_publishes > 0:
            self.broker.fail_publishes -= 1
            raise PublishError("memory broker: injected publish failure")
        topic = self.broker.topic(destination)
        topic.messages.append((key, value, dict(headers)))
        topic.arrived.set()


class MemoryConsumer:
    def __init__(self, broker: MemoryBroker, topic: str, group: str) -> None:
        self.broker = broker
        self.source = topic
        self.group = group
        self._tracker = OffsetTracker()
        self._position = 0

    async def start(self) -> None:
        self._position = self.broker.topic(self.source).committed.get(self.group, 0)

    async def stop(self) -> None:
        return None

    async def fetch(self, max_records: int, timeout_s: float) -> list[Delivery]:
        topic = self.broker.topic(self.source)
        if self._position >= len(topic.messages):
            topic.arrived.clear()
            try:
                await asyncio.wait_for(topic.arrived.wait(), timeout_s)
            except TimeoutError:
                return []
        batch = topic.messages[self._position : self._position + max_records]
        out = []
        for i, (key, value, headers) in enumerate(batch, start=self._position):
            self._tracker.delivered(0, i)
            out.append(Delivery(value, key, headers, self.source, f"0@{i}", token=i))
        self._position += len(batch)
        return out

    def ack(self, delivery: Delivery) -> None:
        self._tracker.done(0, delivery.token)

    async def commit(self) -> None:
        offsets = self._tracker.committable()
        if 0 in offsets:
            self.broker.topic(self.source).committed[self.group] = offsets[0]
        self._tracker.mark_committed(offsets)

    async def nack(self, delivery: Delivery, delay_s: float = 0.0) -> None:
        """The twin is Kafka's: no message is handed back on its own (retries go through
        the store)."""
        raise TransportError("the in-memory consumer cannot redeliver one message")

    async def depth(self) -> QueueDepth:
        topic = self.broker.topic(self.source)
        committed = topic.committed.get(self.group, 0)
        backlog = len(topic.messages) - committed
        return QueueDepth(self.source, backlog, partitions={"0": backlog})
