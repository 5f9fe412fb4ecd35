"""The SQS adapter on boto3: publisher, consumer (delete after the outcome), depth probe, queues.

boto3 is blocking, so every call runs on a small thread pool owned by the client object; the
event loop never waits on the network. Semantics relied on are SQS's own (standard and FIFO):

- a received message stays invisible for the visibility timeout; the consumer's heartbeat
  extends every message it still holds (acknowledged or not) so that a slow batch is not
  delivered twice, and stops extending a message held longer than ``max_hold_s``;
- ``ack`` only marks a message; ``commit`` deletes the marked ones with DeleteMessageBatch and
  keeps the entries that failed for a transient reason for the next commit;
- ``nack(delivery, delay_s)`` hands a message back after a backoff (ChangeMessageVisibility);
- ``stop`` hands back everything still held (visibility 0), so a graceful stop redelivers at
  once and only a crash waits for the visibility timeout;
- FIFO rule: the message key (the API keys each job by its id) is both MessageGroupId and
  MessageDeduplicationId, so a job id is deduplicated and jobs are independent groups; a
  publisher that needs ordering gives related messages one key. Unkeyed messages share the
  group ``inferq`` and are deduplicated by the SHA-256 of their body.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from transports.base import (
    Delivery,
    Headers,
    MessageTooLarge,
    PublishError,
    QueueDepth,
    TransportError,
)
from transports.sqs_wire import decode, encode

log = logging.getLogger(__name__)

FIFO_SUFFIX = ".fifo"
_BATCH = 10  # the most SQS takes in one batch call or returns from one receive
_MISSING_CODES = {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"}
_FIFO_ID = re.compile(r"^[A-Za-z0-9!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]{1,128}$")
_T = TypeVar("_T")


class QueueNotFound(TransportError):
    """The named queue does not exist at the endpoint."""

    def __init__(self, queue: str, endpoint: str | None) -> None:
        where = endpoint or "the AWS default endpoint"
        super().__init__(
            f"SQS queue {queue!r} does not exist at {where}: create it with "
            "`inferq queues create` (or let the worker create it on start)"
        )
        self.queue = queue


@dataclass(frozen=True)
class SqsConfig:
    """Client settings; endpoint and region come from the settings layer (boto3's own
    variables), ``None`` leaves them to boto3's defaults."""

    endpoint_url: str | None = None
    region: str | None = None
    visibility_timeout_s: int = 30
    wait_time_s: int = 5  # longest long-poll of one ReceiveMessage
    max_receive_count: int = 5  # RedrivePolicy of queues created by ensure_queues
    heartbeat_s: float | None = None  # visibility extension period; None: a third of it
    max_hold_s: float = 3600.0  # stop extending a message held longer (stuck work)
    receive_calls: int = 10  # ReceiveMessage calls at most per fetch (10 messages each)
    release_on_stop: bool = True  # hand held messages back on stop (visibility 0)
    threads: int = 4
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    # SQS counts the body and every attribute's name, type and value; 256 KiB is the limit
    # queues have long had (newer queues may take 1 MiB, so this is the safe figure)
    max_message_bytes: int = 256 * 1024


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


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


class _Client:
    """One boto3 SQS client, its thread pool and a queue-URL cache."""

    def __init__(self, config: SqsConfig, name: str) -> None:
        self.config = config
        self._name = name
        self._sqs: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._urls: dict[str, str] = {}

    def open(self) -> None:
        if self._sqs is not None:
            return
        c = self.config
        try:
            self._sqs = boto3.session.Session().client(
                "sqs",
                endpoint_url=c.endpoint_url,
                region_name=c.region,
                config=BotoConfig(
                    retries={"mode": "standard", "max_attempts": 3},
                    connect_timeout=c.connect_timeout_s,
                    read_timeout=max(c.read_timeout_s, c.wait_time_s + 5),
                    max_pool_connections=max(10, c.threads * 2),
                ),
            )
        except BotoCoreError as exc:  # e.g. no region configured
            raise TransportError(f"cannot create an SQS client: {exc}") from exc
        self._pool = ThreadPoolExecutor(c.threads, thread_name_prefix=f"inferq-{self._name}")

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if self._sqs is not None:
            self._sqs.close()
            self._sqs = None

    async def run(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        if self._pool is None:
            raise TransportError(f"SQS {self._name} is not started")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    async def call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        if self._sqs is None:
            raise TransportError(f"SQS {self._name} is not started")
        result: dict[str, Any] = await self.run(getattr(self._sqs, operation), **kwargs)
        return result

    async def url(self, queue: str) -> str:
        cached = self._urls.get(queue)
        if cached is not None:
            return cached
        try:
            response = await self.call("get_queue_url", QueueName=queue)
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                raise QueueNotFound(queue, self.config.endpoint_url) from exc
            raise TransportError(f"cannot look up SQS queue {queue!r}: {exc}") from exc
        except BotoCoreError as exc:
            raise TransportError(f"cannot reach SQS for queue {queue!r}: {exc}") from exc
        self._urls[queue] = url = str(response["QueueUrl"])
        return url


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
        self._client = _Client(config, "sqs-pub")

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
        self._client = _Client(config, "sqs-con")
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
            want = min(_BATCH, max_records - len(out))
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
            if _error_code(exc) in _MISSING_CODES:
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
        for chunk in _chunks(acked):
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
        for chunk in _chunks(held):
            entries = [
                {"Id": str(i), "ReceiptHandle": h.handle, "VisibilityTimeout": timeout_s}
                for i, h in enumerate(chunk)
            ]
            response = await self._client.call(
                "change_message_visibility_batch", QueueUrl=url, Entries=entries
            )
            for failed in response.get("Failed", []):
                log.debug("visibility change refused on %r: %s", self.source, failed)


class SqsDepth:
    """DepthProbe: visible + in flight (NotVisible) + delayed messages of one queue.

    ``partitions`` splits the backlog into ``visible``, ``in_flight`` and ``delayed``.
    """

    def __init__(self, config: SqsConfig, queue: str, group: str | None = None) -> None:
        self.config = config
        self.source = queue
        self._client = _Client(config, "sqs-depth")
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


async def ensure_queues(config: SqsConfig, queue: str) -> tuple[str, str]:
    """Create ``queue`` and ``dlq_name(queue)`` if missing and (re)join them with a
    RedrivePolicy of ``config.max_receive_count``; returns their URLs. Idempotent."""
    client = _Client(config, "sqs-admin")
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


async def _create(client: _Client, name: str, fifo: bool, attributes: dict[str, str]) -> str:
    attrs = dict(attributes)
    if fifo:
        attrs["FifoQueue"] = "true"
    response = await client.call("create_queue", QueueName=name, Attributes=attrs)
    return str(response["QueueUrl"])


async def delete_queues(config: SqsConfig, queues: Sequence[str]) -> None:
    """Delete queues that exist (tests and tools); missing ones are ignored."""
    client = _Client(config, "sqs-admin")
    client.open()
    try:
        for queue in queues:
            try:
                await client.call("delete_queue", QueueUrl=await client.url(queue))
            except QueueNotFound:
                continue
    finally:
        client.close()


def _chunks(items: Sequence[_T], size: int = _BATCH) -> Iterator[Sequence[_T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
