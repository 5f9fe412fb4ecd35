"""The micro-batcher: one queue per model version, flushed at max_batch_size or max_wait_ms,
or as soon as the queue is empty after ``nothing_more()``.

Batches never mix models. While a batch runs, the next one fills, so under load the batch
size grows by itself. A job waits up to ``max_wait_ms`` for company only while more may be
on its way: the worker says ``nothing_more()`` once it has handed over all it fetched, and
then a batch closes as soon as the queue is empty (one job at a time pays no batching
delay; a backlog still comes in full batches, since a fetch hands over many at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass
class Batch(Generic[T]):
    items: list[T]
    waited_s: float  # how long the first item waited for the batch to close


@dataclass
class MicroBatcher(Generic[T]):
    max_batch_size: int
    max_wait_s: float
    handler: Callable[[Batch[T]], Awaitable[None]]
    # told about a batch whose handler raised, so its items are not left hanging; the
    # batcher goes on either way (a dead batcher task would stall its model for good)
    on_error: Callable[[Batch[T], BaseException], Awaitable[None]] | None = None
    _queue: asyncio.Queue[tuple[float, T]] = field(default_factory=asyncio.Queue)
    _task: asyncio.Task[None] | None = None
    _busy: bool = False
    _told_at: float = float("-inf")  # loop time of the last nothing_more()
    _told: asyncio.Event = field(default_factory=asyncio.Event)

    def nothing_more(self) -> None:
        """Everything fetched so far was put: a batch need not wait for more."""
        self._told_at = asyncio.get_running_loop().time()
        self._told.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="micro-batcher")

    def put(self, item: T) -> None:
        self._queue.put_nowait((asyncio.get_running_loop().time(), item))

    def pending(self) -> int:
        return self._queue.qsize() + (1 if self._busy else 0)

    async def drain(self) -> None:
        """Wait until every queued item went through the handler."""
        await self._queue.join()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first_at, first = await self._queue.get()
            self._busy = True
            items = [first]
            deadline = first_at + self.max_wait_s
            while len(items) < self.max_batch_size:
                try:
                    items.append(self._queue.get_nowait()[1])
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0 or self._told_at >= first_at:
                    break  # waited long enough, or nothing more is on its way
                self._told.clear()
                item = await self._next_or_told(remaining)
                if item is None:
                    continue  # told, or timed out: the checks above decide
                items.append(item)
            batch = Batch(items, loop.time() - first_at)
            try:
                await self.handler(batch)
            except Exception as exc:
                log.exception("batch handler failed on %d items", len(items))
                await self._report(batch, exc)
            finally:
                self._busy = False
                for _ in items:
                    self._queue.task_done()

    async def _next_or_told(self, within: float) -> T | None:
        """The next item, or None once told ``nothing_more`` or after ``within`` seconds."""
        getting = asyncio.ensure_future(self._queue.get())
        told = asyncio.ensure_future(self._told.wait())
        try:
            await asyncio.wait((getting, told), timeout=within, return_when=asyncio.FIRST_COMPLETED)
        finally:
            told.cancel()
            if not getting.done():
                getting.cancel()
        if getting.done() and not getting.cancelled():
            return getting.result()[1]
        return None

    async def _report(self, batch: Batch[T], exc: BaseException) -> None:
        if self.on_error is None:
            return
        try:
            await self.on_error(batch, exc)
        except Exception:
            log.exception("batch error handler failed too")
