"""The Celery control plane: webhook delivery and periodic sweeps.

``make_celery(config)`` builds an app from an explicit ``ControlConfig``; nothing is created at
import time. ``inferq control`` builds one from the settings and runs its worker with the
beat embedded; ``celery -A inferq.control`` finds the same app through a lazy attribute.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from celery import Celery
from prometheus_client import CollectorRegistry

from jobstore.delivery import (
    Deliverer,
    DeliveryConfig,
    RetryPolicy,
    UrlCheck,
    WebhookMetrics,
    new_client,
)
from jobstore.outbox import WebhookOutbox
from jobstore.signing import WebhookSigner
from jobstore.store import JobStore
from jobstore.sweeps import Republish

QUEUE = "inferq-control"


@dataclass(frozen=True)
class ControlConfig:
    broker_url: str
    database_url: str
    webhook_secrets: tuple[str, ...]
    check_url: UrlCheck
    retry: RetryPolicy = field(default_factory=RetryPolicy)
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


def make_celery(config: ControlConfig, *, name: str = "inferq-control") -> Celery:
    from jobstore import tasks

    app = Celery(name, broker=config.broker_url, set_as_current=False)
    app.conf.update(
        task_default_queue=config.queue,
        task_ignore_result=True,
        task_acks_late=True,  # a worker killed mid-task leaves the message to be redelivered
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=4,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        timezone="UTC",
        beat_schedule=_beat_schedule(config),
        beat_max_loop_interval=max(0.1, min(config.dispatch_interval_s, 5.0)),
    )
    if config.beat_schedule_path is not None:
        app.conf.beat_schedule_filename = str(config.beat_schedule_path)
    runtime = ControlRuntime(config)
    tasks.register(app, runtime)
    app.inferq_runtime = runtime
    return app


def _beat_schedule(config: ControlConfig) -> dict[str, dict[str, object]]:
    dispatch = config.dispatch_interval_s
    return {
        "webhooks-dispatch": {
            "task": tasks_names.DISPATCH,
            "schedule": timedelta(seconds=dispatch),
            # ticks that queued up while no worker ran are worthless: the next one does it all
            "options": {"expires": max(dispatch * 4, 2.0)},
        },
        "sweeps": {
            "task": tasks_names.SWEEP,
            "schedule": timedelta(seconds=config.sweep_interval_s),
            "options": {"expires": config.sweep_interval_s},
        },
    }


class tasks_names:
    DISPATCH = "inferq.webhooks.dispatch"
    DELIVER = "inferq.webhooks.deliver"
    SWEEP = "inferq.sweeps.run"


def worker_argv(
    *, concurrency: int = 8, beat: bool = True, loglevel: str = "INFO", extra: Sequence[str] = ()
) -> list[str]:
    """argv for ``app.worker_main``: a threads pool (delivery is I/O) and the embedded beat."""
    argv = ["worker", "--pool", "threads", "--concurrency", str(concurrency), "-l", loglevel]
    if beat:
        argv.append("-B")
    return [*argv, *extra]
