"""The service itself, for operators: liveness, readiness, metrics, the autoscaling
signal and the AsyncAPI document of the bus. (Swagger UI at ``/docs``: ``producers.docs``.)"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from producers.errors import STORE_DOWN
from producers.readiness import assess
from producers.responses import FastJSONResponse
from producers.state import State
from schemas.errors import ApiError, ErrorCode, ErrorResponse
from schemas.jobs import AutoscaleResource

log = logging.getLogger(__name__)


def system_router() -> APIRouter:
    router = APIRouter(tags=["ops"])

    @router.get("/v1/autoscale", response_model=AutoscaleResource)
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

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get(
        "/readyz",
        responses={503: {"description": "Not ready: `failing` names the checks that fail"}},
    )
    async def readyz(
        st: State,
        strict: Annotated[
            bool, Query(description="Answer 503 when degraded too (e.g. no live worker).")
        ] = False,
    ) -> FastJSONResponse:
        """ready / degraded (200) or not_ready (503), with every check's status: store,
        publisher, models, workers. No live worker is degraded, not a failure: jobs queue."""
        result = await assess(
            st.deps.store,
            st.deps.publisher,
            st.deps.models(),
            timeout_s=st.deps.config.readiness_timeout_s,
        )
        return FastJSONResponse(result.body(), result.http_status(strict=strict))

    @router.get("/metrics", response_class=PlainTextResponse)
    async def metrics_endpoint(st: State) -> Response:
        try:
            await st.backlog.current()  # backlog, lag and autoscaling gauges as of this scrape
        except STORE_DOWN as exc:  # still serve the rest: the 503 counts matter most now
            log.debug("backlog gauges not refreshed: %s", exc)
        return Response(generate_latest(st.deps.registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/asyncapi.json", responses={404: {"model": ErrorResponse}})
    async def asyncapi(st: State) -> FastJSONResponse:
        doc = st.deps.config.asyncapi
        if doc is None:
            raise ApiError(404, ErrorCode.NOT_FOUND, "no AsyncAPI document for this transport")
        return FastJSONResponse(doc)

    return router
