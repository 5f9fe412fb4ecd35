"""Waiting for jobs without polling: one change feed per API process wakes its waiters.

A request that waits for a job (``GET /v1/jobs/{id}?wait=N``, ``POST`` with ``Prefer:
wait=N``) registers a ``Waiter`` for the job's id with the ``WaiterHub`` and sleeps on it.
The hub hears of changes from the store's ``ChangeFeed`` (jobstore/feeds.py: LISTEN/NOTIFY
on PostgreSQL, ``data_version`` on SQLite) and wakes the waiters of the jobs whose status
moved past what each last saw. Nothing runs per waiter: a thousand idle ones are a thousand
dictionary entries and parked coroutines.

The feed is a hint. The hub's slow sweep (``sweep_s``, about once a second, one query for
every watched id together) finds what a lost notification did not say, so correctness never
depends on the feed, only latency does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from jobstore.errors import JobStoreError
from jobstore.feeds import ChangeFeed
from jobstore.records import JobRecord
from producers.metrics import ApiMetrics
from schemas.jobs import JobStatus

log = logging.getLogger(__name__)

Lookup = Callable[[Sequence[str]], Mapping[str, JobStatus]]
Fetch = Callable[[Sequence[str]], Mapping[str, JobRecord]]


class Waiter:
    """One waiting request's view of one job: the latest status heard that differs from
    the one the request already knows."""

    __slots__ = ("_event", "_gone", "_known", "_pending", "job_id", "record", "wants_record")

    def __init__(self, job_id: str, *, wants_record: bool = True) -> None:
        self.job_id = job_id
        self.wants_record = wants_record
        # the terminal row, when the hub read it for all its woken waiters in one query
        self.record: JobRecord | None = None
        self._event = asyncio.Event()
        self._known: JobStatus | None = None
        self._pending: JobStatus | None = None
        self._gone = False

    @property
    def gone(self) -> bool:
        """The client went away: stop waiting."""
        return self._gone

    def observe(self, status: JobStatus, record: JobRecord | None = None) -> None:
        if record is not None and record.status is status:
            self.record = record
        if status != self._known:
            self._pending = status
            self._event.set()

    def abandon(self) -> None:
        self._gone = True
        self._event.set()

    async def changed(self, known: JobStatus | None, within: float) -> JobStatus | None:
        """The job's status once heard to differ from ``known`` (None: no row yet); None
        when ``within`` seconds pass first or the client went away."""
        self._known = known
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            pending, self._pending = self._pending, None
            if self._gone:
                return None
            if pending is not None and pending != known:
                return pending
            self._event.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                async with asyncio.timeout(remaining):
                    await self._event.wait()
            except TimeoutError:
                return None


class WaiterHub:
    """The waiters of one API process, keyed by job id, and the feed and sweep that wake them.

    ``start`` and ``stop`` belong to the app's lifespan; an app served without one (tests
    on an in-process transport) starts the hub at its first waiter.
    """

    def __init__(
        self,
        lookup: Lookup,
        feed: ChangeFeed,
        *,
        fetch: Fetch | None = None,
        sweep_s: float = 1.0,
        metrics: ApiMetrics | None = None,
    ) -> None:
        if sweep_s <= 0:
            raise ValueError("sweep_s must be positive")
        self._lookup = lookup
        # with ``fetch``, terminal rows are read for all woken waiters in one query, not
        # one query (and one thread hop) per waiter
        self._fetch = fetch
        self._to_fetch: dict[str, JobStatus] = {}
        self._fetching: asyncio.Task[None] | None = None
        self._feed = feed
        self._sweep_s = sweep_s
        self._metrics = metrics
        self._waiters: dict[str, list[Waiter]] = {}
        self._count = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._checking: asyncio.Task[None] | None = None
        self._again = False  # a check was asked for while one ran
        self._last_check = 0.0
        if metrics is not None:
            metrics.waiters.set_function(lambda: self._count)

    @property
    def waiting(self) -> int:
        """Waiters registered now (``inferq_api_waiters``)."""
        return self._count

    def start(self) -> None:
        if self._sweeper is not None:
            return
        self._feed.start(self)
        self._feed.active(self._count > 0)
        self._sweeper = asyncio.get_running_loop().create_task(
            self._sweep(), name="inferq-waiters-sweep"
        )

    async def stop(self) -> None:
        for task in (self._sweeper, self._checking, self._fetching):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._sweeper = self._checking = self._fetching = None
        await self._feed.stop()

    @contextlib.contextmanager
    def watch(self, job_id: str, *, record: bool = True) -> Iterator[Waiter]:
        """Register a waiter for ``job_id`` for the block. Register before reading the row:
        a change committed between the read and the wait is then heard, not missed. With
        ``record``, a terminal status comes with its row (``waiter.record``) when it can."""
        self.start()
        waiter = Waiter(job_id, wants_record=record)
        self._waiters.setdefault(job_id, []).append(waiter)
        self._count += 1
        if self._count == 1:
            self._feed.active(True)
        try:
            yield waiter
        finally:
            peers = self._waiters.get(job_id, [])
            peers.remove(waiter)
            if not peers:
                self._waiters.pop(job_id, None)
            self._count -= 1
            if self._count == 0:
                self._feed.active(False)

    # --- the ChangeSink side: called by the feed, on the loop ----------------------------

    def changed(self, statuses: Mapping[str, JobStatus]) -> None:
        waiters = self._waiters
        for job_id, status in statuses.items():
            for waiter in waiters.get(job_id, ()):
                if self._fetch is not None and status.terminal and waiter.wants_record:
                    self._to_fetch[job_id] = status  # woken with its row, a query later
                else:
                    waiter.observe(status)
        if self._to_fetch and self._fetching is None:
            self._fetching = asyncio.get_running_loop().create_task(self._fetch_terminal())

    def check(self) -> None:
        """Look up every watched job now; calls that come while one runs make one more."""
        if not self._waiters:
            return
        if self._checking is not None:
            self._again = True
            return
        self._checking = asyncio.get_running_loop().create_task(self._check("feed"))

    # --- internals ------------------------------------------------------------------------

    async def _fetch_terminal(self) -> None:
        """Read the rows of the jobs heard terminal, all in one query, and wake their
        waiters with them; if the store cannot say, they wake without (and read it)."""
        assert self._fetch is not None
        try:
            while self._to_fetch:
                batch, self._to_fetch = self._to_fetch, {}
                try:
                    records = await asyncio.to_thread(self._fetch, list(batch))
                except JobStoreError as exc:
                    log.warning("waiters: cannot read %d finished jobs: %s", len(batch), exc)
                    records = {}
                for job_id, status in batch.items():
                    record = records.get(job_id)
                    for waiter in self._waiters.get(job_id, ()):
                        waiter.observe(status, record)
        finally:
            self._fetching = None

    async def _check(self, reason: str) -> None:
        try:
            while True:
                self._again = False
                ids = list(self._waiters)
                if not ids:
                    return
                self._last_check = time.monotonic()
                if self._metrics is not None:
                    self._metrics.wait_lookups.labels(reason).inc()
                try:
                    statuses = await asyncio.to_thread(self._lookup, ids)
                except JobStoreError as exc:  # the store is away: the sweep tries again
                    log.warning("waiters: cannot look up %d jobs: %s", len(ids), exc)
                    return
                self.changed(statuses)
                if not self._again:
                    return
                reason = "feed"
        finally:
            self._checking = None

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_s)
            # a feed's own check that ran recently counts: the sweep only covers silence
            quiet = time.monotonic() - self._last_check >= self._sweep_s * 0.5
            if self._waiters and self._checking is None and quiet:
                self._checking = asyncio.get_running_loop().create_task(self._check("sweep"))


class HubChanges:
    """The event streams' change feed (producers/events.py) on the hub: a stream sleeps as
    one more waiter of its job, so open streams cost what idle waiters cost."""

    def __init__(self, hub: WaiterHub) -> None:
        self._hub = hub

    async def wait_for_change(
        self,
        job_id: str,
        within: float,
        known: JobStatus | None,
    ) -> bool:
        with self._hub.watch(job_id, record=False) as waiter:  # a stream reads its log
            return await waiter.changed(known, within) is not None
