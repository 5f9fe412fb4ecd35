"""`/v1/dlq`: list, inspect and redrive dead letters over HTTP (mounted by the wiring)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from fastapi.responses import JSONResponse

from dlq.redrive import Redriver
from dlq.store import (
    DeadLetterFilter,
    DeadLetterRecord,
    DeadLetterStore,
    headers_json,
    payload_preview,
)
from schemas.dlq import (
    ENTRY_ID_PATTERN,
    DeadLetterPage,
    DeadLetterResource,
    RedriveRequest,
    RedriveResult,
)
from schemas.errors import ErrorCode, ErrorDetail, ErrorResponse
from schemas.storable import SafeText, UtcDateTime

# Far past any real queue, and offset + limit stays inside a signed 64-bit integer (the
# PostgreSQL bigint an OFFSET is) and inside what a JSON number carries exactly.
MAX_OFFSET = 2**53 - 1


def resource(r: DeadLetterRecord, *, full: bool = False) -> DeadLetterResource:
    return DeadLetterResource(
        id=r.id,
        job_id=r.job_id,
        model=r.model,
        version=r.version,
        code=r.code,
        message=r.message,
        exception=r.exception,
        attempts=r.attempts,
        origin=r.origin,
        position=r.position,
        created_at=r.created_at,
        redriven_at=r.redriven_at,
        payload=payload_preview(r.payload) if full else None,
        headers=headers_json(r.headers) if full else None,
        payload_size=r.payload_size,
        payload_sha256=r.payload_sha256,
        truncated=r.trimmed,
        payload_url=r.payload_url,
        published=r.published,
    )


def _missing(ids: list[str]) -> JSONResponse:
    body = ErrorResponse(
        error=ErrorDetail(
            code=ErrorCode.DEAD_LETTER_NOT_FOUND,
            message=f"not in the dead-letter queue: {', '.join(ids[:20])}",
            field="ids",
            details={"missing": ids},
        )
    )
    return JSONResponse(body.model_dump(mode="json", exclude_none=True), 404)


def make_router(letters: DeadLetterStore, redriver: Redriver) -> APIRouter:
    router = APIRouter(prefix="/v1/dlq", tags=["dead letters"])
    errors: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorResponse},
        404: {"model": ErrorResponse},
        422: {"model": ErrorResponse},
    }

    @router.get("", response_model=DeadLetterPage, responses=errors)
    async def list_dead_letters(
        model: SafeText | None = None,
        code: SafeText | None = None,
        since: UtcDateTime | None = None,
        until: UtcDateTime | None = None,
        include_redriven: bool = False,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    ) -> DeadLetterPage:
        f = DeadLetterFilter(model, code, since, until, include_redriven)
        rows = await asyncio.to_thread(letters.list, f, limit=limit + 1, offset=offset)
        more = len(rows) > limit
        return DeadLetterPage(
            data=[resource(r) for r in rows[:limit]], next_offset=offset + limit if more else None
        )

    @router.get("/{entry_id}", response_model=DeadLetterResource, responses=errors)
    async def show_dead_letter(
        entry_id: Annotated[str, Path(pattern=ENTRY_ID_PATTERN)],
    ) -> DeadLetterResource | JSONResponse:
        found = await asyncio.to_thread(letters.get_many, [entry_id])
        if entry_id not in found:
            return _missing([entry_id])
        return resource(found[entry_id], full=True)

    @router.post("/redrive", response_model=RedriveResult, responses=errors)
    async def redrive(body: RedriveRequest) -> RedriveResult | JSONResponse:
        if body.ids is not None:
            ids = list(dict.fromkeys(body.ids))
            found = await asyncio.to_thread(letters.get_many, ids)
            missing = [i for i in ids if i not in found]
            if missing:  # all or nothing: a typo must not redrive half a list
                return _missing(missing)
        else:
            assert body.filter is not None
            f = body.filter
            ids = await asyncio.to_thread(
                letters.ids, DeadLetterFilter(f.model, f.code, f.since, f.until)
            )
        report = await redriver.redrive(ids)
        return RedriveResult(
            redriven=report.redriven, already_redriven=report.already_redriven, failed=report.failed
        )

    return router
