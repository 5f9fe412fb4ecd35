"""The Kafka consumer on aiokafka: a group member with manual commits of the contiguous
acknowledged prefix, idle without spinning.

Only Apache Kafka semantics are relied on: a committed offset is the next offset to read,
and a group member commits only what it owns.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable, Iterable
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from transports.base import Delivery, TransportError
from transports.kafka.config import KafkaConfig
from transports.offsets import OffsetTracker

log = logging.getLogger(__name__)


def _outside_group(consumer: AIOKafkaConsumer) -> bool:
    """True while the member has no generation: the coordinator did not know it (a heartbeat
    or commit answered UnknownMemberId) and aiokafka reset it to generation -1 to rejoin.

    A commit sent now goes out as generation -1 with no member id, which a broker takes as a
    group-less commit whenever the group is empty: an unfenced write of offsets that belong to
    an assignment that no longer exists. After noida-db loses its unflushed tail to a kill -9
    (the acked records and the group with it) such a commit set the group's position past
    the restored log end; the new records that then took those offsets were never read.
    """
    coordinator = getattr(consumer, "_coordinator", None)  # aiokafka has no public accessor
    generation = getattr(coordinator, "generation", None)
    return isinstance(generation, int) and generation < 0


class _Rebalance(ConsumerRebalanceListener):
    """Commits finished work before partitions move, and drops tracking of lost ones."""

    def __init__(self, owner: KafkaConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._owner._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._owner._on_assigned(set(assigned))


class KafkaConsumer:
    """Consumer port on a group member with manual commits of the contiguous acked prefix.

    ``commit`` does not run on ``stop``: call it first, or the acknowledged-but-uncommitted
    messages are delivered again to the next member, which is at-least-once as designed.
    """

    def __init__(self, config: KafkaConfig, topic: str, group: str) -> None:
        self.config = config
        self.source = topic
        self.group = group
        self._consumer: AIOKafkaConsumer | None = None
        self._tracker = OffsetTracker()
        self._last_delivered: dict[TopicPartition, int] = {}
        self._assigned = asyncio.Event()
        # idle back-off, kept across fetch calls: partitions paused until _resume_at
        self._idle_since: float | None = None
        self._paused: frozenset[TopicPartition] = frozenset()
        self._resume_at: float | None = None

    async def start(self) -> None:
        """Join the group and wait (up to ``join_timeout_s``) for the first assignment."""
        if self._consumer is not None:
            return
        c = self.config
        consumer = AIOKafkaConsumer(
            bootstrap_servers=c.bootstrap,
            client_id=c.client_id,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=c.fetch_max_wait_ms,
            max_partition_fetch_bytes=c.max_partition_fetch_bytes,
            request_timeout_ms=c.request_timeout_ms,
            retry_backoff_ms=c.retry_backoff_ms,
            metadata_max_age_ms=c.metadata_max_age_ms,
            session_timeout_ms=c.session_timeout_ms,
            heartbeat_interval_ms=c.heartbeat_interval_ms,
            max_poll_interval_ms=c.max_poll_interval_ms,
            isolation_level=c.isolation_level,
            group_instance_id=c.group_instance_id,
        )
        consumer.subscribe([self.source], listener=_Rebalance(self))
        self._assigned.clear()
        try:
            await consumer.start()
        except KafkaError as exc:
            await consumer.stop()
            raise TransportError(f"cannot reach Kafka at {c.bootstrap}") from exc
        self._consumer = consumer
        try:
            # the group joins in aiokafka's background task; waiting here makes the first
            # fetch timeout mean "no messages" rather than "not a member yet"
            await asyncio.wait_for(self._assigned.wait(), c.join_timeout_s)
        except TimeoutError as exc:
            await self.stop()
            raise TransportError(
                f"group {self.group!r} gave no assignment within {c.join_timeout_s}s"
            ) from exc

    async def stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()
        self._tracker = OffsetTracker()
        self._last_delivered.clear()
        self._paused, self._resume_at = frozenset(), None

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

    def assignment(self) -> frozenset[TopicPartition]:
        return frozenset(self._consumer.assignment()) if self._consumer is not None else frozenset()

    def outstanding(self) -> int:
        """Delivered messages not yet acknowledged (or acked behind an unacked one)."""
        return self._tracker.outstanding()

    def _require(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise TransportError("KafkaConsumer is not started")
        return self._consumer

    async def fetch(self, max_records: int, timeout_s: float) -> list[Delivery]:
        consumer = self._require()
        try:
            batches = await self._poll(consumer, max_records, timeout_s)
        except KafkaError as exc:
            raise TransportError(f"fetch from {self.source!r} failed") from exc
        out: list[Delivery] = []
        for tp, records in batches.items():
            if records and records[0].offset <= self._last_delivered.get(tp, -1):
                # the position went back (offset reset): the old deliveries will come again
                self._forget(tp)
            for record in records:
                self._tracker.delivered(tp, record.offset)
                out.append(
                    Delivery(
                        value=record.value,
                        key=record.key,
                        # Kafka allows null header values; the port promises bytes
                        headers={k: v if v is not None else b"" for k, v in record.headers},
                        source=record.topic,
                        position=f"{record.partition}@{record.offset}",
                        token=(tp, record.offset),
                    )
                )
            if records:
                self._last_delivered[tp] = records[-1].offset
        return out

    async def _poll(
        self, consumer: AIOKafkaConsumer, max_records: int, timeout_s: float
    ) -> dict[TopicPartition, list[Any]]:
        """getmany, but idle without spinning.

        aiokafka prefetches in a background task that re-sends a fetch as soon as the last
        one is answered. A broker that honours fetch_max_wait_ms holds an empty fetch for
        that long; one that answers at once (noida-db does) turns an idle consumer into a
        busy loop that took ~0.7 of a core here, CPU the model then lacks. So when a short
        window brings nothing, the assigned partitions are paused for ``idle_pause_ms``, or a
        quarter of the time they have been idle, up to ``idle_pause_max_ms``: a fixed 5 ms
        pause still meant ~140 fetches a second and a third of a core for an idle worker,
        while a message after a gap of t waits at most ~t/4 more (and idle_pause_max_ms).
        The pause outlives this call, so a caller polling every 100 ms does not end it.
        Records are never lost by this: the position only moves when records are returned.
        """
        c = self.config
        if c.idle_pause_ms <= 0:
            return await consumer.getmany(
                timeout_ms=max(0, int(timeout_s * 1000)), max_records=max_records
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            resumed = False
            if self._resume_at is not None:
                # still backing off from an earlier empty window, perhaps of an earlier call
                wait = min(self._resume_at, deadline) - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if self._resume_at is not None and loop.time() < self._resume_at:
                    return {}
                self._resume(consumer)
                resumed = True
            window = min(c.idle_window_ms / 1000, max(deadline - loop.time(), 0))
            if resumed:
                # a resume must be followed by a real window, even past the caller's deadline:
                # a caller whose timeout equals the pause resumes right at its deadline, and a
                # 0 ms window paused the partitions again before aiokafka sent any fetch, so
                # the consumer never fetched again (tests/test_kafka_idle.py)
                window = max(window, c.idle_window_ms / 1000, 0.001)
            batches = await consumer.getmany(timeout_ms=int(window * 1000), max_records=max_records)
            now = loop.time()
            if any(batches.values()):
                self._idle_since = None
                return batches
            if self._idle_since is None:
                self._idle_since = now
            # busy traffic with short gaps keeps the short pause; a long idle spell grows it
            pause = min(
                max((now - self._idle_since) / 4, c.idle_pause_ms / 1000),
                max(c.idle_pause_max_ms, c.idle_pause_ms) / 1000,
            )
            self._paused = frozenset(consumer.assignment())
            consumer.pause(*self._paused)
            self._resume_at = now + pause
            if deadline - loop.time() <= 0:
                return batches

    def _resume(self, consumer: AIOKafkaConsumer) -> None:
        still = consumer.assignment()  # a rebalance may have moved some meanwhile
        consumer.resume(*(tp for tp in self._paused if tp in still))
        self._paused, self._resume_at = frozenset(), None

    def ack(self, delivery: Delivery) -> None:
        tp, offset = delivery.token
        self._tracker.done(tp, offset)

    async def nack(self, delivery: Delivery, delay_s: float = 0.0) -> None:
        """Kafka cannot hand one message back: its retries wait in the job store and are
        published again (``Capabilities.redelivers_itself`` is False)."""
        raise TransportError("a Kafka consumer cannot redeliver one message; retry via the store")

    async def commit(self) -> None:
        """Commit, per partition still owned, the offset after the contiguous acked prefix."""
        consumer = self._require()
        offsets = self._committable(consumer.assignment())
        if not offsets:
            return
        if _outside_group(consumer):
            # rejoining after the coordinator forgot this member: the partitions may come
            # back re-read from the last commit, so these acks must not count
            log.warning("commit for group %r skipped: the member is rejoining", self.group)
            for tp in offsets:
                self._forget(tp)
            return
        try:
            await asyncio.wait_for(consumer.commit(dict(offsets)), self.config.commit_timeout_s)
        except (CommitFailedError, IllegalStateError) as exc:
            # the group moved on; whoever owns these partitions now re-reads from the last
            # commit, so our later acks for them must not count
            log.warning("commit for group %r lost to a rebalance: %s", self.group, exc)
            for tp in offsets:
                self._forget(tp)
            return
        except (KafkaError, TimeoutError) as exc:
            raise TransportError(f"commit for group {self.group!r} failed") from exc
        done: dict[Hashable, int] = dict(offsets)
        self._tracker.mark_committed(done)

    def _committable(self, owned: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        owned = set(owned)
        offsets: dict[TopicPartition, int] = {}
        for tp, offset in self._tracker.committable().items():
            assert isinstance(tp, TopicPartition)
            if tp in owned:
                offsets[tp] = offset
            else:
                self._forget(tp)
        return offsets

    def _forget(self, tp: TopicPartition) -> None:
        self._tracker.forget(tp)
        self._last_delivered.pop(tp, None)

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        # Apache Kafka accepts this commit from the current generation while the group
        # rebalances; noida-db 0.2.3 refuses it (IllegalGeneration) and its group may then
        # never settle with two or more members, so multi-member groups are Kafka-only
        consumer = self._consumer
        if consumer is not None and _outside_group(consumer):
            # the coordinator no longer knows this member (a broker restart that lost the
            # group, a session expiry): committing now would be a group-less commit outside
            # any generation (see _outside_group); the partitions are re-read instead
            log.warning(
                "group %r forgot this member; %d partition(s) will be re-read from their "
                "last commit",
                self.group,
                len(revoked),
            )
        elif consumer is not None:
            offsets = self._committable(revoked)
            if offsets:
                try:
                    await asyncio.wait_for(
                        consumer.commit(dict(offsets)), self.config.commit_timeout_s
                    )
                except (KafkaError, TimeoutError) as exc:
                    log.warning(
                        "commit on revoke for group %r failed; %d partition(s) will be "
                        "re-read from their last commit: %s",
                        self.group,
                        len(offsets),
                        exc,
                    )
        for tp in revoked:
            self._forget(tp)

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        log.debug("group %r assigned %s", self.group, sorted(assigned))
        # new partitions come unpaused: fetch them now, and back off afresh if they are empty
        self._paused, self._resume_at, self._idle_since = frozenset(), None, None
        self._assigned.set()
