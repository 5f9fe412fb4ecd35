"""The command line's only door to the bus: every call that depends on the transport goes
through here, so the commands hold no transport-specific code.

``create_topics`` is the one function that calls a transport package itself (there is no
wiring-level function that prepares the bus yet); with one per-transport object in
``inferq.wiring`` this module is all there is to re-point.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from inferq.settings import Settings
    from transports.base import Publisher
    from transports.blobs import ClaimCheck


class BusError(Exception):
    """The bus cannot be used as configured; the message says what to set or create."""


def redrive_publisher(settings: Settings) -> tuple[Publisher, str]:
    """(publisher, jobs destination) of the configured transport, as the API's redrive has."""
    from inferq.wiring import ConfigError, job_publisher

    try:
        publisher, destination, _structured = job_publisher(settings, "inferq-dlq")
    except ConfigError as exc:
        raise BusError(str(exc)) from exc
    return publisher, destination


def claim_check(settings: Settings) -> ClaimCheck | None:
    """The S3 claim-check, to replay dead letters whose whole payload is in S3."""
    from inferq.sqs_wiring import claim_check

    return claim_check(settings)


def create_topics(settings: Settings) -> None:
    """The jobs topic (``kafka_partitions``) and its dead-letter topic, where missing."""
    from inferq.wiring import ConfigError, kafka_config
    from transports.base import TransportError
    from transports.kafka import ensure_topics

    topics = {settings.kafka_topic: settings.kafka_partitions, settings.dlq_topic: 1}
    try:
        asyncio.run(ensure_topics(kafka_config(settings, "inferq-admin"), topics))
    except (ConfigError, TransportError) as exc:
        raise BusError(str(exc)) from exc


def create_queues(settings: Settings) -> None:
    """The jobs queue and its dead-letter queue, joined by a RedrivePolicy, where missing."""
    from inferq.sqs_wiring import prepare_queues
    from transports.base import TransportError

    try:
        asyncio.run(prepare_queues(settings, create=True))
    except TransportError as exc:
        raise BusError(str(exc)) from exc
