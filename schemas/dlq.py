"""Dead letters on the HTTP surface: listing, inspecting, redriving."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from schemas.storable import SafeText, UtcDateTime

# Dead-letter ids are uuid4 hex; the pattern keeps a NUL or a surrogate out of the store.
ENTRY_ID_PATTERN = r"^[A-Za-z0-9_\-]{1,40}$"
EntryId = Annotated[str, StringConstraints(pattern=ENTRY_ID_PATTERN)]


class DeadLetterResource(BaseModel):
    id: str
    job_id: str | None
    model: str | None
    version: str | None
    code: str = Field(description="Why it was dead-lettered (a stable error code).")
    message: str
    exception: str | None
    attempts: int
    origin: str = Field(description="The topic or queue it came from.")
    position: str = Field(description="partition@offset, or the SQS message id.")
    created_at: datetime
    redriven_at: datetime | None
    payload: Any | None = Field(default=None, description="The original message (show only).")
    payload_size: int | None = Field(
        default=None, description="Size in bytes of the original message's payload."
    )
    payload_sha256: str | None = Field(default=None, description="SHA-256 of that payload.")
    truncated: bool = Field(
        default=False,
        description="`payload` is only the head of the original, cut to fit the dead-letter "
        "destination; `payload_url` names the whole of it when a claim-check bucket was set.",
    )
    payload_url: str | None = None
    published: bool = Field(
        default=True,
        description="False: the dead-letter destination refused it or stayed unreachable, so "
        "it is kept here only.",
    )
    headers: dict[str, str] | None = None


class DeadLetterPage(BaseModel):
    data: list[DeadLetterResource]
    next_offset: int | None = None


class DeadLetterFilterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: SafeText | None = None
    code: SafeText | None = None
    since: UtcDateTime | None = None
    until: UtcDateTime | None = None


class RedriveRequest(BaseModel):
    """Redrive the given entries, or every entry that matches the filter."""

    # "exactly one of ids and filter", stated in the schema too
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [
                {"required": ["ids"], "properties": {"ids": {"type": "array"}}},
                {"required": ["filter"], "properties": {"filter": {"type": "object"}}},
            ]
        },
    )

    ids: list[EntryId] | None = Field(default=None, min_length=1, max_length=10_000)
    filter: DeadLetterFilterBody | None = None

    @model_validator(mode="after")
    def _one_of(self) -> RedriveRequest:
        if (self.ids is None) == (self.filter is None):
            raise ValueError("give exactly one of 'ids' or 'filter'")
        return self


class RedriveResult(BaseModel):
    redriven: list[str]
    already_redriven: list[str]
    failed: dict[str, str]
