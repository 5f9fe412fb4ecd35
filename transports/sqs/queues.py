"""SQS queue names and administration: the jobs queue, its dead-letter queue and the
RedrivePolicy that joins them."""

from __future__ import annotations

import json
from collections.abc import Sequence

from botocore.exceptions import BotoCoreError, ClientError

from transports.base import TransportError
from transports.sqs.client import QueueNotFound, SqsClient, SqsConfig

FIFO_SUFFIX = ".fifo"


def is_fifo(queue: str) -> bool:
    return queue.endswith(FIFO_SUFFIX)


def queue_name(base: str, *, fifo: bool) -> str:
    """The jobs queue name: ``base`` with ``.fifo`` added for a FIFO queue."""
    if fifo and not is_fifo(base):
        return base + FIFO_SUFFIX
    return base


def dlq_name(queue: str) -> str:
    """``<queue>-dlq``, FIFO-aware: ``jobs.fifo`` -> ``jobs-dlq.fifo``."""
    if is_fifo(queue):
        return queue[: -len(FIFO_SUFFIX)] + "-dlq" + FIFO_SUFFIX
    return queue + "-dlq"


async def ensure_queues(config: SqsConfig, queue: str) -> tuple[str, str]:
    """Create ``queue`` and ``dlq_name(queue)`` if missing and (re)join them with a
    RedrivePolicy of ``config.max_receive_count``; returns their URLs. Idempotent."""
    client = SqsClient(config, "sqs-admin")
    client.open()
    try:
        fifo = is_fifo(queue)
        dlq = dlq_name(queue)
        dlq_url = await _create(client, dlq, fifo, {"MessageRetentionPeriod": "1209600"})
        arn_attrs = await client.call(
            "get_queue_attributes", QueueUrl=dlq_url, AttributeNames=["QueueArn"]
        )
        redrive = {
            "deadLetterTargetArn": arn_attrs["Attributes"]["QueueArn"],
            "maxReceiveCount": str(config.max_receive_count),
        }
        attributes = {
            "VisibilityTimeout": str(config.visibility_timeout_s),
            "RedrivePolicy": json.dumps(redrive),
        }
        url = await _create(client, queue, fifo, {})
        await client.call("set_queue_attributes", QueueUrl=url, Attributes=attributes)
        return url, dlq_url
    except (ClientError, BotoCoreError) as exc:
        raise TransportError(
            f"cannot create SQS queues {queue!r}, {dlq_name(queue)!r}: {exc}"
        ) from exc
    finally:
        client.close()


async def _create(client: SqsClient, name: str, fifo: bool, attributes: dict[str, str]) -> str:
    attrs = dict(attributes)
    if fifo:
        attrs["FifoQueue"] = "true"
    response = await client.call("create_queue", QueueName=name, Attributes=attrs)
    return str(response["QueueUrl"])


async def delete_queues(config: SqsConfig, queues: Sequence[str]) -> None:
    """Delete queues that exist (tests and tools); missing ones are ignored."""
    client = SqsClient(config, "sqs-admin")
    client.open()
    try:
        for queue in queues:
            try:
                await client.call("delete_queue", QueueUrl=await client.url(queue))
            except QueueNotFound:
                continue
    finally:
        client.close()


async def check_queues(config: SqsConfig, queues: Sequence[str]) -> None:
    """Raise QueueNotFound naming the first of ``queues`` that does not exist."""
    client = SqsClient(config, "sqs-admin")
    client.open()
    try:
        for queue in queues:
            await client.url(queue)
    finally:
        client.close()
