"""The HTTP contract, on the in-memory bus and a SQLite store."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from jobstore.records import Outcome
from jobstore.store import JobStore
from producers.app import ApiConfig, ApiDeps, create_app, new_job_id
from schemas.contracts import ModelConfig
from schemas.envelope import decode_message
from schemas.jobs import JobStatus
from transports.memory import MemoryBroker, MemoryPublisher

TOPIC = "jobs"
MODELS = [
    ModelConfig(name="minilm", version="1", adapter="text-embedding", default=True),
    ModelConfig(name="identity", version="1", adapter="identity", default=True),
    ModelConfig(name="identity", version="2", adapter="identity"),
]


@dataclass
class Api:
    client: httpx.AsyncClient
    store: JobStore
    broker: MemoryBroker
    config: ApiConfig

    async def submit(self, body: dict, **kw) -> httpx.Response:
        return await self.client.post("/v1/jobs", json=body, **kw)

    def published(self) -> list:
        return [decode_message(h, v) for _, v, h in self.broker.messages(TOPIC)]


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    broker = MemoryBroker()
    config = ApiConfig(
        topic=TOPIC,
        max_body_bytes=4096,
        publish_attempts=3,
        publish_timeout_s=2,
        backlog_cache_s=0,
        asyncapi={"asyncapi": "3.0.0"},
    )
    app = create_app(
        ApiDeps(
            store=store,
            publisher=MemoryPublisher(broker),
            models=lambda: MODELS,
            config=config,
            registry=CollectorRegistry(),
        )
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        yield Api(client, store, broker, config)
    store.close()


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert "error" in body, body
    return body["error"]


async def test_submit_returns_202_with_location_and_publishes(api: Api) -> None:
    r = await api.submit(
        {"model": "minilm", "input": {"text": "hello"}, "metadata": {"tenant": "acme"}}
    )
    assert r.status_code == 202
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["model"] == "minilm" and job["version"] == "1"
    assert job["metadata"] == {"tenant": "acme"}
    [envelope] = api.published()
    assert envelope.id == job["id"] and envelope.data.input == {"text": "hello"}
    got = await api.client.get(f"/v1/jobs/{job['id']}")
    assert got.status_code == 200 and got.json()["status"] == "queued"


async def test_version_routing_picks_default_and_named(api: Api) -> None:
    assert (await api.submit({"model": "identity", "input": {"tensor": [1]}})).json()[
        "version"
    ] == "1"
    r = await api.submit({"model": "identity", "version": "2", "input": {"tensor": [1]}})
    assert r.json()["version"] == "2"


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({"model": "nope", "input": {"text": "x"}}, 422, "unknown_model", "model"),
        (
            {"model": "identity", "version": "9", "input": {"tensor": [1]}},
            422,
            "unknown_version",
            "version",
        ),
        ({"input": {"text": "x"}}, 422, "field_missing", "model"),
        ({"model": "minilm"}, 422, "field_missing", "input"),
        (
            {"model": "minilm", "input": {"text": "x"}, "priority": "high"},
            422,
            "field_invalid",
            "priority",
        ),
        (
            {"model": "minilm", "input": {"text": "x"}, "priority": 12},
            422,
            "field_invalid",
            "priority",
        ),
        ({"model": "minilm", "input": {"text": "x"}, "ttl_s": -1}, 422, "field_invalid", "ttl_s"),
        (
            {"model": "minilm", "input": {"text": "x"}, "colour": "red"},
            422,
            "field_unknown",
            "colour",
        ),
        ({"model": "minilm", "input": "hello"}, 422, "field_invalid", "input"),
        ({"model": "minilm", "input": {"text": ""}}, 422, "invalid_input", "input.text"),
        ({"model": "minilm", "input": {"text": "   "}}, 422, "invalid_input", "input.text"),
        ({"model": "minilm", "input": {"text": 42}}, 422, "invalid_input", "input.text"),
        ({"model": "minilm", "input": {"tensor": [1.0, 2.0]}}, 422, "invalid_input", "input.text"),
        ({"model": "identity", "input": {"text": "hello"}}, 422, "invalid_input", "input.tensor"),
        ({"model": "identity", "input": {"tensor": []}}, 422, "invalid_input", "input.tensor"),
        ({"model": "identity", "input": {"tensor": ["a"]}}, 422, "invalid_input", "input.tensor.0"),
        (
            {"model": "minilm", "input": {"text": "x"}, "webhook": {"url": "ftp://x"}},
            422,
            "field_invalid",
            "webhook.url",
        ),
    ],
)
async def test_bad_requests_get_a_code_and_the_field(
    api: Api, body: dict, status: int, code: str, field: str
) -> None:
    r = await api.submit(body)
    assert r.status_code == status, r.text
    err = _error(r)
    assert err["code"] == code
    assert err["field"] == field
    assert err["message"]
    assert api.published() == []  # nothing half-accepted


@pytest.mark.parametrize("raw", [b"not json", b'{"model": "minilm", "inp', b""])
async def test_non_json_and_truncated_bodies_are_400(api: Api, raw: bytes) -> None:
    r = await api.client.post("/v1/jobs", content=raw, headers={"content-type": "application/json"})
    assert r.status_code in (400, 422), r.text
    assert _error(r)["code"] in ("malformed_json", "field_missing")


async def test_json_array_body_is_422(api: Api) -> None:
    r = await api.client.post("/v1/jobs", json=[1, 2])
    assert r.status_code == 422 and _error(r)["code"] == "field_invalid"


async def test_body_over_limit_is_413(api: Api) -> None:
    big = {"model": "minilm", "input": {"text": "x" * 10_000}}
    r = await api.submit(big)
    assert r.status_code == 413
    assert _error(r)["code"] == "body_too_large" and _error(r)["field"] == "body"

    async def chunks() -> AsyncIterator[bytes]:  # no content-length: counted as it streams
        for _ in range(10):
            yield b" " * 1000

    r = await api.client.post("/v1/jobs", content=chunks())
    assert r.status_code == 413
    assert api.published() == []


@pytest.mark.parametrize("key", ["", "a" * 256, "has space", "tab\tkey", "é"])
async def test_malformed_idempotency_key(api: Api, key: str) -> None:
    r = await api.submit(
        {"model": "minilm", "input": {"text": "x"}}, headers={"Idempotency-Key": key.encode()}
    )
    assert r.status_code == 400, r.text
    assert _error(r) | {"message": ""} == {
        "code": "invalid_idempotency_key",
        "field": "Idempotency-Key",
        "message": "",
    }


async def test_idempotency_same_body_returns_same_job_other_body_conflicts(api: Api) -> None:
    body = {"model": "minilm", "input": {"text": "once"}}
    first = await api.submit(body, headers={"Idempotency-Key": "order-42"})
    again = await api.submit(body, headers={"Idempotency-Key": "order-42"})
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert len(api.published()) == 1  # published once
    other = await api.submit(
        {"model": "minilm", "input": {"text": "twice"}}, headers={"Idempotency-Key": "order-42"}
    )
    assert other.status_code == 409
    assert _error(other)["code"] == "idempotency_conflict"
    assert _error(other)["field"] == "Idempotency-Key"


async def test_unknown_job_is_404(api: Api) -> None:
    for path in ("/v1/jobs/does-not-exist", "/v1/jobs/" + new_job_id()):
        r = await api.client.get(path)
        assert r.status_code == 404 and _error(r)["code"] == "job_not_found"
    r = await api.client.post("/v1/jobs/nope/cancel")
    assert r.status_code == 404 and _error(r)["code"] == "job_not_found"


async def test_unknown_route_and_method(api: Api) -> None:
    r = await api.client.get("/v2/nothing")
    assert r.status_code == 404 and _error(r)["code"] == "not_found"
    r = await api.client.delete("/v1/jobs")
    assert r.status_code == 405 and _error(r)["code"] == "method_not_allowed"


async def test_cancel_queued_then_not_again(api: Api) -> None:
    job = (await api.submit({"model": "minilm", "input": {"text": "x"}})).json()
    r = await api.client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = await api.client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 409 and _error(r)["code"] == "job_not_cancellable"


async def test_cancel_running_is_409(api: Api) -> None:
    job = (await api.submit({"model": "minilm", "input": {"text": "x"}})).json()
    api.store.claim([job["id"]], worker_id="w", lease_s=60)
    r = await api.client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 409 and _error(r)["code"] == "job_not_cancellable"


async def test_wait_holds_until_terminal(api: Api) -> None:
    import asyncio

    job = (await api.submit({"model": "identity", "input": {"tensor": [3]}})).json()

    async def finish() -> None:
        await asyncio.sleep(0.2)
        [claimed] = api.store.claim([job["id"]], worker_id="w", lease_s=60).claimed
        api.store.complete(
            [
                Outcome(
                    job_id=job["id"],
                    attempt=claimed.attempts,
                    status=JobStatus.SUCCEEDED,
                    result={"tensor": [3.0]},
                )
            ]
        )

    task = asyncio.create_task(finish())
    r = await api.client.get(f"/v1/jobs/{job['id']}", params={"wait": 5})
    await task
    assert r.json()["status"] == "succeeded" and r.json()["result"] == {"tensor": [3.0]}
    # and a wait on a job that never finishes returns when the time is up, not terminal
    other = (await api.submit({"model": "identity", "input": {"tensor": [1]}})).json()
    r = await api.client.get(f"/v1/jobs/{other['id']}", params={"wait": 0.3})
    assert r.status_code == 200 and r.json()["status"] == "queued"
    r = await api.client.get(f"/v1/jobs/{other['id']}", params={"wait": 1000})
    assert r.status_code == 422 and _error(r)["field"] == "wait"


async def test_list_filters_and_paginates(api: Api) -> None:
    ids = []
    for i in range(7):
        model = "minilm" if i % 2 else "identity"
        inp = {"text": f"t{i}"} if model == "minilm" else {"tensor": [i]}
        ids.append((await api.submit({"model": model, "input": inp})).json()["id"])
    api.store.cancel(ids[0])
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = (await api.client.get("/v1/jobs", params=params)).json()
        seen += [j["id"] for j in page["data"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == 7
    minilm = (await api.client.get("/v1/jobs", params={"model": "minilm"})).json()["data"]
    assert {j["id"] for j in minilm} == set(ids[1::2])
    cancelled = (await api.client.get("/v1/jobs", params={"status": "cancelled"})).json()["data"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    r = await api.client.get("/v1/jobs", params={"cursor": "garbage!"})
    assert r.status_code == 400 and _error(r)["code"] == "invalid_cursor"
    r = await api.client.get("/v1/jobs", params={"status": "sleeping"})
    assert r.status_code == 422 and _error(r)["field"] == "status"


async def test_backlog_over_limit_is_429_and_creates_nothing(api: Api) -> None:
    api.config.max_backlog = 2
    for i in range(2):
        assert (await api.submit({"model": "minilm", "input": {"text": f"{i}"}})).status_code == 202
    r = await api.submit({"model": "minilm", "input": {"text": "third"}})
    assert r.status_code == 429 and _error(r)["code"] == "backlog_full"
    assert int(r.headers["retry-after"]) > 0
    assert len(api.published()) == 2
    assert api.store.counts()[JobStatus.QUEUED] == 2


async def test_transient_publish_failures_are_retried(api: Api) -> None:
    api.broker.fail_publishes = 2
    r = await api.submit({"model": "minilm", "input": {"text": "x"}})
    assert r.status_code == 202
    assert len(api.published()) == 1


async def test_publish_outage_is_503_and_no_job_is_left_queued(api: Api) -> None:
    api.broker.fail_publishes = 100
    r = await api.submit(
        {"model": "minilm", "input": {"text": "x"}}, headers={"Idempotency-Key": "k1"}
    )
    assert r.status_code == 503 and _error(r)["code"] == "publish_unavailable"
    assert "retry-after" in r.headers
    assert api.store.counts().get(JobStatus.QUEUED, 0) == 0
    # the client retries with the same key once the bus is back: a fresh job, not the dud
    api.broker.fail_publishes = 0
    r = await api.submit(
        {"model": "minilm", "input": {"text": "x"}}, headers={"Idempotency-Key": "k1"}
    )
    assert r.status_code == 202 and r.json()["status"] == "queued"


async def test_models_health_metrics_docs(api: Api) -> None:
    api.store.heartbeat(
        "w1", [{"name": "minilm", "version": "1", "provider": "CPUExecutionProvider"}]
    )
    models = (await api.client.get("/v1/models")).json()["data"]
    minilm = next(m for m in models if m["name"] == "minilm")
    assert minilm["providers"] == ["CPUExecutionProvider"] and minilm["default"] is True
    assert "text" in json.dumps(minilm["input_schema"])
    identity = {m["version"]: m["default"] for m in models if m["name"] == "identity"}
    assert identity == {"1": True, "2": False}
    assert (await api.client.get("/healthz")).json() == {"status": "ok"}
    ready = await api.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["store"]["status"] == "ok"
    await api.submit({"model": "nope", "input": {}})
    text = (await api.client.get("/metrics")).text
    assert 'inferq_http_requests_total{method="POST",route="/v1/jobs",status="422"}' in text
    assert 'inferq_jobs_rejected_total{code="unknown_model"} 1.0' in text
    openapi = (await api.client.get("/openapi.json")).json()
    assert "/v1/jobs" in openapi["paths"] and "JobRequest" in json.dumps(openapi)
    assert (await api.client.get("/asyncapi.json")).json()["asyncapi"] == "3.0.0"


async def test_request_metrics_count_by_route_template_and_status(api: Api) -> None:
    """Each answer counted once under its route's template (never the concrete id), also
    the ones a middleware inside gives (413) and the ones no route matched."""
    job = (await api.submit({"model": "identity", "input": {"tensor": [1.0]}})).json()
    await api.client.get(f"/v1/jobs/{job['id']}")
    await api.client.get("/v1/jobs/nope-000")
    await api.client.get("/nowhere")
    big = b'{"model": "identity", "input": {"tensor": [' + b"1," * 2_000_000 + b"1]}}"
    r = await api.client.post("/v1/jobs", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
    text = (await api.client.get("/metrics")).text
    for line in (
        'inferq_http_requests_total{method="POST",route="/v1/jobs",status="202"} 1.0',
        'inferq_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="200"} 1.0',
        'inferq_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"} 1.0',
        'inferq_http_requests_total{method="GET",route="unmatched",status="404"} 1.0',
        'inferq_http_requests_total{method="POST",route="unmatched",status="413"} 1.0',
        'inferq_http_request_duration_seconds_count{method="POST",route="/v1/jobs"} 1.0',
    ):
        assert line in text, line
    assert job["id"] not in text


async def test_wait_on_an_unknown_id_waits_then_404s(api: Api) -> None:
    import time

    started = time.monotonic()
    r = await api.client.get("/v1/jobs/not-yet-published", params={"wait": 0.3})
    assert r.status_code == 404 and _error(r)["code"] == "job_not_found"
    assert time.monotonic() - started >= 0.3


async def test_per_model_backlog_limit(api: Api) -> None:
    api.config.max_backlog_per_model = {"identity": 1}
    assert (await api.submit({"model": "identity", "input": {"tensor": [1]}})).status_code == 202
    r = await api.submit({"model": "identity", "input": {"tensor": [2]}})
    assert r.status_code == 429 and _error(r)["code"] == "backlog_full"
    assert "identity" in _error(r)["message"] and r.headers["retry-after"]
    # other models are not held back by identity's limit
    assert (await api.submit({"model": "minilm", "input": {"text": "x"}})).status_code == 202


async def test_autoscale_signal_and_backlog_gauges(api: Api) -> None:
    for i in range(3):
        await api.submit({"model": "minilm", "input": {"text": f"{i}"}})
    api.store.heartbeat(
        "w1",
        [
            {
                "name": "minilm",
                "version": "1",
                "provider": "CPUExecutionProvider",
                "jobs_per_s": "0.01",
            }
        ],
    )
    body = (await api.client.get("/v1/autoscale")).json()
    assert body["backlog"] == 3 and body["workers"] == 1
    assert body["throughput_per_worker"] == 0.01
    # 3 jobs / (0.01 jobs/s x 60 s) = 5 workers
    assert body["raw_desired_workers"] == 5 and body["desired_workers"] == 5
    assert body["models"]["minilm"]["queued"] == 3
    text = (await api.client.get("/metrics")).text
    assert 'inferq_backlog_jobs{model="minilm",state="queued"} 3.0' in text
    assert "inferq_desired_workers 5.0" in text
    assert 'inferq_oldest_queued_age_seconds{model="minilm"}' in text
