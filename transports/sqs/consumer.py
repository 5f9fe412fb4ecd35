"""The SQS consumer: delete after the outcome. Semantics relied on are SQS's own (standard
and FIFO):

- a received message stays invisible for the visibility timeout; the consumer's heartbeat
  extends every message it still holds (acknowledged or not) so that a slow batch is not
  delivered twice, and stops extending a message held longer than ``max_hold_s``;
- ``ack`` only marks a message; ``commit`` deletes the marked ones with DeleteMessageBatch and
  keeps the entries that failed for a transient reason for the next commit;
- ``nack(delivery, delay_s)`` hands a message back after a backoff (ChangeMessageVisibility);
- ``stop`` hands back everything still held (visibility 0), so a graceful stop redelivers at
  once and only a crash waits for the visibility timeout.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from botocore.exceptions import BotoCoreError, ClientError

from transports.base import Delivery, TransportError
from transports.sqs.client import (
    BATCH,
    MISSING_CODES,
    QueueNotFound,
    SqsClient,
    SqsConfig,
    chunks,
    error_code,
)
from transports.sqs.wire import decode

log = logging.getLogger(__name__)


@dataclass
class _Held:
    handle: str
    received_at: float
    acked: bool = False


class SqsConsumer:
    """Consumer port on one queue. ``group`` is accepted for symmetry with Kafka and unused:
    every consumer of a queue competes for its messages."""

    def __init__(self, config: SqsConfig, queue: str, group: str | None = None) -> None:
        self.config = config
        self.source = queue
        self.group = group
        self._client = SqsClient(config, "sqs-con")
        self._url: str | None = None
        self._held: dict[str, _Held] = {}
        self._heartbeat: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the client and resolve the queue; QueueNotFound names a missing queue."""
        if self._url is not None:
            return
        self._client.open()
        try:
            self._url = await self._client.url(self.source)
        except BaseException:
            self._client.close()
            raise
        self._heartbeat = asyncio.create_task(
            self._extend_loop(), name=f"sqs-heartbeat-{self.source}"
        )

    async def stop(self) -> None:
        task, self._heartbeat = self._heartbeat, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._url is not None and self._held and self.config.release_on_stop:
            try:
                await self._change_visibility(list(self._held.values()), 0)
            except Exception as exc:  # they come back after the visibility timeout instead
                log.warning("handing %d messages back on stop failed: %s", len(self._held), exc)
        self._held.clear()
        self._url = None
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

    def _require(self) -> str:
        if self._url is None:
            raise TransportError("SqsConsumer is not started")
        return self._url

    def outstanding(self) -> int:
        """Received messages not yet deleted."""
        return len(self._held)

    async def fetch(self, max_records: int, timeout_s: float) -> list[Delivery]:
        """Long-poll once (whole seconds, at most ``wait_time_s``), then top up without
        waiting while full batches of 10 keep coming."""
        url = self._require()
        wait = min(self.config.wait_time_s, max(0, math.ceil(timeout_s)))
        out: list[Delivery] = []
        for call in range(self.config.receive_calls):
            want = min(BATCH, max_records - len(out))
            if want <= 0:
                break
            messages = await self._receive(url, want, wait if call == 0 else 0)
            now = time.monotonic()
            for message in messages:
                out.append(self._delivery(message, now))
            if len(messages) < want:
                break
        return out

    async def _receive(self, url: str, count: int, wait_s: int) -> list[dict[str, Any]]:
        try:
            response = await self._client.call(
                "receive_message",
                QueueUrl=url,
                MaxNumberOfMessages=count,
                WaitTimeSeconds=wait_s,
                VisibilityTimeout=self.config.visibility_timeout_s,
                MessageAttributeNames=["All"],
                MessageSystemAttributeNames=["ApproximateReceiveCount"],
            )
        except ClientError as exc:
            if error_code(exc) in MISSING_CODES:
                raise QueueNotFound(self.source, self.config.endpoint_url) from exc
            raise TransportError(f"receive from {self.source!r} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise TransportError(f"receive from {self.source!r} failed: {exc}") from exc
        messages: list[dict[str, Any]] = response.get("Messages", [])
        return messages

    def _delivery(self, message: dict[str, Any], now: float) -> Delivery:
        handle = str(message["ReceiptHandle"])
        self._held[handle] = _Held(handle, now)
        value, key, headers = decode(
            str(message.get("Body", "")), message.get("MessageAttributes") or {}
        )
        count = message.get("Attributes", {}).get("ApproximateReceiveCount", "1")
        return Delivery(
            value=value,
            key=key,
            headers=headers,
            source=self.source,
            position=str(message.get("MessageId", "")),
            receive_count=int(count),
            token=handle,
        )

    def ack(self, delivery: Delivery) -> None:
        held = self._held.get(delivery.token)
        if held is not None:
            held.acked = True

    async def commit(self) -> None:
        """DeleteMessageBatch the acknowledged messages; transient per-entry failures stay
        for the next commit, permanent ones (a stale receipt handle) are dropped."""
        url = self._require()
        acked = [h for h in self._held.values() if h.acked]
        for chunk in chunks(acked):
            entries = [{"Id": str(i), "ReceiptHandle": h.handle} for i, h in enumerate(chunk)]
            try:
                response = await self._client.call(
                    "delete_message_batch", QueueUrl=url, Entries=entries
                )
            except (ClientError, BotoCoreError) as exc:
                raise TransportError(f"delete from {self.source!r} failed: {exc}") from exc
            for ok in response.get("Successful", []):
                self._held.pop(chunk[int(ok["Id"])].handle, None)
            for failed in response.get("Failed", []):
                held = chunk[int(failed["Id"])]
                if failed.get("SenderFault"):
                    log.warning(
                        "delete of a message from %r refused (%s: %s); it will be redelivered",
                        self.source,
                        failed.get("Code"),
                        failed.get("Message"),
                    )
                    self._held.pop(held.handle, None)
                else:
                    log.info(
                        "delete from %r failed (%s); retrying next commit",
                        self.source,
                        failed.get("Code"),
                    )

    async def nack(self, delivery: Delivery, delay_s: float = 0.0) -> None:
        """Hand a message back: it becomes visible again after ``delay_s`` (backoff)."""
        url = self._require()
        held = self._held.pop(delivery.token, None)
        if held is None:
            return
        delay = max(0, min(math.ceil(delay_s), 12 * 3600))
        try:
            await self._client.call(
                "change_message_visibility",
                QueueUrl=url,
                ReceiptHandle=held.handle,
                VisibilityTimeout=delay,
            )
        except (ClientError, BotoCoreError) as exc:
            # it comes back after its current visibility timeout instead
            log.warning("nack on %r failed: %s", self.source, exc)

    async def _extend_loop(self) -> None:
        period = self.config.heartbeat_s or max(self.config.visibility_timeout_s / 3, 0.2)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            due = [h for h in self._held.values() if now - h.received_at < self.config.max_hold_s]
            if not due:
                continue
            try:
                await self._change_visibility(due, self.config.visibility_timeout_s)
            except Exception as exc:
                log.warning("extending %d messages on %r failed: %s", len(due), self.source, exc)

    async def _change_visibility(self, held: Sequence[_Held], timeout_s: int) -> None:
        url = self._require()
        for chunk in chunks(held):
            entries = [
                {"Id": str(i), "ReceiptHandle": h.handle, "VisibilityTimeout": timeout_s}
                for i, h in enumerate(chunk)
            ]
            response = await self._client.call(
                "change_message_visibility_batch", QueueUrl=url, Entries=entries
            )
            for failed in response.get("Failed", []):
                log.debug("visibility change refused on %r: %s", self.source, failed)
