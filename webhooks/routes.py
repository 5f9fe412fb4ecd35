"""Webhook routes: the delivery log of a job, replay, endpoints disabled by 410 Gone (list,
enable), and the submit-time URL check."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from prometheus_client import Counter

from jobstore.outbox import WebhookOutbox
from jobstore.store import JobStore
from schemas.errors import ApiError, ErrorCode, ErrorResponse
from schemas.jobs import JOB_ID_PATTERN, WebhookEvent
from schemas.webhooks import (
    DisabledEndpoint,
    DisabledEndpointList,
    EnableEndpoint,
    WebhookDeliveryList,
)
from webhooks.ssrf import UrlGuard, WebhookUrlError

RESOLVE_TIMEOUT_S = 5.0
# the same rule as the API's job routes: anything else (a NUL) is a 422 before the store
JobIdPath = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="A job id.")]
_ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorResponse} for s in (404, 409)}


async def check_webhook_url(guard: UrlGuard, url: str, rejected: Counter | None = None) -> None:
    """422 ``webhook_url_invalid`` / ``webhook_url_forbidden`` on field ``webhook.url``."""
    try:
        await asyncio.wait_for(asyncio.to_thread(guard.check, url), RESOLVE_TIMEOUT_S)
    except TimeoutError as exc:
        error = WebhookUrlError(ErrorCode.WEBHOOK_URL_INVALID, "the host did not resolve in time")
        raise _url_error(error, rejected) from exc
    except WebhookUrlError as exc:
        raise _url_error(exc, rejected) from exc


def _url_error(exc: WebhookUrlError, rejected: Counter | None) -> ApiError:
    if rejected is not None:
        rejected.labels(exc.code.value).inc()
    return ApiError(422, exc.code, exc.message, field="webhook.url")


def _store(request: Request) -> JobStore:
    store: JobStore = request.app.state.inferq.deps.store
    return store


def _outbox(store: JobStore) -> WebhookOutbox:
    return WebhookOutbox(store.engine, writer=store.writer)


def webhook_router() -> APIRouter:
    router = APIRouter(tags=["webhooks"])

    @router.get("/v1/jobs/{job_id}/webhooks", response_model=WebhookDeliveryList, responses=_ERRORS)
    async def list_deliveries(job_id: JobIdPath, request: Request) -> WebhookDeliveryList:
        store = _store(request)
        if await asyncio.to_thread(store.get, job_id) is None:
            raise _not_found(job_id)
        deliveries = await asyncio.to_thread(_outbox(store).for_job, job_id)
        return WebhookDeliveryList(data=deliveries)

    @router.post(
        "/v1/jobs/{job_id}/webhooks/replay",
        status_code=202,
        response_model=WebhookDeliveryList,
        responses=_ERRORS,
    )
    async def replay(
        job_id: JobIdPath,
        request: Request,
        event: list[WebhookEvent] | None = Query(default=None),
    ) -> WebhookDeliveryList:
        """Send the job's webhooks again, with the same `webhook-id`s and bodies."""
        store = _store(request)
        record = await asyncio.to_thread(store.get, job_id)
        if record is None:
            raise _not_found(job_id)
        if not record.webhook:
            raise ApiError(
                409,
                ErrorCode.WEBHOOK_NOT_CONFIGURED,
                f"job {job_id} was submitted without a webhook",
                field="webhook",
            )
        outbox = _outbox(store)
        if await asyncio.to_thread(outbox.replay, job_id, event) == 0:
            raise ApiError(
                409,
                ErrorCode.WEBHOOK_NOTHING_TO_REPLAY,
                f"job {job_id} has no webhook deliveries yet"
                + (" for these events" if event else ""),
                field="event" if event else None,
            )
        return WebhookDeliveryList(data=await asyncio.to_thread(outbox.for_job, job_id))

    @router.get("/v1/webhooks/endpoints/disabled", response_model=DisabledEndpointList)
    async def disabled_endpoints(request: Request) -> DisabledEndpointList:
        """Webhook URLs that answered 410 Gone, to which nothing is sent."""
        outbox = _outbox(_store(request))
        return DisabledEndpointList(data=await asyncio.to_thread(outbox.disabled_endpoints))

    @router.post(
        "/v1/webhooks/endpoints/enable",
        response_model=DisabledEndpoint,
        responses={**_ERRORS, 400: {"model": ErrorResponse}},  # a body that is not JSON
    )
    async def enable_endpoint(body: EnableEndpoint, request: Request) -> DisabledEndpoint:
        """Send to a URL disabled by 410 Gone again (its settled deliveries: replay the jobs);
        the answer is what it was disabled for."""
        outbox = _outbox(_store(request))
        enabled = await asyncio.to_thread(outbox.enable_endpoint, body.url)
        if enabled is None:
            raise ApiError(
                404,
                ErrorCode.WEBHOOK_ENDPOINT_NOT_DISABLED,
                f"the webhook endpoint {body.url!r} is not disabled",
                field="url",
            )
        return enabled

    return router


def _not_found(job_id: str) -> ApiError:
    return ApiError(404, ErrorCode.JOB_NOT_FOUND, f"no job with id {job_id!r}", field="id")
