"""Hostile input never reaches the store: 4xx with a code and the field, on SQLite and PostgreSQL.

Each case once left a row queued forever or answered 500 (often only on PostgreSQL, whose
text and jsonb cannot hold NUL), so every test runs on both stores and checks afterwards
that nothing was stored or published and that listing still works for everyone.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from dlq.http import make_router
from dlq.redrive import Redriver
from dlq.router import DeadLetter
from dlq.store import DeadLetterStore
from jobstore.store import JobStore
from producers.app import ApiConfig, ApiDeps, create_app
from schemas.contracts import ModelConfig
from schemas.envelope import EnvelopeError, decode_message
from schemas.errors import ErrorCode
from schemas.jobs import JobStatus
from schemas.storable import METADATA_MAX_BYTES, METADATA_MAX_DEPTH
from transports.base import Delivery
from transports.memory import MemoryBroker, MemoryPublisher

TOPIC = "jobs"
MODELS = [
    ModelConfig(name="minilm", version="1", adapter="text-embedding", default=True),
    ModelConfig(name="identity", version="1", adapter="identity", default=True),
]


@dataclass
class Api:
    client: httpx.AsyncClient
    store: JobStore
    letters: DeadLetterStore
    broker: MemoryBroker
    config: ApiConfig

    async def post_raw(self, raw: str) -> httpx.Response:
        """A body as written: JSON escapes such as \\ud83d reach the server untouched."""
        return await self.client.post(
            "/v1/jobs", content=raw.encode(), headers={"content-type": "application/json"}
        )

    async def assert_nothing_kept(self) -> None:
        assert sum(self.store.counts().values()) == 0
        assert self.broker.messages(TOPIC) == []
        listing = await self.client.get("/v1/jobs")
        assert listing.status_code == 200 and listing.json()["data"] == [], listing.text


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    if request.param == "sqlite":
        sqlite_store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
        sqlite_store.create_schema()
        yield sqlite_store
        sqlite_store.close()
        return
    url: str = request.getfixturevalue("postgres_url")
    schema = f"t_{uuid.uuid4().hex}"
    admin = create_engine(url, poolclass=NullPool)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    pg_store = JobStore(url, schema=schema)
    try:
        pg_store.create_schema()
        yield pg_store
    finally:
        pg_store.close()
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


@pytest.fixture
async def api(store: JobStore) -> AsyncIterator[Api]:
    letters = DeadLetterStore(store.engine)
    letters.create_schema()
    broker = MemoryBroker()
    config = ApiConfig(topic=TOPIC, max_body_bytes=256 * 1024, backlog_cache_s=0)
    app = create_app(
        ApiDeps(
            store=store,
            publisher=MemoryPublisher(broker),
            models=lambda: MODELS,
            config=config,
            registry=CollectorRegistry(),
        )
    )
    app.include_router(
        make_router(letters, Redriver(letters, MemoryPublisher(broker), TOPIC, store))
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        yield Api(client, store, letters, broker, config)


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert "error" in body, body
    error: dict[str, Any] = body["error"]
    return error


def _nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def _job(extra: str) -> str:
    return '{"model": "identity", "input": {"tensor": [1]}, ' + extra + "}"


# --- item 7: what is stored or published is checked before a row exists -------------------


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        pytest.param(_job(f'"metadata": {_nested(300)}'), "metadata", id="metadata-300-deep"),
        pytest.param(
            _job(f'"metadata": {_nested(METADATA_MAX_DEPTH + 1)}'),
            "metadata",
            id="metadata-just-too-deep",
        ),
        pytest.param(_job('"metadata": {"k": "\\ud83d"}'), "metadata.k", id="metadata-surrogate"),
        pytest.param(
            _job('"metadata": {"k": ["ok", "\\udc00"]}'),
            "metadata.k.1",
            id="metadata-low-surrogate",
        ),
        pytest.param(_job('"metadata": {"\\ud83d": 1}'), "metadata", id="metadata-key-surrogate"),
        pytest.param(_job('"metadata": {"k": "a\\u0000b"}'), "metadata.k", id="metadata-nul"),
        pytest.param(_job('"metadata": {"a\\u0000": 1}'), "metadata", id="metadata-key-nul"),
        pytest.param(_job('"metadata": {"x": NaN}'), "metadata.x", id="metadata-nan"),
        pytest.param(_job('"metadata": {"x": -Infinity}'), "metadata.x", id="metadata-inf"),
        pytest.param(
            _job('"metadata": {"x": "' + "y" * METADATA_MAX_BYTES + '"}'),
            "metadata",
            id="metadata-too-large",
        ),
        pytest.param(
            '{"model": "minilm", "input": {"text": "a\\u0000b"}}', "input.text", id="input-nul"
        ),
        pytest.param(
            '{"model": "minilm", "input": {"text": "\\ud83d"}}', "input.text", id="input-surrogate"
        ),
        pytest.param(
            '{"model": "identity", "input": {"tensor": [1], "\\ud83d": 1}}',
            "input",
            id="input-key-surrogate",
        ),
        pytest.param(
            '{"model": "identity", "input": {"tensor": [1], "x": ' + _nested(300) + "}}",
            "input",
            id="input-300-deep",
        ),
        pytest.param(
            '{"model": "identity", "input_url": "s3://bucket/a\\u0000b"}',
            "input_url",
            id="input-url-nul",
        ),
    ],
)
async def test_unstorable_values_are_422_before_any_row(api: Api, raw: str, field: str) -> None:
    r = await api.post_raw(raw)
    assert r.status_code == 422, r.text
    err = _error(r)
    assert (err["code"], err["field"]) == ("field_invalid", field)
    assert err["message"]
    await api.assert_nothing_kept()


async def test_metadata_at_the_limits_is_accepted_and_listed(api: Api) -> None:
    deep = json.loads(_nested(METADATA_MAX_DEPTH))
    r = await api.client.post(
        "/v1/jobs",
        json={"model": "identity", "input": {"tensor": [1]}, "metadata": deep | {"e": "😀"}},
    )
    assert r.status_code == 202, r.text
    listing = await api.client.get("/v1/jobs")
    assert listing.status_code == 200
    assert listing.json()["data"][0]["metadata"] == deep | {"e": "😀"}


async def test_unknown_field_named_with_a_lone_surrogate_is_422_not_500(api: Api) -> None:
    r = await api.post_raw(_job('"\\ud83d": 1'))
    assert r.status_code == 422, r.text
    assert _error(r)["code"] in ("field_invalid", "field_unknown")
    await api.assert_nothing_kept()


async def test_rejected_requests_do_not_fill_the_backlog(api: Api) -> None:
    api.config.max_backlog = 3
    for _ in range(5):
        r = await api.post_raw(_job('"metadata": {"k": "\\ud83d"}'))
        assert r.status_code == 422
    r = await api.client.post("/v1/jobs", json={"model": "identity", "input": {"tensor": [1]}})
    assert r.status_code == 202, r.text


class _BrokenPublisher(MemoryPublisher):
    """A publisher failing in a way nobody planned for (not a TransportError)."""

    async def publish(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug in the publish path")


async def test_a_job_that_fails_to_publish_for_any_reason_is_not_left_queued(
    store: JobStore,
) -> None:
    app = create_app(
        ApiDeps(
            store=store,
            publisher=_BrokenPublisher(MemoryBroker()),
            models=lambda: MODELS,
            config=ApiConfig(topic=TOPIC, backlog_cache_s=0),
            registry=CollectorRegistry(),
        )
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        r = await client.post("/v1/jobs", json={"model": "identity", "input": {"tensor": [1]}})
        assert r.status_code >= 500
        counts = store.counts()
        assert counts[JobStatus.QUEUED] == 0 and counts[JobStatus.FAILED] == 1
        assert store.backlog() == 0
        assert (await client.get("/v1/jobs")).status_code == 200


# --- item 8: tampered parameters -----------------------------------------------------------


def _cursor(created_at: str, job_id: str) -> str:
    raw = json.dumps([created_at, job_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        pytest.param(_cursor("0001-01-01T00:00:00+14:00", "x"), id="before-year-1-in-utc"),
        pytest.param(_cursor("9999-12-31T23:59:59-14:00", "x"), id="after-year-9999-in-utc"),
        pytest.param(_cursor("2030-01-01T00:00:00+00:00", "a\u0000b"), id="nul-id"),
        pytest.param(_cursor("2030-01-01T00:00:00+00:00", "\ud83d"), id="surrogate-id"),
        pytest.param(_cursor("2030-01-01T00:00:00+00:00", "x" * 1000), id="overlong-id"),
    ],
)
async def test_tampered_cursor_is_400(api: Api, cursor: str) -> None:
    r = await api.client.get("/v1/jobs", params={"cursor": cursor})
    assert r.status_code == 400, r.text
    assert (_error(r)["code"], _error(r)["field"]) == ("invalid_cursor", "cursor")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/jobs/a%00b"),
        ("POST", "/v1/jobs/a%00b/cancel"),
        ("GET", "/v1/jobs/a%00b/webhooks"),
        ("POST", "/v1/jobs/a%00b/webhooks/replay"),
        ("GET", "/v1/jobs/%ED%A0%BD"),
        ("GET", "/v1/jobs/" + "x" * 200),
    ],
)
async def test_impossible_job_id_in_the_path_is_422(api: Api, method: str, path: str) -> None:
    r = await api.client.request(method, path)
    assert r.status_code == 422, r.text
    assert (_error(r)["code"], _error(r)["field"]) == ("field_invalid", "job_id")


async def test_nul_in_the_model_filter_is_422(api: Api) -> None:
    r = await api.client.get("/v1/jobs?model=a%00b")
    assert r.status_code == 422, r.text
    assert (_error(r)["code"], _error(r)["field"]) == ("field_invalid", "model")


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("offset=100000000000000000000", "offset"),
        (f"offset={2**63}", "offset"),
        ("model=a%00b", "model"),
        ("code=a%00b", "code"),
    ],
)
async def test_tampered_dlq_listing_is_422(api: Api, query: str, field: str) -> None:
    r = await api.client.get(f"/v1/dlq?{query}")
    assert r.status_code == 422, r.text
    assert (_error(r)["code"], _error(r)["field"]) == ("field_invalid", field)


@pytest.mark.parametrize(
    "query",
    ["since=0001-01-01T00:00:00%2B14:00", "until=9999-12-31T23:59:59-14:00", "since=0001-01-01"],
)
async def test_dlq_bounds_at_the_edge_of_the_calendar_mean_everything(api: Api, query: str) -> None:
    entry = _letter(api, b"{}")
    r = await api.client.get(f"/v1/dlq?{query}")
    assert r.status_code == 200, r.text
    assert [d["id"] for d in r.json()["data"]] == [entry]


async def test_largest_documented_dlq_offset_is_an_empty_page(api: Api) -> None:
    from dlq.http import MAX_OFFSET

    r = await api.client.get("/v1/dlq", params={"offset": MAX_OFFSET})
    assert r.status_code == 200 and r.json() == {"data": [], "next_offset": None}


async def test_nul_in_a_dead_letter_id_is_422(api: Api) -> None:
    r = await api.client.get("/v1/dlq/a%00b")
    assert r.status_code == 422, r.text
    assert (_error(r)["code"], _error(r)["field"]) == ("field_invalid", "entry_id")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"ids": ["a\u0000b"]}, "ids.0"),
        ({"filter": {"model": "a\u0000b"}}, "filter.model"),
        ({"filter": {"code": "a\u0000b"}}, "filter.code"),
        ({"filter": {"since": 0.5}}, "filter.since"),
    ],
)
async def test_tampered_redrive_is_422(api: Api, body: dict[str, Any], field: str) -> None:
    r = await api.client.post("/v1/dlq/redrive", json=body)
    assert r.status_code == 422, r.text
    assert (_error(r)["code"], _error(r)["field"]) == ("field_invalid", field)


def _letter(api: Api, raw: bytes) -> str:
    delivery = Delivery(value=raw, key=None, headers={}, source=TOPIC, position="0@1")
    return api.letters.add(
        DeadLetter(delivery, "invalid_input", "bad", None, None, None, "EnvelopeError", 1)
    )


async def test_dead_letter_with_an_unencodable_payload_is_shown_as_text(api: Api) -> None:
    raw = b'{"model": "identity", "metadata": {"k": "\\ud83d"}}'
    entry = _letter(api, raw)
    r = await api.client.get(f"/v1/dlq/{entry}")
    assert r.status_code == 200, r.text
    assert r.json()["payload"] == raw.decode()


# --- the contract says what is enforced ----------------------------------------------------


async def test_405_allows_every_method_of_the_path(api: Api) -> None:
    r = await api.client.delete("/v1/jobs")
    assert r.status_code == 405 and _error(r)["code"] == "method_not_allowed"
    assert {m.strip() for m in r.headers["allow"].split(",")} == {"GET", "POST"}
    r = await api.client.put("/v1/jobs/x/cancel")
    assert {m.strip() for m in r.headers["allow"].split(",")} == {"POST"}
    # routes of an included router too (FastAPI keeps one as a single route over its own)
    r = await api.client.get("/v1/webhooks/endpoints/enable")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    # a concrete path before a templated one: not also GET of /v1/dlq/{entry_id}
    r = await api.client.put("/v1/dlq/redrive")
    assert r.status_code == 405 and r.headers["allow"] == "POST"


async def test_openapi_states_the_key_pattern_and_the_model_names(api: Api) -> None:
    doc = (await api.client.get("/openapi.json")).json()
    submit = doc["paths"]["/v1/jobs"]["post"]
    key = next(p for p in submit["parameters"] if p["name"] == "Idempotency-Key")
    assert key["schema"]["pattern"] == r"^[\x21-\x7e]{1,255}$"
    model = doc["components"]["schemas"]["JobRequest"]["properties"]["model"]
    assert model["enum"] == ["identity", "minilm"]
    assert "400" in submit["responses"] and "429" in submit["responses"]


async def test_body_that_cannot_be_parsed_is_400_malformed_json(api: Api) -> None:
    r = await api.post_raw(_job('"metadata": {"a": ' + "[" * 50_000 + "]" * 50_000 + "}"))
    assert r.status_code == 400, r.text
    assert (_error(r)["code"], _error(r)["field"]) == ("malformed_json", "body")
    await api.assert_nothing_kept()


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/v1/jobs", "application/x-www-form-urlencoded"),  # curl -d without -H
        ("/v1/jobs", "text/plain"),
        ("/v1/jobs", None),
        ("/v1/dlq/redrive", "application/x-www-form-urlencoded"),
    ],
)
async def test_body_that_is_not_sent_as_json_is_415_naming_the_content_type(
    api: Api, path: str, content_type: str | None
) -> None:
    body = json.dumps({"model": "identity", "input": {"tensor": [1]}}).encode()
    headers = {"content-type": content_type} if content_type else {}
    r = await api.client.post(path, content=body, headers=headers)
    assert r.status_code == 415, r.text
    error = _error(r)
    assert (error["code"], error["field"]) == ("unsupported_media_type", "Content-Type")
    assert "application/json" in error["message"]
    await api.assert_nothing_kept()


async def test_openapi_documents_415_where_a_body_is_taken(api: Api) -> None:
    paths = (await api.client.get("/openapi.json")).json()["paths"]
    for path, method in (("/v1/jobs", "post"), ("/v1/dlq/redrive", "post")):
        answer = paths[path][method]["responses"]["415"]
        assert answer["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "415" not in paths["/v1/jobs"]["get"]["responses"]


@pytest.mark.parametrize(
    "path",
    ["/v1/jobs?stauts=queued", "/v1/jobs/x?wiat=5", "/v1/dlq?modle=identity", "/v1/dlq?c%C2%B7=1"],
)
async def test_unknown_query_parameter_is_422(api: Api, path: str) -> None:
    r = await api.client.get(path)
    assert r.status_code == 422, r.text
    assert _error(r)["code"] == "field_unknown"
    assert _error(r)["field"] == path.split("?")[1].split("=")[0].replace("%C2%B7", "·")


@pytest.mark.parametrize(
    "body",
    [
        {"model": "identity", "input": {"tensor": [1]}, "priority": False},
        {"model": "identity", "input": {"tensor": [1]}, "ttl_s": True},
        {"model": "identity", "input": {"tensor": [True]}},
    ],
)
async def test_booleans_are_not_numbers(api: Api, body: dict[str, Any]) -> None:
    r = await api.client.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    assert _error(r)["code"] in ("field_invalid", "invalid_input")
    await api.assert_nothing_kept()


@pytest.mark.parametrize("query", ["since=0.5", "until=1700000000"])
async def test_dlq_dates_must_be_dates(api: Api, query: str) -> None:
    r = await api.client.get(f"/v1/dlq?{query}")
    assert r.status_code == 422, r.text
    assert (_error(r)["code"], _error(r)["field"]) == ("field_invalid", query.split("=")[0])


async def test_empty_cursor_is_400_and_malformed_redrive_json_is_400(api: Api) -> None:
    r = await api.client.get("/v1/jobs?cursor=")
    assert r.status_code == 400 and _error(r)["code"] == "invalid_cursor"
    r = await api.client.post(
        "/v1/dlq/redrive", content=b"\x00", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400, r.text
    assert (_error(r)["code"], _error(r)["field"]) == ("malformed_json", "body")


# --- the same rules for a job decoded off the bus by a worker ------------------------------


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (
            b'{"model": "identity", "input": {"tensor": [1]}, "metadata": {"k": "a\\u0000"}}',
            "metadata.k",
        ),
        (
            b'{"model": "identity", "input": {"tensor": [1]}, "metadata": {"k": "\\ud83d"}}',
            "metadata.k",
        ),
        (b'{"model": "minilm", "input": {"text": "a\\u0000b"}}', "input.text"),
        (
            b'{"model": "identity", "input": {"tensor": [1]}, "metadata": '
            + _nested(300).encode()
            + b"}",
            "metadata",
        ),
    ],
)
def test_bus_jobs_obey_the_same_storable_rules(data: bytes, field: str) -> None:
    headers = {
        "ce_specversion": b"1.0",
        "ce_id": b"job-1",
        "ce_source": b"urn:test",
        "ce_type": b"inferq.job.requested",
    }
    with pytest.raises(EnvelopeError) as caught:
        decode_message(headers, data)
    assert (caught.value.code, caught.value.field) == (ErrorCode.INVALID_INPUT, field)
    assert caught.value.job_id == "job-1"


def test_a_bus_job_id_the_store_cannot_hold_is_not_carried_on() -> None:
    headers = {
        "ce_specversion": b"1.0",
        "ce_id": b"a\x00b",
        "ce_source": b"urn:test",
        "ce_type": b"inferq.job.requested",
    }
    with pytest.raises(EnvelopeError) as caught:
        decode_message(headers, b'{"model": "identity", "input": {"tensor": [1]}}')
    assert caught.value.field == "ce_id" and caught.value.job_id is None


async def test_openapi_documents_the_error_shape_for_every_422(api: Api) -> None:
    doc = (await api.client.get("/openapi.json")).json()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            answer = operation["responses"].get("422")
            if answer is not None:
                schema = answer["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path)
