"""What the front door knows about the backlog: per-model queue stats from the store, the
bus lag, live workers and their measured throughput; admission control and autoscaling
signals both read it. Refreshed at most every ``ttl`` seconds, not per request."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from jobstore.store import JobStore
from producers.autoscale import AutoscalePolicy, Autoscaler, ScaleSignal
from transports.base import DepthProbe

log = logging.getLogger(__name__)


@dataclass
class Snapshot:
    per_model: dict[str, dict[str, float]] = field(default_factory=dict)
    lag: int | None = None
    lag_partitions: dict[str, int] = field(default_factory=dict)
    workers: int = 0
    throughput_per_worker: float = 0.0
    signal: ScaleSignal | None = None

    @property
    def store_backlog(self) -> int:
        return int(sum(m["queued"] + m["running"] for m in self.per_model.values()))

    @property
    def backlog(self) -> int:
        """Work not yet done: what the bus still holds, or the store's count if larger
        (jobs waiting out a retry backoff are in the store, not on the bus)."""
        return max(self.store_backlog, self.lag or 0)

    def model_backlog(self, model: str) -> int:
        m = self.per_model.get(model)
        return int(m["queued"] + m["running"]) if m else 0

    def retry_after_s(self, excess: int) -> int:
        rate = self.throughput_per_worker * max(self.workers, 1)
        if rate <= 0:
            return 5
        return max(1, min(60, math.ceil(excess / rate)))


class _Gauges:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.backlog = Gauge(
            "inferq_backlog_jobs",
            "Jobs accepted and not finished.",
            ["model", "state"],
            registry=registry,
        )
        self.oldest = Gauge(
            "inferq_oldest_queued_age_seconds",
            "Age of the oldest queued job.",
            ["model"],
            registry=registry,
        )
        self.lag = Gauge(
            "inferq_bus_lag_messages",
            "Messages on the jobs topic/queue not yet consumed (consumer lag).",
            ["source"],
            registry=registry,
        )
        self.workers = Gauge(
            "inferq_workers_live", "Workers with a fresh heartbeat.", registry=registry
        )
        self.throughput = Gauge(
            "inferq_throughput_per_worker_jobs_per_second",
            "Mean measured throughput of a live worker (EWMA).",
            registry=registry,
        )
        self.desired = Gauge(
            "inferq_desired_workers",
            "Workers needed to drain the backlog within the target time.",
            registry=registry,
        )


class BacklogMonitor:
    def __init__(
        self,
        store: JobStore,
        *,
        depth: DepthProbe | None = None,
        policy: AutoscalePolicy | None = None,
        registry: CollectorRegistry,
        ttl_s: float = 0.25,
    ) -> None:
        self.store = store
        self.depth = depth
        self.autoscaler = Autoscaler(policy or AutoscalePolicy())
        self.ttl_s = ttl_s
        self.gauges = _Gauges(registry)
        self.snapshot = Snapshot()
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()
        self._seen: set[str] = set()

    async def current(self) -> Snapshot:
        async with self._lock:
            if time.monotonic() - self._read_at > self.ttl_s:
                await self._refresh()
        return self.snapshot

    def accepted(self, model: str) -> None:
        """Count a job accepted between two reads, so a burst cannot overshoot the limit."""
        m = self.snapshot.per_model.setdefault(
            model, {"queued": 0, "running": 0, "oldest_queued_s": 0}
        )
        m["queued"] += 1

    async def _refresh(self) -> None:
        snap = Snapshot()
        snap.per_model = await asyncio.to_thread(self.store.queue_stats)
        workers = await asyncio.to_thread(self.store.live_workers)
        rates = [_rate(models) for models in workers.values()]
        snap.workers = len(workers)
        snap.throughput_per_worker = sum(rates) / len(rates) if rates else 0.0
        if self.depth is not None:
            try:
                depth = await self.depth.depth()
                snap.lag, snap.lag_partitions = depth.backlog, dict(depth.partitions)
                self.gauges.lag.labels(depth.source).set(depth.backlog)
            except Exception as exc:  # the bus is down: admission falls back to the store
                log.debug("lag unknown: %s", exc)
        snap.signal = self.autoscaler.observe(
            snap.backlog, snap.throughput_per_worker, snap.workers
        )
        self.snapshot = snap
        self._read_at = time.monotonic()
        self._export(snap)

    def _export(self, snap: Snapshot) -> None:
        for model in self._seen - snap.per_model.keys():  # drained: say 0, not the last value
            for state in ("queued", "running"):
                self.gauges.backlog.labels(model, state).set(0)
            self.gauges.oldest.labels(model).set(0)
        self._seen |= snap.per_model.keys()
        for model, m in snap.per_model.items():
            self.gauges.backlog.labels(model, "queued").set(m["queued"])
            self.gauges.backlog.labels(model, "running").set(m["running"])
            self.gauges.oldest.labels(model).set(m["oldest_queued_s"])
        self.gauges.workers.set(snap.workers)
        self.gauges.throughput.set(snap.throughput_per_worker)
        if snap.signal is not None:
            self.gauges.desired.set(snap.signal.desired_workers)


def _rate(models: list[dict[str, Any]]) -> float:
    for m in models:
        try:
            return float(m.get("jobs_per_s", 0))
        except (TypeError, ValueError):
            continue
    return 0.0
