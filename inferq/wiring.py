"""The composition root: builds the parts from Settings and joins them. Nothing else in the
code base knows which transport, store or models are in use."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from dlq.router import DeadLetterRouter
from inferq.control import url_guard
from inferq.settings import Settings
from jobstore.store import JobStore
from producers.app import ApiConfig, ApiDeps, create_app
from producers.asyncapi import asyncapi_document
from schemas.contracts import ModelConfig
from transports.kafka import KafkaConfig, KafkaConsumer, KafkaDepth, KafkaPublisher, ensure_topics
from workers.adapters import LoadedModel, load_model
from workers.loop import Worker, WorkerConfig
from workers.metrics import WorkerMetrics
from workers.repository import ModelRepository
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
    )


def open_store(settings: Settings) -> JobStore:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore(settings.resolved_database_url)
    store.create_schema()
    return store


def model_configs(settings: Settings) -> list[ModelConfig]:
    return ModelRepository(settings.resolved_model_repository).configs()


def build_api(settings: Settings, registry: CollectorRegistry | None = None) -> FastAPI:
    store = open_store(settings)
    config = kafka_config(settings, client_id="inferq-api")
    repo = ModelRepository(settings.resolved_model_repository)
    cached = repo.configs()
    if not cached:
        log.warning("no models in %s: run `inferq models build`", repo.root)
    deps = ApiDeps(
        store=store,
        publisher=KafkaPublisher(config),
        models=lambda: cached,
        config=ApiConfig(
            topic=settings.kafka_topic,
            max_backlog=settings.max_backlog,
            max_body_bytes=settings.max_body_bytes,
            publish_attempts=settings.publish_attempts,
            publish_timeout_s=settings.publish_timeout_s,
            asyncapi=asyncapi_document(
                settings.kafka_bootstrap or "",
                settings.kafka_topic,
                settings.dlq_topic,
                settings.kafka_group,
            ),
        ),
        registry=registry or CollectorRegistry(),
        webhook_guard=url_guard(settings),
    )
    return create_app(deps)


def load_models(settings: Settings) -> dict[tuple[str, str], LoadedModel]:
    repo = ModelRepository(settings.resolved_model_repository)
    configs = repo.configs()
    if not configs:
        raise ConfigError(
            f"no models in {repo.root}: run `inferq models build` (or set INFERQ_MODEL_REPOSITORY)"
        )
    providers = choose_providers(settings.provider_preference)
    return {c.key: load_model(repo, c, providers, settings.inference_threads) for c in configs}


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
    # a stable, configured worker id makes the worker a static group member
    config = kafka_config(
        settings, client_id=f"inferq-worker-{wid}", group_instance_id=settings.worker_id
    )
    await ensure_topics(
        config, {settings.kafka_topic: settings.kafka_partitions, settings.dlq_topic: 1}
    )
    publisher = KafkaPublisher(config)
    await publisher.start()
    depth = KafkaDepth(config, settings.kafka_topic, settings.kafka_group)
    worker = Worker(
        consumer=KafkaConsumer(config, settings.kafka_topic, settings.kafka_group),
        store=store,
        models=models,
        dead_letters=DeadLetterRouter(publisher, settings.dlq_topic),
        metrics=WorkerMetrics(registry or CollectorRegistry()),
        config=WorkerConfig(
            worker_id=wid,
            fetch_max_records=settings.worker_fetch_max_records,
            lease_s=settings.worker_lease_s,
        ),
        depth=depth,
    )
    try:
        await depth.start()
        await worker.run(stop)
    finally:
        await depth.stop()
        await publisher.stop()
        store.close()
    return worker


def default_models_dir(settings: Settings) -> Path:
    return settings.resolved_model_repository
