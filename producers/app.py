"""The front door: the FastAPI app for /v1/jobs, models, health and metrics.

Everything it needs arrives in ``ApiDeps``; there is no global state. A job is answered 202
only once the broker acknowledged its publish; a publish that fails for good turns into 503
and the job row says so, so no accepted job is ever lost.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from jobstore.errors import IdempotencyConflict, IllegalTransition, InvalidCursor, JobNotFound
from jobstore.records import NewJob
from jobstore.store import JobStore
from producers.errors import ApiError, install_handlers
from producers.limits import BodySizeLimit
from producers.metrics import ApiMetrics
from producers.publish import JobPublisher, PublishUnavailable
from producers.ssrf import UrlGuard
from producers.webhook_routes import check_webhook_url, webhook_router
from schemas.contracts import (
    ADAPTER_INPUTS,
    ContractViolation,
    ModelConfig,
    resolve_version,
    validate_input,
)
from schemas.envelope import new_envelope
from schemas.errors import ErrorCode, ErrorResponse
from schemas.jobs import JobPage, JobRequest, JobResource, JobStatus, ModelInfo, ModelList
from transports.base import Publisher

IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
MAX_WAIT_S = 60.0


@dataclass
class ApiConfig:
    topic: str
    source: str = "urn:inferq:api"
    max_backlog: int = 100_000
    max_body_bytes: int = 1_048_576
    publish_attempts: int = 4
    publish_timeout_s: float = 10.0
    backlog_cache_s: float = 0.25
    asyncapi: dict[str, Any] | None = None


@dataclass
class ApiDeps:
    store: JobStore
    publisher: Publisher
    models: Callable[[], list[ModelConfig]]
    config: ApiConfig
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    manage_publisher: bool = True  # start/stop it with the app
    webhook_guard: UrlGuard = field(default_factory=UrlGuard)  # SSRF: no private targets


class _Backlog:
    """Admission control reads the backlog at most every ``ttl`` seconds, not per request."""

    def __init__(self, store: JobStore, ttl: float) -> None:
        self.store, self.ttl = store, ttl
        self.value, self.read_at = 0, float("-inf")

    async def current(self) -> int:
        now = time.monotonic()
        if now - self.read_at > self.ttl:
            self.value = await asyncio.to_thread(self.store.backlog)
            self.read_at = now
        return self.value

    def bump(self) -> None:
        self.value += 1


@dataclass
class _State:
    deps: ApiDeps
    publisher: JobPublisher
    metrics: ApiMetrics
    backlog: _Backlog


def _state(request: Request) -> _State:
    state: _State = request.app.state.inferq
    return state


State = Annotated[_State, Depends(_state)]

_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (400, 404, 409, 413, 422, 429, 503)
}


def new_job_id() -> str:
    """A UUIDv7: time-ordered, so ids sort roughly by creation."""
    ms = int(time.time() * 1000)
    rand = uuid.uuid4().int & ((1 << 74) - 1)
    value = (
        (ms << 80) | (0x7 << 76) | ((rand >> 62) << 64) | (0b10 << 62) | (rand & ((1 << 62) - 1))
    )
    return str(uuid.UUID(int=value))


def create_app(deps: ApiDeps) -> FastAPI:
    metrics = ApiMetrics(deps.registry)
    publisher = JobPublisher(
        deps.publisher,
        deps.config.topic,
        attempts=deps.config.publish_attempts,
        timeout_s=deps.config.publish_timeout_s,
    )
    state = _State(deps, publisher, metrics, _Backlog(deps.store, deps.config.backlog_cache_s))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if deps.manage_publisher:
            await deps.publisher.start()
        try:
            yield
        finally:
            if deps.manage_publisher:
                await deps.publisher.stop()

    app = FastAPI(
        title="inferq",
        version="0.1.0",
        description="Asynchronous ML inference jobs: submit, poll or wait, get results.",
        lifespan=lifespan,
    )
    app.state.inferq = state
    install_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=deps.config.max_body_bytes)

    @app.middleware("http")
    async def observe(request: Request, call_next: Any) -> Response:
        started = time.perf_counter()
        response: Response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests.labels(request.method, path, str(response.status_code)).inc()
        metrics.latency.labels(request.method, path).observe(time.perf_counter() - started)
        return response

    _routes(app)
    app.include_router(webhook_router())
    return app


def _routes(app: FastAPI) -> None:
    @app.post(
        "/v1/jobs",
        status_code=202,
        response_model=JobResource,
        responses={200: {"model": JobResource, "description": "Idempotent replay"}, **_ERRORS},
        tags=["jobs"],
    )
    async def submit_job(
        body: JobRequest,
        response: Response,
        st: State,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> JobResource:
        if idempotency_key is not None and not IDEMPOTENCY_KEY.match(idempotency_key):
            raise _reject(
                st,
                400,
                ErrorCode.INVALID_IDEMPOTENCY_KEY,
                "Idempotency-Key must be 1-255 printable ASCII characters",
                "Idempotency-Key",
            )
        config = _resolve(st, body)
        try:
            validate_input(config.adapter, body.input)
        except ContractViolation as exc:
            raise _reject(st, 422, ErrorCode.INVALID_INPUT, exc.message, exc.field) from exc
        if body.webhook is not None:
            await check_webhook_url(
                st.deps.webhook_guard, str(body.webhook.url), st.metrics.rejected
            )

        backlog = await st.backlog.current()
        st.metrics.backlog.set(backlog)
        if backlog >= st.deps.config.max_backlog:
            raise _reject(
                st,
                429,
                ErrorCode.BACKLOG_FULL,
                f"backlog of {backlog} jobs is at its limit of "
                f"{st.deps.config.max_backlog}; retry later",
                None,
                headers={"Retry-After": "5"},
            )

        job = _new_job(body, config, idempotency_key, st.deps.config.source)
        try:
            record, created = await asyncio.to_thread(st.deps.store.create, job)
        except IdempotencyConflict as exc:
            raise _reject(
                st,
                409,
                ErrorCode.IDEMPOTENCY_CONFLICT,
                "this Idempotency-Key was used with a different request body",
                "Idempotency-Key",
                details={"job_id": exc.existing.id},
            ) from exc
        if not created:
            response.status_code = 200
            response.headers["Location"] = f"/v1/jobs/{record.id}"
            return record.to_resource()

        envelope = new_envelope(record.id, body, st.deps.config.source)
        retries_before = st.publisher.retries
        try:
            await st.publisher.publish(envelope)
        except PublishUnavailable as exc:
            await asyncio.to_thread(
                st.deps.store.abandon_unpublished,
                record.id,
                ErrorCode.PUBLISH_UNAVAILABLE.value,
                f"the broker did not acknowledge: {exc}",
            )
            raise _reject(
                st,
                503,
                ErrorCode.PUBLISH_UNAVAILABLE,
                "the job bus is unavailable; the job was not accepted, retry later",
                None,
                headers={"Retry-After": "2"},
            ) from exc
        finally:
            st.metrics.publish_retries.inc(st.publisher.retries - retries_before)
        st.metrics.submitted.labels(config.name).inc()
        st.backlog.bump()
        response.headers["Location"] = f"/v1/jobs/{record.id}"
        return record.to_resource()

    @app.get("/v1/jobs/{job_id}", response_model=JobResource, responses=_ERRORS, tags=["jobs"])
    async def get_job(
        job_id: str,
        st: State,
        wait: Annotated[
            float,
            Query(
                ge=0,
                le=MAX_WAIT_S,
                description="Hold up to N seconds until the job is terminal (or, for an id not "
                "yet known, until it appears).",
            ),
        ] = 0,
    ) -> JobResource:
        store = st.deps.store
        record = await asyncio.to_thread(store.get, job_id)
        # With ?wait, an id not yet known is waited for too: a job published straight onto
        # the bus has no row until a worker picks it up.
        deadline = time.monotonic() + wait
        interval = 0.002
        while (record is None or not record.status.terminal) and time.monotonic() < deadline:
            await asyncio.sleep(min(interval, max(deadline - time.monotonic(), 0)))
            record = await asyncio.to_thread(store.get, job_id) or record
            interval = min(interval * 1.5, 0.05)
        if record is None:
            raise _not_found(job_id)
        return record.to_resource()

    @app.get("/v1/jobs", response_model=JobPage, responses=_ERRORS, tags=["jobs"])
    async def list_jobs(
        st: State,
        status: JobStatus | None = None,
        model: str | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: str | None = None,
    ) -> JobPage:
        try:
            records, next_cursor = await asyncio.to_thread(
                st.deps.store.list, status=status, model=model, limit=limit, cursor=cursor
            )
        except InvalidCursor as exc:
            raise ApiError(
                400, ErrorCode.INVALID_CURSOR, "cursor is malformed or expired", field="cursor"
            ) from exc
        return JobPage(data=[r.to_resource() for r in records], next_cursor=next_cursor)

    @app.post(
        "/v1/jobs/{job_id}/cancel", response_model=JobResource, responses=_ERRORS, tags=["jobs"]
    )
    async def cancel_job(job_id: str, st: State) -> JobResource:
        try:
            record = await asyncio.to_thread(st.deps.store.cancel, job_id)
        except JobNotFound as exc:
            raise _not_found(job_id) from exc
        except IllegalTransition as exc:
            raise ApiError(
                409,
                ErrorCode.JOB_NOT_CANCELLABLE,
                f"job {job_id} is {exc.current.value}; only queued jobs can be cancelled",
                field="status",
            ) from exc
        return record.to_resource()

    @app.get("/v1/models", response_model=ModelList, tags=["models"])
    async def list_models(st: State) -> ModelList:
        providers = await asyncio.to_thread(st.deps.store.providers)
        data = []
        for c in sorted(st.deps.models(), key=lambda c: (c.name, c.version)):
            schema = _input_schema(c.adapter)
            data.append(
                ModelInfo(
                    name=c.name,
                    version=c.version,
                    default=resolve_version(st.deps.models(), c.name, None) == c,
                    adapter=c.adapter,
                    max_batch_size=c.max_batch_size,
                    max_wait_ms=c.max_wait_ms,
                    input_schema=schema,
                    providers=sorted(providers.get(c.key, set())),
                )
            )
        return ModelList(data=data)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz(st: State) -> JSONResponse:
        checks: dict[str, Any] = {}
        ready = True
        try:
            await asyncio.to_thread(st.deps.store.ping)
            checks["store"] = "ok"
        except Exception as exc:
            checks["store"] = f"unavailable: {exc}"
            ready = False
        models = st.deps.models()
        checks["models"] = [f"{c.name}/{c.version}" for c in models]
        if not models:
            ready = False
        providers = await asyncio.to_thread(st.deps.store.providers)
        checks["workers"] = {f"{n}/{v}": sorted(p) for (n, v), p in providers.items()}
        return JSONResponse(
            {"status": "ready" if ready else "not_ready", "checks": checks}, 200 if ready else 503
        )

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    async def metrics_endpoint(st: State) -> Response:
        return Response(generate_latest(st.deps.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/asyncapi.json", tags=["ops"])
    async def asyncapi(st: State) -> JSONResponse:
        doc = st.deps.config.asyncapi
        if doc is None:
            raise ApiError(404, ErrorCode.NOT_FOUND, "no AsyncAPI document for this transport")
        return JSONResponse(doc)


def _reject(
    st: _State,
    status: int,
    code: ErrorCode,
    message: str,
    field: str | None,
    *,
    headers: dict[str, str] | None = None,
    details: dict[str, Any] | None = None,
) -> ApiError:
    st.metrics.rejected.labels(code.value).inc()
    return ApiError(status, code, message, field=field, headers=headers, details=details)


def _not_found(job_id: str) -> ApiError:
    return ApiError(404, ErrorCode.JOB_NOT_FOUND, f"no job with id {job_id!r}", field="id")


def _resolve(st: _State, body: JobRequest) -> ModelConfig:
    models = st.deps.models()
    config = resolve_version(models, body.model, body.version)
    if config is not None:
        return config
    if any(c.name == body.model for c in models):
        versions = sorted(c.version for c in models if c.name == body.model)
        raise _reject(
            st,
            422,
            ErrorCode.UNKNOWN_VERSION,
            f"model {body.model!r} has no version {body.version!r}; "
            f"available: {', '.join(versions)}",
            "version",
        )
    names = sorted({c.name for c in models})
    raise _reject(
        st,
        422,
        ErrorCode.UNKNOWN_MODEL,
        f"no model named {body.model!r}; available: {', '.join(names) or 'none'}",
        "model",
    )


def _input_schema(adapter: str) -> dict[str, Any]:
    return ADAPTER_INPUTS[adapter].model_json_schema()


def request_hash(body: JobRequest) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _new_job(body: JobRequest, config: ModelConfig, key: str | None, source: str) -> NewJob:
    now = datetime.now(UTC)
    return NewJob(
        id=new_job_id(),
        model=config.name,
        version=config.version,
        input=body.input,
        priority=body.priority,
        expires_at=now + timedelta(seconds=body.ttl_s) if body.ttl_s else None,
        metadata=body.metadata,
        webhook=body.webhook.model_dump(mode="json") if body.webhook else None,
        source=source,
        idempotency_key=key,
        request_hash=request_hash(body) if key else None,
        created_at=now,
    )
