"""The error shape every client sees, and the stable machine codes it carries."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorCode(StrEnum):
    # request shape
    MALFORMED_JSON = "malformed_json"
    FIELD_MISSING = "field_missing"
    FIELD_INVALID = "field_invalid"
    FIELD_UNKNOWN = "field_unknown"
    BODY_TOO_LARGE = "body_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    INVALID_IDEMPOTENCY_KEY = "invalid_idempotency_key"
    INVALID_CURSOR = "invalid_cursor"
    INVALID_LAST_EVENT_ID = "invalid_last_event_id"
    # model contract
    UNKNOWN_MODEL = "unknown_model"
    UNKNOWN_VERSION = "unknown_version"
    INVALID_INPUT = "invalid_input"
    # job lifecycle
    JOB_NOT_FOUND = "job_not_found"
    JOB_NOT_CANCELLABLE = "job_not_cancellable"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    JOB_EXPIRED = "job_expired"
    LEASE_EXPIRED = "lease_expired"
    JOB_ID_CONFLICT = "job_id_conflict"  # a bus event reused an id bound to another request
    JOB_UNSTORABLE = "job_unstorable"  # the job store refused the job's row (e.g. a NUL)
    # webhooks
    WEBHOOK_URL_INVALID = "webhook_url_invalid"
    WEBHOOK_URL_FORBIDDEN = "webhook_url_forbidden"
    WEBHOOK_NOT_CONFIGURED = "webhook_not_configured"
    WEBHOOK_NOTHING_TO_REPLAY = "webhook_nothing_to_replay"
    WEBHOOK_ENDPOINT_NOT_DISABLED = "webhook_endpoint_not_disabled"
    # capacity and dependencies
    BACKLOG_FULL = "backlog_full"
    BATCH_EMPTY = "batch_empty"
    BATCH_TOO_LARGE = "batch_too_large"
    PUBLISH_UNAVAILABLE = "publish_unavailable"
    STORE_UNAVAILABLE = "store_unavailable"
    # bus messages
    MALFORMED_MESSAGE = "malformed_message"
    INVALID_ENVELOPE = "invalid_envelope"
    UNSUPPORTED_EVENT_TYPE = "unsupported_event_type"
    # claim-check (S3) inputs
    INPUT_NOT_FOUND = "input_not_found"
    INPUT_NOT_ALLOWED = "input_not_allowed"
    INPUT_TOO_LARGE = "input_too_large"
    INPUT_UNAVAILABLE = "input_unavailable"
    # execution
    INFERENCE_FAILED = "inference_failed"
    # dead letters
    DEAD_LETTER_NOT_FOUND = "dead_letter_not_found"
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"
    # routing
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    INTERNAL_ERROR = "internal_error"


class ErrorDetail(BaseModel):
    model_config = ConfigDict(frozen=True)

    code: ErrorCode = Field(description="Stable machine-readable code.")
    message: str = Field(description="Human-readable explanation.")
    field: str | None = Field(
        default=None,
        description="The offending field, dotted (`input.text`), or a header name.",
    )
    details: dict[str, Any] | None = None


class ErrorResponse(BaseModel):
    """Body of every 4xx/5xx answer."""

    error: ErrorDetail
    errors: list[ErrorDetail] | None = Field(
        default=None, description="All problems found, when there is more than one."
    )


class ApiError(Exception):
    """An error a client sees: its HTTP status, the error object, extra headers.

    The root of every client-facing error; route modules in any package raise it and the
    API's handlers render it (``producers.errors``).
    """

    def __init__(
        self,
        status: int,
        code: ErrorCode,
        message: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(code=code, message=message, field=field, details=details)
        self.headers = headers
