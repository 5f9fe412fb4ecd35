"""The Kafka publisher on aiokafka: an acks=all producer that replaces itself when it can
no longer publish.

Publishing is at least once: a publish that timed out may still land, and a retry then
duplicates it; consumers dedupe by the CloudEvent id. Idempotence (KafkaConfig.idempotent,
off by default) would only remove duplicates that are harmless anyway, and on a broker that
reuses producer ids after a crash (noida-db, the embedded default) it drops acknowledged
records as "duplicates" (tests/test_kafka_broker_crash.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from types import TracebackType
from typing import Any, NamedTuple, Self

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    InvalidProducerIdMapping,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    UnknownProducerId,
)
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from transports.base import Headers, MessageTooLarge, PublishError, TransportError
from transports.kafka.config import KafkaConfig

log = logging.getLogger(__name__)


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


def _sender_dead(producer: AIOKafkaProducer) -> bool:
    # aiokafka's background sender ends on a fatal error and fails every later batch
    task = producer._sender.sender_task
    return task is not None and task.done()


class KafkaPublisher:
    """Publisher port on an acks=all producer (idempotent only if configured so).

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
            enable_idempotence=c.idempotent,
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
