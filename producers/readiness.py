"""/readyz: can this API instance do its job right now, and if not, which check says no.

Kubernetes readiness decides whether a pod gets traffic, so only what makes *this instance*
unable to accept jobs fails it: the job store unreachable, the bus unable to publish, no
models configured. No live worker does not: jobs are accepted and queue on the bus until
workers come, and the autoscaling signal that brings workers up (KEDA reads /v1/autoscale
through the same Service) must stay reachable exactly when there are none. That case is
reported as ``degraded`` (HTTP 200); ``?strict=true`` turns degraded into 503 for deploy
gates and smoke tests that want the whole pipeline up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from jobstore.store import JobStore
from schemas.contracts import ModelConfig
from transports.base import Checked, Publisher

Status = Literal["ok", "degraded", "fail", "unknown"]


@dataclass(frozen=True)
class Check:
    status: Status
    detail: dict[str, Any] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"status": self.status, **self.detail}


@dataclass(frozen=True)
class Readiness:
    checks: dict[str, Check]

    @property
    def failing(self) -> list[str]:
        return [name for name, c in self.checks.items() if c.status == "fail"]

    @property
    def degraded(self) -> list[str]:
        return [name for name, c in self.checks.items() if c.status == "degraded"]

    @property
    def status(self) -> str:
        if self.failing:
            return "not_ready"
        return "degraded" if self.degraded else "ready"

    def http_status(self, *, strict: bool = False) -> int:
        if self.failing or (strict and self.degraded):
            return 503
        return 200

    def body(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "failing": self.failing,
            "degraded": self.degraded,
            "checks": {name: c.body() for name, c in self.checks.items()},
        }


async def _bounded(probe: Callable[[], Awaitable[Check]], timeout_s: float, what: str) -> Check:
    try:
        return await asyncio.wait_for(probe(), timeout_s)
    except TimeoutError:
        return Check("fail", {"error": f"{what} did not answer within {timeout_s} s"})
    except Exception as exc:  # a readiness probe reports every failure, it never raises
        return Check("fail", {"error": f"{type(exc).__name__}: {exc}"})


async def assess(
    store: JobStore,
    publisher: Publisher,
    models: Sequence[ModelConfig],
    *,
    timeout_s: float = 3.0,
    worker_max_age_s: float = 30.0,
) -> Readiness:
    """Run the checks concurrently, each bounded by ``timeout_s``."""

    async def store_check() -> Check:
        await asyncio.to_thread(store.ping)
        return Check("ok")

    async def publisher_check() -> Check:
        if not isinstance(publisher, Checked):
            return Check("unknown", {"detail": "this transport has no publish check"})
        await publisher.check()
        return Check("ok")

    async def workers_check() -> Check:
        live = await asyncio.to_thread(store.live_workers, max_age_s=worker_max_age_s)
        providers: dict[str, set[str]] = {}
        for served in live.values():
            for entry in served:
                key = f"{entry.get('name')}/{entry.get('version')}"
                if entry.get("provider"):
                    providers.setdefault(key, set()).add(str(entry["provider"]))
                else:
                    providers.setdefault(key, set())
        unserved = sorted({f"{c.name}/{c.version}" for c in models} - providers.keys())
        detail: dict[str, Any] = {
            "live": len(live),
            "providers": {k: sorted(v) for k, v in sorted(providers.items())},
        }
        if not live:
            detail["detail"] = "no live worker: jobs are accepted and wait on the bus"
            return Check("degraded", detail)
        if unserved:
            detail["models_without_worker"] = unserved
            return Check("degraded", detail)
        return Check("ok", detail)

    store_result, publisher_result, workers_result = await asyncio.gather(
        _bounded(store_check, timeout_s, "the job store"),
        _bounded(publisher_check, timeout_s, "the bus"),
        _bounded(workers_check, timeout_s, "the job store"),
    )
    if store_result.status == "fail":  # the worker registry lives in the store
        workers_result = Check("unknown", {"detail": "the job store is unavailable"})
    elif workers_result.status == "fail":
        workers_result = Check("unknown", workers_result.detail)
    model_names = [f"{c.name}/{c.version}" for c in models]
    models_result = (
        Check("ok", {"models": model_names})
        if models
        else Check("fail", {"error": "no models configured", "models": []})
    )
    return Readiness(
        {
            "store": store_result,
            "publisher": publisher_result,
            "models": models_result,
            "workers": workers_result,
        }
    )
