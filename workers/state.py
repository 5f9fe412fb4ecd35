"""What every part of the worker shares: its ports, its in-flight bookkeeping, the store
call that waits out an outage, and the commit of what has been acknowledged.

The worker is one object, built in layers (see ``workers/loop.py``): each layer is a
subclass of the one below it and adds one concern, so the parts share this state on
``self`` exactly as one class would.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TypeVar

from dlq.router import DeadLetterRouter
from jobstore.records import Binding
from jobstore.store import JobStore
from transports.base import Consumer, DepthProbe
from transports.blobs import ClaimCheck
from workers import storing
from workers.adapters import LoadedModel
from workers.batcher import MicroBatcher
from workers.items import WorkerConfig, WorkItem
from workers.metrics import WorkerMetrics
from workers.retry import RetryPolicy, RetryPump
from workers.throughput import Ewma

_T = TypeVar("_T")

log = logging.getLogger(__name__)


class WorkerState:
    def __init__(
        self,
        *,
        consumer: Consumer,
        store: JobStore,
        models: Mapping[tuple[str, str], LoadedModel],
        dead_letters: DeadLetterRouter,
        metrics: WorkerMetrics,
        config: WorkerConfig,
        depth: DepthProbe | None = None,
        executor: Executor | None = None,
        retry: RetryPolicy | None = None,
        retry_pump: RetryPump | None = None,
        claim_check: ClaimCheck | None = None,
        on_write: Callable[[], None] | None = None,
    ) -> None:
        self.claim_check = claim_check
        self.on_write = on_write  # told after each store write (the events relay wakes)
        self.consumer = consumer
        self.store = store
        self.models = dict(models)
        self.configs = [m.config for m in self.models.values()]
        self.dead_letters = dead_letters
        self.metrics = metrics
        self.config = config
        self.depth = depth
        self.retry = retry or RetryPolicy()
        self.retry_pump = retry_pump
        self.throughput = Ewma(half_life_s=30.0)
        # one inference thread per model keeps batches of a model in order and off the loop
        self.executor = executor or ThreadPoolExecutor(
            max_workers=max(1, len(self.models)), thread_name_prefix="inferq-infer"
        )
        self._batchers: dict[tuple[str, str], MicroBatcher[WorkItem]] = {}
        self._in_flight: set[str] = set()
        self._writes = asyncio.Semaphore(config.max_pending_writes)
        self._write_tasks: set[asyncio.Task[None]] = set()
        self._commit_lock = asyncio.Lock()
        self._room = asyncio.Event()  # set whenever in-flight work shrinks
        self._bound: dict[str, Binding] = {}  # in-flight id -> the request it runs
        self.processed = 0
        self._stop = asyncio.Event()  # run()'s: dead-letter retries give up when it is set
        # poison messages are dead-lettered beside the loop, a bounded number at a time, so
        # that a slow dead-letter destination never holds the messages behind them
        self._letter_slots = asyncio.Semaphore(16)
        self._letter_tasks: set[asyncio.Task[None]] = set()
        # re-publishes waiting out a backoff: cancelled at stop (their messages stay unacked)
        self._deferred: set[asyncio.Task[None]] = set()

    async def _store_call(self, what: str, call: Callable[[], _T]) -> _T:
        result = await storing.store_call(self._stop, what, call)
        if self.on_write is not None:
            self.on_write()
        return result

    async def _commit(self) -> None:
        async with self._commit_lock:
            try:
                await self.consumer.commit()
            except Exception as exc:  # a failed commit only means redelivery later
                log.warning("offset commit failed: %s", exc)
