"""The events topic of the SQS transport: an SNS topic ``<queue>-events`` that users
subscribe their own queues to, and the publisher of job events onto it.

Each event is published in binary mode: the job resource as the message, the CloudEvents
attributes as String message attributes (an SQS subscription with raw message delivery
hands them over as the message's own attributes). A FIFO queue's topic is a FIFO topic,
grouped by job id (its events stay in order) and deduplicated by event id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from transports.base import Headers, PublishError, TransportError
from transports.sqs.client import SqsClient, SqsConfig, chunks
from transports.sqs.queues import FIFO_SUFFIX, is_fifo

Item = tuple[bytes, bytes | None, Headers]  # (value, key, headers) of one message


def events_topic_name(queue: str) -> str:
    """``<queue>-events``, FIFO-aware: ``jobs.fifo`` -> ``jobs-events.fifo``."""
    if is_fifo(queue):
        return queue[: -len(FIFO_SUFFIX)] + "-events" + FIFO_SUFFIX
    return queue + "-events"


async def ensure_topic(config: SqsConfig, name: str) -> str:
    """Create the SNS topic where missing (CreateTopic is idempotent); its ARN."""
    client = SqsClient(config, "sns-admin", service="sns")
    client.open()
    try:
        attributes = {"FifoTopic": "true"} if is_fifo(name) else {}
        response = await client.call("create_topic", Name=name, Attributes=attributes)
        return str(response["TopicArn"])
    except (ClientError, BotoCoreError) as exc:
        raise TransportError(f"cannot create SNS topic {name!r}: {exc}") from exc
    finally:
        client.close()


def _attributes(headers: Headers) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, raw in headers:
        if raw:
            out[name] = {"DataType": "String", "StringValue": raw.decode("utf-8", "replace")}
    return out


class SnsPublisher:
    """Publisher port onto SNS topics (by name), returning once SNS has accepted each."""

    def __init__(self, config: SqsConfig) -> None:
        self._client = SqsClient(config, "sns-pub", service="sns")
        self._arns: dict[str, str] = {}

    async def start(self) -> None:
        self._client.open()

    async def stop(self) -> None:
        self._client.close()

    async def _arn(self, topic: str) -> str:
        cached = self._arns.get(topic)
        if cached is not None:
            return cached
        token: str | None = None
        while True:
            page = await self._client.call("list_topics", **({"NextToken": token} if token else {}))
            for entry in page.get("Topics", []):
                arn = str(entry["TopicArn"])
                if arn.rsplit(":", 1)[-1] == topic:
                    self._arns[topic] = arn
                    return arn
            token = page.get("NextToken")
            if not token:
                raise PublishError(
                    f"SNS topic {topic!r} does not exist: create it with `inferq queues create`"
                )

    async def publish(
        self, destination: str, value: bytes, *, key: bytes | None = None, headers: Headers = ()
    ) -> None:
        await self.publish_many(destination, [(value, key, headers)])

    async def publish_many(self, destination: str, items: Iterable[Item]) -> int:
        """PublishBatch, ten at a time, in order; PublishError when any entry was refused."""
        fifo = is_fifo(destination)
        entries = [_entry(str(i), *item, fifo=fifo) for i, item in enumerate(items)]
        try:
            arn = await self._arn(destination)
            for batch in chunks(entries):
                response = await self._client.call(
                    "publish_batch", TopicArn=arn, PublishBatchRequestEntries=list(batch)
                )
                if response.get("Failed"):
                    failed = response["Failed"][0]
                    raise PublishError(f"publish to SNS {destination!r} refused: {failed}")
        except PublishError:
            raise
        except (ClientError, BotoCoreError, TransportError) as exc:
            raise PublishError(f"publish to SNS {destination!r} failed: {exc}") from exc
        return len(entries)


def _entry(
    ident: str, value: bytes, key: bytes | None, headers: Headers, *, fifo: bool
) -> dict[str, Any]:
    entry: dict[str, Any] = {"Id": ident, "Message": value.decode("utf-8")}
    attributes = _attributes(headers)
    if attributes:
        entry["MessageAttributes"] = attributes
    if fifo:
        # a job's events in order (its own group), a republished one dropped (its event id)
        group = (key or b"inferq").decode("utf-8", "replace")[:128]
        event_id = dict(headers).get("ce_id", value[:64])
        entry["MessageGroupId"] = group
        entry["MessageDeduplicationId"] = hashlib.sha256(event_id).hexdigest()
    return entry
