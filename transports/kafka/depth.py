"""The Kafka depth probe: a consumer group's lag on one topic."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from transports.base import QueueDepth, TransportError
from transports.kafka.config import KafkaConfig


class KafkaDepth:
    """DepthProbe: the group's lag on one topic, summed over partitions.

    Lag of a partition = end offset - committed offset; with no commit yet, everything still
    retained counts (end - beginning), as a new group with auto_offset_reset=earliest would
    read it all. Between ``start`` and ``stop`` the probe keeps its clients; without ``start``
    each ``depth`` call opens and closes its own, so a caller that never stops it leaks nothing.
    """

    def __init__(self, config: KafkaConfig, topic: str, group: str) -> None:
        self.config = config
        self.source = topic
        self.group = group
        self._clients: _DepthClients | None = None

    async def start(self) -> None:
        if self._clients is None:
            self._clients = await _DepthClients.open(self.config)

    async def stop(self) -> None:
        clients, self._clients = self._clients, None
        if clients is not None:
            await clients.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def depth(self) -> QueueDepth:
        if self._clients is not None:
            return await self._measure(self._clients)
        clients = await _DepthClients.open(self.config)
        try:
            return await self._measure(clients)
        finally:
            await clients.close()

    async def _measure(self, clients: _DepthClients) -> QueueDepth:
        try:
            tps = await _partitions(clients.admin, self.source)
            if not tps:
                return QueueDepth(self.source, 0)
            committed = await clients.admin.list_consumer_group_offsets(self.group, partitions=tps)
            ends = await clients.offsets.end_offsets(tps)
            # -1 (or absent) = the group never committed on that partition
            missing = [tp for tp in tps if tp not in committed or committed[tp].offset < 0]
            begins = await clients.offsets.beginning_offsets(missing) if missing else {}
        except KafkaError as exc:
            raise TransportError(f"lag of {self.group!r} on {self.source!r} unknown") from exc
        lags: dict[str, int] = {}
        for tp in tps:
            start = begins[tp] if tp in begins else committed[tp].offset
            lags[str(tp.partition)] = max(0, ends[tp] - start)
        return QueueDepth(self.source, sum(lags.values()), partitions=lags)


@dataclass(frozen=True)
class _DepthClients:
    admin: AIOKafkaAdminClient
    offsets: AIOKafkaConsumer  # groupless: asks for end/beginning offsets, never joins

    @classmethod
    async def open(cls, c: KafkaConfig) -> _DepthClients:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=c.bootstrap,
            client_id=f"{c.client_id}-depth",
            request_timeout_ms=c.request_timeout_ms,
            metadata_max_age_ms=c.metadata_max_age_ms,
        )
        offsets = AIOKafkaConsumer(
            bootstrap_servers=c.bootstrap,
            client_id=f"{c.client_id}-depth",
            group_id=None,
            enable_auto_commit=False,
            request_timeout_ms=c.request_timeout_ms,
            metadata_max_age_ms=c.metadata_max_age_ms,
            isolation_level=c.isolation_level,
        )
        clients = cls(admin, offsets)
        try:
            await admin.start()
            await offsets.start()
        except KafkaError as exc:
            await clients.close()
            raise TransportError(f"cannot reach Kafka at {c.bootstrap}") from exc
        return clients

    async def close(self) -> None:
        # aiokafka's groupless consumer fails its stop() with CancelledError when stopped
        # before its background task ever ran; one loop turn lets that task start
        await asyncio.sleep(0)
        try:
            await self.offsets.stop()
        finally:
            await self.admin.close()


async def _partitions(admin: AIOKafkaAdminClient, topic: str) -> list[TopicPartition]:
    # metadata for all topics: asking for one by name may auto-create it on some brokers
    for meta in await admin.describe_topics():
        if meta["topic"] == topic and meta["error_code"] == 0:
            return sorted(TopicPartition(topic, p["partition"]) for p in meta["partitions"])
    return []
