"""Job request and job resource: the HTTP contract, also the data of a bus event."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from schemas.errors import ErrorCode
from schemas.storable import (
    INPUT_MAX_DEPTH,
    METADATA_MAX_BYTES,
    METADATA_MAX_DEPTH,
    Unstorable,
    check_json,
    check_text,
    not_bool,
    pydantic_error,
)

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$"
MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9._\-]{0,63}$"

S3_URL_PATTERN = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]/.+$"

JobId = Annotated[str, StringConstraints(pattern=JOB_ID_PATTERN)]
ModelName = Annotated[str, StringConstraints(pattern=MODEL_NAME_PATTERN)]
ModelVersion = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._\-]{1,32}$")]


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED}
)

WebhookEvent = Literal["job.started", "job.succeeded", "job.failed", "job.cancelled", "job.expired"]
TERMINAL_WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = (
    "job.succeeded",
    "job.failed",
    "job.cancelled",
    "job.expired",
)


class WebhookSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    url: AnyHttpUrl = Field(description="Where the job's events are POSTed.")
    events: list[WebhookEvent] = Field(
        default_factory=lambda: list(TERMINAL_WEBHOOK_EVENTS),
        description="Which events to send; the terminal ones by default.",
    )


class JobRequest(BaseModel):
    """What a client submits with `POST /v1/jobs`, and the data of a bus job event."""

    model_config = ConfigDict(extra="forbid")

    model: ModelName = Field(description="A registered model name.")
    version: ModelVersion | None = Field(
        default=None, description="A model version; the model's default when absent."
    )
    input_url: str | None = Field(
        default=None,
        pattern=S3_URL_PATTERN,
        max_length=1100,
        description="`s3://bucket/key` of a JSON object holding the input (claim-check), in an "
        "allowed bucket; the worker reads it. Exactly one of `input` and `input_url`.",
    )
    input: dict[str, Any] | None = Field(
        default=None,
        validate_default=True,
        description="Validated against the model's input contract. Exactly one of `input` and "
        "`input_url`.",
    )
    webhook: WebhookSpec | None = None
    priority: Annotated[int, BeforeValidator(not_bool)] = Field(
        default=5, ge=0, le=9, description="0 (lowest) to 9."
    )
    ttl_s: Annotated[int, BeforeValidator(not_bool)] | None = Field(
        default=None, ge=1, le=7 * 24 * 3600, description="A job not started by then expires."
    )
    metadata: dict[str, Any] | None = Field(
        default=None,
        description=f"Echoed back untouched. At most {METADATA_MAX_DEPTH} levels deep and "
        f"{METADATA_MAX_BYTES} bytes as JSON; strings hold no NUL and no lone surrogate.",
    )

    @field_validator("input", mode="after")
    @classmethod
    def _one_input(cls, v: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        # input_url is declared first, so it is in info.data when it was valid
        url = info.data.get("input_url")
        if v is None and url is None:
            raise PydanticCustomError("missing", "Field required (or give input_url)")
        if v is not None and url is not None:
            raise PydanticCustomError("one_input", "give input or input_url, not both")
        return v

    # What is stored and published must be storable everywhere (schemas.storable); the same
    # rules then hold for a job from HTTP and one decoded off the bus by a worker.
    @field_validator("input_url", mode="after")
    @classmethod
    def _storable_url(cls, v: str | None) -> str | None:
        try:
            if v is not None:
                check_text(v, "input_url")
        except Unstorable as exc:
            raise pydantic_error(exc) from exc
        return v

    @field_validator("input", mode="after")
    @classmethod
    def _storable_input(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        try:
            if v is not None:
                check_json(v, "input", max_depth=INPUT_MAX_DEPTH)
        except Unstorable as exc:
            raise pydantic_error(exc) from exc
        return v

    @field_validator("metadata", mode="after")
    @classmethod
    def _storable_metadata(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        try:
            if v is not None:
                check_json(
                    v, "metadata", max_depth=METADATA_MAX_DEPTH, max_bytes=METADATA_MAX_BYTES
                )
        except Unstorable as exc:
            raise pydantic_error(exc) from exc
        return v


class JobError(BaseModel):
    model_config = ConfigDict(frozen=True)

    code: ErrorCode | str
    message: str
    retryable: bool = False


class JobResource(BaseModel):
    """A job as `GET /v1/jobs/{id}` shows it."""

    id: str
    status: JobStatus
    model: str
    version: str | None
    result: dict[str, Any] | None = None
    result_url: str | None = Field(
        default=None,
        description="A presigned URL of a result too large to return inline (then `result` is "
        "null).",
    )
    error: JobError | None = None
    attempts: int = 0
    priority: int = 5
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    expires_at: datetime | None = None
    next_attempt_at: datetime | None = Field(
        default=None, description="When a job waiting out a retry backoff runs again."
    )
    metadata: dict[str, Any] | None = None
    source: str | None = Field(default=None, description="Who published the job (CloudEvents).")


class JobPage(BaseModel):
    """One page of `GET /v1/jobs`."""

    data: list[JobResource]
    next_cursor: str | None = Field(default=None, description="Pass as `cursor` for the next page.")


class ModelInfo(BaseModel):
    """One model version, as `GET /v1/models` lists it."""

    name: str
    version: str
    default: bool
    adapter: str
    max_batch_size: int
    max_wait_ms: float
    input_schema: dict[str, Any]
    providers: list[str] = Field(
        default_factory=list,
        description="Execution providers the live workers run it on (from their heartbeats).",
    )


class ModelList(BaseModel):
    data: list[ModelInfo]


class AutoscaleResource(BaseModel):
    """`GET /v1/autoscale`: read by KEDA's metrics-api scaler (valueLocation desired_workers)."""

    desired_workers: int = Field(description="Stabilised: rises at once, falls after a delay.")
    raw_desired_workers: int
    backlog: int = Field(description="Jobs not done: max(store queued+running, bus lag).")
    bus_lag: int | None = Field(description="Messages the worker group has not committed.")
    workers: int = Field(description="Workers with a fresh heartbeat.")
    throughput_per_worker: float = Field(description="Jobs/s per worker, EWMA.")
    target_drain_s: float
    models: dict[str, dict[str, float]]
