"""The control plane's Celery consumer: Celery's own, except that a Redis outage cannot stop the
worker through kombu's cleanup of the dead connection (issue 8).

When Redis goes away while tasks are unacknowledged, Celery cleans up with ``collect()`` and then
``close()``. If both of collect's tries to close the consumer's channel fail part-way (reading
its outstanding BRPOP, then deleting the pidbox's fanout binding), collect detaches the
transport anyway; ``close()`` then gets as far as restoring the unacked messages, and rebuilding
the Redis pool from the detached transport raises ``AttributeError: 'NoneType' object has no
attribute 'hostname'``. That is neither a connection nor a channel error: Celery reported
"Unrecoverable error" and the worker exited. Once past that, every late acknowledgement of a
message from that channel (a task that finished while the consumer reconnected) raises the same
error inside the new connection's event loop, with the same end.

Both are caught here and logged. An acknowledgement that is lost leaves the message to be
delivered again (or lost with Redis); either way the outbox claim lapses after
``lease_s`` and the delivery is handed out again, and a stale claim sends nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

CONSUMER = "control.consumer:Consumer"  # for the app's ``worker_consumer``

log = logging.getLogger(__name__)


class Consumer(CeleryConsumer):
    def on_connection_error_after_connected(self, exc: BaseException) -> None:
        try:
            super().on_connection_error_after_connected(exc)
        except Exception as cleanup:
            log.warning(
                "consumer: cleanup of the lost broker connection failed (%r); reconnecting anyway",
                cleanup,
                exc_info=True,
            )
            self.connection = None  # dead; Celery's restart opens a new one

    def call_soon_ack(self, p: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return super().call_soon_ack(_guarded_ack(p, self.connection_errors), *args, **kwargs)


def _guarded_ack(
    ack: Callable[..., Any], connection_errors: tuple[type[BaseException], ...]
) -> Callable[..., Any]:
    """``message.ack_log_error`` (or reject), which lets a connection error through on purpose
    (Celery reconnects) and anything else too: that is logged here instead."""

    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return ack(*args, **kwargs)
        except connection_errors:
            raise
        except Exception as exc:
            message = getattr(ack, "__self__", None)
            tag = getattr(message, "delivery_tag", "?")
            log.critical("Couldn't ack %s: its channel is gone (%r)", tag, exc, exc_info=True)
            return None

    return guarded
