"""Another attempt: when a failed job runs again, and how its message comes back.

A transport that can hand a message back (``Capabilities.redelivers_itself``, in the
worker's config as ``redelivers``: SQS) gets it back with a delay and counts the receives;
on the others (Kafka) a retry waits in the store for the retry pump, and a message whose
input cannot be read yet is published again after the backoff. Every such check of the
worker is in this module.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

from jobstore.records import Outcome, Reschedule
from schemas.envelope import JobEnvelope
from schemas.errors import ErrorCode
from schemas.jobs import JobStatus
from transports.base import Delivery
from transports.blobs import BlobError
from workers.dead_lettering import DeadLettering
from workers.items import WorkItem

log = logging.getLogger(__name__)

# how often a message's input_url could not be read (Kafka re-publishes carry it)
INPUT_ATTEMPTS_HEADER = "inferq-input-attempts"


class Redelivery(DeadLettering):
    def _split_retries(
        self, items: list[WorkItem], outcomes: list[Outcome]
    ) -> tuple[list[Outcome], list[Reschedule], dict[str, float]]:
        """A batch's outcomes: the final ones, the retries the store holds until due, and
        the messages to hand back to the queue after a delay (job id -> seconds)."""
        final: list[Outcome] = []
        retries: list[Reschedule] = []
        redeliver: dict[str, float] = {}  # SQS: back on the queue after a delay
        for item, o in zip(items, outcomes, strict=True):
            delay = self._retry_delay(item, o)
            if delay is None:
                final.append(o)
            elif self.config.redelivers:
                redeliver[o.job_id] = delay
            else:
                retry_at = datetime.now(UTC) + timedelta(seconds=delay)
                code = o.error_code or ErrorCode.INFERENCE_FAILED.value
                retries.append(
                    Reschedule(o.job_id, o.attempt, retry_at, code, o.error_message or "")
                )
        return final, retries, redeliver

    def _retry_delay(self, item: WorkItem, outcome: Outcome) -> float | None:
        """Backoff before the next attempt, or None when this outcome is final."""
        if outcome.status is not JobStatus.FAILED:
            return None
        code = outcome.error_code or ErrorCode.INFERENCE_FAILED.value
        if not self.retry.should_retry(code, outcome.retryable, outcome.attempt):
            return None
        limit = self.config.max_deliveries
        if limit is not None and item.delivery.receive_count >= limit:
            return None  # the queue's redrive policy would take it next: finish it here
        return self.retry.delay_s(outcome.attempt)

    async def _retry_later(self, item: WorkItem, delay_s: float) -> None:
        log.info(
            "job %s failed retryably (receive %d); retrying in %.1fs",
            item.record.id,
            item.delivery.receive_count,
            delay_s,
        )
        await self.consumer.nack(item.delivery, delay_s)
        self._in_flight.discard(item.record.id)
        self._bound.pop(item.record.id, None)

    async def _input_unavailable(
        self, delivery: Delivery, envelope: JobEnvelope, url: str, exc: BlobError
    ) -> None:
        """Retry a job whose input cannot be read for now, with the retry policy's backoff,
        then dead-letter it; the message is always settled, so no commit waits on S3."""
        if self.config.redelivers:
            attempt = delivery.receive_count
        else:
            attempt = _input_attempts(delivery) + 1
        if attempt >= self.retry.max_attempts or (
            self.retry_pump is None and not self.config.redelivers
        ):
            msg = f"input_url {url} could not be read ({attempt} attempts): {exc}"
            await self._poison(
                delivery, ErrorCode.INPUT_UNAVAILABLE, msg, envelope=envelope, exc=exc
            )
            return
        delay = self.retry.delay_s(attempt)
        log.warning("cannot read %s (attempt %d), retrying in %.1fs: %s", url, attempt, delay, exc)
        self.metrics.retries.labels(envelope.data.model, ErrorCode.INPUT_UNAVAILABLE.value).inc()
        if self.config.redelivers:
            await self.consumer.nack(delivery, delay)
            return
        task = asyncio.create_task(self._republish_later(delivery, delay, attempt))
        self._deferred.add(task)
        task.add_done_callback(self._deferred.discard)

    async def _republish_later(self, delivery: Delivery, delay_s: float, attempt: int) -> None:
        """Kafka has no per-message redelivery: publish the same message again after the
        backoff, then acknowledge the original (a crash before that means redelivery)."""
        assert self.retry_pump is not None
        await asyncio.sleep(delay_s)
        headers = [(k, v) for k, v in delivery.headers.items() if k != INPUT_ATTEMPTS_HEADER]
        headers.append((INPUT_ATTEMPTS_HEADER, str(attempt).encode()))
        try:
            await self.retry_pump.publisher.publish(
                self.retry_pump.topic, delivery.value or b"", key=delivery.key, headers=headers
            )
        except Exception as exc:  # left unacknowledged: redelivered after a restart
            log.warning("re-publishing %s failed: %s", delivery.position, exc)
            return
        self.consumer.ack(delivery)
        await self._commit()


def _input_attempts(delivery: Delivery) -> int:
    raw = delivery.headers.get(INPUT_ATTEMPTS_HEADER)
    try:
        return int(raw or b"0")
    except ValueError:
        return 0
