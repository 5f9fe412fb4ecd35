"""What the consume loop's parts pass each other: its settings, an accepted event, a job
on its way through a batch."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from jobstore.records import Binding, JobRecord
from schemas.contracts import ModelConfig
from schemas.envelope import JobEnvelope
from transports.base import Delivery


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str
    fetch_max_records: int = 512
    fetch_timeout_s: float = 0.1
    lease_s: float = 300.0
    heartbeat_interval_s: float = 5.0
    depth_interval_s: float = 5.0
    max_pending_writes: int = 2
    # Transports that count receives and can hand a message back (SQS): a retryable failure
    # is retried with backoff until the ``max_deliveries``-th receive, which is final; a
    # message received more often than that (no redrive policy) is dead-lettered unrun.
    max_deliveries: int | None = None
    # the transport's Capabilities.redelivers_itself: retries are handed back with
    # ``consumer.nack`` (SQS) instead of waiting in the store for the retry pump (Kafka)
    redelivers: bool = False


@dataclass
class WorkItem:
    record: JobRecord
    payload: BaseModel
    delivery: Delivery
    enqueued_at: float


@dataclass(frozen=True)
class Accepted:
    """A decoded event that fits a served model, before its row is claimed."""

    envelope: JobEnvelope
    config: ModelConfig
    payload: BaseModel
    delivery: Delivery
    binding: Binding
