"""The narrow ports every transport implements: publish, consume, depth.

A transport builds them (``transports/transport.py``); what differs between transports is
said by its ``Capabilities``, never found out by ``isinstance``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Headers = Sequence[tuple[str, bytes]]


class TransportError(Exception):
    """The bus could not do what was asked (unreachable, timed out, refused)."""


class NotConfigured(TransportError):
    """The transport cannot connect until its server is configured; says what to set."""


class PublishError(TransportError):
    """A publish was not acknowledged by the broker."""


class MessageTooLarge(PublishError):
    """The message is over the destination's size limit: sending the same bytes again fails
    again."""


@dataclass(frozen=True)
class Delivery:
    """One message pulled from the bus, with the handle needed to acknowledge it."""

    value: bytes | None
    key: bytes | None
    headers: Mapping[str, bytes]
    source: str  # e.g. "inferq.jobs" (topic or queue)
    position: str  # e.g. "2@1041" (partition@offset) or an SQS message id, for DLQ reasons
    receive_count: int = 1
    token: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class QueueDepth:
    """How far behind the consumers are on one topic or queue."""

    source: str
    backlog: int  # messages not yet acknowledged by the consumer group
    in_flight: int = 0  # received but not acknowledged (SQS NotVisible); 0 where unknown
    partitions: Mapping[str, int] = field(default_factory=dict)


@runtime_checkable
class Publisher(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def publish(
        self, destination: str, value: bytes, *, key: bytes | None = None, headers: Headers = ()
    ) -> None:
        """Return only once the broker has durably acknowledged the message."""
        ...


@runtime_checkable
class Checked(Protocol):
    """A client that can say, cheaply and within a bound, whether it could work right now."""

    async def check(self) -> None:
        """Return if the next operation could succeed; raise TransportError saying why not."""


@runtime_checkable
class SizeLimited(Protocol):
    """A publisher that knows the largest message its destination takes."""

    @property
    def max_message_bytes(self) -> int: ...

    def message_size(self, value: bytes, *, key: bytes | None = None, headers: Headers = ()) -> int:
        """The size that counts against ``max_message_bytes`` (encoding included)."""
        ...


@runtime_checkable
class Consumer(Protocol):
    source: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def fetch(self, max_records: int, timeout_s: float) -> list[Delivery]:
        """Up to ``max_records`` messages; waits at most ``timeout_s`` when none is ready."""
        ...

    def ack(self, delivery: Delivery) -> None:
        """Mark a message done. Acks may come in any order; nothing is committed yet."""
        ...

    async def commit(self) -> None:
        """Make the acknowledged messages durable (Kafka: contiguous offsets per partition)."""
        ...

    async def nack(self, delivery: Delivery, delay_s: float = 0.0) -> None:
        """Redeliver ``delivery`` after ``delay_s``; it is no longer held by this consumer.

        Only where the transport's ``Capabilities.redelivers_itself`` (SQS: the visibility
        timeout); elsewhere it raises TransportError and retries wait in the job store."""
        ...


@runtime_checkable
class DepthProbe(Protocol):
    """Backlog of a topic or queue. Started once and kept: its connections are reused."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def depth(self) -> QueueDepth: ...
