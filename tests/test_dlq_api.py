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
