"""The SQS transport on boto3: ``SqsTransport`` builds every part of it."""

from transports.sqs.client import QueueNotFound, SqsConfig
from transports.sqs.consumer import SqsConsumer
from transports.sqs.depth import SqsDepth
from transports.sqs.local import LocalAws
from transports.sqs.publisher import SqsPublisher
from transports.sqs.queues import (
    check_queues,
    delete_queues,
    dlq_name,
    ensure_queues,
    is_fifo,
    queue_name,
)
from transports.sqs.transport import SqsTransport

__all__ = [
    "LocalAws",
    "QueueNotFound",
    "SqsConfig",
    "SqsConsumer",
    "SqsDepth",
    "SqsPublisher",
    "SqsTransport",
    "check_queues",
    "delete_queues",
    "dlq_name",
    "ensure_queues",
    "is_fifo",
    "queue_name",
]
