"""Webhook contracts: the Standard Webhooks payload and the delivery log the API shows."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import get_args

from pydantic import BaseModel, ConfigDict, Field

from schemas.jobs import JobResource, JobStatus, WebhookEvent
from schemas.storable import SafeUrl

WEBHOOK_EVENTS: tuple[str, ...] = get_args(WebhookEvent)

# The event a job's status change emits.
STATUS_EVENTS: dict[JobStatus, WebhookEvent] = {
    JobStatus.RUNNING: "job.started",
    JobStatus.SUCCEEDED: "job.succeeded",
    JobStatus.FAILED: "job.failed",
    JobStatus.CANCELLED: "job.cancelled",
    JobStatus.EXPIRED: "job.expired",
}


class WebhookPayload(BaseModel):
    """The body of every webhook request (Standard Webhooks: type, timestamp, data)."""

    model_config = ConfigDict(frozen=True)

    type: WebhookEvent = Field(description="The event, e.g. `job.succeeded`.")
    timestamp: datetime = Field(description="When the event happened (not when it was sent).")
    data: JobResource = Field(description="The job as `GET /v1/jobs/{id}` showed it then.")


class DeliveryStatus(StrEnum):
    PENDING = "pending"  # waiting for its next attempt
    DELIVERING = "delivering"  # handed to a delivery task
    DELIVERED = "delivered"  # the receiver answered 2xx
    FAILED = "failed"  # the retry schedule is exhausted, or the URL was refused at send time
    DISABLED = "disabled"  # the endpoint answered 410 Gone


class WebhookAttempt(BaseModel):
    """One HTTP attempt of a delivery."""

    attempted_at: datetime
    status_code: int | None = Field(default=None, description="None when no response came.")
    latency_ms: float
    error: str | None = None
    outcome: str = Field(description="delivered, retry, failed, disabled or skipped.")


class WebhookDelivery(BaseModel):
    """One event of one job, with every attempt made to deliver it."""

    id: str = Field(description="The `webhook-id` header: the same on every attempt.")
    job_id: str
    event: WebhookEvent
    url: str
    status: DeliveryStatus
    attempts: int = Field(description="Attempts since the delivery was (re)started.")
    next_attempt_at: datetime | None = None
    last_status_code: int | None = None
    last_error: str | None = None
    created_at: datetime
    delivered_at: datetime | None = None
    attempt_log: list[WebhookAttempt] = Field(default_factory=list)


class WebhookDeliveryList(BaseModel):
    """`GET /v1/jobs/{id}/webhooks`."""

    data: list[WebhookDelivery]


class DisabledEndpoint(BaseModel):
    """A webhook URL that answered 410 Gone: nothing is sent to it until it is enabled."""

    url: str
    disabled_at: datetime
    reason: str


class DisabledEndpointList(BaseModel):
    """`GET /v1/webhooks/endpoints/disabled`."""

    data: list[DisabledEndpoint]


class EnableEndpoint(BaseModel):
    """`POST /v1/webhooks/endpoints/enable`: the URL exactly as the jobs gave it."""

    model_config = ConfigDict(extra="forbid")

    url: SafeUrl
