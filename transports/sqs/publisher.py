"""The SQS publisher: SendMessage, returning once SQS has stored the message.

FIFO rule: the message key (the API keys each job by its id) is both MessageGroupId and
MessageDeduplicationId, so a job id is deduplicated and jobs are independent groups; a
publisher that needs ordering gives related messages one key. Unkeyed messages share the
group ``inferq`` and are deduplicated by the SHA-256 of their body.
"""

from __future__ import annotations

import hashlib
import re
from types import TracebackType
from typing import Any, Self

from botocore.exceptions import BotoCoreError, ClientError

from transports.base import Headers, MessageTooLarge, PublishError, TransportError
from transports.sqs.client import QueueNotFound, SqsClient, SqsConfig
from transports.sqs.queues import is_fifo
from transports.sqs.wire import encode

_FIFO_ID = re.compile(r"^[A-Za-z0-9!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]{1,128}$")


def _fifo_ids(value: bytes, key: bytes | None) -> tuple[str, str]:
    """(MessageGroupId, MessageDeduplicationId) by the documented rule."""
    if key:
        text = key.decode("utf-8", "replace")
        ident = text if _FIFO_ID.match(text) else hashlib.sha256(key).hexdigest()
        return ident, ident
    return "inferq", hashlib.sha256(value).hexdigest()


class SqsPublisher:
    """Publisher port: SendMessage, returning once SQS has stored the message."""

    def __init__(self, config: SqsConfig) -> None:
        self.config = config
        self._client = SqsClient(config, "sqs-pub")

    async def start(self) -> None:
        self._client.open()

    async def stop(self) -> None:
        self._client.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def max_message_bytes(self) -> int:
        return self.config.max_message_bytes

    def message_size(self, value: bytes, *, key: bytes | None = None, headers: Headers = ()) -> int:
        body, attributes = encode(value, key, headers)
        return len(body.encode()) + sum(_attribute_size(n, a) for n, a in attributes.items())

    async def publish(
        self, destination: str, value: bytes, *, key: bytes | None = None, headers: Headers = ()
    ) -> None:
        body, attributes = encode(value, key, headers)
        request: dict[str, Any] = {"MessageBody": body}
        if attributes:
            request["MessageAttributes"] = attributes
        if is_fifo(destination):
            group, dedup = _fifo_ids(value, key)
            request["MessageGroupId"] = group
            request["MessageDeduplicationId"] = dedup
        try:
            url = await self._client.url(destination)
            await self._client.call("send_message", QueueUrl=url, **request)
        except QueueNotFound as exc:
            raise PublishError(str(exc)) from exc
        except TransportError as exc:
            raise PublishError(f"publish to {destination!r} failed: {exc}") from exc
        except ClientError as exc:
            if "must be shorter than" in str(exc):
                raise MessageTooLarge(f"publish to {destination!r} refused: {exc}") from exc
            raise PublishError(f"publish to {destination!r} not acknowledged: {exc}") from exc
        except BotoCoreError as exc:
            raise PublishError(f"publish to {destination!r} not acknowledged: {exc}") from exc


def _attribute_size(name: str, attr: dict[str, Any]) -> int:
    value = attr.get("BinaryValue", b"") or str(attr.get("StringValue", "")).encode()
    return len(name.encode()) + len(str(attr["DataType"]).encode()) + len(value)
