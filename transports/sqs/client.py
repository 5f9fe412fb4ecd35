"""The SQS client that the publisher, consumer, probe and queue admin share, and its settings.

boto3 is blocking, so every call runs on a small thread pool owned by the client object; the
event loop never waits on the network.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from transports.base import TransportError

BATCH = 10  # the most SQS takes in one batch call or returns from one receive
MISSING_CODES = {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"}
T = TypeVar("T")


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


def error_code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


class SqsClient:
    """One boto3 SQS client (``service="sns"``: an SNS one), its thread pool and a
    queue-URL cache."""

    def __init__(self, config: SqsConfig, name: str, *, service: str = "sqs") -> None:
        self.config = config
        self._name = name
        self._service = service
        self._sqs: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._urls: dict[str, str] = {}

    def open(self) -> None:
        if self._sqs is not None:
            return
        c = self.config
        try:
            self._sqs = boto3.session.Session().client(
                self._service,
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
            raise TransportError(f"cannot create an {self._service} client: {exc}") from exc
        self._pool = ThreadPoolExecutor(c.threads, thread_name_prefix=f"inferq-{self._name}")

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if self._sqs is not None:
            self._sqs.close()
            self._sqs = None

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
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
            if error_code(exc) in MISSING_CODES:
                raise QueueNotFound(queue, self.config.endpoint_url) from exc
            raise TransportError(f"cannot look up SQS queue {queue!r}: {exc}") from exc
        except BotoCoreError as exc:
            raise TransportError(f"cannot reach SQS for queue {queue!r}: {exc}") from exc
        self._urls[queue] = url = str(response["QueueUrl"])
        return url


def chunks(items: Sequence[T], size: int = BATCH) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
