"""Bulk submit, everything ``POST /v1/jobs/batch`` does behind its route.

Each item goes through the same checks as a single submit (``SubmissionService``) and gets
the answer it alone would have had; valid items are accepted even when others are not. The
accepted ones are admitted against the backlog together (the batch counts against its own
limit), their rows written in one transaction, and their events published concurrently, so
the producer sends them as one batch. An item whose publish is not acknowledged is marked
so in the store and answered ``503 publish_unavailable``: no accepted-but-lost job.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from jobstore.errors import IdempotencyConflict, JobStoreError, StoreUnavailable
from producers.errors import validation_details
from producers.submission import SubmissionService, new_job
from schemas.batch import MAX_BATCH_JOBS, BatchItem
from schemas.contracts import ModelConfig
from schemas.errors import ApiError, ErrorCode, ErrorDetail
from schemas.jobs import JobRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Valid:
    position: int
    body: JobRequest
    config: ModelConfig
    key: str | None


class BulkSubmission:
    """Answers a list of raw items with one ``BatchItem`` each, in order; raises
    ``ApiError`` only for what is wrong with the batch as a whole."""

    def __init__(self, single: SubmissionService) -> None:
        self.single = single

    async def submit(self, items: Sequence[Any]) -> list[BatchItem]:
        self._check_size(items)
        answers: dict[int, BatchItem] = {}
        valid: list[_Valid] = []
        for position, raw in enumerate(items):
            try:
                valid.append(await self._check(position, raw))
            except ApiError as exc:
                answers[position] = _failed(exc, position)
        admitted = await self._admit(valid, answers)
        await self._create_and_publish(admitted, answers)
        return [answers[p] for p in range(len(items))]

    def _check_size(self, items: Sequence[Any]) -> None:
        if not items:
            raise self.single._reject(
                422, ErrorCode.BATCH_EMPTY, "jobs must hold at least one job request", "jobs"
            )
        if len(items) > MAX_BATCH_JOBS:
            raise self.single._reject(
                413,
                ErrorCode.BATCH_TOO_LARGE,
                f"a batch holds at most {MAX_BATCH_JOBS} jobs; this one has {len(items)}",
                "jobs",
                details={"limit": MAX_BATCH_JOBS, "count": len(items)},
            )

    async def _check(self, position: int, raw: Any) -> _Valid:
        """The item's shape, key, model and input, as a single submit checks them."""
        if not isinstance(raw, Mapping):
            raise self.single._reject(
                422, ErrorCode.FIELD_INVALID, "a batch item must be a job request object", None
            )
        fields = dict(raw)
        key = fields.pop("idempotency_key", None)
        if key is not None and not isinstance(key, str):
            raise self.single._reject(
                400,
                ErrorCode.INVALID_IDEMPOTENCY_KEY,
                "idempotency_key must be a string of 1-255 printable ASCII characters",
                "idempotency_key",
            )
        try:
            body = JobRequest.model_validate(fields)
        except ValidationError as exc:
            status, details = validation_details(exc.errors())
            for d in details:
                self.single.metrics.rejected.labels(d.code.value).inc()
            raise _ItemInvalid(status, details) from exc
        self.single._check_key(key)
        config = self.single._resolve(body)
        await self.single._check_input(body, config)
        return _Valid(position, body, config, key)

    async def _admit(self, valid: list[_Valid], answers: dict[int, BatchItem]) -> list[_Valid]:
        """Against one backlog snapshot, counting the items admitted before each."""
        if not valid:
            return []
        snap = await self.single.backlog.current()
        admitted: list[_Valid] = []
        per_model: dict[str, int] = {}
        for item in valid:
            name = item.config.name
            refusal = self.single.admission(
                snap, name, ahead=len(admitted), ahead_of_model=per_model.get(name, 0)
            )
            if refusal is not None:
                answers[item.position] = _failed(refusal, item.position)
                continue
            admitted.append(item)
            per_model[name] = per_model.get(name, 0) + 1
        return admitted

    async def _create_and_publish(
        self, admitted: list[_Valid], answers: dict[int, BatchItem]
    ) -> None:
        if not admitted:
            return
        source = self.single.deps.config.source
        jobs = [new_job(i.body, i.config, i.key, source) for i in admitted]
        created = await asyncio.to_thread(self.single.deps.store.create_many, jobs)
        to_publish = []
        for item, outcome in zip(admitted, created, strict=True):
            if isinstance(outcome, IdempotencyConflict):
                answers[item.position] = _failed(self.single.conflict(outcome), item.position)
            elif isinstance(outcome, JobStoreError):
                # judged alone after the batch's transaction failed: its row is not written
                answers[item.position] = _failed(self._unwritten(outcome), item.position)
            elif outcome[1]:
                to_publish.append((item, outcome[0]))
            else:  # a replay of an earlier submit with the same key and body
                answers[item.position] = BatchItem(status=200, job=outcome[0].to_resource())
        results = await asyncio.gather(
            *(self.single._publish(record, item.body) for item, record in to_publish),
            return_exceptions=True,
        )
        for (item, record), result in zip(to_publish, results, strict=True):
            if isinstance(result, ApiError):
                answers[item.position] = _failed(result, item.position)
            elif isinstance(result, Exception):
                # its row is already marked failed (never left queued); the others were
                # accepted, so the batch must still answer
                log.error("job %s: publish failed", record.id, exc_info=result)
                answers[item.position] = _failed(
                    ApiError(500, ErrorCode.INTERNAL_ERROR, "the job could not be published"),
                    item.position,
                )
            elif isinstance(result, BaseException):
                raise result
            else:
                self.single.accepted(item.config.name)
                answers[item.position] = BatchItem(status=202, job=record.to_resource())

    def _unwritten(self, exc: JobStoreError) -> ApiError:
        if isinstance(exc, StoreUnavailable):
            retry_after = self.single.deps.config.store_retry_after_s
            return self.single._reject(
                503,
                ErrorCode.STORE_UNAVAILABLE,
                "the job store is unavailable; retry later",
                None,
                headers={"Retry-After": str(retry_after)},
            )
        log.error("a batch item could not be written: %s", exc)
        return ApiError(500, ErrorCode.INTERNAL_ERROR, "the job could not be written")


class _ItemInvalid(ApiError):
    """An item that is not a job request, with every problem found."""

    def __init__(self, status: int, details: list[ErrorDetail]) -> None:
        super().__init__(status, details[0].code, details[0].message, field=details[0].field)
        self.all = details


def _failed(exc: ApiError, position: int) -> BatchItem:
    details = exc.all if isinstance(exc, _ItemInvalid) else [exc.detail]
    located = [_locate(d, position) for d in details]
    return BatchItem(
        status=exc.status, error=located[0], errors=located if len(located) > 1 else None
    )


def _locate(detail: ErrorDetail, position: int) -> ErrorDetail:
    """The field as the batch names it: ``jobs[3].input.text``; a header of a single
    submit (``Idempotency-Key``) is the item's own field here."""
    field = detail.field
    if field == "Idempotency-Key":
        field = "idempotency_key"
    where = f"jobs[{position}]" + (f".{field}" if field and field != "body" else "")
    message = detail.message
    if detail.field and message.startswith(f"{detail.field}: "):
        message = f"{where}: {message[len(detail.field) + 2 :]}"
    return detail.model_copy(update={"field": where, "message": message})
