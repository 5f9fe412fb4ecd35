"""The AWS side of the composition root: SqsConfig and the S3 claim-check from Settings,
and queue checks on start."""

from __future__ import annotations

import asyncio

from inferq.settings import Settings
from transports.blobs import ClaimCheck, S3Blobs
from transports.sqs import QueueNotFound, SqsConfig, SqsDepth, ensure_queues


class QueueSetupError(Exception):
    """The jobs queue or its dead-letter queue is missing (and auto-create is off)."""


def sqs_config(settings: Settings) -> SqsConfig:
    return SqsConfig(
        endpoint_url=settings.aws_endpoint_url,
        visibility_timeout_s=settings.sqs_visibility_timeout_s,
        wait_time_s=settings.sqs_wait_time_s,
        max_receive_count=settings.sqs_max_receive_count,
        max_message_bytes=settings.sqs_max_message_bytes,
    )


async def prepare_queues(settings: Settings, *, create: bool | None = None) -> None:
    """Create the queues (``sqs_create_queues``), or check that both exist; a missing one
    raises QueueSetupError naming it."""
    config = sqs_config(settings)
    if settings.sqs_create_queues if create is None else create:
        await ensure_queues(config, settings.sqs_queue_name)
        return
    for queue in (settings.sqs_queue_name, settings.sqs_dlq):
        try:
            await SqsDepth(config, queue).depth()
        except QueueNotFound as exc:
            raise QueueSetupError(str(exc)) from exc


def prepare_queues_sync(settings: Settings) -> None:
    asyncio.run(prepare_queues(settings))


def claim_check(settings: Settings) -> ClaimCheck | None:
    """The S3 claim-check, when a bucket to write to or buckets to read from are configured."""
    if not settings.allowed_buckets:
        return None
    return ClaimCheck(
        blobs=S3Blobs(endpoint_url=settings.aws_endpoint_url),
        bucket=settings.s3_bucket,
        prefix=settings.s3_prefix,
        allowed_buckets=settings.allowed_buckets,
        inline_input_max_bytes=settings.inline_input_max_bytes,
        inline_result_max_bytes=settings.inline_result_max_bytes,
        input_url_max_bytes=settings.input_url_max_bytes,
        presign_ttl_s=settings.s3_presign_ttl_s,
    )
