"""The consume loop: pull, decode, claim, micro-batch, infer off the loop, store, commit.

Delivery rule: a message is acknowledged only after its job's outcome is durably stored (or
the job was already terminal, or its dead letter was acknowledged by the broker), and the
transport commits only the contiguous acknowledged prefix. A crash anywhere therefore means
redelivery, never loss; the job store's guarded transitions make the outcome effectively once.

``Worker`` is the façade; its parts are layers of one object, each in its own module:
``state`` (ports, in-flight bookkeeping, store calls, the commit), ``dead_lettering``
(poison messages), ``redelivery`` (another attempt, and every check of ``config.redelivers``),
then ``admission`` (deliveries into claimed jobs) and ``outcomes`` (batches run, stored,
acknowledged). This module holds the lifecycle: start, the fetch loop, drain, side loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from workers.admission import Admission
from workers.batcher import MicroBatcher
from workers.items import WorkerConfig, WorkItem
from workers.outcomes import Outcomes
from workers.redelivery import INPUT_ATTEMPTS_HEADER

__all__ = ["INPUT_ATTEMPTS_HEADER", "WorkItem", "Worker", "WorkerConfig"]

log = logging.getLogger(__name__)


class Worker(Admission, Outcomes):
    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        for key, model in self.models.items():
            batcher: MicroBatcher[WorkItem] = MicroBatcher(
                model.config.max_batch_size,
                model.config.max_wait_ms / 1000.0,
                self._make_handler(model),
                on_error=self._make_error_handler(model),
            )
            batcher.start()
            self._batchers[key] = batcher
            self.metrics.model_info.labels(key[0], key[1], model.provider).set(1)
        await self.consumer.start()
        side = [asyncio.create_task(self._heartbeats(stop), name="heartbeat")]
        if self.depth is not None:
            side.append(asyncio.create_task(self._depth_loop(stop), name="depth"))
        if self.retry_pump is not None:
            side.append(asyncio.create_task(self.retry_pump.run(stop), name="retry-pump"))
        try:
            while not stop.is_set():
                deliveries = await self.consumer.fetch(
                    self.config.fetch_max_records, self.config.fetch_timeout_s
                )
                if deliveries:
                    await self._admit(deliveries)
                    for batcher in self._batchers.values():
                        batcher.nothing_more()  # all of this fetch is in: no need to wait
                    # don't read far ahead of the models: bounded memory, fair redelivery
                    limit = 4 * self.config.fetch_max_records
                    while len(self._in_flight) > limit and not stop.is_set():
                        self._room.clear()
                        await self._room.wait()
        finally:
            await self._drain()
            for task in side:
                task.cancel()
            await asyncio.gather(*side, return_exceptions=True)
            await self.consumer.stop()

    async def _drain(self) -> None:
        for task in list(self._deferred):
            task.cancel()
        await asyncio.gather(*self._deferred, return_exceptions=True)
        for batcher in self._batchers.values():
            await batcher.drain()
        if self._write_tasks:
            await asyncio.gather(*self._write_tasks, return_exceptions=True)
        if self._letter_tasks:
            await asyncio.gather(*self._letter_tasks, return_exceptions=True)
        await self._commit()
        for batcher in self._batchers.values():
            await batcher.stop()

    # -- side loops ------------------------------------------------------------------------

    async def _heartbeats(self, stop: asyncio.Event) -> None:
        models = [
            {"name": m.config.name, "version": m.config.version, "provider": m.provider}
            for m in self.models.values()
        ]
        while not stop.is_set():
            rate = self.throughput.rate()
            self.metrics.throughput.set(rate)
            beat = [{**m, "jobs_per_s": f"{rate:.3f}"} for m in models]
            try:
                await asyncio.to_thread(self.store.heartbeat, self.config.worker_id, beat)
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)
            await _sleep_until(stop, self.config.heartbeat_interval_s)

    async def _depth_loop(self, stop: asyncio.Event) -> None:
        assert self.depth is not None
        while not stop.is_set():
            try:
                depth = await self.depth.depth()
                self.metrics.lag.labels(depth.source).set(depth.backlog)
            except Exception as exc:
                log.debug("depth probe failed: %s", exc)
            await _sleep_until(stop, self.config.depth_interval_s)


async def _sleep_until(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
