"""What the control plane's tasks work with: its typed config, and the store, outbox and
deliverer that each worker process opens on first use."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry

from control.sweeps import Republish
from jobstore.outbox import WebhookOutbox
from jobstore.store import JobStore
from webhooks.delivery import (
    Deliverer,
    DeliveryConfig,
    DeliverySchedule,
    UrlCheck,
    WebhookMetrics,
    new_client,
)
from webhooks.signing import WebhookSigner

QUEUE = "inferq-control"


@dataclass(frozen=True)
class ControlConfig:
    broker_url: str
    database_url: str
    webhook_secrets: tuple[str, ...]
    check_url: UrlCheck
    retry: DeliverySchedule = field(default_factory=DeliverySchedule)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    lease_s: float = 60.0  # a claimed delivery not settled by then is handed out again
    dispatch_interval_s: float = 0.5
    dispatch_batch: int = 200
    sweep_interval_s: float = 30.0
    result_retention_s: float = 7 * 86400.0
    job_max_attempts: int = 5
    republish: Republish | None = None
    beat_schedule_path: Path | None = None
    queue: str = QUEUE
    registry: CollectorRegistry = field(default_factory=CollectorRegistry, compare=False)


class ControlRuntime:
    """What the tasks work with, opened on first use in the worker process."""

    def __init__(self, config: ControlConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._store: JobStore | None = None
        self._deliverer: Deliverer | None = None
        self.metrics = WebhookMetrics(config.registry)

    @property
    def store(self) -> JobStore:
        with self._lock:
            if self._store is None:
                store = JobStore(self.config.database_url, pool_size=8)
                store.create_schema()
                self._store = store
            return self._store

    @property
    def outbox(self) -> WebhookOutbox:
        store = self.store
        return WebhookOutbox(store.engine, writer=store.writer)

    @property
    def deliverer(self) -> Deliverer:
        outbox = self.outbox
        with self._lock:
            if self._deliverer is None:
                signer = WebhookSigner.from_secrets(self.config.webhook_secrets)
                self._deliverer = Deliverer(
                    outbox=outbox,
                    signer_keys=lambda: signer,
                    policy=self.config.retry,
                    config=self.config.delivery,
                    check_url=self.config.check_url,
                    metrics=self.metrics,
                    client=new_client(self.config.delivery),
                )
            return self._deliverer

    def close(self) -> None:
        with self._lock:
            if self._deliverer is not None:
                self._deliverer.client.close()
            if self._store is not None:
                self._store.close()
