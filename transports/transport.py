"""What a transport is: one object that builds everything of its bus from its typed config.

A transport package (``transports/kafka/``, ``transports/sqs/``, ``transports/memory/``)
exports one class that satisfies ``Transport``. The roles ask it for their parts (publisher,
consumer, depth probe), for the resources to create, for the dead-letter destination, for how
a CloudEvent travels, for the AsyncAPI document and for a local server in dev; where the
transports differ, they ask its ``Capabilities``. Nothing outside ``inferq/wiring.py``'s
``transport_of`` knows which transport is in use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from schemas.envelope import STRUCTURED_CONTENT_TYPE, JobEnvelope
from transports.base import Consumer, DepthProbe, Publisher

Encoded = tuple[bytes, list[tuple[str, bytes]]]  # (value, headers) of one message


@dataclass(frozen=True)
class Capabilities:
    """Where transports differ, as facts the roles ask instead of a transport's name."""

    # a consumer hands one message back for a later attempt itself (``Consumer.nack``; SQS:
    # the visibility timeout); otherwise retries wait in the job store and a pump publishes
    # them again, so that a retry never blocks a partition (Kafka)
    redelivers_itself: bool
    # messages with one key keep their order (a Kafka partition); an SQS standard queue keeps none
    ordered_partitions: bool
    # consumer groups with positions of their own; on SQS every consumer competes for one queue
    consumer_groups: bool
    # a commit covers the contiguous acknowledged prefix (offsets); SQS deletes each on its own
    contiguous_commits: bool
    # CloudEvents in structured mode (the whole event as the body) instead of binary mode
    # (the data as the value, the attributes as ce_* headers)
    structured_events: bool
    # how long a worker's fetch waits when nothing is ready (SQS: its long poll)
    fetch_timeout_s: float
    # the receive at which the transport's own redrive takes a message: the worker makes
    # that attempt the final one (None: the transport counts no receives)
    max_deliveries: int | None = None
    # the most consumers that can share the work (Kafka: the jobs topic's partitions)
    max_consumers: int | None = None


def encode_event(envelope: JobEnvelope, *, structured: bool) -> Encoded:
    """One CloudEvent as a message: structured (the event is the body) or binary mode."""
    if structured:
        return envelope.to_structured(), [("content-type", STRUCTURED_CONTENT_TYPE.encode())]
    headers, value = envelope.to_binary()
    return value, headers


@dataclass(frozen=True)
class LocalServerSpec:
    """How ``inferq dev`` runs a transport's local server."""

    what: str  # "the local broker", for the log
    port: int  # its default port (dev takes a free one when it is taken)
    option: str  # the dev option that asks for another port, e.g. "--kafka-port"
    port_of: str = ""  # whose port, in "port N for ... is in use"; ``what`` when empty


class LocalServer(Protocol):
    """A transport's server as a child process of dev or of the test suite."""

    @property
    def address(self) -> str:
        """What clients connect to (bootstrap servers, an endpoint URL)."""
        ...

    @property
    def running(self) -> bool: ...

    @property
    def pid(self) -> int | None: ...

    @property
    def log_path(self) -> Path: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def environment(self) -> dict[str, str]:
        """Variables its clients need besides the address (moto: dummy AWS credentials)."""
        ...


class Transport(Protocol):
    @property
    def name(self) -> str:
        """The ``INFERQ_TRANSPORT`` value that selects it."""
        ...

    @property
    def capabilities(self) -> Capabilities: ...

    @property
    def jobs(self) -> str:
        """The jobs topic or queue."""
        ...

    @property
    def dead_letters(self) -> str:
        """Where dead letters go: ``<topic>.dlq``, ``<queue>-dlq``."""
        ...

    @property
    def events(self) -> str:
        """Where job events are published: ``<topic>.events`` (Kafka), the SNS topic
        ``<queue>-events`` (SQS)."""
        ...

    def events_publisher(self, client_id: str) -> Publisher:
        """The publisher of job events onto ``events``."""
        ...

    @property
    def address(self) -> str | None:
        """Its server as configured (bootstrap servers, an endpoint URL); None: none named
        (dev then starts a local one; SQS alone would use AWS's own endpoint)."""
        ...

    @property
    def missing(self) -> str | None:
        """What must be set before it can connect (its server), None when nothing; its
        parts raise NotConfigured with this message meanwhile."""
        ...

    @property
    def local(self) -> LocalServerSpec: ...

    def publisher(self, client_id: str) -> Publisher:
        """For the jobs and the dead-letter destinations alike."""
        ...

    def consumer(
        self,
        client_id: str,
        *,
        member: str | None = None,
        source: str | None = None,
        group: str | None = None,
    ) -> Consumer:
        """The workers' consumer of the jobs destination (``source`` for another one);
        ``member``: a stable id that makes it a static group member where that exists."""
        ...

    def depth(
        self, client_id: str, *, source: str | None = None, group: str | None = None
    ) -> DepthProbe: ...

    async def prepare(self, *, create: bool | None = None) -> None:
        """Make the bus usable before a role consumes: the jobs and dead-letter destinations
        created where missing (``create=False``: only checked to exist; None: as configured).
        Raises TransportError (NotConfigured, a missing destination) saying what to do."""
        ...

    async def prepare_publisher(self) -> None:
        """What the API needs before it starts: nothing where its publisher reconnects by
        itself and readiness says when the broker is up (Kafka), ``prepare`` where a
        missing destination would fail every publish (SQS)."""
        ...

    def encode(self, envelope: JobEnvelope) -> Encoded:
        """How a CloudEvent travels on this bus: (value, headers)."""
        ...

    def asyncapi(self) -> dict[str, Any]:
        """The AsyncAPI document of its destinations."""
        ...

    def local_server(self, data_dir: Path, port: int) -> LocalServer:
        """A server of its own for dev, keeping its data under ``data_dir``."""
        ...

    def on_local_server(self, address: str) -> Transport:
        """This transport on dev's local server at ``address``; its ``prepare`` creates
        everything there, the claim-check bucket too."""
        ...

    def environment(self) -> dict[str, str]:
        """The settings, as environment variables, that select this transport and its
        server: what dev hands its roles and writes to dev.json."""
        ...

    def describe(self, where: str) -> str:
        """One banner line: the server (``where``: local or external) and destinations."""
        ...
