"""The client's side of a job's event stream: parsing ``text/event-stream`` and the rules
for reconnecting, shared by the sync and the async client."""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.jobs import JobResource

TERMINAL_TYPES = frozenset({"job.succeeded", "job.failed", "job.cancelled", "job.expired"})


@dataclass(frozen=True)
class StreamEvent:
    """One event of ``GET /v1/jobs/{id}/events``: its id, type and the job at that point."""

    id: str
    type: str
    job: JobResource

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES


@dataclass
class SseParser:
    """Lines in, events out (the WHATWG event-stream rules that the API's stream uses)."""

    retry_s: float = 1.0
    last_id: str | None = None
    _event: str = "message"
    _data: list[str] = field(default_factory=list)
    _id: str | None = None

    def line(self, raw: str) -> StreamEvent | None:
        line = raw.rstrip("\r\n")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment: the heartbeat
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self.retry_s = int(value) / 1000.0
        return None

    def _dispatch(self) -> StreamEvent | None:
        event, data, ident = self._event, self._data, self._id
        self._event, self._data, self._id = "message", [], None
        if ident is not None:
            self.last_id = ident
        if not data or ident is None:
            return None
        job = JobResource.model_validate_json("\n".join(data))
        return StreamEvent(id=ident, type=event, job=job)


def resume_headers(last_id: str | None) -> dict[str, str]:
    headers = {"Accept": "text/event-stream"}
    if last_id:
        headers["Last-Event-ID"] = last_id
    return headers
