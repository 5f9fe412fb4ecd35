"""Dead-letter routing: a message that cannot be processed goes to the dead-letter topic with
its reason in headers, so an operator can see why without replaying it.

Two rules keep one bad message from holding the others:

- a dead letter always fits its destination: a payload that would not is cut to its head
  (the whole of it goes to S3 first when a claim-check bucket is configured), and the
  original size and SHA-256 travel in the reason headers;
- routing is bounded: a publish that keeps failing (destination unreachable past
  ``publish_deadline_s``, or refused as too large even when cut down), or a stop request,
  ends with the letter kept in the dead-letter table alone (``published`` false), loudly
  logged; only then, or once the destination acknowledged it, may the original be acked.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from transports.base import (
    Delivery,
    MessageTooLarge,
    Publisher,
    SizeLimited,
    TransportError,
)

log = logging.getLogger(__name__)

HEADER_PREFIX = "inferq-dlq-"
DEFAULT_HEAD_BYTES = 64 * 1024
# what a publish already under way may still take after a stop request
STOP_GRACE_S = 2.0
_T = TypeVar("_T")


@dataclass(frozen=True)
class DeadLetter:
    delivery: Delivery
    code: str
    message: str
    job_id: str | None = None
    model: str | None = None
    version: str | None = None
    exception: str | None = None
    attempts: int = 0
    # set by the router: what is sent instead of the original value when that would not
    # fit (None: the original), the original's size and hash, where the whole of it is
    payload: bytes | None = None
    payload_size: int | None = None
    payload_sha256: str | None = None
    payload_url: str | None = None
    keep_headers: bool = True  # False: the original headers alone were too large to send
    published: bool = True  # False: kept in the dead-letter table only

    @property
    def value(self) -> bytes:
        return self.payload if self.payload is not None else (self.delivery.value or b"")

    @property
    def trimmed(self) -> bool:
        return self.payload_size is not None and len(self.value) < self.payload_size

    def headers(self) -> list[tuple[str, bytes]]:
        reason = {
            "code": self.code,
            "message": self.message[:1024],
            "exception": self.exception,
            "origin": self.delivery.source,
            "position": self.delivery.position,
            "job-id": self.job_id,
            "model": self.model,
            "version": self.version,
            "attempts": str(self.attempts),
            "failed-at": datetime.now(UTC).isoformat(),
            "payload-size": None if self.payload_size is None else str(self.payload_size),
            "payload-sha256": self.payload_sha256,
            "payload-truncated": "true" if self.trimmed else None,
            "payload-url": self.payload_url,
            "headers-dropped": None if self.keep_headers else "true",
        }
        # keep the original headers (minus any stale reason) so a redrive can replay them
        kept = [(k, v) for k, v in self.delivery.headers.items() if not k.startswith(HEADER_PREFIX)]
        ours = [(HEADER_PREFIX + k, v.encode()) for k, v in reason.items() if v is not None]
        return (kept if self.keep_headers else []) + ours


def reason_from_headers(headers: dict[str, bytes]) -> dict[str, str]:
    """The reason fields of a dead letter, as a plain dict (for tools and tests)."""
    return {
        k[len(HEADER_PREFIX) :]: v.decode("utf-8", "replace")
        for k, v in headers.items()
        if k.startswith(HEADER_PREFIX)
    }


class PayloadOffload(Protocol):
    """Where the whole payload of a cut-down dead letter goes (the S3 claim-check)."""

    async def offload_dead_letter(self, name: str, data: bytes) -> str | None: ...


@dataclass(frozen=True)
class Routed:
    """How a dead letter ended: ``acked`` says the original may now be acknowledged."""

    acked: bool
    published: bool
    trimmed: bool = False
    offloaded: bool = False
    unpublished_reason: str | None = None  # too_large | unreachable | stopping


class _Stopped(Exception):
    pass


class DeadLetterRouter:
    """Publishes dead letters and records them (``record``, e.g. DeadLetterStore.add)."""

    def __init__(
        self,
        publisher: Publisher,
        destination: str,
        *,
        max_backoff_s: float = 5.0,
        record: Callable[[DeadLetter], object] | None = None,
        offload: PayloadOffload | None = None,
        head_bytes: int = DEFAULT_HEAD_BYTES,
        publish_deadline_s: float = 60.0,
        max_message_bytes: int | None = None,
    ) -> None:
        self.publisher = publisher
        self.destination = destination
        self.max_backoff_s = max_backoff_s
        self.record = record  # e.g. DeadLetterStore.add: makes the letter listable
        self.offload = offload
        self.head_bytes = head_bytes
        self.publish_deadline_s = publish_deadline_s
        self._limit = max_message_bytes
        if self._limit is None and isinstance(publisher, SizeLimited):
            self._limit = publisher.max_message_bytes

    def _size(self, letter: DeadLetter) -> int:
        key, value, headers = letter.delivery.key, letter.value, letter.headers()
        if isinstance(self.publisher, SizeLimited):
            return self.publisher.message_size(value, key=key, headers=headers)
        return len(value) + len(key or b"") + sum(len(k) + len(v) for k, v in headers)

    async def fit(self, letter: DeadLetter) -> DeadLetter:
        """The letter, cut down to fit the destination when it would not."""
        original = letter.delivery.value or b""
        letter = replace(
            letter,
            payload_size=len(original),
            payload_sha256=hashlib.sha256(original).hexdigest(),
        )
        limit = self._limit
        if limit is None or self._size(letter) <= limit:
            return letter
        url = None
        if self.offload is not None:
            try:
                url = await self.offload.offload_dead_letter(letter.payload_sha256 or "", original)
            except TransportError as exc:  # S3 down: the head and the hash still go out
                log.warning("cannot keep the whole dead letter in S3: %s", exc)
        return self._shrink(replace(letter, payload=original[: self.head_bytes], payload_url=url))

    def _shrink(self, letter: DeadLetter) -> DeadLetter:
        assert self._limit is not None
        head = letter.value
        while len(head) > 0 and self._size(replace(letter, payload=head)) > self._limit:
            head = head[: len(head) // 2]
        letter = replace(letter, payload=head)
        if self._size(letter) > self._limit:  # the original headers alone are too large
            letter = replace(letter, keep_headers=False)
        return letter

    async def send(self, letter: DeadLetter, stop: asyncio.Event | None = None) -> Routed:
        letter = await self.fit(letter)
        trimmed, offloaded = letter.trimmed, letter.payload_url is not None
        if trimmed:
            log.warning(
                "dead letter of %s cut to %d of %d bytes (sha256 %s, whole copy %s)",
                letter.delivery.position,
                len(letter.value),
                letter.payload_size,
                letter.payload_sha256,
                letter.payload_url or "not kept",
            )
        letter, reason = await self._publish(letter, stop)
        trimmed = letter.trimmed  # _publish may have cut it down further
        if reason is not None:
            if self.record is None:  # nowhere else to keep it: the original stays unacked
                log.error("dead letter of %s not published (%s)", letter.delivery.position, reason)
                return Routed(False, False, trimmed, offloaded, reason)
            letter = replace(letter, published=False)
            log.error(
                "dead letter of %s NOT on %r (%s): kept in the dead-letter table only",
                letter.delivery.position,
                self.destination,
                reason,
            )
        if self.record is not None and not await self._record(letter, stop):
            return Routed(False, reason is None, trimmed, offloaded, reason)
        return Routed(True, reason is None, trimmed, offloaded, reason)

    async def _publish(
        self, letter: DeadLetter, stop: asyncio.Event | None
    ) -> tuple[DeadLetter, str | None]:
        """(the letter as last tried, None once published, else why it was not)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.publish_deadline_s
        delay = 0.05
        cut_down = False
        while True:
            try:
                await _unless_stopped(
                    self.publisher.publish(
                        self.destination,
                        letter.value,
                        key=letter.delivery.key,
                        headers=letter.headers(),
                    ),
                    stop,
                )
                return letter, None
            except _Stopped:
                return letter, "stopping"
            except MessageTooLarge as exc:
                # the destination takes less than we were told: try once with almost nothing
                if cut_down:
                    log.error("dead letter refused as too large even cut down: %s", exc)
                    return letter, "too_large"
                log.warning("dead letter refused as too large, cutting it down: %s", exc)
                cut_down = True
                letter = replace(letter, payload=letter.value[:1024], keep_headers=False)
            except TransportError as exc:
                if loop.time() + delay > deadline:
                    log.error(
                        "dead-letter publish failed for %.0fs, giving up: %s",
                        self.publish_deadline_s,
                        exc,
                    )
                    return letter, "unreachable"
                log.warning("dead-letter publish failed, retrying in %.2fs: %s", delay, exc)
                if await _stopped_within(stop, delay):
                    return letter, "stopping"
                delay = min(delay * 2, self.max_backoff_s)

    async def _record(self, letter: DeadLetter, stop: asyncio.Event | None) -> bool:
        """Keep trying while the store is down; False when told to stop first."""
        assert self.record is not None
        record = self.record
        delay = 0.05
        while True:
            try:
                await asyncio.to_thread(record, letter)
                return True
            except Exception as exc:  # the store is down: the message must not be acked yet
                log.warning("recording dead letter failed, retrying in %.2fs: %s", delay, exc)
                if await _stopped_within(stop, delay):
                    return False
                delay = min(delay * 2, self.max_backoff_s)


async def _stopped_within(stop: asyncio.Event | None, seconds: float) -> bool:
    if stop is None:
        await asyncio.sleep(seconds)
        return False
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


async def _unless_stopped(work: Awaitable[_T], stop: asyncio.Event | None) -> _T:
    """``work``, given at most STOP_GRACE_S more once ``stop`` is set; _Stopped after that."""
    if stop is None:
        return await work
    task = asyncio.ensure_future(work)
    if stop.is_set():
        await asyncio.wait({task}, timeout=STOP_GRACE_S)
    else:
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not task.done():
            await asyncio.wait({task}, timeout=STOP_GRACE_S)
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise _Stopped
    return task.result()
