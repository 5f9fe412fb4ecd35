"""`POST /v1/jobs/batch`: bulk submit on the in-memory bus and a SQLite store. Each item gets
the answer a single submit would give it; the accepted rows go in one transaction; an item
whose publish fails is answered 503 and never left queued."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import event

from jobstore.store import JobStore
from producers.app import ApiConfig, ApiDeps, create_app
from schemas.envelope import decode_message
from tests.test_api import MODELS, TOPIC, Api
from transports.base import Headers, PublishError
from transports.memory import MemoryBroker, MemoryPublisher


class _FailSome(MemoryPublisher):
    """A broker that never acknowledges the events whose input says ``unlucky``."""

    async def publish(
        self, destination: str, value: bytes, *, key: bytes | None = None, headers: Headers = ()
    ) -> None:
        if b"unlucky" in value:
            raise PublishError("injected: no acknowledgement")
        await super().publish(destination, value, key=key, headers=headers)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    broker = MemoryBroker()
    config = ApiConfig(
        topic=TOPIC, publish_attempts=2, publish_timeout_s=2, backlog_cache_s=0, asyncapi={}
    )
    app = create_app(
        ApiDeps(
            store=store,
            publisher=_FailSome(broker),
            models=lambda: MODELS,
            config=config,
            registry=CollectorRegistry(),
        )
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        yield Api(client, store, broker, config)
    store.close()


def ok(text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "minilm", "input": {"text": text}, **extra}


async def batch(api: Api, jobs: Any) -> httpx.Response:
    return await api.client.post("/v1/jobs/batch", json={"jobs": jobs})


async def test_valid_items_are_accepted_beside_invalid_ones(api: Api) -> None:
    r = await batch(
        api,
        [
            ok("first"),
            ok("   "),  # fails the model's contract
            {"model": "nope", "input": {"text": "x"}},
            "not an object",
            ok("keyed", idempotency_key="bad key with spaces"),
            {"model": "minilm", "input": {"text": "x"}, "priority": 11, "colour": "red"},
            ok("last"),
        ],
    )
    assert r.status_code == 200
    data = r.json()["data"]
    assert [d["status"] for d in data] == [202, 422, 422, 422, 400, 422, 202]
    assert data[1]["error"]["code"] == "invalid_input"
    assert data[1]["error"]["field"] == "jobs[1].input.text"
    assert data[2]["error"] == {
        **data[2]["error"],
        "code": "unknown_model",
        "field": "jobs[2].model",
    }
    assert data[3]["error"]["field"] == "jobs[3]"
    assert data[4]["error"]["code"] == "invalid_idempotency_key"
    assert data[4]["error"]["field"] == "jobs[4].idempotency_key"
    # every problem of an item, each with its field
    fields = {e["field"]: e["code"] for e in data[5]["errors"]}
    assert fields == {"jobs[5].priority": "field_invalid", "jobs[5].colour": "field_unknown"}
    accepted = [data[0]["job"], data[6]["job"]]
    assert [j["status"] for j in accepted] == ["queued", "queued"]
    published = {decode_message(h, v).id for _, v, h in api.broker.messages(TOPIC)}
    assert published == {j["id"] for j in accepted}
    page, _ = api.store.list(limit=100)
    assert {rec.id for rec in page} == published  # no row for a refused item


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({"jobs": []}, 422, "batch_empty", "jobs"),
        ({"jobs": [ok()] * 1001}, 413, "batch_too_large", "jobs"),
        ({"jobs": {"model": "minilm"}}, 422, "field_invalid", "jobs"),
        ({"jobs": "all of them"}, 422, "field_invalid", "jobs"),
        ({}, 422, "field_missing", "jobs"),
        ([ok()], 422, "field_invalid", "body"),
        ({"jobs": [ok()], "extra": 1}, 422, "field_unknown", "extra"),
    ],
)
async def test_a_batch_that_is_wrong_as_a_whole(
    api: Api, body: Any, status: int, code: str, field: str
) -> None:
    r = await api.client.post("/v1/jobs/batch", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["field"] == field
    assert api.store.list(limit=1)[0] == []


async def test_a_batch_at_the_limit_is_accepted_in_one_insert(api: Api) -> None:
    inserts: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO JOBS"):
            inserts.append(statement)

    event.listen(api.store._engine, "before_cursor_execute", count)
    r = await batch(api, [ok(f"text {i}") for i in range(1000)])
    assert r.status_code == 200
    data = r.json()["data"]
    assert len(data) == 1000 and {d["status"] for d in data} == {202}
    # request order kept
    rows = api.store.get_many(d["job"]["id"] for d in data)
    assert [rows[d["job"]["id"]].input["text"] for d in data] == [f"text {i}" for i in range(1000)]
    assert len(api.broker.messages(TOPIC)) == 1000
    assert len(inserts) == 1  # one multi-row INSERT, in one transaction


async def test_each_item_has_its_own_idempotency_key(api: Api) -> None:
    first = (await batch(api, [ok("a", idempotency_key="k-a"), ok("b")])).json()["data"]
    again = (
        await batch(
            api,
            [
                ok("a", idempotency_key="k-a"),  # a replay: the same job, not published again
                ok("other", idempotency_key="k-a"),  # the key with another body
                ok("c", idempotency_key="k-c"),
                ok("c", idempotency_key="k-c"),  # twice in one batch: one job
            ],
        )
    ).json()["data"]
    assert again[0]["status"] == 200 and again[0]["job"]["id"] == first[0]["job"]["id"]
    assert again[1]["status"] == 409 and again[1]["error"]["code"] == "idempotency_conflict"
    assert again[1]["error"]["field"] == "jobs[1].idempotency_key"
    assert again[2]["status"] == 202 and again[3]["status"] == 200
    assert again[2]["job"]["id"] == again[3]["job"]["id"]
    assert len(api.broker.messages(TOPIC)) == 3  # a, b, c


async def test_unacknowledged_items_are_503_and_never_left_queued(api: Api) -> None:
    r = await batch(api, [ok("fine"), ok("unlucky one"), ok("fine too"), ok("unlucky two")])
    data = r.json()["data"]
    assert [d["status"] for d in data] == [202, 503, 202, 503]
    for position in (1, 3):
        error = data[position]["error"]
        assert error["code"] == "publish_unavailable" and error["field"] == f"jobs[{position}]"
    page, _ = api.store.list(limit=10)
    statuses = {rec.input["text"]: rec.status.value for rec in page}
    assert statuses["fine"] == "queued" and statuses["fine too"] == "queued"
    # a job the broker never acknowledged is not accepted: failed, so it holds no backlog
    # slot and a late copy of its message would not run
    assert statuses["unlucky one"] == "failed" and statuses["unlucky two"] == "failed"


async def test_the_batch_counts_against_the_backlog_limit(api: Api) -> None:
    api.config.max_backlog = 3
    await api.client.post("/v1/jobs", json=ok("already"))
    data = (await batch(api, [ok(f"t{i}") for i in range(4)])).json()["data"]
    assert [d["status"] for d in data] == [202, 202, 429, 429]
    assert data[2]["error"]["code"] == "backlog_full" and data[2]["error"]["field"] == "jobs[2]"


async def test_a_batch_body_may_exceed_the_single_submit_limit(api: Api) -> None:
    """1,000 long texts are more than a single submit's body limit allows; the batch has
    its own, larger one, and is refused with 413 only above it."""
    texts = [ok("word " * 300) for _ in range(1000)]  # ~1.6 MB of JSON
    r = await batch(api, texts)
    assert r.status_code == 200 and len(r.json()["data"]) == 1000
    single = await api.client.post("/v1/jobs", json={"jobs": texts})
    assert single.status_code == 413 and single.json()["error"]["code"] == "body_too_large"
    api_limit = api.config.max_batch_body_bytes
    r = await api.client.post(
        "/v1/jobs/batch",
        content=b"{" + b" " * api_limit + b"}",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
