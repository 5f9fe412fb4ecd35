"""Wiring of the Celery control plane (webhook delivery, sweeps) from Settings.

``celery -A inferq.control worker -B`` works too: ``app`` is built from the environment on
first access (PEP 562), never at import time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from celery import Celery
from prometheus_client import CollectorRegistry

from control.app import make_celery
from control.runtime import ControlConfig
from control.sweeps import Republish
from inferq.settings import Settings
from inferq.wiring import transport_of, url_guard
from schemas.envelope import JobEnvelope
from webhooks.delivery import DeliveryConfig, DeliverySchedule, parse_schedule
from webhooks.signing import load_or_create_secret, parse_secrets

log = logging.getLogger(__name__)


def webhook_secrets(settings: Settings) -> list[str]:
    """INFERQ_WEBHOOK_SECRET, else the secret generated once into the data dir."""
    if settings.webhook_secret:
        return parse_secrets(settings.webhook_secret)
    return [load_or_create_secret(settings.data_dir / "webhook_secret")]


def bus_republish(settings: Settings) -> Republish | None:
    """Publishes requeued jobs onto the jobs topic or queue of the configured transport, in
    its CloudEvents mode (None while the transport cannot connect: no broker configured)."""
    transport = transport_of(settings)
    if transport.missing is not None:
        return None

    def republish(envelopes: Sequence[JobEnvelope]) -> None:
        async def run() -> None:
            publisher = transport.publisher("inferq-control")
            await publisher.start()
            try:
                for envelope in envelopes:
                    value, headers = transport.encode(envelope)
                    await publisher.publish(
                        transport.jobs, value, key=envelope.id.encode(), headers=headers
                    )
            finally:
                await publisher.stop()

        asyncio.run(run())

    return republish


def control_config(
    settings: Settings, *, broker_url: str | None = None, registry: CollectorRegistry | None = None
) -> ControlConfig:
    return ControlConfig(
        broker_url=broker_url or settings.redis_url,
        database_url=settings.resolved_database_url,
        webhook_secrets=tuple(webhook_secrets(settings)),
        check_url=url_guard(settings),
        retry=DeliverySchedule(
            schedule=parse_schedule(settings.webhook_retry_schedule),
            jitter=settings.webhook_retry_jitter,
        ),
        delivery=DeliveryConfig(
            connect_timeout_s=settings.webhook_connect_timeout_s,
            read_timeout_s=settings.webhook_read_timeout_s,
            total_timeout_s=settings.webhook_total_timeout_s,
            max_response_bytes=settings.webhook_max_response_bytes,
        ),
        lease_s=settings.webhook_lease_s,
        dispatch_interval_s=settings.webhook_dispatch_interval_s,
        sweep_interval_s=settings.sweep_interval_s,
        result_retention_s=settings.result_retention_s,
        job_max_attempts=settings.job_max_attempts,
        republish=bus_republish(settings),
        beat_schedule_path=settings.data_dir / "celerybeat-schedule",
        queue=settings.control_queue,
        registry=registry or CollectorRegistry(),
    )


def build_celery(settings: Settings, *, broker_url: str | None = None) -> Celery:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return make_celery(control_config(settings, broker_url=broker_url))


def redis_reachable(url: str, timeout_s: float = 1.0) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
        )
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def local_broker_url(settings: Settings) -> str:
    """A broker that needs no server: kombu's SQLAlchemy transport on SQLite in the data dir."""
    return f"sqla+sqlite:///{settings.data_dir / 'celery-broker.db'}"


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        return build_celery(Settings())
    raise AttributeError(name)
