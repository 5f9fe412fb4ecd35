"""A job's state change as a CloudEvent on the bus (the events topic / SNS topic).

Binary mode everywhere: the data (the job resource) is the message value, the attributes
travel as ``ce_*`` headers (SNS: message attributes), keyed by the job id so that a job's
events keep their order on a Kafka partition.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from schemas.jobs import JobResource

EVENT_SOURCE = "urn:inferq:events"
# the stored event type -> its CloudEvents type (job.queued is not published)
BUS_TYPES: dict[str, str] = {
    "job.started": "inferq.job.started",
    "job.succeeded": "inferq.job.succeeded",
    "job.failed": "inferq.job.failed",
    "job.cancelled": "inferq.job.cancelled",
    "job.expired": "inferq.job.expired",
}


class JobEventMessage(BaseModel):
    """One published job event; ``id`` is unique per event (``<job id>:<seq>``), so a
    consumer drops a redelivered duplicate by it."""

    specversion: str = "1.0"
    id: str = Field(description="The event id, `<job id>:<seq>`: the same on every copy.")
    source: str = EVENT_SOURCE
    type: str = Field(description="`inferq.job.started|succeeded|failed|cancelled|expired`.")
    subject: str = Field(description="The job id.")
    time: datetime
    datacontenttype: str = "application/json"
    data: JobResource = Field(description="The job as `GET /v1/jobs/{id}` showed it then.")

    def to_binary(self) -> tuple[list[tuple[str, bytes]], bytes]:
        headers = [
            ("ce_specversion", self.specversion.encode()),
            ("ce_id", self.id.encode()),
            ("ce_source", self.source.encode()),
            ("ce_type", self.type.encode()),
            ("ce_subject", self.subject.encode()),
            ("ce_time", self.time.isoformat().encode()),
            ("content-type", self.datacontenttype.encode()),
        ]
        return headers, self.data.model_dump_json().encode()
