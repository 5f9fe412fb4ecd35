"""A job put back on the bus (retry pump, stale-lease requeue) is the request it was: one
function rebuilds it, for both, with its source, time, ttl and input or input_url."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from control.sweeps import envelope_for as sweep_envelope
from jobstore.records import JobRecord
from schemas.jobs import JobStatus
from workers.retry import envelope_for as retry_envelope


def _record(**kw: object) -> JobRecord:
    created = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    fields: dict[str, object] = dict(
        id="j1", status=JobStatus.RUNNING, model="identity", version="1",
        input={"tensor": [1.0]}, result=None, error_code=None, error_message=None,
        error_retryable=False, attempts=1, priority=7, created_at=created, started_at=None,
        completed_at=None, expires_at=created + timedelta(seconds=600),
        metadata={"tenant": "acme"}, webhook=None, source="urn:publisher", idempotency_key=None,
        request_hash=None, lease_owner=None, lease_expires_at=None, updated_at=created,
    )  # fmt: skip
    fields.update(kw)
    return JobRecord(**fields)  # type: ignore[arg-type]


def test_both_requeue_paths_rebuild_the_same_request() -> None:
    record = _record()
    for rebuild in (sweep_envelope, retry_envelope):
        envelope = rebuild(record, "urn:inferq:requeue")
        assert envelope.id == "j1" and envelope.source == "urn:publisher"
        assert envelope.time == record.created_at
        data = envelope.data
        assert data.ttl_s == 600 and data.priority == 7 and data.metadata == {"tenant": "acme"}
        assert data.input == {"tensor": [1.0]} and data.input_url is None


def test_an_input_url_job_is_rebuilt_with_its_input_url() -> None:
    record = _record(input={"$input_url": "s3://bucket/key.json"}, source=None)
    for rebuild in (sweep_envelope, retry_envelope):
        envelope = rebuild(record, "urn:inferq:requeue")
        assert envelope.source == "urn:inferq:requeue"
        assert envelope.data.input is None and envelope.data.input_url == "s3://bucket/key.json"
