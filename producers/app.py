"""The front door: the FastAPI app for /v1/jobs, models, health and metrics.

Everything it needs arrives in ``ApiDeps``; there is no global state. A job is answered 202
only once the broker acknowledged its publish; a publish that fails for good turns into 503
and the job row says so, so no accepted job is ever lost.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
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
from jobstore.records import JobRecord, NewJob
from jobstore.store import JobStore
from producers.autoscale import AutoscalePolicy
from producers.backpressure import BacklogMonitor
from producers.docs import install_offline_docs
from producers.errors import STORE_DOWN, ApiError, install_handlers
from producers.limits import BodySizeLimit, JobIdPath, no_unknown_query
from producers.metrics import ApiMetrics
from producers.publish import JobPublisher, PublishUnavailable
from producers.readiness import assess
from schemas.contracts import (
    ADAPTER_INPUTS,
    ContractViolation,
    ModelConfig,
    resolve_version,
    validate_input,
)
from schemas.envelope import new_envelope
from schemas.errors import ErrorCode, ErrorResponse
from schemas.jobs import (
    MODEL_NAME_PATTERN,
    AutoscaleResource,
    JobPage,
    JobRequest,
    JobResource,
    JobStatus,
    ModelInfo,
    ModelList,
)
from transports.base import DepthProbe, Publisher, TransportError
from transports.blobs import ClaimCheck
from webhooks.routes import check_webhook_url, webhook_router
from webhooks.ssrf import UrlGuard

IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"
IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)
MAX_WAIT_S = 60.0

log = logging.getLogger(__name__)


@dataclass
class ApiConfig:
    topic: str
    source: str = "urn:inferq:api"
    max_backlog: int = 100_000
    max_backlog_per_model: dict[str, int] = field(default_factory=dict)
    max_body_bytes: int = 1_048_576
    publish_attempts: int = 4
    publish_timeout_s: float = 10.0
    backlog_cache_s: float = 0.25
    asyncapi: dict[str, Any] | None = None
    structured_events: bool = False  # publish structured CloudEvents (SQS) instead of binary
    store_retry_after_s: int = 2  # Retry-After of a 503 store_unavailable
    readiness_timeout_s: float = 3.0  # the most one /readyz check may take


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


@dataclass
class _State:
    deps: ApiDeps
    publisher: JobPublisher
    metrics: ApiMetrics
    backlog: BacklogMonitor


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
        structured=deps.config.structured_events,
    )
    monitor = BacklogMonitor(
        deps.store,
        depth=deps.depth,
        policy=deps.autoscale,
        registry=deps.registry,
        ttl_s=deps.config.backlog_cache_s,
    )
    state = _State(deps, publisher, metrics, monitor)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if deps.manage_publisher:
            await deps.publisher.start()
        if deps.depth is not None:
            await deps.depth.start()
        try:
            yield
        finally:
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
    _document_models(app, deps.models, inline_only=deps.claim_check is None)
    return app


def _document_models(
    app: FastAPI, models: Callable[[], list[ModelConfig]], *, inline_only: bool
) -> None:
    """The OpenAPI document states what a submit must hold, as of each fetch: the known
    model names and versions, each model's input contract, and exactly one of ``input``
    and ``input_url`` (only ``input`` without a claim-check store)."""
    generate = app.openapi  # FastAPI's own, which caches the static part

    def openapi() -> dict[str, Any]:
        doc = copy.deepcopy(generate())
        _error_shape_for_422(doc)
        configs = models()
        request = doc.get("components", {}).get("schemas", {}).get("JobRequest")
        if request is None:  # no submit route (never in this app; keeps the doc servable)
            return doc
        props = request["properties"]
        if configs:
            props["model"]["enum"] = sorted({c.name for c in configs})
            by_contract: dict[tuple[str, str], list[str]] = {}
            for c in configs:
                by_contract.setdefault((c.name, c.adapter), []).append(c.version)
            request["anyOf"] = [
                {
                    "properties": {
                        "model": {"const": name},
                        "version": {"anyOf": [{"enum": sorted(versions)}, {"type": "null"}]},
                        "input": {"anyOf": [_input_schema(adapter), {"type": "null"}]},
                    }
                }
                for (name, adapter), versions in sorted(by_contract.items())
            ]
        if inline_only:  # no claim-check store: input_url is refused, input is required
            props.pop("input_url", None)
            request["required"] = sorted({*request.get("required", []), "input"})
            props["input"] = {k: v for k, v in props["input"].items() if k != "anyOf"} | {
                "type": "object"
            }
        else:
            request["oneOf"] = [
                {"required": ["input"], "properties": {"input": {"type": "object"}}},
                {"required": ["input_url"], "properties": {"input_url": {"type": "string"}}},
            ]
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def _error_shape_for_422(doc: dict[str, Any]) -> None:
    """FastAPI documents its own 422 body ({"detail": ...}); this app answers ErrorResponse."""
    schemas = doc.get("components", {}).get("schemas", {})
    if "ErrorResponse" not in schemas:
        return
    for operation in (op for item in doc.get("paths", {}).values() for op in item.values()):
        answer = operation.get("responses", {}).get("422", {})
        media = answer.get("content", {}).get("application/json", {})
        if media.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
            media["schema"] = {"$ref": "#/components/schemas/ErrorResponse"}
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)


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
        idempotency_key: Annotated[
            str | None,
            Header(
                alias="Idempotency-Key",
                description="Replays of the same key and body return the same job (400 "
                "`invalid_idempotency_key` when it does not match the pattern).",
                json_schema_extra={"pattern": IDEMPOTENCY_KEY_PATTERN},
            ),
        ] = None,
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
        if body.input is not None:
            try:
                validate_input(config.adapter, body.input)
            except ContractViolation as exc:
                raise _reject(st, 422, ErrorCode.INVALID_INPUT, exc.message, exc.field) from exc
        elif body.input_url is not None:
            cc = st.deps.claim_check
            if cc is None or not cc.allows(body.input_url):
                raise _reject(
                    st,
                    422,
                    ErrorCode.INPUT_NOT_ALLOWED,
                    "input_url names a bucket this service may not read",
                    "input_url",
                )
        if body.webhook is not None:
            await check_webhook_url(
                st.deps.webhook_guard, str(body.webhook.url), st.metrics.rejected
            )

        await _admit(st, config.name)

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

        retries_before = st.publisher.retries
        try:
            envelope = new_envelope(
                record.id, await _offloaded(st, record.id, body), st.deps.config.source
            )
            await st.publisher.publish(envelope)
        except (PublishUnavailable, TransportError) as exc:
            try:
                await asyncio.to_thread(
                    st.deps.store.abandon_unpublished,
                    record.id,
                    ErrorCode.PUBLISH_UNAVAILABLE.value,
                    f"the broker did not acknowledge: {exc}",
                )
            except STORE_DOWN:  # both down: the client is told the job was not accepted
                log.warning("job %s unpublished and not marked so: the store is down", record.id)
            raise _reject(
                st,
                503,
                ErrorCode.PUBLISH_UNAVAILABLE,
                "the job bus is unavailable; the job was not accepted, retry later",
                None,
                headers={"Retry-After": "2"},
            ) from exc
        except Exception:
            # anything unplanned: the row must not stay queued, holding a backlog slot for a
            # job that will never run
            await asyncio.to_thread(
                st.deps.store.abandon_unpublished,
                record.id,
                ErrorCode.INTERNAL_ERROR.value,
                "the job could not be published",
            )
            raise
        finally:
            st.metrics.publish_retries.inc(st.publisher.retries - retries_before)
        st.metrics.submitted.labels(config.name).inc()
        st.backlog.accepted(config.name)
        response.headers["Location"] = f"/v1/jobs/{record.id}"
        return record.to_resource()

    @app.get("/v1/jobs/{job_id}", response_model=JobResource, responses=_ERRORS, tags=["jobs"])
    async def get_job(
        job_id: JobIdPath,
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
            # fast polls while a quick job is likely to finish, then back off to spare the store
            waited = time.monotonic() - (deadline - wait)
            interval = 0.003 if waited < 0.5 else min(interval * 1.5, 0.05)
        if record is None:
            raise _not_found(job_id)
        return await _resource(st, record)

    @app.get("/v1/jobs", response_model=JobPage, responses=_ERRORS, tags=["jobs"])
    async def list_jobs(
        st: State,
        status: JobStatus | None = None,
        model: Annotated[str | None, Query(pattern=MODEL_NAME_PATTERN)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[
            str | None,
            Query(
                description="`next_cursor` of the previous page; any other value is 400 "
                "`invalid_cursor`.",
                # documented shape only: the store decodes it, and refuses it with 400
                json_schema_extra={"minLength": 1, "pattern": r"^[A-Za-z0-9_\-]+$"},
            ),
        ] = None,
    ) -> JobPage:
        try:
            records, next_cursor = await asyncio.to_thread(
                st.deps.store.list, status=status, model=model, limit=limit, cursor=cursor
            )
        except InvalidCursor as exc:
            raise ApiError(
                400, ErrorCode.INVALID_CURSOR, "cursor is malformed or expired", field="cursor"
            ) from exc
        return JobPage(data=[await _resource(st, r) for r in records], next_cursor=next_cursor)

    @app.post(
        "/v1/jobs/{job_id}/cancel", response_model=JobResource, responses=_ERRORS, tags=["jobs"]
    )
    async def cancel_job(job_id: JobIdPath, st: State) -> JobResource:
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

    @app.get("/v1/autoscale", response_model=AutoscaleResource, tags=["ops"])
    async def autoscale(st: State) -> AutoscaleResource:
        """The autoscaling signal, in a shape KEDA's metrics-api scaler reads directly."""
        snap = await st.backlog.current()
        signal = snap.signal
        assert signal is not None
        return AutoscaleResource(
            desired_workers=signal.desired_workers,
            raw_desired_workers=signal.raw_workers,
            backlog=snap.backlog,
            bus_lag=snap.lag,
            workers=snap.workers,
            throughput_per_worker=round(snap.throughput_per_worker, 3),
            target_drain_s=st.deps.autoscale.target_drain_s,
            models={
                name: {
                    "queued": int(m["queued"]),
                    "running": int(m["running"]),
                    "oldest_queued_s": round(m["oldest_queued_s"], 3),
                }
                for name, m in snap.per_model.items()
            },
        )

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["ops"],
        responses={503: {"description": "Not ready: `failing` names the checks that fail"}},
    )
    async def readyz(
        st: State,
        strict: Annotated[
            bool, Query(description="Answer 503 when degraded too (e.g. no live worker).")
        ] = False,
    ) -> JSONResponse:
        """ready / degraded (200) or not_ready (503), with every check's status: store,
        publisher, models, workers. No live worker is degraded, not a failure: jobs queue."""
        result = await assess(
            st.deps.store,
            st.deps.publisher,
            st.deps.models(),
            timeout_s=st.deps.config.readiness_timeout_s,
        )
        return JSONResponse(result.body(), result.http_status(strict=strict))

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    async def metrics_endpoint(st: State) -> Response:
        try:
            await st.backlog.current()  # backlog, lag and autoscaling gauges as of this scrape
        except STORE_DOWN as exc:  # still serve the rest: the 503 counts matter most now
            log.debug("backlog gauges not refreshed: %s", exc)
        return Response(generate_latest(st.deps.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/asyncapi.json", tags=["ops"], responses={404: {"model": ErrorResponse}})
    async def asyncapi(st: State) -> JSONResponse:
        doc = st.deps.config.asyncapi
        if doc is None:
            raise ApiError(404, ErrorCode.NOT_FOUND, "no AsyncAPI document for this transport")
        return JSONResponse(doc)


async def _admit(st: _State, model: str) -> None:
    """429 when the backlog, overall or of this model, is at its limit: the queue grows in
    the broker instead of the service falling over, and the client knows when to retry."""
    snap = await st.backlog.current()
    limits = st.deps.config
    checks = [(snap.backlog, limits.max_backlog, "the backlog")]
    if model in limits.max_backlog_per_model:
        checks.append(
            (
                snap.model_backlog(model),
                limits.max_backlog_per_model[model],
                f"the backlog of model {model!r}",
            )
        )
    for backlog, limit, what in checks:
        if backlog >= limit:
            retry_after = snap.retry_after_s(backlog - limit + 1)
            raise _reject(
                st,
                429,
                ErrorCode.BACKLOG_FULL,
                f"{what} ({backlog} jobs) is at its limit of {limit}; retry in {retry_after} s",
                None,
                headers={"Retry-After": str(retry_after)},
                details={"backlog": backlog, "limit": limit},
            )


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


async def _offloaded(st: _State, job_id: str, body: JobRequest) -> JobRequest:
    """The request as it travels: an input over the inline limit replaced by its S3 URL."""
    cc = st.deps.claim_check
    if cc is None or body.input is None:
        return body
    url = await cc.offload_input(job_id, body.input)
    if url is None:
        return body
    return body.model_copy(update={"input": None, "input_url": url})


async def _resource(st: _State, record: JobRecord) -> JobResource:
    resource = record.to_resource()
    cc = st.deps.claim_check
    if cc is not None and record.result is not None:
        url = await cc.result_url(record.result)
        if url is not None:
            resource = resource.model_copy(update={"result": None, "result_url": url})
    return resource


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
