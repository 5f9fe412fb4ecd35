"""The Kafka adapter on aiokafka: publisher, consumer (manual commits), lag probe, topic admin.

Only Apache Kafka semantics are relied on: a committed offset is the next offset to read,
acks="all" plus idempotence for publishes, and a group member commits only what it owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, NamedTuple, Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    InvalidProducerEpoch,
    InvalidProducerIdMapping,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    TopicAlreadyExistsError,
    UnknownProducerId,
    for_code,
)
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from transports.base import (
    Delivery,
    Headers,
    MessageTooLarge,
    PublishError,
    QueueDepth,
    TransportError,
)
from transports.offsets import OffsetTracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KafkaConfig:
    """Client settings shared by the publisher, consumers and probes of one cluster."""

    bootstrap: str
    client_id: str = "inferq"
    # producer: a 1 ms linger batches concurrent publishes; it adds ~1 ms to a lone one
    linger_ms: int = 1
    max_batch_size: int = 64 * 1024
    # the largest record the producer sends (Kafka's own default; brokers take 1,048,588)
    max_request_size: int = 1024 * 1024
    compression_type: Literal["gzip", "snappy", "lz4", "zstd"] | None = None
    request_timeout_ms: int = 15_000
    # the most a publish waits for its ack: an idempotent aiokafka producer never expires a
    # batch by itself and would wait for a down broker forever
    delivery_timeout_ms: int = 30_000
    # how long KafkaPublisher.stop waits for buffered messages before dropping them
    close_timeout_ms: int = 5_000
    retry_backoff_ms: int = 100
    metadata_max_age_ms: int = 60_000
    # consumer: short broker-side waits so that a lone message is not held back
    fetch_max_wait_ms: int = 10
    max_partition_fetch_bytes: int = 1024 * 1024
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    max_poll_interval_ms: int = 300_000
    isolation_level: Literal["read_uncommitted", "read_committed"] = "read_uncommitted"
    # idle without a busy loop against brokers that answer empty fetches at once: after
    # an empty window of idle_window_ms, pause the partitions for idle_pause_ms (0: off),
    # or a quarter of the time they have been idle, up to idle_pause_max_ms: the most a
    # message that ends a long idle spell waits, for an idle cost of ~1/idle_pause_max_ms
    # fetches a second
    idle_window_ms: int = 2
    idle_pause_ms: int = 5
    idle_pause_max_ms: int = 100
    # static group membership (KIP-345): a restarted worker with the same id takes its
    # partitions back at once instead of waiting for the dead member's session to expire
    group_instance_id: str | None = None
    # how long KafkaConsumer.start waits for its first partition assignment
    join_timeout_s: float = 30.0
    # how long a commit may wait (aiokafka retries a missing coordinator forever)
    commit_timeout_s: float = 15.0


class Outgoing(NamedTuple):
    """One message for ``KafkaPublisher.publish_many``; a plain (value, key, headers) fits."""

    value: bytes
    key: bytes | None = None
    headers: Headers = ()


def _headers_out(headers: Headers) -> list[tuple[str, bytes]]:
    return [(name, value) for name, value in headers]


# Errors after which an idempotent producer can never publish again: the broker no longer
# matches its producer id or sequence numbers. A broker that lost its producer state (a
# kill -9, then a restart on its data) answers OutOfOrderSequenceNumber to every later batch
# of the old producer; only a new producer, with a new id from InitProducerId, gets through.
_FATAL_PRODUCER_ERRORS: tuple[type[KafkaError], ...] = (
    OutOfOrderSequenceNumber,
    UnknownProducerId,
    InvalidProducerEpoch,
    InvalidProducerIdMapping,
    ProducerFenced,
)
# how often a fatal error may be answered by replacing the producer within one publish
_REPLACEMENTS_PER_PUBLISH = 2


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


def _sender_dead(producer: AIOKafkaProducer) -> bool:
    # aiokafka's background sender ends on a fatal error and fails every later batch
    task = producer._sender.sender_task
    return task is not None and task.done()


class KafkaPublisher:
    """Publisher port on an idempotent, acks=all producer.

    The producer is replaced by a fresh one when it can no longer publish (a fatal error, or
    its sender task died), and re-created on the next publish when that failed because the
    broker was down: a publisher recovers from a broker crash by itself.
    """

    def __init__(self, config: KafkaConfig) -> None:
        self.config = config
        self._producer: AIOKafkaProducer | None = None
        self._started = False
        self._lock = asyncio.Lock()
        self._next_attempt = 0.0  # monotonic time before which no new producer is tried
        self._last_error: TransportError | None = None
        self.replacements = 0  # new producers put in place of ones that could not publish

    async def start(self) -> None:
        if self._started:
            return
        self._producer = await self._new_producer()
        self._started = True

    async def _new_producer(self) -> AIOKafkaProducer:
        c = self.config
        producer = AIOKafkaProducer(
            bootstrap_servers=c.bootstrap,
            client_id=c.client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=c.linger_ms,
            max_batch_size=c.max_batch_size,
            max_request_size=c.max_request_size,
            compression_type=c.compression_type,
            request_timeout_ms=c.request_timeout_ms,
            retry_backoff_ms=c.retry_backoff_ms,
            metadata_max_age_ms=c.metadata_max_age_ms,
        )
        try:
            await producer.start()
        except KafkaError as exc:
            await producer.stop()
            raise TransportError(f"cannot reach Kafka at {c.bootstrap}: {exc!r}") from exc
        except BaseException:  # cancelled while connecting: leave no client behind
            await asyncio.shield(producer.stop())
            raise
        return producer

    async def stop(self) -> None:
        """Flush what is still buffered (up to ``close_timeout_ms``), then close."""
        self._started = False
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            await asyncio.wait_for(producer.flush(), self.config.close_timeout_ms / 1000)
        except TimeoutError:
            log.warning(
                "Kafka did not acknowledge buffered messages within %d ms; dropping them",
                self.config.close_timeout_ms,
            )
            await _abandon_buffered(producer)
        await producer.stop()

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

    async def _current(self) -> AIOKafkaProducer:
        """The producer to send with: the sound current one, or a fresh replacement."""
        if not self._started:
            raise TransportError("KafkaPublisher is not started")
        producer = self._producer
        if producer is not None and not _sender_dead(producer):
            return producer
        return await self._replace(producer)

    async def _replace(self, failed: AIOKafkaProducer | None) -> AIOKafkaProducer:
        """Swap ``failed`` for a new producer, once, however many callers saw it fail."""
        async with self._lock:
            if not self._started:
                raise TransportError("KafkaPublisher is not started")
            current = self._producer
            if current is not None and current is not failed and not _sender_dead(current):
                return current  # another caller replaced it meanwhile
            if current is not None:
                self._producer = None
                # its buffered batches carry the stale producer id and can never succeed:
                # fail them now (their publishers retry on the new producer); shielded so
                # that a caller's timeout cannot leave it half closed
                await asyncio.shield(_discard(current))
            loop = asyncio.get_running_loop()
            last = self._last_error
            if last is not None and loop.time() < self._next_attempt:
                # the broker was unreachable a moment ago: fail fast, try again soon
                raise TransportError(str(last)) from last
            try:
                producer = await self._new_producer()
            except TransportError as exc:
                self._last_error = exc
                self._next_attempt = loop.time() + self.config.retry_backoff_ms / 1000
                raise
            if not self._started:  # stopped meanwhile: nobody would ever close it
                await producer.stop()
                raise TransportError("KafkaPublisher is not started")
            self._producer, self._last_error = producer, None
            self.replacements += 1
            log.warning("Kafka producer replaced by a new one (producer id renewed)")
            return producer

    def _unusable(self, producer: AIOKafkaProducer, exc: KafkaError) -> bool:
        return (
            isinstance(exc, _FATAL_PRODUCER_ERRORS)
            or producer is not self._producer  # replaced while this send was buffered
            or _sender_dead(producer)
        )

    async def check(self) -> None:
        """Raise TransportError unless a publish could be acknowledged now: the producer is
        sound (replaced first if it was not) and the broker answers a metadata request."""
        producer = await self._current()
        try:
            await asyncio.wait_for(
                producer.client.fetch_all_metadata(), self.config.request_timeout_ms / 1000
            )
        except (KafkaError, TimeoutError) as exc:
            raise TransportError(f"Kafka at {self.config.bootstrap} does not answer") from exc

    @property
    def max_message_bytes(self) -> int:
        return self.config.max_request_size

    def message_size(self, value: bytes, *, key: bytes | None = None, headers: Headers = ()) -> int:
        """The producer's own upper estimate, the figure it checks against max_request_size."""
        size: int = DefaultRecordBatchBuilder.estimate_size_in_bytes(
            key, value, _headers_out(headers)
        )
        return size

    async def publish(
        self, destination: str, value: bytes, *, key: bytes | None = None, headers: Headers = ()
    ) -> None:
        """Wait for the broker's ack; PublishError after ``delivery_timeout_ms`` at most.

        A publish that timed out may still be delivered later (the producer keeps retrying
        it), so a retry can duplicate it: consumers dedupe by event id. A producer that can
        no longer publish is replaced and the message sent again on the new one.
        """
        replacements = 0
        try:
            async with asyncio.timeout(self.config.delivery_timeout_ms / 1000):
                while True:
                    producer = await self._current()
                    sent = False
                    try:
                        ack = await producer.send(
                            destination, value, key=key, headers=_headers_out(headers)
                        )
                        sent = True
                        await ack
                        return
                    except MessageSizeTooLargeError as exc:
                        # the producer's own check, or the broker's refusal: after the
                        # broker's, this idempotent producer is out of sequence (measured on
                        # noida-db: OutOfOrderSequenceNumber on every later send), so replace it
                        if sent:
                            log.warning("Kafka refused a batch as too large; new producer")
                            await self._replace(producer)
                        raise MessageTooLarge(f"publish to {destination!r} refused: {exc}") from exc
                    except KafkaError as exc:
                        if replacements >= _REPLACEMENTS_PER_PUBLISH or not self._unusable(
                            producer, exc
                        ):
                            raise
                        log.warning("Kafka producer cannot publish any more (%r)", exc)
                        replacements += 1
                        await self._replace(producer)
        except TimeoutError as exc:
            raise PublishError(
                f"publish to {destination!r} not acknowledged within "
                f"{self.config.delivery_timeout_ms} ms"
            ) from exc
        except KafkaError as exc:
            raise PublishError(f"publish to {destination!r} not acknowledged: {exc!r}") from exc
        except MessageTooLarge:
            raise
        except TransportError as exc:
            if not self._started:
                raise
            raise PublishError(f"publish to {destination!r} failed: {exc}") from exc

    async def publish_many(self, destination: str, items: Iterable[Outgoing]) -> int:
        """Send all items at once, then wait for every ack; returns how many were sent.

        Raises PublishError if any was not acknowledged within ``delivery_timeout_ms``; the
        acknowledged ones stay published, so retrying the whole list may duplicate some.
        """
        try:
            producer = await self._current()
        except TransportError as exc:
            if not self._started:
                raise
            raise PublishError(f"publish_many to {destination!r} failed: {exc}") from exc
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.delivery_timeout_ms / 1000
        acks: list[asyncio.Future[Any]] = []
        stopped: BaseException | None = None
        try:
            async with asyncio.timeout_at(deadline):
                for value, key, headers in items:
                    acks.append(
                        await producer.send(
                            destination, value, key=key, headers=_headers_out(headers)
                        )
                    )
        except (KafkaError, TimeoutError) as exc:
            stopped = exc  # what was enqueued before it still gets its chance below
        pending: set[asyncio.Future[Any]] = set()
        if acks:
            _, pending = await asyncio.wait(acks, timeout=max(0.0, deadline - loop.time()))
        for ack in pending:
            ack.cancel()  # stop waiting; aiokafka ignores futures that are already done
        failed = [a for a in acks if a.cancelled() or a.exception() is not None]
        if stopped is None and not failed:
            return len(acks)
        cause = stopped
        if cause is None:
            first = failed[0]
            cause = TimeoutError() if first.cancelled() else first.exception()
        if isinstance(cause, KafkaError) and self._unusable(producer, cause):
            with contextlib.suppress(TransportError):  # the next call gets a sound producer
                await self._replace(producer)
        note = "; sending stopped early" if stopped is not None else ""
        raise PublishError(
            f"publish_many to {destination!r}: {len(failed)} of {len(acks)} sent were not "
            f"acknowledged{note}"
        ) from cause


async def _discard(producer: AIOKafkaProducer) -> None:
    await _abandon_buffered(producer)
    await producer.stop()


async def _abandon_buffered(producer: AIOKafkaProducer) -> None:
    # An idempotent aiokafka producer retries a batch until the broker takes it, and its
    # stop() waits for every buffered batch, so with the broker gone it would never return.
    # There is no public way out: stop the sender first (so that nothing re-enqueues behind
    # our back), then fail what is left; stop() then finishes at once.
    await producer._sender.close()
    accumulator = producer._message_accumulator
    batches = [b for queue in accumulator._batches.values() for b in queue]
    batches += list(accumulator._pending_batches)
    accumulator.fail_all(KafkaTimeoutError("producer stopped before the broker acknowledged"))
    for batch in batches:  # mark the failures seen: publish() reported them to its callers
        for future in (batch.future, batch._drain_waiter):
            if future.done() and not future.cancelled():
                future.exception()


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


async def ensure_topics(config: KafkaConfig, topics: Mapping[str, int]) -> None:
    """Create the topics that are missing with the given partition counts (replication 1).

    An existing topic is left as it is; fewer partitions than asked for is logged.
    """
    if not topics:
        return
    admin = AIOKafkaAdminClient(
        bootstrap_servers=config.bootstrap,
        client_id=f"{config.client_id}-admin",
        request_timeout_ms=config.request_timeout_ms,
    )
    try:
        await admin.start()
        response = await admin.create_topics(
            [NewTopic(name, partitions, 1) for name, partitions in topics.items()]
        )
        existing: list[str] = []
        for name, code, *rest in response.topic_errors:
            error = for_code(code)
            if error is TopicAlreadyExistsError:
                existing.append(name)
            elif code != 0:
                message = rest[0] if rest else None
                raise TransportError(f"cannot create topic {name!r}: {message or error.__name__}")
        if existing:
            for meta in await admin.describe_topics(existing):
                have, want = len(meta["partitions"]), topics[meta["topic"]]
                if have < want:
                    log.warning(
                        "topic %r has %d partitions, fewer than the %d configured",
                        meta["topic"],
                        have,
                        want,
                    )
    except KafkaError as exc:
        raise TransportError(f"cannot create topics {sorted(topics)}") from exc
    finally:
        await admin.close()
