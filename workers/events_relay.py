"""The relay of job events onto the bus: an outbox reader of ``job_events``.

Each state change is stored first (jobstore/events.py, in the transaction that made it);
the relay reads the rows not yet published, in the order they were written, publishes
them as CloudEvents (schemas/events.py) in one batch, keyed by job id, and only then marks
them published. A crash in between publishes them again with the same event ids, so
consumers see each event at least once and drop copies by id.

One relay publishes at a time (a lease in the store, renewed while it works): with several
worker processes each running one, a job's events still leave in order. It runs in the
worker process, beside the retry pump; ``INFERQ_EVENTS_PUBLISH=false`` turns it off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from jobstore.events import EventLog, JobEvent
from schemas.events import BUS_TYPES, JobEventMessage
from schemas.jobs import JobResource
from transports.base import Headers, Publisher
from workers.pauses import pause

log = logging.getLogger(__name__)

LEASE = "events"


@runtime_checkable
class BatchPublisher(Protocol):
    """A publisher that sends many messages in order and then waits for all the acks."""

    async def publish_many(
        self, destination: str, items: Iterable[tuple[bytes, bytes | None, Headers]]
    ) -> int: ...


@dataclass(frozen=True)
class RelayConfig:
    interval_s: float = 0.1  # how often a busy relay looks for new rows
    # an idle relay looks less and less often, up to this far apart: an idle worker costs
    # almost nothing; a write in this process (``wake``) ends the wait at once
    idle_interval_s: float = 1.0
    batch: int = 500  # rows per read and per produce batch
    lease_s: float = 10.0  # another relay takes over this long after this one stopped


def message_of(event: JobEvent, job: JobResource) -> tuple[bytes, bytes, Headers]:
    """(value, key, headers) of one event on the bus: binary-mode CloudEvent."""
    message = JobEventMessage(
        id=event.id,
        type=BUS_TYPES[event.type],
        subject=event.job_id,
        time=event.created_at,
        data=job,
    )
    headers, value = message.to_binary()
    return value, event.job_id.encode(), headers


async def _same(job: JobResource) -> JobResource:
    return job


class EventRelay:
    def __init__(
        self,
        events: EventLog,
        publisher: Publisher,
        destination: str,
        *,
        owner: str,
        config: RelayConfig | None = None,
        resolve: Callable[[JobResource], Awaitable[JobResource]] | None = None,
    ) -> None:
        self.events = events
        self.publisher = publisher
        self.destination = destination
        self.owner = owner
        self.config = config or RelayConfig()
        self.resolve = resolve or _same
        self.published = 0
        self._held = False
        self._ask_at = 0.0  # monotonic: when to take or renew the lease next
        self._woken = asyncio.Event()

    def wake(self) -> None:
        """Something was stored in this process: look for new rows now, not at the next tick."""
        self._woken.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop``; then publish what is left once (a worker's last outcomes)."""
        idle = self.config.interval_s
        try:
            while not stop.is_set():
                self._woken.clear()
                found = 0
                try:
                    if await self._leader():
                        found = await self.publish_once()
                except Exception as exc:  # the store or the bus is away: try again later
                    log.warning("job events relay: %s", exc)
                    self._held, self._ask_at = False, 0.0
                if found >= self.config.batch:
                    continue
                if found:  # busy: the next look a tick later, gathering a batch meanwhile
                    idle = self.config.interval_s
                    await pause(idle, stop)
                else:  # idle: back off, unless a write here wakes it
                    await pause(idle, stop, self._woken)
                    idle = min(2 * idle, max(self.config.idle_interval_s, idle))
            with contextlib.suppress(Exception):
                if await self._leader():
                    while await self.publish_once() >= self.config.batch:
                        pass
        finally:
            if self._held:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.events.release_lease, LEASE, self.owner)

    async def _leader(self) -> bool:
        """Whether this relay holds the lease, asking the store a third of a lease apart."""
        now = time.monotonic()
        if now < self._ask_at:
            return self._held
        self._held = await asyncio.to_thread(
            self.events.hold_lease, LEASE, self.owner, self.config.lease_s
        )
        self._ask_at = now + self.config.lease_s / 3
        return self._held

    async def publish_once(self) -> int:
        """One batch of pending events published and marked; how many."""
        pending = await asyncio.to_thread(self.events.pending, self.config.batch)
        if not pending:
            return 0
        items = [message_of(e, await self.resolve(e.job)) for e in pending]
        await self._publish(items)
        await asyncio.to_thread(self.events.mark_published, [e.position for e in pending])
        self.published += len(pending)
        return len(pending)

    async def _publish(self, items: Sequence[tuple[bytes, bytes, Headers]]) -> None:
        if isinstance(self.publisher, BatchPublisher):
            await self.publisher.publish_many(self.destination, items)
            return
        for value, key, headers in items:  # in order: a job's events stay in order
            await self.publisher.publish(self.destination, value, key=key, headers=headers)
