"""The front door: the FastAPI app for /v1/jobs, models, health and metrics, assembled.

Everything it needs arrives in ``ApiDeps``; there is no global state. The routes are in
``producers/routes/``, one module per resource; what a submit does is
``producers/submission.py``'s. A job is answered 202 only once the broker acknowledged its
publish; a publish that fails for good turns into 503 and the job row says so, so no
accepted job is ever lost.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI
from prometheus_client import CollectorRegistry

from jobstore.store import JobStore
from producers.autoscale import AutoscalePolicy
from producers.backpressure import BacklogMonitor
from producers.docs import install_offline_docs
from producers.errors import install_handlers
from producers.events import ChangeFeed
from producers.limits import BodySizeLimit, no_unknown_query
from producers.metrics import ApiMetrics
from producers.observe import RequestMetrics
from producers.openapi import document_models
from producers.publish import JobPublisher
from producers.routes.events import events_router
from producers.routes.jobs import jobs_router
from producers.routes.models import models_router
from producers.routes.system import system_router
from producers.state import ApiState
from producers.submission import SubmissionService, new_job_id
from producers.waiters import WaiterHub
from schemas.contracts import ModelConfig
from schemas.envelope import JobEnvelope
from transports.base import DepthProbe, Publisher
from transports.blobs import ClaimCheck
from transports.transport import Encoded
from webhooks.routes import webhook_router
from webhooks.ssrf import UrlGuard

__all__ = ["ApiConfig", "ApiDeps", "create_app", "new_job_id"]


@dataclass
class ApiConfig:
    topic: str
    source: str = "urn:inferq:api"
    max_backlog: int = 100_000
    max_backlog_per_model: dict[str, int] = field(default_factory=dict)
    max_body_bytes: int = 1_048_576
    max_batch_body_bytes: int = 16_777_216  # POST /v1/jobs/batch: up to 1,000 requests
    publish_attempts: int = 4
    publish_timeout_s: float = 10.0
    backlog_cache_s: float = 0.25
    asyncapi: dict[str, Any] | None = None
    store_retry_after_s: int = 2  # Retry-After of a 503 store_unavailable
    readiness_timeout_s: float = 3.0  # the most one /readyz check may take
    sse_heartbeat_s: float = 15.0  # a comment on an idle event stream, so proxies keep it
    wait_sweep_s: float = 1.0  # waiters: the slow sweep behind the change feed
    wait_poll_s: float = 0.005  # waiters on SQLite: how often data_version is looked at


@dataclass
class ApiDeps:
    store: JobStore
    publisher: Publisher
    models: Callable[[], list[ModelConfig]]
    config: ApiConfig
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    manage_publisher: bool = True  # start/stop it with the app
    depth: DepthProbe | None = None  # bus lag, for admission and autoscaling
    autoscale: AutoscalePolicy = field(default_factory=AutoscalePolicy)
    claim_check: ClaimCheck | None = None  # S3 for large inputs and results; None: inline only
    webhook_guard: UrlGuard = field(default_factory=UrlGuard)  # SSRF: no private targets
    # how a job's CloudEvent travels: the transport's ``encode``; None: binary mode
    encode: Callable[[JobEnvelope], Encoded] | None = None
    # what wakes event streams when a job changes; None: the waiter hub (HubChanges)
    changes: ChangeFeed | None = None


def create_app(deps: ApiDeps) -> FastAPI:
    metrics = ApiMetrics(deps.registry)
    publisher = JobPublisher(
        deps.publisher,
        deps.config.topic,
        attempts=deps.config.publish_attempts,
        timeout_s=deps.config.publish_timeout_s,
        encode=deps.encode,
    )
    monitor = BacklogMonitor(
        deps.store,
        depth=deps.depth,
        policy=deps.autoscale,
        registry=deps.registry,
        ttl_s=deps.config.backlog_cache_s,
    )
    publisher.on_retry = metrics.publish_retries.inc  # each retry once, as it happens
    waiters = WaiterHub(
        deps.store.statuses,
        deps.store.change_feed(poll_s=deps.config.wait_poll_s),
        fetch=deps.store.get_many,
        sweep_s=deps.config.wait_sweep_s,
        metrics=metrics,
    )
    state = ApiState(
        deps,
        publisher,
        metrics,
        monitor,
        SubmissionService(deps, publisher, metrics, monitor),
        waiters,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if deps.manage_publisher:
            await deps.publisher.start()
        if deps.depth is not None:
            await deps.depth.start()
        waiters.start()
        try:
            yield
        finally:
            await waiters.stop()
            if deps.depth is not None:
                await deps.depth.stop()
            if deps.manage_publisher:
                await deps.publisher.stop()

    app = FastAPI(
        title="inferq",
        version="0.1.0",
        description="Asynchronous ML inference jobs: submit, poll or wait, get results.",
        lifespan=lifespan,
        docs_url=None,  # served below from the package's own assets: no CDN, works offline
        dependencies=[Depends(no_unknown_query)],
    )
    install_offline_docs(app)
    app.state.inferq = state
    install_handlers(
        app, store_retry_after_s=deps.config.store_retry_after_s, rejected=metrics.rejected
    )
    app.add_middleware(
        BodySizeLimit,
        max_bytes=deps.config.max_body_bytes,
        per_path={"/v1/jobs/batch": deps.config.max_batch_body_bytes},
    )

    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: it sees every answer
    app.include_router(jobs_router())
    app.include_router(events_router())
    app.include_router(models_router())
    app.include_router(system_router())
    app.include_router(webhook_router())
    document_models(app, deps.models, inline_only=deps.claim_check is None)
    return app
