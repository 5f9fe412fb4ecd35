"""The identity task on Celery and on Dramatiq, each with Redis as broker AND result backend,
for the reference drains in ``bench.reference_queues``.

Both worker processes import this module (``celery -A bench.queue_apps:celery_app``,
``dramatiq bench.queue_apps``); the broker URL comes from the environment that the
benchmark sets for its children, so the same names work on both sides.
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq
from celery import Celery
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

CELERY_URL_ENV = "INFERQ_BENCH_CELERY_URL"
DRAMATIQ_URL_ENV = "INFERQ_BENCH_DRAMATIQ_URL"
DEFAULT_CELERY_URL = "redis://127.0.0.1:6379/12"
DEFAULT_DRAMATIQ_URL = "redis://127.0.0.1:6379/13"
QUEUE = "bench-identity"


def _celery_app(url: str) -> Celery:
    app = Celery("bench_identity", broker=url, backend=url)
    app.conf.update(
        task_default_queue=QUEUE,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=4,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        result_expires=600,
    )
    return app


celery_app = _celery_app(os.environ.get(CELERY_URL_ENV, DEFAULT_CELERY_URL))


@celery_app.task(name="bench.identity")
def celery_identity(x: Any) -> Any:
    return x


def _dramatiq_broker(url: str) -> RedisBroker:
    broker = RedisBroker(url=url)
    broker.add_middleware(Results(backend=RedisBackend(url=url), result_ttl=600_000))
    return broker


# Dramatiq's actors bind to the global broker at decoration time; the benchmark process and
# the worker both import this module with the same URL in the environment.
dramatiq.set_broker(_dramatiq_broker(os.environ.get(DRAMATIQ_URL_ENV, DEFAULT_DRAMATIQ_URL)))


@dramatiq.actor(queue_name=QUEUE, store_results=True, max_retries=0)
def dramatiq_identity(x: Any) -> Any:
    return x
