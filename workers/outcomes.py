"""A model's batches: run off the event loop, their outcomes stored in one transaction
(results over the inline limit offloaded to S3 first), and only then their messages
acknowledged, dead-lettered or handed to another attempt."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from jobstore.records import Outcome, Reschedule
from schemas.jobs import JobStatus
from transports.blobs import BlobError
from workers import storing
from workers.adapters import LoadedModel
from workers.batcher import Batch
from workers.inference import as_retryable, inference_letter, outcome_of, run_isolating
from workers.items import WorkItem
from workers.redelivery import Redelivery

log = logging.getLogger(__name__)


class Outcomes(Redelivery):
    def _make_handler(self, model: LoadedModel) -> Any:
        async def handle(batch: Batch[WorkItem]) -> None:
            name, version = model.config.key
            self.metrics.batch_size.labels(name).observe(len(batch.items))
            self.metrics.batch_wait.labels(name).observe(batch.waited_s)
            loop = asyncio.get_running_loop()
            started = time.perf_counter()
            results = await loop.run_in_executor(self.executor, run_isolating, model, batch.items)
            self.metrics.inference.labels(name, version).observe(time.perf_counter() - started)
            outcomes = [
                outcome_of(item, result) for item, result in zip(batch.items, results, strict=True)
            ]
            # store while the next batch runs; bounded so a slow store slows intake
            await self._writes.acquire()
            task = asyncio.create_task(self._persist(model, batch.items, outcomes))
            self._write_tasks.add(task)
            task.add_done_callback(self._write_tasks.discard)

        return handle

    def _make_error_handler(self, model: LoadedModel) -> Any:
        async def failed(batch: Batch[WorkItem], exc: BaseException) -> None:
            # a bug around inference, not in a job: fail each job retryably, so the retry
            # policy and the DLQ decide, and the messages are acked instead of stalling
            outcomes = [outcome_of(item, as_retryable(exc)) for item in batch.items]
            await self._writes.acquire()
            await self._persist(model, batch.items, outcomes)

        return failed

    async def _persist(
        self, model: LoadedModel, items: list[WorkItem], outcomes: list[Outcome]
    ) -> None:
        try:
            outcomes = [await self._offload(o) for o in outcomes]
            final, retries, redeliver = self._split_retries(items, outcomes)
            replaced = await self._store_outcomes(final, retries)
            if replaced:
                outcomes = [replaced.get(o.job_id, o) for o in outcomes]
                retries = [r for r in retries if r.job_id not in replaced]
            if retries and self.retry_pump is not None:
                self.retry_pump.expect(min(r.retry_at for r in retries))
            name = model.config.name
            now = datetime.now(UTC)
            retrying = {r.job_id for r in retries}
            for item, outcome in zip(items, outcomes, strict=True):
                if outcome.job_id in redeliver:
                    self.metrics.retries.labels(name, outcome.error_code or "unknown").inc()
                    await self._retry_later(item, redeliver[outcome.job_id])
                    continue
                if outcome.job_id in retrying:
                    self.metrics.retries.labels(name, outcome.error_code or "unknown").inc()
                else:
                    self.metrics.jobs.labels(name, outcome.status.value).inc()
                    self.metrics.end_to_end.labels(name).observe(
                        (now - item.record.created_at).total_seconds()
                    )
                if (
                    outcome.status is JobStatus.FAILED
                    and outcome.job_id not in retrying
                    and not await self._dead_letter(inference_letter(item, outcome))
                ):
                    self._in_flight.discard(item.record.id)
                    continue  # not acked: delivered again after a restart
                self.consumer.ack(item.delivery)
                self._in_flight.discard(item.record.id)
                self._bound.pop(item.record.id, None)
            finished = len(items) - len(retries) - len(redeliver)
            self.processed += finished
            self.throughput.add(finished)
            self._room.set()
            self.metrics.in_flight.set(len(self._in_flight))
            await self._commit()
        finally:
            self._writes.release()
            # wake the fetch loop even when this write gave up at a stop (the store down):
            # its jobs stay in flight, and the loop, told to stop, must not wait for room
            self._room.set()

    async def _offload(self, outcome: Outcome) -> Outcome:
        """A result over the inline limit goes to S3; the row keeps a reference to it."""
        if self.claim_check is None or outcome.result is None:
            return outcome
        try:
            result = await self.claim_check.offload_result(outcome.job_id, outcome.result)
        except BlobError as exc:
            log.warning("result of %s stays inline: %s", outcome.job_id, exc)
            return outcome
        return replace(outcome, result=result)

    async def _store_outcomes(
        self, outcomes: list[Outcome], retries: list[Reschedule]
    ) -> dict[str, Outcome]:
        """Store the batch's outcomes; while the store is down, keep them and retry (never ack
        unstored). An outcome the store refuses fails its job alone: the replacements."""
        items = storing.clean([*outcomes, *retries])
        replaced: dict[str, Outcome] = {}
        await self._store_call(
            f"storing {len(items)} outcomes",
            lambda: storing.complete_isolating(self.store, items, replaced),
        )
        return replaced
