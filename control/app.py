"""The Celery app of the control plane: webhook delivery and periodic sweeps.

``make_celery(config)`` builds an app from an explicit ``ControlConfig``; nothing is created at
import time. ``inferq control`` builds one from the settings and runs its worker with the
beat embedded; ``celery -A inferq.control`` finds the same app through a lazy attribute.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from celery import Celery, signals

from control import tasks
from control.consumer import CONSUMER
from control.names import TaskNames
from control.runtime import ControlConfig, ControlRuntime


def make_celery(config: ControlConfig, *, name: str = "inferq-control") -> Celery:
    app = Celery(name, broker=config.broker_url, set_as_current=False)
    app.conf.update(
        task_default_queue=config.queue,
        task_ignore_result=True,
        task_acks_late=True,  # a worker killed mid-task leaves the message to be redelivered
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=4,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # keep trying for as long as Redis is down
        # a reply error also restarts the consumer instead of ending the worker: a Redis
        # failed over to a replica answers READONLY (a ResponseError) until it is promoted
        broker_channel_error_retry=True,
        # a lost broker connection whose cleanup fails must not stop the worker (issue 8)
        worker_consumer=CONSUMER,
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
            "task": TaskNames.DISPATCH,
            "schedule": timedelta(seconds=dispatch),
            # ticks that queued up while no worker ran are worthless: the next one does it all
            "options": {"expires": max(dispatch * 4, 2.0)},
        },
        "sweeps": {
            "task": TaskNames.SWEEP,
            "schedule": timedelta(seconds=config.sweep_interval_s),
            "options": {"expires": config.sweep_interval_s},
        },
    }


def worker_argv(
    *, concurrency: int = 8, beat: bool = True, loglevel: str = "INFO", extra: Sequence[str] = ()
) -> list[str]:
    """argv for ``app.worker_main``: a threads pool (delivery is I/O) and the embedded beat."""
    argv = ["worker", "--pool", "threads", "--concurrency", str(concurrency), "-l", loglevel]
    if beat:
        argv.append("-B")
    return [*argv, *extra]


def run_worker(app: Celery, argv: Sequence[str]) -> int:
    """``app.worker_main(argv)``, returning the worker's exit code, which worker_main drops:
    a worker stopped by an unrecoverable error would otherwise exit 0, as if asked to."""
    workers: list[Any] = []

    def started(sender: Any, **_: object) -> None:
        if getattr(sender, "app", None) is app:
            workers.append(sender)

    signals.worker_init.connect(started, weak=False)
    try:
        app.worker_main(list(argv))
    finally:
        signals.worker_init.disconnect(started)
    return int(workers[-1].exitcode or 0) if workers else 1
