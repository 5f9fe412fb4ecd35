"""Dead-letter routing: a message that cannot be processed goes to the dead-letter topic with
its reason in headers, so an operator can see why without replaying it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from transports.base import Delivery, Publisher, TransportError

log = logging.getLogger(__name__)

HEADER_PREFIX = "inferq-dlq-"


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
        }
        # keep the original headers (minus any stale reason) so a redrive can replay them
        kept = [(k, v) for k, v in self.delivery.headers.items() if not k.startswith(HEADER_PREFIX)]
        ours = [(HEADER_PREFIX + k, v.encode()) for k, v in reason.items() if v is not None]
        return kept + ours


def reason_from_headers(headers: dict[str, bytes]) -> dict[str, str]:
    """The reason fields of a dead letter, as a plain dict (for tools and tests)."""
    return {
        k[len(HEADER_PREFIX) :]: v.decode("utf-8", "replace")
        for k, v in headers.items()
        if k.startswith(HEADER_PREFIX)
    }


class DeadLetterRouter:
    """Publishes dead letters; keeps trying while the bus is down, because the original
    message must not be acknowledged before its dead letter is durable."""

    def __init__(
        self,
        publisher: Publisher,
        destination: str,
        *,
        max_backoff_s: float = 5.0,
        record: Callable[[DeadLetter], object] | None = None,
    ) -> None:
        self.publisher = publisher
        self.destination = destination
        self.max_backoff_s = max_backoff_s
        self.record = record  # e.g. DeadLetterStore.add: makes the letter listable

    async def send(self, letter: DeadLetter) -> None:
        delay = 0.05
        while True:
            try:
                await self.publisher.publish(
                    self.destination,
                    letter.delivery.value or b"",
                    key=letter.delivery.key,
                    headers=letter.headers(),
                )
                break
            except TransportError as exc:
                log.warning("dead-letter publish failed, retrying in %.2fs: %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
        if self.record is None:
            return
        delay = 0.05
        while True:
            try:
                await asyncio.to_thread(self.record, letter)
                return
            except Exception as exc:  # the store is down: the message must not be acked yet
                log.warning("recording dead letter failed, retrying in %.2fs: %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
