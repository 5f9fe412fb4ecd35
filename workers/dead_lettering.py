"""Poison messages: the row (if any) says why, the dead letter keeps the message, and only
then is the original acknowledged. Dead letters are sent beside the loop, a bounded number
at a time."""

from __future__ import annotations

import asyncio
import logging

from dlq.router import DeadLetter, Routed
from schemas.envelope import JobEnvelope
from schemas.errors import ErrorCode
from transports.base import Delivery
from workers import storing
from workers.items import Accepted
from workers.state import WorkerState

log = logging.getLogger(__name__)


class DeadLettering(WorkerState):
    async def _refuse(self, delivery: Delivery, reason: str) -> None:
        """The id belongs to another request: dead-letter this event and leave the row be.
        No job id on the letter, so a redrive cannot requeue the owner's job."""
        await self._poison(delivery, ErrorCode.JOB_ID_CONFLICT, f"{reason}; this event was not run")

    async def _unstorable(self, a: Accepted, error: Exception) -> None:
        job_id = a.envelope.id
        message = storing.printable(
            f"the job store cannot keep this job: {storing.db_reason(error)}"
        )
        log.warning("job %s cannot be stored: %s", job_id, error)
        await self._store_call(
            f"failing job {job_id}",
            lambda: storing.fail_placeholder(
                self.store, job_id, a.delivery, ErrorCode.JOB_UNSTORABLE, message
            ),
        )
        await self._poison(a.delivery, ErrorCode.JOB_UNSTORABLE, message, job_id=job_id)

    async def _poison(
        self,
        delivery: Delivery,
        code: ErrorCode,
        message: str,
        *,
        job_id: str | None = None,
        envelope: JobEnvelope | None = None,
        exc: Exception | None = None,
    ) -> None:
        """Contract breakers never run: the row (if any) says why, the DLQ keeps the message."""
        model = version = None
        if envelope is not None:
            job_id = envelope.id
            model, version = envelope.data.model, envelope.data.version
            await self._store_call(
                f"failing job {job_id}",
                lambda: storing.fail_row(self.store, envelope, delivery, code, message),
            )
        elif job_id is not None and code is not ErrorCode.JOB_UNSTORABLE:
            # the id is readable but the rest is not: a failed row lets the publisher see why
            await self._store_call(
                f"failing job {job_id}",
                lambda: storing.fail_placeholder(self.store, job_id, delivery, code, message),
            )
        letter = DeadLetter(
            delivery=delivery,
            code=code.value,
            message=message,
            job_id=job_id,
            model=model,
            version=version,
            exception=type(exc).__name__ if exc else None,
            attempts=delivery.receive_count,
        )
        await self._letter_slots.acquire()
        task = asyncio.create_task(self._route(letter), name=f"dead-letter-{delivery.position}")
        self._letter_tasks.add(task)
        task.add_done_callback(self._letter_tasks.discard)

    async def _route(self, letter: DeadLetter) -> None:
        """Dead-letter one poison message, then ack it (and commit past it)."""
        try:
            if await self._dead_letter(letter):
                where = letter.delivery.position
                log.warning("dead-lettered %s (%s): %s", where, letter.code, letter.message)
                self.consumer.ack(letter.delivery)
                await self._commit()
        except Exception:  # unacked: it comes again after a restart; the others go on
            log.exception("dead-lettering %s failed", letter.delivery.position)
        finally:
            self._letter_slots.release()

    async def _dead_letter(self, letter: DeadLetter) -> bool:
        """Send a dead letter; True once the original may be acknowledged."""
        routed: Routed = await self.dead_letters.send(letter, stop=self._stop)
        if routed.trimmed:
            self.metrics.dlq_trimmed.labels("s3" if routed.offloaded else "none").inc()
        if routed.unpublished_reason is not None:
            self.metrics.dlq_unpublished.labels(routed.unpublished_reason).inc()
        if routed.acked:
            self.metrics.dead_letters.labels(letter.code).inc()
        return routed.acked
