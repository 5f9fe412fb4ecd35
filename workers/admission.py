"""Admission: decode a fetch's deliveries into jobs, dead-letter what cannot run, then
create and claim the rows in one transaction and hand the claimed jobs to their batchers.

Each delivery is settled one way: handed to a batcher (acknowledged once its outcome is
stored), acknowledged at once (a duplicate, or a job already terminal), dead-lettered, or
left for redelivery (the worker stopped while the store was down).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from jobstore.errors import StoreUnavailable
from jobstore.records import Binding, ClaimResult, NewJob
from schemas.contracts import ContractViolation, resolve_version, validate_input
from schemas.envelope import EnvelopeError, JobEnvelope, decode_message
from schemas.errors import ErrorCode
from transports.base import Delivery
from transports.blobs import BlobError, BlobNotFound, BlobTooLarge
from workers import storing
from workers.items import Accepted, WorkItem
from workers.redelivery import Redelivery
from workers.retry import RETRY_EXTENSION

log = logging.getLogger(__name__)


class Admission(Redelivery):
    async def _admit(self, deliveries: list[Delivery]) -> None:
        try:
            await self._admit_or_stop(deliveries)
        except storing.Stopping:
            return  # not acknowledged: redelivered to whoever consumes next

    async def _admit_or_stop(self, deliveries: list[Delivery]) -> None:
        # rounds[k]: the k-th distinct request seen for each id in this fetch; a later round
        # is judged against the row the earlier one bound (or left unbound)
        rounds: list[dict[str, Accepted]] = []
        for delivery in deliveries:
            try:
                envelope = decode_message(delivery.headers, delivery.value)
            except EnvelopeError as exc:
                await self._poison(delivery, exc.code, exc.message, job_id=exc.job_id, exc=exc)
                continue
            job_id = envelope.id
            limit = self.config.max_deliveries
            if limit is not None and delivery.receive_count > limit:
                msg = (
                    f"received {delivery.receive_count} times, more than the {limit} allowed, "
                    "without an outcome"
                )
                await self._poison(delivery, ErrorCode.ATTEMPTS_EXHAUSTED, msg, envelope=envelope)
                continue
            request = envelope.data
            config = resolve_version(self.configs, request.model, request.version)
            if config is None:
                known = any(c.name == request.model for c in self.configs)
                code = ErrorCode.UNKNOWN_VERSION if known else ErrorCode.UNKNOWN_MODEL
                field = "version" if known else "model"
                msg = f"{field} {request.version if known else request.model!r} is not served"
                await self._poison(delivery, code, msg, envelope=envelope)
                continue
            raw = await self._input_of(delivery, envelope)
            if raw is None:
                continue
            try:
                payload = validate_input(config.adapter, raw)
            except ContractViolation as exc:
                await self._poison(
                    delivery, ErrorCode.INVALID_INPUT, exc.message, envelope=envelope, exc=exc
                )
                continue
            binding = storing.binding(envelope, config, raw)
            running = self._bound.get(job_id)
            if running is not None:
                if storing.same_request(running, binding):
                    self._duplicate(delivery)  # the running copy's outcome stands for both
                else:
                    reason = f"job id {job_id!r} is already running another request"
                    await self._refuse(delivery, reason)
                continue
            accepted = Accepted(envelope, config, payload, delivery, binding)
            for batch in rounds:
                first = batch.get(job_id)
                if first is None:
                    batch[job_id] = accepted
                    break
                if storing.same_request(first.binding, binding):
                    self._duplicate(delivery)
                    break
            else:
                rounds.append({job_id: accepted})
        for batch in rounds:
            await self._claim(list(batch.values()))
        self.metrics.in_flight.set(len(self._in_flight))
        await self._commit()

    def _duplicate(self, delivery: Delivery) -> None:
        self.metrics.skipped.labels("duplicate").inc()
        self.consumer.ack(delivery)

    async def _claim(self, accepted: list[Accepted]) -> None:
        """Create the rows that are missing and claim the batch; every job whose row the
        store cannot keep, or whose id is bound to another request, is dead-lettered alone."""
        new_jobs = [storing.new_job(a.envelope, a.config) for a in accepted]
        due = {
            a.envelope.id
            for a in accepted
            if (a.envelope.model_extra or {}).get(RETRY_EXTENSION) is not None
        }
        bindings = {a.envelope.id: a.binding for a in accepted}
        claim, unstorable = await self._store_call(
            f"claiming {len(new_jobs)} jobs",
            lambda: self._ensure_and_claim(new_jobs, due, bindings),
        )
        by_id = {r.id: r for r in claim.claimed}
        now = asyncio.get_running_loop().time()
        for a in accepted:
            job_id = a.envelope.id
            if job_id in unstorable:
                await self._unstorable(a, unstorable[job_id])
                continue
            if job_id in claim.conflicts:
                await self._refuse(a.delivery, claim.conflicts[job_id])
                continue
            record = by_id.get(job_id)
            if record is None:
                status = claim.skipped.get(job_id)
                self.metrics.skipped.labels(str(status.value) if status else "missing").inc()
                self.consumer.ack(a.delivery)
                continue
            self._in_flight.add(record.id)
            self._bound[record.id] = a.binding
            self._batchers[a.config.key].put(WorkItem(record, a.payload, a.delivery, now))

    async def _input_of(self, delivery: Delivery, envelope: JobEnvelope) -> dict[str, Any] | None:
        """The job's input, read from S3 for an ``input_url``; None once dead-lettered."""
        request = envelope.data
        if request.input is not None:
            return request.input
        url = request.input_url or ""
        cc = self.claim_check
        code: ErrorCode
        error: Exception
        if cc is None or not cc.allows(url):
            code, msg = ErrorCode.INPUT_NOT_ALLOWED, f"input_url {url} is not in an allowed bucket"
            await self._poison(delivery, code, msg, envelope=envelope)
            return None
        try:
            return await cc.load_input(url)
        except BlobNotFound as exc:
            code, msg, error = ErrorCode.INPUT_NOT_FOUND, str(exc), exc
        except BlobTooLarge as exc:
            code, msg, error = ErrorCode.INPUT_TOO_LARGE, str(exc), exc
        except ValueError as exc:
            code, msg, error = ErrorCode.INVALID_INPUT, f"input_url {url}: {exc}", exc
        except BlobError as exc:  # S3 unreachable: not the message's fault, try again later
            await self._input_unavailable(delivery, envelope, url, exc)
            return None
        await self._poison(delivery, code, msg, envelope=envelope, exc=error)
        return None

    def _ensure_and_claim(
        self, new_jobs: list[NewJob], due: set[str], bindings: Mapping[str, Binding]
    ) -> tuple[ClaimResult, dict[str, Exception]]:
        def claim(ids: list[str], ensure: list[NewJob]) -> ClaimResult:
            return self.store.claim(
                ids,
                worker_id=self.config.worker_id,
                lease_s=self.config.lease_s,
                due=due,
                bindings=bindings,
                ensure=ensure,
            )

        try:  # the missing rows and the claim in one transaction, as nearly always
            return claim([j.id for j in new_jobs], new_jobs), {}
        except StoreUnavailable:
            raise
        except Exception:  # a row the store cannot keep: find it alone, claim the others
            log.debug("claim of %d jobs with their rows failed; isolating", len(new_jobs))
        unstorable = storing.ensure_isolating(self.store, new_jobs)
        return claim([j.id for j in new_jobs if j.id not in unstorable], []), unstorable
