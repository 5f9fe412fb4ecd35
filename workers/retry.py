"""Retry policy as an object, and the pump that puts due retries back on the bus.

A failed attempt that may succeed later does not sleep on its partition: the job goes back
to ``queued`` in the store with a not-before time, its message is acknowledged, and the pump
re-publishes it when due. The jobs behind it on the partition never wait for its backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from jobstore.records import JobRecord, envelope_of
from jobstore.store import JobStore
from schemas.envelope import JobEnvelope
from schemas.errors import ErrorCode
from transports.base import Publisher

log = logging.getLogger(__name__)

# CloudEvents extension that marks the pump's own re-publish of a due retry: the worker may
# claim it even while the row's not-before still holds the pump's hold time
RETRY_EXTENSION = "inferqretry"

# Errors that fail the same way every time: retrying only delays the dead letter.
NEVER_RETRY = frozenset(
    {
        ErrorCode.INVALID_INPUT.value,
        ErrorCode.UNKNOWN_MODEL.value,
        ErrorCode.UNKNOWN_VERSION.value,
        ErrorCode.MALFORMED_MESSAGE.value,
        ErrorCode.INVALID_ENVELOPE.value,
        ErrorCode.UNSUPPORTED_EVENT_TYPE.value,
    }
)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter and a cap (dramatiq's retries middleware shape)."""

    max_attempts: int = 5
    base_delay_s: float = 1.0
    max_delay_s: float = 300.0
    jitter: float = 0.5  # fraction of the delay that is randomised
    never_retry: frozenset[str] = NEVER_RETRY
    rng: Callable[[], float] = field(default=random.random, compare=False, repr=False)

    def should_retry(self, code: str, retryable: bool, attempt: int) -> bool:
        return retryable and code not in self.never_retry and attempt < self.max_attempts

    def delay_s(self, attempt: int) -> float:
        """Backoff after the ``attempt``-th failure (1-based)."""
        raw = min(self.base_delay_s * 2 ** (attempt - 1), self.max_delay_s)
        return raw * (1 - self.jitter) + raw * self.jitter * self.rng()

    def retry_at(self, attempt: int, now: datetime | None = None) -> datetime:
        return (now or datetime.now(UTC)) + timedelta(seconds=self.delay_s(attempt))


def envelope_for(record: JobRecord, source: str) -> JobEnvelope:
    """The bus event of a job, rebuilt from its row (for retries and redrives)."""
    return envelope_of(record, source)


class RetryPump:
    """Re-publishes due retries; safe to run in every worker at once (rows are taken
    atomically, and a duplicate message of a job is harmless by construction)."""

    def __init__(
        self,
        store: JobStore,
        publisher: Publisher,
        topic: str,
        *,
        interval_s: float = 0.2,
        source: str = "urn:inferq:retry",
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.topic = topic
        self.interval_s = interval_s
        self.source = source
        self.published = 0

    async def pump_once(self) -> int:
        due = await asyncio.to_thread(self.store.due_retries)
        if not due:
            return 0
        sent = []
        for record in due:
            envelope = envelope_for(record, self.source)
            envelope = JobEnvelope.model_validate(
                {**envelope.model_dump(), RETRY_EXTENSION: str(record.attempts)}
            )
            headers, value = envelope.to_binary()
            try:
                await self.publisher.publish(
                    self.topic, value, key=record.id.encode(), headers=headers
                )
                sent.append(record.id)
            except Exception as exc:  # stays due; the hold time brings it back
                log.warning("re-publishing retry of %s failed: %s", record.id, exc)
        if sent:
            await asyncio.to_thread(self.store.retries_published, sent)
        self.published += len(sent)
        return len(sent)

    async def run(self, stop: asyncio.Event) -> None:
        pause = self.interval_s
        while not stop.is_set():
            try:
                busy = await self.pump_once()
                pause = self.interval_s
            except Exception as exc:  # the store or the bus is down: back off, keep going
                busy = 0
                pause = min(pause * 2, 5.0)
                log.warning("retry pump: %s; next try in %.1fs", exc, pause)
            if not busy:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)
