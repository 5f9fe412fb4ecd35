"""The CloudEvents 1.0 job envelope, and its decoding from bus messages.

Kafka carries it in binary mode (``ce_*`` headers, data as the value) or structured mode
(``application/cloudevents+json``); SQS carries the structured form. Decoding is pure: it
never touches a broker, so the same rules hold on every transport.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.errors import ErrorCode
from schemas.jobs import JOB_ID_PATTERN, JobRequest
from schemas.storable import error_field, printable

JOB_REQUESTED = "inferq.job.requested"
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
_JOB_ID = re.compile(JOB_ID_PATTERN)


class JobEnvelope(BaseModel):
    """A job on the bus: a CloudEvents 1.0 event whose data is a JobRequest."""

    model_config = ConfigDict(extra="allow")  # CloudEvents extension attributes pass through

    specversion: str = Field(default="1.0", pattern=r"^1\.0$")
    id: str = Field(pattern=JOB_ID_PATTERN, description="The job id.")
    source: str = Field(min_length=1, description="The publisher, a URI-reference.")
    type: str = Field(default=JOB_REQUESTED)
    time: datetime | None = None
    datacontenttype: str | None = "application/json"
    subject: str | None = None
    data: JobRequest

    def to_structured(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    def to_binary(self) -> tuple[list[tuple[str, bytes]], bytes]:
        """Kafka binary mode: (headers, value)."""
        headers = [
            ("ce_specversion", self.specversion.encode()),
            ("ce_id", self.id.encode()),
            ("ce_source", self.source.encode()),
            ("ce_type", self.type.encode()),
            ("content-type", b"application/json"),
        ]
        if self.time is not None:
            headers.append(("ce_time", self.time.isoformat().encode()))
        for name, value in (self.model_extra or {}).items():  # extension attributes
            headers.append((f"ce_{name}", str(value).encode()))
        return headers, self.data.model_dump_json(exclude_none=True).encode()


class EnvelopeError(ValueError):
    """A bus message that cannot become a job; it goes to the DLQ with this reason."""

    def __init__(
        self, code: ErrorCode, message: str, field: str | None = None, job_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.job_id = job_id


def new_envelope(job_id: str, request: JobRequest, source: str) -> JobEnvelope:
    return JobEnvelope(id=job_id, source=source, time=datetime.now(UTC), data=request)


def decode_message(headers: Mapping[str, bytes], value: bytes | None) -> JobEnvelope:
    """Decode one bus message in either CloudEvents mode, or raise EnvelopeError."""
    lowered = {k.lower(): v for k, v in headers.items()}
    if "ce_specversion" in lowered or "ce_id" in lowered:
        return _decode_binary(lowered, value)
    return _decode_structured(value)


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EnvelopeError(ErrorCode.MALFORMED_MESSAGE, f"{what} is not UTF-8") from exc


def _json(raw: bytes | None, what: str) -> Any:
    if not raw:
        raise EnvelopeError(ErrorCode.MALFORMED_MESSAGE, f"{what} is empty")
    try:
        return json.loads(_text(raw, what))
    except json.JSONDecodeError as exc:
        raise EnvelopeError(
            ErrorCode.MALFORMED_MESSAGE, f"{what} is not valid JSON: {exc.msg} at {exc.pos}"
        ) from exc


def _decode_binary(headers: Mapping[str, bytes], value: bytes | None) -> JobEnvelope:
    # the id header is readable on its own: a body or another header that is not must
    # still fail under that id, so GET /v1/jobs/{id} can tell the publisher why
    job_id = _valid_id(headers.get("ce_id"))
    try:
        return _binary_envelope(headers, value)
    except EnvelopeError as exc:
        if exc.job_id is None and job_id is not None:
            exc.job_id = job_id
        raise


def _valid_id(raw: object) -> str | None:
    """``raw`` as a job id when it is one (a str or UTF-8 bytes matching the id pattern)."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return raw if isinstance(raw, str) and _JOB_ID.fullmatch(raw) else None


def _binary_envelope(headers: Mapping[str, bytes], value: bytes | None) -> JobEnvelope:
    attrs: dict[str, Any] = {}
    for key, raw in headers.items():
        if key.startswith("ce_"):
            attrs[key[3:]] = _text(raw, f"header {key}")
    if "content-type" in headers:
        attrs["datacontenttype"] = _text(headers["content-type"], "header content-type")
    attrs["data"] = _json(value, "message value")
    return _validate(attrs, prefix="ce_")


def _decode_structured(value: bytes | None) -> JobEnvelope:
    doc = _json(value, "message value")
    if not isinstance(doc, dict):
        raise EnvelopeError(ErrorCode.INVALID_ENVELOPE, "a structured CloudEvent must be an object")
    return _validate(doc, prefix="")


_REQUIRED = ("specversion", "id", "source", "type")


def _validate(attrs: dict[str, Any], prefix: str) -> JobEnvelope:
    job_id = _valid_id(attrs.get("id"))
    for name in _REQUIRED:
        if name not in attrs:
            raise EnvelopeError(
                ErrorCode.INVALID_ENVELOPE,
                f"CloudEvents attribute '{name}' is required",
                field=prefix + name,
                job_id=job_id,
            )
    if attrs["type"] != JOB_REQUESTED:
        raise EnvelopeError(
            ErrorCode.UNSUPPORTED_EVENT_TYPE,
            f"event type {attrs['type']!r} is not {JOB_REQUESTED!r}",
            field=prefix + "type",
            job_id=job_id,
        )
    try:
        return JobEnvelope.model_validate(attrs)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"]]
        in_data = bool(loc) and loc[0] == "data"
        field = ".".join(loc[1:]) if in_data else prefix + ".".join(loc)
        field = printable(error_field(first, field))
        code = ErrorCode.INVALID_INPUT if in_data else ErrorCode.INVALID_ENVELOPE
        raise EnvelopeError(
            code, f"{field or 'data'}: {first['msg']}", field=field or "data", job_id=job_id
        ) from exc
