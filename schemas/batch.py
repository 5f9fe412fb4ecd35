"""Bulk submit (`POST /v1/jobs/batch`): up to ``MAX_BATCH_JOBS`` job requests in one call,
answered item by item in request order."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SkipValidation

from schemas.errors import ErrorDetail
from schemas.jobs import JobRequest, JobResource

MAX_BATCH_JOBS = 1000
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"


class BatchJobRequest(JobRequest):
    """One item of a bulk submit: a job request, with its own idempotency key."""

    idempotency_key: str | None = Field(
        default=None,
        pattern=IDEMPOTENCY_KEY_PATTERN,
        description="What the `Idempotency-Key` header is to a single submit.",
    )


class BatchRequest(BaseModel):
    """Items are checked one by one by the server (an item that is not a valid job request
    gets its own error in the answer), so the list is taken as it comes."""

    model_config = ConfigDict(extra="forbid")

    jobs: list[Annotated[BatchJobRequest | Any, SkipValidation]] = Field(
        description=f"1 to {MAX_BATCH_JOBS} job requests (`BatchJobRequest`).",
        json_schema_extra={"minItems": 1, "maxItems": MAX_BATCH_JOBS},
    )


class BatchItem(BaseModel):
    """The answer to one item: ``status`` 202 (accepted) or 200 (an idempotent replay) with
    the job, or the 4xx/5xx status the item alone would have had, with its error."""

    status: int = Field(ge=200, le=599)
    job: JobResource | None = None
    error: ErrorDetail | None = None
    errors: list[ErrorDetail] | None = Field(
        default=None, description="All problems of the item, when there is more than one."
    )


class BatchResponse(BaseModel):
    data: list[BatchItem] = Field(description="One answer per item, in request order.")
