"""`/v1/dlq`: list with filters, show, redrive (idempotent, all-or-nothing on unknown ids)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from dlq.http import make_router
from dlq.redrive import Redriver
from dlq.router import DeadLetter
from dlq.store import DeadLetterFilter, DeadLetterStore
from jobstore.records import NewJob
from jobstore.store import JobStore
from producers.app import ApiConfig, ApiDeps, create_app
from schemas.contracts import ModelConfig
from schemas.jobs import JobStatus
from transports.base import Delivery
from transports.memory import MemoryBroker, MemoryPublisher

TOPIC = "jobs"


@dataclass
class Dlq:
    client: httpx.AsyncClient
    store: JobStore
    letters: DeadLetterStore
    broker: MemoryBroker

    def add(self, job_id: str, model: str, code: str) -> str:
        self.store.create(NewJob(id=job_id, model=model, version="1", input={"tensor": [1]}))
        self.store.claim([job_id], worker_id="w", lease_s=60)
        self.store.fail_unstarted(job_id, code, "it broke")
        delivery = Delivery(
            value=b'{"job": "%s"}' % job_id.encode(),
            key=job_id.encode(),
            headers={"ce_id": job_id.encode()},
            source=TOPIC,
            position="0@1",
        )
        return self.letters.add(
            DeadLetter(delivery, code, "it broke", job_id, model, "1", "InferenceError", 1)
        )


@pytest.fixture
async def dlq(tmp_path: Path) -> AsyncIterator[Dlq]:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    letters = DeadLetterStore(store.engine)
    letters.create_schema()
    broker = MemoryBroker()
    app = create_app(
        ApiDeps(
            store=store,
            publisher=MemoryPublisher(broker),
            models=lambda: [ModelConfig(name="identity", version="1", adapter="identity")],
            config=ApiConfig(topic=TOPIC),
            registry=CollectorRegistry(),
        )
    )
    app.include_router(
        make_router(letters, Redriver(letters, MemoryPublisher(broker), TOPIC, store))
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api"
    ) as client:
        yield Dlq(client, store, letters, broker)
    store.close()


async def test_list_filters_and_show(dlq: Dlq) -> None:
    a = dlq.add("a", "identity", "inference_failed")
    dlq.add("b", "identity", "invalid_input")
    dlq.add("c", "other", "inference_failed")
    everything = (await dlq.client.get("/v1/dlq")).json()["data"]
    assert len(everything) == 3
    by_model = (await dlq.client.get("/v1/dlq", params={"model": "identity"})).json()["data"]
    assert {d["job_id"] for d in by_model} == {"a", "b"}
    both = (
        await dlq.client.get("/v1/dlq", params={"model": "identity", "code": "inference_failed"})
    ).json()
    assert [d["id"] for d in both["data"]] == [a]
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert (await dlq.client.get("/v1/dlq", params={"since": future})).json()["data"] == []
    page = (await dlq.client.get("/v1/dlq", params={"limit": 2})).json()
    assert len(page["data"]) == 2 and page["next_offset"] == 2
    shown = (await dlq.client.get(f"/v1/dlq/{a}")).json()
    assert shown["payload"] == {"job": "a"} and shown["headers"] == {"ce_id": "a"}
    assert shown["code"] == "inference_failed" and shown["exception"] == "InferenceError"
    r = await dlq.client.get("/v1/dlq/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "dead_letter_not_found"


async def test_redrive_ids_is_idempotent_and_requeues_the_job(dlq: Dlq) -> None:
    a = dlq.add("a", "identity", "inference_failed")
    r = await dlq.client.post("/v1/dlq/redrive", json={"ids": [a]})
    assert r.status_code == 200 and r.json()["redriven"] == [a]
    again = (await dlq.client.post("/v1/dlq/redrive", json={"ids": [a]})).json()
    assert again["redriven"] == [] and again["already_redriven"] == [a]
    assert len(dlq.broker.messages(TOPIC)) == 1  # enqueued once
    record = dlq.store.get("a")
    assert record is not None and record.status is JobStatus.QUEUED and record.error_code is None
    assert (await dlq.client.get("/v1/dlq")).json()["data"] == []


async def test_redrive_unknown_id_redrives_nothing(dlq: Dlq) -> None:
    a = dlq.add("a", "identity", "inference_failed")
    r = await dlq.client.post("/v1/dlq/redrive", json={"ids": [a, "not-a-dead-letter"]})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "dead_letter_not_found" and err["field"] == "ids"
    assert err["details"]["missing"] == ["not-a-dead-letter"]
    assert dlq.broker.messages(TOPIC) == []


async def test_redrive_by_filter_and_a_filter_matching_nothing(dlq: Dlq) -> None:
    dlq.add("a", "identity", "inference_failed")
    dlq.add("b", "identity", "invalid_input")
    r = await dlq.client.post("/v1/dlq/redrive", json={"filter": {"code": "invalid_input"}})
    assert len(r.json()["redriven"]) == 1
    assert [m[0] for m in dlq.broker.messages(TOPIC)] == [b"b"]
    none = await dlq.client.post("/v1/dlq/redrive", json={"filter": {"model": "nothing"}})
    assert none.status_code == 200 and none.json()["redriven"] == []


@pytest.mark.parametrize(
    "body", [{}, {"ids": []}, {"ids": ["a"], "filter": {}}, {"filter": {"colour": "red"}}]
)
async def test_bad_redrive_requests_are_422(dlq: Dlq, body: dict) -> None:
    r = await dlq.client.post("/v1/dlq/redrive", json=body)
    assert r.status_code == 422 and r.json()["error"]["code"] in ("field_invalid", "field_unknown")


def test_purge_by_filter(tmp_path: Path) -> None:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    letters = DeadLetterStore(store.engine)
    letters.create_schema()
    d = Delivery(b"x", None, {}, TOPIC, "0@0")
    letters.add(DeadLetter(d, "inference_failed", "m", None, "a"))
    letters.add(DeadLetter(d, "invalid_input", "m", None, "a"))
    assert letters.purge(DeadLetterFilter(code="invalid_input")) == 1
    assert [r.code for r in letters.list(DeadLetterFilter())] == ["inference_failed"]
    store.close()


async def test_a_redrive_whose_publish_fails_leaves_the_job_failed_not_queued(dlq: Dlq) -> None:
    a = dlq.add("a", "identity", "inference_failed")
    backlog = dlq.store.backlog()
    dlq.broker.fail_publishes = 1
    r = await dlq.client.post("/v1/dlq/redrive", json={"ids": [a]})
    assert r.status_code == 200 and r.json()["redriven"] == [] and a in r.json()["failed"]
    assert dlq.broker.messages(TOPIC) == []
    record = dlq.store.get("a")
    # nothing is on the bus, so the row must not wait as queued (it would count forever)
    assert record is not None and record.status is JobStatus.FAILED
    assert record.error_code == "inference_failed" and record.error_message == "it broke"
    assert dlq.store.backlog() == backlog
    # the entry was given back: a later redrive, with the broker healthy, succeeds
    again = (await dlq.client.post("/v1/dlq/redrive", json={"ids": [a]})).json()
    assert again["redriven"] == [a] and len(dlq.broker.messages(TOPIC)) == 1
    requeued = dlq.store.get("a")
    assert requeued is not None and requeued.status is JobStatus.QUEUED


async def test_a_cut_down_letter_shows_so_and_is_not_redriven_as_its_head(dlq: Dlq) -> None:
    """A letter whose payload was cut to fit the bus, with no S3 copy, cannot be replayed:
    publishing its head would only make a new poison message."""
    dlq.store.create(NewJob(id="cut", model="identity", version="1", input={"tensor": [1]}))
    dlq.store.claim(["cut"], worker_id="w", lease_s=60)
    dlq.store.fail_unstarted("cut", "invalid_input", "too big")
    original = b'{"model": "identity", "input": {"text": "' + b"z" * 5000 + b'"}}'
    delivery = Delivery(original, b"cut", {"ce_id": b"cut"}, TOPIC, "0@9")
    entry = dlq.letters.add(
        DeadLetter(
            delivery,
            "invalid_input",
            "too big",
            "cut",
            payload=original[:100],
            payload_size=len(original),
            payload_sha256="ab" * 32,
            published=False,
        )
    )
    shown = (await dlq.client.get(f"/v1/dlq/{entry}")).json()
    assert shown["payload_size"] == len(original) and shown["payload_sha256"] == "ab" * 32
    assert shown["truncated"] is True and shown["published"] is False
    assert shown["payload_url"] is None
    r = (await dlq.client.post("/v1/dlq/redrive", json={"ids": [entry]})).json()
    assert r["redriven"] == [] and "cut to 100 of" in r["failed"][entry]
    assert dlq.broker.messages(TOPIC) == []
    row = dlq.store.get("cut")
    assert row is not None and row.status is JobStatus.FAILED  # not requeued for nothing
    # still redrivable later (nothing was claimed)
    assert dlq.letters.list(DeadLetterFilter())[0].redriven_at is None


async def test_a_cut_down_letter_is_redriven_whole_from_its_s3_copy(tmp_path: Path) -> None:
    from transports.blobs import ClaimCheck, MemoryBlobs

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    letters = DeadLetterStore(store.engine)
    letters.create_schema()
    broker = MemoryBroker()
    claim = ClaimCheck(MemoryBlobs({"keep": {}}), bucket="keep")
    original = b'{"model": "identity", "input": {"tensor": [1]}}' + b" " * 3000
    url = await claim.offload_dead_letter("x", original)
    assert url is not None
    delivery = Delivery(original, b"k", {"ce_id": b"whole"}, TOPIC, "0@3")
    import hashlib

    entry = letters.add(
        DeadLetter(
            delivery,
            "invalid_input",
            "m",
            None,
            payload=original[:10],
            payload_size=len(original),
            payload_sha256=hashlib.sha256(original).hexdigest(),
            payload_url=url,
        )
    )
    redriver = Redriver(
        letters,
        MemoryPublisher(broker),
        TOPIC,
        store,
        load_payload=claim.load_dead_letter,
    )
    report = await redriver.redrive([entry])
    assert report.redriven == [entry], report.failed
    [(key, value, headers)] = broker.messages(TOPIC)
    assert value == original and key == b"k" and headers == {"ce_id": b"whole"}
    store.close()


def test_create_schema_adds_the_new_columns_to_an_older_table(tmp_path: Path) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'old.db'}")
    with engine.begin() as conn:  # the table as the first release made it
        conn.exec_driver_sql(
            "CREATE TABLE dead_letters (id VARCHAR(40) PRIMARY KEY, job_id VARCHAR(128), "
            "model VARCHAR(64), version VARCHAR(32), code VARCHAR(64) NOT NULL, "
            "message TEXT NOT NULL, exception VARCHAR(128), attempts INTEGER NOT NULL, "
            "origin VARCHAR(256) NOT NULL, position VARCHAR(128) NOT NULL, "
            "payload BLOB NOT NULL, headers JSON NOT NULL, key BLOB, "
            "created_at DATETIME NOT NULL, redriven_at DATETIME)"
        )
        conn.exec_driver_sql(
            "INSERT INTO dead_letters VALUES ('old', NULL, NULL, NULL, 'invalid_input', 'm', "
            "NULL, 0, 'jobs', '0@1', x'7b7d', '{}', NULL, '2026-01-01 00:00:00', NULL)"
        )
    letters = DeadLetterStore(engine)
    letters.create_schema()
    letters.create_schema()  # twice is fine
    [old] = letters.list(DeadLetterFilter())
    assert old.id == "old" and old.published and not old.trimmed and old.payload_size is None
    delivery = Delivery(b"{}", None, {}, TOPIC, "0@2")
    new = letters.add(DeadLetter(delivery, "x", "m", payload_size=2, published=False))
    assert not letters.get_many([new])[new].published
    engine.dispose()
