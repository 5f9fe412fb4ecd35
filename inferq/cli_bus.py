"""The command line's only door to the bus: every call that depends on the transport goes
through here, and each asks the transport object of ``inferq.wiring.transport_of``, so the
commands hold no transport-specific code."""

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
    from inferq.wiring import transport_of

    transport = transport_of(settings)
    if transport.missing is not None:
        raise BusError(transport.missing)
    return transport.publisher("inferq-dlq"), transport.jobs


def claim_check(settings: Settings) -> ClaimCheck | None:
    """The S3 claim-check, to replay dead letters whose whole payload is in S3."""
    from inferq.wiring import claim_check

    return claim_check(settings)


def create_topics(settings: Settings) -> None:
    """The jobs topic (``kafka_partitions``) and its dead-letter topic, where missing."""
    _create(settings, "kafka")


def create_queues(settings: Settings) -> None:
    """The jobs queue and its dead-letter queue, joined by a RedrivePolicy, where missing."""
    _create(settings, "sqs")


def _create(settings: Settings, name: str) -> None:
    from inferq.wiring import ConfigError, transport_of
    from transports.base import TransportError

    try:
        transport = transport_of(settings, name)
        if transport.missing is not None:
            raise BusError(transport.missing)
        asyncio.run(transport.prepare(create=True))
    except (ConfigError, TransportError) as exc:
        raise BusError(str(exc)) from exc
