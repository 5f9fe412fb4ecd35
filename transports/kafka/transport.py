"""The Kafka transport: one object that builds every part of a Kafka bus from its config."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from schemas.envelope import JobEnvelope
from transports.base import NotConfigured
from transports.kafka.admin import ensure_topics
from transports.kafka.asyncapi import asyncapi_document
from transports.kafka.config import KafkaConfig
from transports.kafka.consumer import KafkaConsumer
from transports.kafka.depth import KafkaDepth
from transports.kafka.local import EmbeddedKafka
from transports.kafka.publisher import KafkaPublisher
from transports.transport import Capabilities, Encoded, LocalServerSpec, encode_event

LOCAL = LocalServerSpec(
    what="the local broker", port=19092, option="--kafka-port", port_of="the Kafka broker"
)


@dataclass(frozen=True)
class KafkaTransport:
    """A jobs topic (and its ``<topic>.dlq``) on one cluster, consumed by one group.

    ``client`` holds the cluster's client settings (its ``client_id`` and
    ``group_instance_id`` are set per part); None while no broker is configured.
    """

    client: KafkaConfig | None
    topic: str = "inferq.jobs"
    partitions: int = 4
    group: str = "inferq-workers"
    fetch_timeout_s: float = 0.1  # the worker's poll; the consumer idles without spinning

    name = "kafka"
    local = LOCAL

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            redelivers_itself=False,
            ordered_partitions=True,
            consumer_groups=True,
            contiguous_commits=True,
            structured_events=False,
            fetch_timeout_s=self.fetch_timeout_s,
            max_consumers=self.partitions,  # a group never uses more than the partitions
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

    def events_publisher(self, client_id: str) -> KafkaPublisher:
        return self.publisher(client_id)

    @property
    def address(self) -> str | None:
        return self.client.bootstrap if self.client is not None else None

    @property
    def missing(self) -> str | None:
        if self.client is not None:
            return None
        return (
            "INFERQ_KAFKA_BOOTSTRAP is not set: point it at a Kafka broker "
            "(host:port), or run `inferq dev`, which starts an embedded one"
        )

    def _config(self, client_id: str, member: str | None = None) -> KafkaConfig:
        if self.client is None:
            raise NotConfigured(self.missing)
        return replace(self.client, client_id=client_id, group_instance_id=member)

    def publisher(self, client_id: str) -> KafkaPublisher:
        return KafkaPublisher(self._config(client_id))

    def consumer(
        self,
        client_id: str,
        *,
        member: str | None = None,
        source: str | None = None,
        group: str | None = None,
    ) -> KafkaConsumer:
        # a stable member id makes the worker a static group member (KIP-345)
        config = self._config(client_id, member)
        return KafkaConsumer(config, source or self.topic, group or self.group)

    def depth(
        self, client_id: str, *, source: str | None = None, group: str | None = None
    ) -> KafkaDepth:
        return KafkaDepth(self._config(client_id), source or self.topic, group or self.group)

    async def prepare(self, *, create: bool | None = None) -> None:
        # topics are always created where missing: with the partition count meant, rather
        # than whatever a broker that auto-creates on the first publish would pick
        # the events topic as many partitions as the jobs: keyed by job id, in order per job
        topics = {self.topic: self.partitions, self.dead_letters: 1, self.events: self.partitions}
        await ensure_topics(self._config("inferq-admin"), topics)

    async def prepare_publisher(self) -> None:
        return None  # the publisher reconnects by itself; /readyz says when the broker is up

    def encode(self, envelope: JobEnvelope) -> Encoded:
        return encode_event(envelope, structured=self.capabilities.structured_events)

    def asyncapi(self) -> dict[str, Any]:
        bootstrap = self.client.bootstrap if self.client is not None else ""
        return asyncapi_document(
            bootstrap, self.topic, self.dead_letters, self.group, events=self.events
        )

    def local_server(self, data_dir: Path, port: int) -> EmbeddedKafka:
        return EmbeddedKafka(data_dir / "kafka", port)

    def on_local_server(self, address: str) -> KafkaTransport:
        client = self.client or KafkaConfig(bootstrap=address)
        return replace(self, client=replace(client, bootstrap=address))

    def environment(self) -> dict[str, str]:
        env = {"INFERQ_TRANSPORT": self.name}
        if self.client is not None:
            env["INFERQ_KAFKA_BOOTSTRAP"] = self.client.bootstrap
        return env

    def describe(self, where: str) -> str:
        bootstrap = self.client.bootstrap if self.client is not None else "(none)"
        topics = f"{self.topic}, {self.dead_letters}, {self.events}"
        return f"Kafka      {bootstrap} ({where})   topics {topics}"
