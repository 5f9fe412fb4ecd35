"""The consume loop: pull, decode, claim, micro-batch, infer off the loop, store, commit.

Delivery rule: a message is acknowledged only after its job's outcome is durably stored (or
the job was already terminal, or its dead letter was acknowledged by the broker), and the
transport commits only the contiguous acknowledged prefix. A crash anywhere therefore means
redelivery, never loss; the job store's guarded transitions make the outcome effectively once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from pydantic import BaseModel

from dlq.router import DeadLetter, DeadLetterRouter, Routed
from jobstore.records import (
    Binding,
    ClaimResult,
    JobRecord,
    NewJob,
    Outcome,
    Reschedule,
)
from jobstore.store import JobStore
from schemas.contracts import ContractViolation, ModelConfig, resolve_version, validate_input
from schemas.envelope import EnvelopeError, JobEnvelope, decode_message
from schemas.errors import ErrorCode
from schemas.jobs import JobStatus
from transports.base import Consumer, Delivery, DepthProbe
from transports.blobs import BlobError, BlobNotFound, BlobTooLarge, ClaimCheck
from workers import storing
from workers.adapters import LoadedModel
from workers.batcher import Batch, MicroBatcher
from workers.metrics import WorkerMetrics
from workers.retry import RETRY_EXTENSION, RetryPolicy, RetryPump
from workers.throughput import Ewma

_T = TypeVar("_T")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str
    fetch_max_records: int = 512
    fetch_timeout_s: float = 0.1
    lease_s: float = 300.0
    heartbeat_interval_s: float = 5.0
    depth_interval_s: float = 5.0
    max_pending_writes: int = 2
    # Transports that count receives and can hand a message back (SQS): a retryable failure
    # is retried with backoff until the ``max_deliveries``-th receive, which is final; a
    # message received more often than that (no redrive policy) is dead-lettered unrun.
    max_deliveries: int | None = None
    # the transport's Capabilities.redelivers_itself: retries are handed back with
    # ``consumer.nack`` (SQS) instead of waiting in the store for the retry pump (Kafka)
    redelivers: bool = False


@dataclass
class WorkItem:
    record: JobRecord
    payload: BaseModel
    delivery: Delivery
    enqueued_at: float


@dataclass(frozen=True)
class _Accepted:
    envelope: JobEnvelope
    config: ModelConfig
    payload: BaseModel
    delivery: Delivery
    binding: Binding


class Worker:
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
    ) -> None:
        self.claim_check = claim_check
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
        self._stop = asyncio.Event()
        self.processed = 0
        self._stop = asyncio.Event()  # run()'s: dead-letter retries give up when it is set
        # poison messages are dead-lettered beside the loop, a bounded number at a time, so
        # that a slow dead-letter destination never holds the messages behind them
        self._letter_slots = asyncio.Semaphore(16)
        self._letter_tasks: set[asyncio.Task[None]] = set()
        # re-publishes waiting out a backoff: cancelled at stop (their messages stay unacked)
        self._deferred: set[asyncio.Task[None]] = set()

    # -- lifecycle -------------------------------------------------------------------------

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
                    # don't read far ahead of the models: bounded memory, fair redelivery
                    while len(self._in_flight) > 4 * self.config.fetch_max_records:
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

    # -- admission -------------------------------------------------------------------------

    async def _admit(self, deliveries: list[Delivery]) -> None:
        try:
            await self._admit_or_stop(deliveries)
        except storing.Stopping:
            return  # not acknowledged: redelivered to whoever consumes next

    async def _admit_or_stop(self, deliveries: list[Delivery]) -> None:
        # rounds[k]: the k-th distinct request seen for each id in this fetch; a later round
        # is judged against the row the earlier one bound (or left unbound)
        rounds: list[dict[str, _Accepted]] = []
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
            accepted = _Accepted(envelope, config, payload, delivery, binding)
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

    async def _claim(self, accepted: list[_Accepted]) -> None:
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

    async def _refuse(self, delivery: Delivery, reason: str) -> None:
        """The id belongs to another request: dead-letter this event and leave the row be.
        No job id on the letter, so a redrive cannot requeue the owner's job."""
        await self._poison(delivery, ErrorCode.JOB_ID_CONFLICT, f"{reason}; this event was not run")

    async def _unstorable(self, a: _Accepted, error: Exception) -> None:
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

    def _ensure_and_claim(
        self, new_jobs: list[NewJob], due: set[str], bindings: Mapping[str, Binding]
    ) -> tuple[ClaimResult, dict[str, Exception]]:
        unstorable = storing.ensure_isolating(self.store, new_jobs)
        ids = [j.id for j in new_jobs if j.id not in unstorable]
        claim = self.store.claim(
            ids,
            worker_id=self.config.worker_id,
            lease_s=self.config.lease_s,
            due=due,
            bindings=bindings,
        )
        return claim, unstorable

    async def _store_call(self, what: str, call: Callable[[], _T]) -> _T:
        return await storing.store_call(self._stop, what, call)

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

    # -- batches ---------------------------------------------------------------------------

    def _make_handler(self, model: LoadedModel) -> Any:
        async def handle(batch: Batch[WorkItem]) -> None:
            name, version = model.config.key
            self.metrics.batch_size.labels(name).observe(len(batch.items))
            self.metrics.batch_wait.labels(name).observe(batch.waited_s)
            loop = asyncio.get_running_loop()
            started = time.perf_counter()
            results = await loop.run_in_executor(self.executor, _run_isolating, model, batch.items)
            self.metrics.inference.labels(name, version).observe(time.perf_counter() - started)
            outcomes = [
                _outcome(item, result) for item, result in zip(batch.items, results, strict=True)
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
            outcomes = [_outcome(item, _as_retryable(exc)) for item in batch.items]
            await self._writes.acquire()
            await self._persist(model, batch.items, outcomes)

        return failed

    async def _persist(
        self, model: LoadedModel, items: list[WorkItem], outcomes: list[Outcome]
    ) -> None:
        try:
            outcomes = [await self._offload(o) for o in outcomes]
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
            replaced = await self._store_outcomes(final, retries)
            if replaced:
                outcomes = [replaced.get(o.job_id, o) for o in outcomes]
                retries = [r for r in retries if r.job_id not in replaced]
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
                    and not await self._dead_letter(_inference_letter(item, outcome))
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

    async def _commit(self) -> None:
        async with self._commit_lock:
            try:
                await self.consumer.commit()
            except Exception as exc:  # a failed commit only means redelivery later
                log.warning("offset commit failed: %s", exc)

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


# how often a message's input_url could not be read (Kafka re-publishes carry it)
INPUT_ATTEMPTS_HEADER = "inferq-input-attempts"


def _input_attempts(delivery: Delivery) -> int:
    raw = delivery.headers.get(INPUT_ATTEMPTS_HEADER)
    try:
        return int(raw or b"0")
    except ValueError:
        return 0


def _run_isolating(model: LoadedModel, items: list[WorkItem]) -> list[dict[str, Any] | Exception]:
    """Run a batch; when it fails, split it so one bad item does not fail its neighbours."""
    try:
        results: list[dict[str, Any] | Exception] = list(model.run([i.payload for i in items]))
        if len(results) != len(items):
            raise _ContractBroken(f"model returned {len(results)} results for {len(items)} inputs")
        return results
    except Exception as exc:
        if len(items) == 1:
            return [exc]
        mid = len(items) // 2
        return _run_isolating(model, items[:mid]) + _run_isolating(model, items[mid:])


class _ContractBroken(RuntimeError):
    """The model answered, but not one result per input."""


class _HandlerFailed(RuntimeError):
    retryable = True


def _as_retryable(exc: BaseException) -> Exception:
    wrapped = _HandlerFailed(f"{type(exc).__name__}: {exc}")
    wrapped.__cause__ = exc
    return wrapped


def _outcome(item: WorkItem, result: dict[str, Any] | Exception) -> Outcome:
    if isinstance(result, Exception):
        return Outcome(
            job_id=item.record.id,
            attempt=item.record.attempts,
            status=JobStatus.FAILED,
            error_code=ErrorCode.INFERENCE_FAILED.value,
            error_message=_failure_message(item, result),
            retryable=bool(getattr(result, "retryable", False)),
        )
    return Outcome(
        job_id=item.record.id,
        attempt=item.record.attempts,
        status=JobStatus.SUCCEEDED,
        result=result,
    )


def _failure_message(item: WorkItem, error: Exception) -> str:
    message = f"{type(error).__name__}: {error}"[:1000]
    if item.record.attempts > 1:
        message += f" (gave up after {item.record.attempts} attempts)"
    return message


def _inference_letter(item: WorkItem, outcome: Outcome) -> DeadLetter:
    return DeadLetter(
        delivery=item.delivery,
        code=outcome.error_code or ErrorCode.INFERENCE_FAILED.value,
        message=outcome.error_message or "",
        job_id=item.record.id,
        model=item.record.model,
        version=item.record.version,
        exception=(outcome.error_message or "").split(":", 1)[0] or None,
        attempts=item.record.attempts,
    )
