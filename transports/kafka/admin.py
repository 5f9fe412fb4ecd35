"""Kafka topic administration: create the topics a transport needs."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from transports.base import TransportError
from transports.kafka.config import KafkaConfig

log = logging.getLogger(__name__)


async def ensure_topics(config: KafkaConfig, topics: Mapping[str, int]) -> None:
    """Create the topics that are missing with the given partition counts (replication 1).

    An existing topic is left as it is; fewer partitions than asked for is logged.
    """
    if not topics:
        return
    admin = AIOKafkaAdminClient(
        bootstrap_servers=config.bootstrap,
        client_id=f"{config.client_id}-admin",
        request_timeout_ms=config.request_timeout_ms,
    )
    try:
        await admin.start()
        response = await admin.create_topics(
            [NewTopic(name, partitions, 1) for name, partitions in topics.items()]
        )
        existing: list[str] = []
        for name, code, *rest in response.topic_errors:
            error = for_code(code)
            if error is TopicAlreadyExistsError:
                existing.append(name)
            elif code != 0:
                message = rest[0] if rest else None
                raise TransportError(f"cannot create topic {name!r}: {message or error.__name__}")
        if existing:
            for meta in await admin.describe_topics(existing):
                have, want = len(meta["partitions"]), topics[meta["topic"]]
                if have < want:
                    log.warning(
                        "topic %r has %d partitions, fewer than the %d configured",
                        meta["topic"],
                        have,
                        want,
                    )
    except KafkaError as exc:
        raise TransportError(f"cannot create topics {sorted(topics)}") from exc
    finally:
        await admin.close()
