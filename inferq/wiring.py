"""The composition root: builds the parts from Settings and joins them. Nothing else in the
code base knows which transport, store or models are in use."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy.exc import OperationalError
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from control.handoff import CelerySender, Handoff
from dlq.http import make_router
from dlq.redrive import Redriver
from dlq.router import DeadLetterRouter
from dlq.store import DeadLetterStore
from inferq.settings import Settings
from jobstore.errors import StoreUnavailable
from jobstore.store import JobStore, OutboxListener
from producers.app import ApiConfig, ApiDeps, create_app
from producers.autoscale import AutoscalePolicy
from producers.events import resolve_result
from schemas.contracts import ModelConfig
from schemas.jobs import JobResource
from transports.base import DepthProbe, TransportError
from transports.blobs import ClaimCheck, S3Blobs
from transports.kafka import KafkaConfig, KafkaTransport
from transports.sqs import SqsConfig, SqsTransport
from transports.transport import Transport
from webhooks.ssrf import UrlGuard
from workers.adapters import LoadedModel, load_model
from workers.events_relay import EventRelay, RelayConfig
from workers.loop import Worker, WorkerConfig
from workers.metrics import WorkerMetrics
from workers.repository import ModelRepository
from workers.retry import RetryPolicy, RetryPump
from workers.runtime import choose_providers

log = logging.getLogger(__name__)


class ConfigError(Exception):
    """The settings cannot work (a required server is not configured, no models, ...)."""


def _kafka(settings: Settings) -> KafkaTransport:
    client = None
    if settings.kafka_bootstrap:
        client = KafkaConfig(
            bootstrap=settings.kafka_bootstrap,
            max_request_size=settings.kafka_max_request_size,
        )
    return KafkaTransport(
        client,
        topic=settings.kafka_topic,
        partitions=settings.kafka_partitions,
        group=settings.kafka_group,
    )


def _sqs(settings: Settings) -> SqsTransport:
    client = SqsConfig(
        endpoint_url=settings.aws_endpoint_url,
        visibility_timeout_s=settings.sqs_visibility_timeout_s,
        wait_time_s=settings.sqs_wait_time_s,
        max_receive_count=settings.sqs_max_receive_count,
        max_message_bytes=settings.sqs_max_message_bytes,
    )
    return SqsTransport(
        client,
        queue=settings.sqs_queue_name,
        create_queues=settings.sqs_create_queues,
        bucket=settings.s3_bucket,
    )


# the transports a role can run on, by their INFERQ_TRANSPORT name (the in-memory one has no
# server: unit tests build it themselves); adding a transport adds a line here
TRANSPORTS: dict[str, Callable[[Settings], Transport]] = {"kafka": _kafka, "sqs": _sqs}


def transport_of(settings: Settings, name: str | None = None) -> Transport:
    """The transport object of the settings (``name``: another one, e.g. a CLI option's)."""
    chosen = name or settings.transport
    try:
        build = TRANSPORTS[chosen]
    except KeyError:
        raise ConfigError(
            f"unknown transport {chosen!r}; one of: {', '.join(sorted(TRANSPORTS))}"
        ) from None
    return build(settings)


def claim_check(settings: Settings) -> ClaimCheck | None:
    """The S3 claim-check, when a bucket to write to or buckets to read from are configured."""
    if not settings.allowed_buckets:
        return None
    return ClaimCheck(
        blobs=S3Blobs(endpoint_url=settings.aws_endpoint_url),
        bucket=settings.s3_bucket,
        prefix=settings.s3_prefix,
        allowed_buckets=settings.allowed_buckets,
        inline_input_max_bytes=settings.inline_input_max_bytes,
        inline_result_max_bytes=settings.inline_result_max_bytes,
        input_url_max_bytes=settings.input_url_max_bytes,
        presign_ttl_s=settings.s3_presign_ttl_s,
    )


def open_store(settings: Settings, on_outbox: OutboxListener | None = None) -> JobStore:
    """The job store with every table in place (jobs, outbox, dead letters).

    Roles start at once and may all create the schema; on SQLite a schema change that
    meets another one fails with "database is locked" instead of waiting, so retry briefly.
    ``on_outbox``: hears of committed webhook rows (``webhook_handoff``).
    """
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore(settings.resolved_database_url, on_outbox=on_outbox)
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


def webhook_handoff(settings: Settings) -> Handoff | None:
    """Hands committed webhook rows to the control plane over its broker, unless turned off
    (INFERQ_WEBHOOK_HANDOFF=false): then the dispatch sweep alone delivers them."""
    if not settings.webhook_handoff:
        return None
    sender = CelerySender(
        settings.redis_url, settings.control_queue, expires_s=settings.webhook_lease_s
    )
    return Handoff(sender, closing=sender.close)


def url_guard(settings: Settings) -> UrlGuard:
    return UrlGuard.from_allowlist(
        settings.webhook_allowed_hosts.split(","), max_length=settings.webhook_max_url_length
    )


def model_configs(settings: Settings) -> list[ModelConfig]:
    return ModelRepository(settings.resolved_model_repository).configs()


def _ready(transport: Transport) -> None:
    """ConfigError, saying what to set, while the transport cannot connect."""
    if transport.missing is not None:
        raise ConfigError(transport.missing)


def prepare_api(settings: Settings) -> None:
    """What the API needs in place before it serves: a transport that can connect, its
    destination, the store's schema. ConfigError says what is missing."""
    transport = transport_of(settings)
    _ready(transport)
    try:
        asyncio.run(transport.prepare_publisher())
    except TransportError as exc:
        raise ConfigError(str(exc)) from exc
    open_store(settings).close()


def build_api(
    settings: Settings, registry: CollectorRegistry | None = None, *, prepared: bool = False
) -> FastAPI:
    """The API app; ``prepared``: ``prepare_api`` ran already (in the parent of several API
    processes), so this may run inside an event loop."""
    transport = transport_of(settings)
    _ready(transport)
    if not prepared:
        try:
            asyncio.run(transport.prepare_publisher())
        except TransportError as exc:
            raise ConfigError(str(exc)) from exc
    # its thread (started on the first cancel with a webhook) dies with the process; what it
    # had not sent yet waits for the sweep
    store = open_store(settings, webhook_handoff(settings))
    destination = transport.jobs
    repo = ModelRepository(settings.resolved_model_repository)
    cached = repo.configs()
    if not cached:
        log.warning("no models in %s: run `inferq models build`", repo.root)
    blobs = claim_check(settings)
    deps = ApiDeps(
        claim_check=blobs,
        store=store,
        publisher=transport.publisher("inferq-api"),
        encode=transport.encode,
        models=lambda: cached,
        config=ApiConfig(
            topic=destination,
            max_backlog=settings.max_backlog,
            max_backlog_per_model=settings.max_backlog_per_model,
            max_body_bytes=settings.max_body_bytes,
            max_batch_body_bytes=settings.max_batch_body_bytes,
            publish_attempts=settings.publish_attempts,
            publish_timeout_s=settings.publish_timeout_s,
            wait_sweep_s=settings.wait_sweep_s,
            wait_poll_s=settings.wait_poll_s,
            asyncapi=transport.asyncapi(),
            sse_heartbeat_s=settings.sse_heartbeat_s,
        ),
        registry=registry or CollectorRegistry(),
        depth=transport.depth("inferq-api"),
        autoscale=autoscale_policy(settings, transport),
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


def autoscale_policy(settings: Settings, transport: Transport) -> AutoscalePolicy:
    return AutoscalePolicy(
        target_drain_s=settings.autoscale_target_drain_s,
        min_workers=settings.autoscale_min_workers,
        max_workers=settings.autoscale_max_workers,
        scale_down_delay_s=settings.autoscale_scale_down_delay_s,
        # a consumer group never uses more consumers than the topic has partitions
        max_partitions=transport.capabilities.max_consumers,
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
    handoff = webhook_handoff(settings)
    store = open_store(settings, handoff)
    models = load_models(settings)
    for (name, version), model in models.items():
        log.info("model %s/%s on %s", name, version, model.provider)
    wid = worker_id(settings)
    transport = transport_of(settings)
    _ready(transport)
    try:
        await transport.prepare()
    except TransportError as exc:
        raise ConfigError(str(exc)) from exc
    caps = transport.capabilities
    client_id = f"inferq-worker-{wid}"
    # a stable, configured worker id makes the worker a static group member
    consumer = transport.consumer(client_id, member=settings.worker_id)
    publisher = transport.publisher(client_id)
    depth = transport.depth(client_id)
    await publisher.start()
    letters = DeadLetterStore(store.engine)
    blobs = claim_check(settings)
    relay = events_relay(settings, transport, store, client_id, blobs)
    worker = Worker(
        claim_check=blobs,
        on_write=None if relay is None else relay.wake,
        consumer=consumer,
        store=store,
        models=models,
        dead_letters=DeadLetterRouter(
            publisher,
            transport.dead_letters,
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
            fetch_timeout_s=caps.fetch_timeout_s,
            max_deliveries=caps.max_deliveries,
            redelivers=caps.redelivers_itself,
        ),
        depth=depth,
        retry=retry_policy(settings),
        # a transport that redelivers by itself retries with nack (SQS: visibility timeout);
        # elsewhere retries wait in the store and its pump publishes them again
        retry_pump=None
        if caps.redelivers_itself
        else RetryPump(
            store,
            publisher,
            transport.jobs,
            backlog=_backlog(depth),
            stranded_after_s=max(settings.stranded_after_s, 2 * settings.publish_timeout_s),
        ),
    )
    relay_stop = asyncio.Event()
    relaying: asyncio.Task[None] | None = None
    try:
        await depth.start()
        if relay is not None:
            await relay.publisher.start()
            relaying = asyncio.create_task(relay.run(relay_stop), name="events-relay")
        await worker.run(stop)
    finally:
        relay_stop.set()  # after the worker's last outcomes: the relay publishes them too
        if relaying is not None:
            await asyncio.gather(relaying, return_exceptions=True)
        if relay is not None:
            await relay.publisher.stop()
        await depth.stop()
        await publisher.stop()
        store.close()
        if handoff is not None:
            await asyncio.to_thread(handoff.close)
    return worker


def events_relay(
    settings: Settings,
    transport: Transport,
    store: JobStore,
    owner: str,
    blobs: ClaimCheck | None,
) -> EventRelay | None:
    """The relay of stored job events onto the transport's events destination (None when
    INFERQ_EVENTS_PUBLISH is off)."""
    if not settings.events_publish:
        return None
    resolve = None
    if blobs is not None:

        async def resolve(job: JobResource) -> JobResource:
            return await resolve_result(blobs, job)

    return EventRelay(
        store.event_log,
        transport.events_publisher(owner),
        transport.events,
        owner=owner,
        config=RelayConfig(
            interval_s=settings.events_relay_interval_s, batch=settings.events_relay_batch
        ),
        resolve=resolve,
    )


def _backlog(depth: DepthProbe) -> Callable[[], Awaitable[int]]:
    async def backlog() -> int:
        return (await depth.depth()).backlog

    return backlog


def default_models_dir(settings: Settings) -> Path:
    return settings.resolved_model_repository
