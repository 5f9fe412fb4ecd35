"""Submitting a job, everything ``POST /v1/jobs`` does behind its route.

In order: the Idempotency-Key's shape, the model and version, the input against the
model's contract (or the ``input_url`` against the claim-check store), the webhook URL,
admission against the backlog limits; then the row is written ``queued`` under a new job id
(bound to the key, so a replay finds it; in one transaction with the rows of concurrent
submits, ``producers/insert_groups.py``) and the job published. The job counts as accepted
only once the broker acknowledged it; a publish that fails for good marks the row so and
answers 503, so no accepted job is ever lost and no dead row holds a backlog slot. Every
refusal is an ``ApiError``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from jobstore.errors import IdempotencyConflict
from jobstore.records import JobRecord, NewJob
from producers.backpressure import BacklogMonitor, Snapshot
from producers.errors import STORE_DOWN
from producers.insert_groups import InsertGroups
from producers.metrics import ApiMetrics
from producers.publish import JobPublisher, PublishUnavailable
from schemas.batch import IDEMPOTENCY_KEY_PATTERN
from schemas.contracts import ContractViolation, ModelConfig, resolve_version, validate_input
from schemas.envelope import new_envelope
from schemas.errors import ApiError, ErrorCode
from schemas.jobs import JobRequest, JobResource
from transports.base import TransportError
from webhooks.routes import check_webhook_url

if TYPE_CHECKING:
    from producers.app import ApiDeps

IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)
PUBLISH_RETRY_AFTER_S = 2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Submitted:
    job: JobResource
    created: bool  # False: a replay of an earlier submit with the same key and body


class SubmissionService:
    """Takes a request, returns the accepted job or raises ``ApiError``. Each refusal is
    counted in ``inferq_jobs_rejected_total`` by its code."""

    def __init__(
        self,
        deps: ApiDeps,
        publisher: JobPublisher,
        metrics: ApiMetrics,
        backlog: BacklogMonitor,
    ) -> None:
        self.deps = deps  # its config is read per request: limits may change while serving
        self.publisher = publisher
        self.metrics = metrics
        self.backlog = backlog
        # concurrent submits share store transactions (one in flight, the rest queue)
        self.inserts = InsertGroups(deps.store, observe=metrics.insert_group.observe)

    async def submit(self, body: JobRequest, idempotency_key: str | None) -> Submitted:
        self._check_key(idempotency_key)
        config = self._resolve(body)
        await self._check_input(body, config)
        await self._admit(config.name)
        record, created = await self._create(body, config, idempotency_key)
        if created:
            await self._publish(record, body)
            self.accepted(config.name)
        return Submitted(record.to_resource(), created)

    # --- the request ----------------------------------------------------------------------

    def _check_key(self, key: str | None) -> None:
        if key is not None and not IDEMPOTENCY_KEY.match(key):
            raise self._reject(
                400,
                ErrorCode.INVALID_IDEMPOTENCY_KEY,
                "Idempotency-Key must be 1-255 printable ASCII characters",
                "Idempotency-Key",
            )

    def _resolve(self, body: JobRequest) -> ModelConfig:
        models = self.deps.models()
        config = resolve_version(models, body.model, body.version)
        if config is not None:
            return config
        if any(c.name == body.model for c in models):
            versions = sorted(c.version for c in models if c.name == body.model)
            raise self._reject(
                422,
                ErrorCode.UNKNOWN_VERSION,
                f"model {body.model!r} has no version {body.version!r}; "
                f"available: {', '.join(versions)}",
                "version",
            )
        names = sorted({c.name for c in models})
        raise self._reject(
            422,
            ErrorCode.UNKNOWN_MODEL,
            f"no model named {body.model!r}; available: {', '.join(names) or 'none'}",
            "model",
        )

    async def _check_input(self, body: JobRequest, config: ModelConfig) -> None:
        """The input against the model's contract, or the input URL against what this
        service may read; then the webhook URL (no private targets)."""
        if body.input is not None:
            try:
                validate_input(config.adapter, body.input)
            except ContractViolation as exc:
                raise self._reject(422, ErrorCode.INVALID_INPUT, exc.message, exc.field) from exc
        elif body.input_url is not None:
            cc = self.deps.claim_check
            if cc is None or not cc.allows(body.input_url):
                raise self._reject(
                    422,
                    ErrorCode.INPUT_NOT_ALLOWED,
                    "input_url names a bucket this service may not read",
                    "input_url",
                )
        if body.webhook is not None:
            await check_webhook_url(
                self.deps.webhook_guard, str(body.webhook.url), self.metrics.rejected
            )

    async def _admit(self, model: str) -> None:
        """429 when the backlog, overall or of this model, is at its limit: the queue grows
        in the broker instead of the service falling over, and the client knows when to
        retry."""
        refusal = self.admission(await self.backlog.current(), model)
        if refusal is not None:
            raise refusal

    def admission(
        self, snap: Snapshot, model: str, *, ahead: int = 0, ahead_of_model: int = 0
    ) -> ApiError | None:
        """The 429 for one more job of ``model``, or None; ``ahead`` jobs (of them
        ``ahead_of_model`` of this model) were admitted in the same request already."""
        limits = self.deps.config
        checks = [(snap.backlog + ahead, limits.max_backlog, "the backlog")]
        if model in limits.max_backlog_per_model:
            checks.append(
                (
                    snap.model_backlog(model) + ahead_of_model,
                    limits.max_backlog_per_model[model],
                    f"the backlog of model {model!r}",
                )
            )
        for backlog, limit, what in checks:
            if backlog >= limit:
                retry_after = snap.retry_after_s(backlog - limit + 1)
                return self._reject(
                    429,
                    ErrorCode.BACKLOG_FULL,
                    f"{what} ({backlog} jobs) is at its limit of {limit}; retry in {retry_after} s",
                    None,
                    headers={"Retry-After": str(retry_after)},
                    details={"backlog": backlog, "limit": limit},
                )
        return None

    def accepted(self, model: str) -> None:
        """Count a job the broker acknowledged."""
        self.metrics.submitted.labels(model).inc()
        self.backlog.accepted(model)

    # --- the row and the publish ----------------------------------------------------------

    async def _create(
        self, body: JobRequest, config: ModelConfig, key: str | None
    ) -> tuple[JobRecord, bool]:
        """The row, ``queued``; with a key, the existing row when the same key came with
        the same body (created False), 409 when it came with another. Written with the
        rows of the submits that arrived meanwhile, in one transaction."""
        job = new_job(body, config, key, self.deps.config.source)
        try:
            return await self.inserts.create(job)
        except IdempotencyConflict as exc:
            raise self.conflict(exc) from exc

    def conflict(self, exc: IdempotencyConflict) -> ApiError:
        return self._reject(
            409,
            ErrorCode.IDEMPOTENCY_CONFLICT,
            "this Idempotency-Key was used with a different request body",
            "Idempotency-Key",
            details={"job_id": exc.existing.id},
        )

    async def _publish(self, record: JobRecord, body: JobRequest) -> None:
        store = self.deps.store
        try:
            envelope = new_envelope(
                record.id, await self._offloaded(record.id, body), self.deps.config.source
            )
            await self.publisher.publish(envelope)
        except (PublishUnavailable, TransportError) as exc:
            try:
                await asyncio.to_thread(
                    store.abandon_unpublished,
                    record.id,
                    ErrorCode.PUBLISH_UNAVAILABLE.value,
                    f"the broker did not acknowledge: {exc}",
                )
            except STORE_DOWN:  # both down: the client is told the job was not accepted
                log.warning("job %s unpublished and not marked so: the store is down", record.id)
            raise self._reject(
                503,
                ErrorCode.PUBLISH_UNAVAILABLE,
                "the job bus is unavailable; the job was not accepted, retry later",
                None,
                headers={"Retry-After": str(PUBLISH_RETRY_AFTER_S)},
            ) from exc
        except Exception:
            # anything unplanned: the row must not stay queued, holding a backlog slot for a
            # job that will never run
            await asyncio.to_thread(
                store.abandon_unpublished,
                record.id,
                ErrorCode.INTERNAL_ERROR.value,
                "the job could not be published",
            )
            raise

    async def _offloaded(self, job_id: str, body: JobRequest) -> JobRequest:
        """The request as it travels: an input over the inline limit replaced by its S3
        URL."""
        cc = self.deps.claim_check
        if cc is None or body.input is None:
            return body
        url = await cc.offload_input(job_id, body.input)
        if url is None:
            return body
        return body.model_copy(update={"input": None, "input_url": url})

    def _reject(
        self,
        status: int,
        code: ErrorCode,
        message: str,
        field: str | None,
        *,
        headers: dict[str, str] | None = None,
        details: dict[str, Any] | None = None,
    ) -> ApiError:
        self.metrics.rejected.labels(code.value).inc()
        return ApiError(status, code, message, field=field, headers=headers, details=details)


def new_job_id() -> str:
    """A UUIDv7: time-ordered, so ids sort roughly by creation."""
    ms = int(time.time() * 1000)
    rand = uuid.uuid4().int & ((1 << 74) - 1)
    value = (
        (ms << 80) | (0x7 << 76) | ((rand >> 62) << 64) | (0b10 << 62) | (rand & ((1 << 62) - 1))
    )
    return str(uuid.UUID(int=value))


def request_hash(body: JobRequest) -> str:
    """What an Idempotency-Key is bound to besides the job id: the canonical body."""
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def new_job(body: JobRequest, config: ModelConfig, key: str | None, source: str) -> NewJob:
    now = datetime.now(UTC)
    return NewJob(
        id=new_job_id(),
        model=config.name,
        version=config.version,
        input=body.input if body.input is not None else {"$input_url": body.input_url},
        priority=body.priority,
        expires_at=now + timedelta(seconds=body.ttl_s) if body.ttl_s else None,
        metadata=body.metadata,
        webhook=body.webhook.model_dump(mode="json") if body.webhook else None,
        source=source,
        idempotency_key=key,
        request_hash=request_hash(body) if key else None,
        created_at=now,
    )
