"""The composition root: builds the parts from Settings and joins them. Nothing else in the
code base knows which transport, store or models are in use."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy.exc import OperationalError
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from dlq.http import make_router
from dlq.redrive import Redriver
from dlq.router import DeadLetterRouter
from dlq.store import DeadLetterStore
from inferq.settings import Settings
from jobstore.errors import StoreUnavailable
from jobstore.store import JobStore
from producers.app import ApiConfig, ApiDeps, create_app
from producers.asyncapi import asyncapi_document, sqs_asyncapi_document
from producers.autoscale import AutoscalePolicy
from schemas.contracts import ModelConfig
from transports.base import Consumer, DepthProbe, Publisher, TransportError
from transports.kafka import KafkaConfig, KafkaConsumer, KafkaDepth, KafkaPublisher, ensure_topics
from webhooks.ssrf import UrlGuard
from workers.adapters import LoadedModel, load_model
from workers.loop import Worker, WorkerConfig
from workers.metrics import WorkerMetrics
from workers.repository import ModelRepository
from workers.retry import RetryPolicy, RetryPump
from workers.runtime import choose_providers

log = logging.getLogger(__name__)


class ConfigError(Exception):
    """The settings cannot work (a required server is not configured, no models, ...)."""


def kafka_config(
    settings: Settings, client_id: str, *, group_instance_id: str | None = None
) -> KafkaConfig:
    if not settings.kafka_bootstrap:
        raise ConfigError(
            "INFERQ_KAFKA_BOOTSTRAP is not set: point it at a Kafka broker "
            "(host:port), or run `inferq dev`, which starts an embedded one"
        )
    return KafkaConfig(
        bootstrap=settings.kafka_bootstrap,
        client_id=client_id,
        group_instance_id=group_instance_id,
        max_request_size=settings.kafka_max_request_size,
    )


def open_store(settings: Settings) -> JobStore:
    """The job store with every table in place (jobs, outbox, dead letters).

    Roles start at once and may all create the schema; on SQLite a schema change that
    meets another one fails with "database is locked" instead of waiting, so retry briefly.
    """
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore(settings.resolved_database_url)
    for attempt in Retrying(
        retry=retry_if_exception_type((StoreUnavailable, OperationalError)),
        wait=wait_exponential_jitter(multiplier=0.05, max=1.0),
        stop=stop_after_attempt(10),
        reraise=True,
    ):
        with attempt:
            store.create_schema()
            DeadLetterStore(store.engine).create_schema()
    return store


def url_guard(settings: Settings) -> UrlGuard:
    return UrlGuard.from_allowlist(
        settings.webhook_allowed_hosts.split(","), max_length=settings.webhook_max_url_length
    )


def job_publisher(settings: Settings, client_id: str) -> tuple[Publisher, str, bool]:
    """(publisher, jobs destination, structured events?) of the configured transport, for
    roles that put jobs back on the bus (the control plane's requeue)."""
    if settings.transport == "sqs":
        from inferq.sqs_wiring import sqs_config
        from transports.sqs import SqsPublisher

        return SqsPublisher(sqs_config(settings)), settings.sqs_queue_name, True
    return KafkaPublisher(kafka_config(settings, client_id)), settings.kafka_topic, False


def model_configs(settings: Settings) -> list[ModelConfig]:
    return ModelRepository(settings.resolved_model_repository).configs()


def _api_bus(
    settings: Settings,
) -> tuple[Publisher, str, dict[str, Any] | None, DepthProbe]:
    """(publisher, destination, AsyncAPI document, depth probe) for the transport."""
    if settings.transport == "sqs":
        from inferq.sqs_wiring import QueueSetupError, prepare_queues_sync, sqs_config
        from transports.sqs import SqsPublisher

        try:
            prepare_queues_sync(settings)
        except (QueueSetupError, TransportError) as exc:
            raise ConfigError(str(exc)) from exc
        from transports.sqs import SqsDepth

        sqs = sqs_config(settings)
        queue = settings.sqs_queue_name
        doc = sqs_asyncapi_document(queue, settings.sqs_dlq, settings.aws_endpoint_url)
        return SqsPublisher(sqs), queue, doc, SqsDepth(sqs, queue)
    config = kafka_config(settings, client_id="inferq-api")
    doc = asyncapi_document(
        settings.kafka_bootstrap or "",
        settings.kafka_topic,
        settings.dlq_topic,
        settings.kafka_group,
    )
    depth = KafkaDepth(config, settings.kafka_topic, settings.kafka_group)
    return KafkaPublisher(config), settings.kafka_topic, doc, depth


def build_api(settings: Settings, registry: CollectorRegistry | None = None) -> FastAPI:
    store = open_store(settings)
    publisher, destination, doc, depth = _api_bus(settings)
    repo = ModelRepository(settings.resolved_model_repository)
    cached = repo.configs()
    if not cached:
        log.warning("no models in %s: run `inferq models build`", repo.root)
    from inferq.sqs_wiring import claim_check

    blobs = claim_check(settings)
    deps = ApiDeps(
        claim_check=blobs,
        store=store,
        publisher=publisher,
        models=lambda: cached,
        config=ApiConfig(
            topic=destination,
            structured_events=settings.transport == "sqs",
            max_backlog=settings.max_backlog,
            max_backlog_per_model=settings.max_backlog_per_model,
            max_body_bytes=settings.max_body_bytes,
            max_batch_body_bytes=settings.max_batch_body_bytes,
            publish_attempts=settings.publish_attempts,
            publish_timeout_s=settings.publish_timeout_s,
            asyncapi=doc,
        ),
        registry=registry or CollectorRegistry(),
        depth=depth,
        autoscale=autoscale_policy(settings),
        webhook_guard=url_guard(settings),
    )
    app = create_app(deps)
    letters = DeadLetterStore(store.engine)
    redriver = Redriver(
        letters,
        deps.publisher,
        destination,
        store,
        load_payload=blobs.load_dead_letter if blobs else None,
    )
    app.include_router(make_router(letters, redriver))
    return app


def load_models(settings: Settings) -> dict[tuple[str, str], LoadedModel]:
    repo = ModelRepository(settings.resolved_model_repository)
    configs = repo.configs()
    if not configs:
        raise ConfigError(
            f"no models in {repo.root}: run `inferq models build` (or set INFERQ_MODEL_REPOSITORY)"
        )
    providers = choose_providers(settings.provider_preference)
    return {c.key: load_model(repo, c, providers, settings.inference_threads) for c in configs}


def autoscale_policy(settings: Settings) -> AutoscalePolicy:
    return AutoscalePolicy(
        target_drain_s=settings.autoscale_target_drain_s,
        min_workers=settings.autoscale_min_workers,
        max_workers=settings.autoscale_max_workers,
        scale_down_delay_s=settings.autoscale_scale_down_delay_s,
        # a consumer group never uses more consumers than the topic has partitions
        max_partitions=settings.kafka_partitions,
    )


def retry_policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=settings.retry_max_attempts,
        base_delay_s=settings.retry_base_delay_s,
        max_delay_s=settings.retry_max_delay_s,
    )


def worker_id(settings: Settings) -> str:
    return settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"


async def run_worker(
    settings: Settings, stop: asyncio.Event, registry: CollectorRegistry | None = None
) -> Worker:
    store = open_store(settings)
    models = load_models(settings)
    for (name, version), model in models.items():
        log.info("model %s/%s on %s", name, version, model.provider)
    wid = worker_id(settings)
    consumer, publisher, depth, dlq = await _worker_bus(settings, wid)
    await publisher.start()
    letters = DeadLetterStore(store.engine)
    from inferq.sqs_wiring import claim_check

    blobs = claim_check(settings)
    worker = Worker(
        claim_check=blobs,
        consumer=consumer,
        store=store,
        models=models,
        dead_letters=DeadLetterRouter(
            publisher,
            dlq,
            record=letters.add,
            offload=blobs,
            head_bytes=settings.dlq_head_bytes,
            publish_deadline_s=settings.dlq_publish_deadline_s,
        ),
        metrics=WorkerMetrics(registry or CollectorRegistry()),
        config=WorkerConfig(
            worker_id=wid,
            fetch_max_records=settings.worker_fetch_max_records,
            lease_s=settings.worker_lease_s,
            heartbeat_interval_s=settings.worker_heartbeat_s,
            depth_interval_s=settings.worker_heartbeat_s,
            # SQS: long polls, and a final attempt before the redrive policy would take over
            fetch_timeout_s=settings.sqs_wait_time_s if settings.transport == "sqs" else 0.1,
            max_deliveries=settings.sqs_max_receive_count if settings.transport == "sqs" else None,
        ),
        depth=depth,
        retry=retry_policy(settings),
        # SQS retries with the visibility timeout (nack); Kafka through the store's pump
        retry_pump=None
        if settings.transport == "sqs"
        else RetryPump(
            store,
            publisher,
            settings.kafka_topic,
            backlog=_backlog(depth),
            stranded_after_s=max(settings.stranded_after_s, 2 * settings.publish_timeout_s),
        ),
    )
    try:
        await depth.start()
        await worker.run(stop)
    finally:
        await depth.stop()
        await publisher.stop()
        store.close()
    return worker


def _backlog(depth: DepthProbe) -> Callable[[], Awaitable[int]]:
    async def backlog() -> int:
        return (await depth.depth()).backlog

    return backlog


async def _worker_bus(settings: Settings, wid: str) -> tuple[Consumer, Publisher, DepthProbe, str]:
    """(consumer, dead-letter publisher, depth probe, dead-letter destination)."""
    if settings.transport == "sqs":
        from inferq.sqs_wiring import QueueSetupError, prepare_queues, sqs_config
        from transports.sqs import SqsConsumer, SqsDepth, SqsPublisher

        try:
            await prepare_queues(settings)
        except (QueueSetupError, TransportError) as exc:
            raise ConfigError(str(exc)) from exc
        sqs = sqs_config(settings)
        queue = settings.sqs_queue_name
        return SqsConsumer(sqs, queue), SqsPublisher(sqs), SqsDepth(sqs, queue), settings.sqs_dlq
    # a stable, configured worker id makes the worker a static group member
    config = kafka_config(
        settings, client_id=f"inferq-worker-{wid}", group_instance_id=settings.worker_id
    )
    await ensure_topics(
        config, {settings.kafka_topic: settings.kafka_partitions, settings.dlq_topic: 1}
    )
    depth = KafkaDepth(config, settings.kafka_topic, settings.kafka_group)
    consumer = KafkaConsumer(config, settings.kafka_topic, settings.kafka_group)
    return consumer, KafkaPublisher(config), depth, settings.dlq_topic


def default_models_dir(settings: Settings) -> Path:
    return settings.resolved_model_repository
