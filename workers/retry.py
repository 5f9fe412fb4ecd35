"""Retry policy as an object, and the pump that puts due retries back on the bus.

A failed attempt that may succeed later does not sleep on its partition: the job goes back
to ``queued`` in the store with a not-before time, its message is acknowledged, and the pump
re-publishes it when due. The jobs behind it on the partition never wait for its backoff.

The pump also re-publishes stranded jobs: rows still ``queued``, untouched for
``stranded_after_s``, while the bus holds no backlog for the group, so their message is no
longer there to be read. A broker that acknowledged a record and then lost it does that
(noida-db keeps its log in memory and writes it out about once a second, so a kill -9 loses
up to a second of acknowledged records, and it hands their offsets out again). Redelivery is
safe: the store's guarded claim runs a job once however many copies arrive.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from jobstore.records import JobRecord, envelope_of
from jobstore.store import JobStore
from schemas.envelope import JobEnvelope
from schemas.errors import ErrorCode
from transports.base import Publisher
from workers import pauses

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
    """Re-publishes due retries, and stranded jobs when ``backlog`` is given; safe to run in
    every worker at once (rows are taken atomically, and a duplicate message of a job is
    harmless by construction).

    ``backlog`` answers how many messages wait for the consumer group (the depth probe).
    ``stranded_after_s`` must exceed the API's publish budget: a row the API is still
    publishing, or is about to mark failed, is not stranded.
    """

    def __init__(
        self,
        store: JobStore,
        publisher: Publisher,
        topic: str,
        *,
        interval_s: float = 0.2,
        source: str = "urn:inferq:retry",
        backlog: Callable[[], Awaitable[int]] | None = None,
        stranded_after_s: float = 120.0,
        idle_interval_s: float = 1.0,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.topic = topic
        self.interval_s = interval_s
        self.source = source
        self.backlog = backlog
        self.stranded_after_s = stranded_after_s
        # how often to look for stranded rows: a fraction of the threshold, 1 to 30 s
        self.stranded_check_s = min(max(stranded_after_s / 4, 1.0), 30.0)
        self.idle_interval_s = idle_interval_s
        self.published = 0
        self.rescued = 0  # stranded jobs published again
        self._expected: float | None = None  # monotonic: the soonest retry this process made
        self._expecting = asyncio.Event()

    async def pump_once(self) -> int:
        due = await asyncio.to_thread(self.store.due_retries)
        return await self._publish(due)

    async def rescue_stranded(self) -> int:
        """Publish again the queued jobs whose message is gone; returns how many."""
        if self.backlog is None:
            return 0
        idle_s = self.stranded_after_s
        seen = await asyncio.to_thread(self.store.stranded, idle_s=idle_s, limit=1, take=False)
        if not seen or await self.backlog() > 0:  # a backlog: their messages may be in it
            return 0
        taken = await asyncio.to_thread(self.store.stranded, idle_s=idle_s)
        if taken:
            log.warning(
                "%d queued job(s) unclaimed for %.0fs with no backlog on the bus (their "
                "messages were lost): publishing them again, e.g. %s",
                len(taken),
                idle_s,
                taken[0].id,
            )
        sent = await self._publish(taken)
        self.rescued += sent
        return sent

    async def _publish(self, due: list[JobRecord]) -> int:
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

    def expect(self, at: datetime) -> None:
        """A retry of this process is due at ``at``: an idle pump looks again by then."""
        loop_at = time.monotonic() + max((at - datetime.now(UTC)).total_seconds(), 0.0)
        if self._expected is None or loop_at < self._expected:
            self._expected = loop_at
        self._expecting.set()

    async def run(self, stop: asyncio.Event) -> None:
        pause = self.interval_s
        idle = self.interval_s  # grows while nothing is due: an idle worker costs ~nothing
        loop = asyncio.get_running_loop()
        next_rescue = loop.time() + self.stranded_check_s
        while not stop.is_set():
            polled_at = time.monotonic()
            try:
                busy = await self.pump_once()
                if self.backlog is not None and loop.time() >= next_rescue:
                    next_rescue = loop.time() + self.stranded_check_s
                    busy += await self.rescue_stranded()
                pause = self.interval_s
            except Exception as exc:  # the store or the bus is down: back off, keep going
                busy = 0
                pause = min(pause * 2, 5.0)
                log.warning("retry pump: %s; next try in %.1fs", exc, pause)
            if busy:
                idle = self.interval_s
                continue
            wait = max(pause, idle)
            if self._expected is not None:  # a retry of ours falls due sooner: look then
                wait = min(wait, max(self._expected - time.monotonic(), 0.0) + self.interval_s)
                if self._expected <= polled_at:  # that poll took it
                    self._expected = None
            idle = min(2 * idle, max(self.idle_interval_s, self.interval_s))
            self._expecting.clear()
            await pauses.pause(wait, stop, self._expecting)
