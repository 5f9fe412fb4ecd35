"""The in-memory transport: the twin of Kafka as a whole Transport, for unit tests in one
process (no role can run on it: it has no server)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.envelope import JobEnvelope
from transports.base import TransportError
from transports.memory.broker import MemoryBroker, MemoryConsumer, MemoryPublisher
from transports.transport import Capabilities, Encoded, LocalServer, LocalServerSpec, encode_event

LOCAL = LocalServerSpec(what="no server (in-process)", port=0, option="")


@dataclass(frozen=True)
class MemoryTransport:
    """A topic and a consumer group on one ``MemoryBroker`` shared by all the parts."""

    broker: MemoryBroker = field(default_factory=MemoryBroker)
    topic: str = "inferq.jobs"
    group: str = "inferq-workers"

    name = "memory"
    local = LOCAL

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            redelivers_itself=False,
            ordered_partitions=True,
            consumer_groups=True,
            contiguous_commits=True,
            structured_events=False,
            fetch_timeout_s=0.1,
        )

    @property
    def jobs(self) -> str:
        return self.topic

    @property
    def dead_letters(self) -> str:
        return f"{self.topic}.dlq"

    @property
    def events(self) -> str:
        return f"{self.topic}.events"

    def events_publisher(self, client_id: str) -> MemoryPublisher:
        return MemoryPublisher(self.broker)

    @property
    def address(self) -> str | None:
        return "memory://"  # in-process: nothing to start

    @property
    def missing(self) -> str | None:
        return None

    def publisher(self, client_id: str) -> MemoryPublisher:
        return MemoryPublisher(self.broker)

    def consumer(
        self,
        client_id: str,
        *,
        member: str | None = None,
        source: str | None = None,
        group: str | None = None,
    ) -> MemoryConsumer:
        return MemoryConsumer(self.broker, source or self.topic, group or self.group)

    def depth(
        self, client_id: str, *, source: str | None = None, group: str | None = None
    ) -> MemoryConsumer:
        # the twin's consumer is its own probe: it measures without joining anything
        return MemoryConsumer(self.broker, source or self.topic, group or self.group)

    async def prepare(self, *, create: bool | None = None) -> None:
        self.broker.topic(self.topic)
        self.broker.topic(self.dead_letters)
        self.broker.topic(self.events)

    async def prepare_publisher(self) -> None:
        return None

    def encode(self, envelope: JobEnvelope) -> Encoded:
        return encode_event(envelope, structured=self.capabilities.structured_events)

    def asyncapi(self) -> dict[str, Any]:
        return {
            "asyncapi": "3.0.0",
            "info": {"title": "inferq bus", "version": "1.0.0", "description": "In memory."},
            "channels": {
                "jobs": {"address": self.topic},
                "dead_letters": {"address": self.dead_letters},
                "job_events": {"address": self.events},
            },
        }

    def local_server(self, data_dir: Path, port: int) -> LocalServer:
        raise TransportError("the in-memory transport runs inside one process: no server")

    def on_local_server(self, address: str) -> MemoryTransport:
        return self

    def environment(self) -> dict[str, str]:
        return {}  # not a transport a role can be started on

    def describe(self, where: str) -> str:
        return f"memory     (in-process)   topics {self.topic}, {self.dead_letters}"
