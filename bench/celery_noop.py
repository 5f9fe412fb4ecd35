"""A Celery app with one no-op task, for the Celery-on-Redis reference in the identity scenario.

The worker runs it as ``celery -A bench.celery_noop worker``; both sides read the broker URL,
queue and counter key from the environment that the benchmark sets. The task only increments
a Redis counter, so completion is counted without a result backend.
"""

from __future__ import annotations

import os
import threading

import redis
from celery import Celery

BROKER_ENV = "INFERQ_BENCH_CELERY_BROKER"
QUEUE_ENV = "INFERQ_BENCH_CELERY_QUEUE"
COUNTER_ENV = "INFERQ_BENCH_CELERY_COUNTER"
PREFETCH_ENV = "INFERQ_BENCH_CELERY_PREFETCH"

DEFAULT_BROKER = "redis://127.0.0.1:6379/15"
DEFAULT_QUEUE = "bench-noop"
DEFAULT_COUNTER = "bench:noop:done"

app = Celery("bench_noop", broker=os.environ.get(BROKER_ENV, DEFAULT_BROKER))
app.conf.update(
    task_ignore_result=True,
    task_default_queue=os.environ.get(QUEUE_ENV, DEFAULT_QUEUE),
    worker_prefetch_multiplier=int(os.environ.get(PREFETCH_ENV, "4")),
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    accept_content=["json"],
)

_local = threading.local()


def _redis() -> redis.Redis:
    client = getattr(_local, "client", None)
    if client is None:
        client = redis.Redis.from_url(os.environ.get(BROKER_ENV, DEFAULT_BROKER))
        _local.client = client
    return client


@app.task(name="bench.noop")
def noop() -> None:
    _redis().incr(os.environ.get(COUNTER_ENV, DEFAULT_COUNTER))
