"""The SQS depth probe: visible, in flight and delayed messages of one queue."""

from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError

from transports.base import QueueDepth, TransportError
from transports.sqs.client import SqsClient, SqsConfig


class SqsDepth:
    """DepthProbe: visible + in flight (NotVisible) + delayed messages of one queue.

    ``partitions`` splits the backlog into ``visible``, ``in_flight`` and ``delayed``.
    """

    def __init__(self, config: SqsConfig, queue: str, group: str | None = None) -> None:
        self.config = config
        self.source = queue
        self._client = SqsClient(config, "sqs-depth")
        self._owned = False

    async def start(self) -> None:
        self._client.open()
        self._owned = True

    async def stop(self) -> None:
        self._client.close()
        self._owned = False

    async def depth(self) -> QueueDepth:
        if self._owned:
            return await self._measure()
        self._client.open()
        try:
            return await self._measure()
        finally:
            self._client.close()

    async def _measure(self) -> QueueDepth:
        url = await self._client.url(self.source)
        try:
            response = await self._client.call(
                "get_queue_attributes",
                QueueUrl=url,
                AttributeNames=[
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible",
                    "ApproximateNumberOfMessagesDelayed",
                ],
            )
        except (ClientError, BotoCoreError) as exc:
            raise TransportError(f"depth of {self.source!r} unknown: {exc}") from exc
        attrs = response.get("Attributes", {})
        visible = int(attrs.get("ApproximateNumberOfMessages", 0))
        in_flight = int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0))
        delayed = int(attrs.get("ApproximateNumberOfMessagesDelayed", 0))
        return QueueDepth(
            self.source,
            visible + in_flight + delayed,
            in_flight=in_flight,
            partitions={"visible": visible, "in_flight": in_flight, "delayed": delayed},
        )
