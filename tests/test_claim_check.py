"""The S3 claim-check: the API side on the in-memory twins, the worker side on moto's S3."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import boto3
import httpx
import pytest
from prometheus_client import CollectorRegistry

from dlq.router import reason_from_headers
from jobstore.records import Outcome
from jobstore.store import JobStore
from producers.app import ApiConfig, ApiDeps, create_app
from schemas.contracts import ModelConfig
from schemas.envelope import decode_message
from schemas.jobs import JobStatus
from tests.fixtures_sqs import TENSOR, SqsHarness
from transports.blobs import REF, ClaimCheck, MemoryBlobs, S3Blobs
from transports.memory import MemoryBroker, MemoryPublisher

MODELS = [ModelConfig(name="identity", version="1", adapter="identity", default=True)]


def _policy(blobs: object, **kw: object) -> ClaimCheck:
    defaults: dict[str, object] = {
        "bucket": "ours",
        "allowed_buckets": frozenset({"theirs"}),
        "inline_input_max_bytes": 200,
        "inline_result_max_bytes": 200,
        "input_url_max_bytes": 1000,
    }
    defaults.update(kw)
    return ClaimCheck(blobs, **defaults)  # type: ignore[arg-type]


@pytest.fixture
async def api(
    tmp_path: Path,
) -> AsyncIterator[tuple[httpx.AsyncClient, MemoryBroker, JobStore, MemoryBlobs]]:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    broker = MemoryBroker()
    blobs = MemoryBlobs({"ours": {}, "theirs": {}})
    app = create_app(
        ApiDeps(
            store=store,
            publisher=MemoryPublisher(broker),
            models=lambda: MODELS,
            config=ApiConfig(topic="jobs", backlog_cache_s=0),
            registry=CollectorRegistry(),
            claim_check=_policy(blobs),
        )
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        yield client, broker, store, blobs
    store.close()


async def test_api_offloads_a_large_input_and_publishes_only_its_url(api) -> None:
    client, broker, _, blobs = api
    big = {"tensor": [float(i) for i in range(100)]}
    r = await client.post("/v1/jobs", json={"model": "identity", "input": big})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    [(_, value, headers)] = broker.messages("jobs")
    event = decode_message(headers, value)
    assert event.data.input is None
    assert event.data.input_url == f"s3://ours/inferq/inputs/{job_id}.json"
    assert json.loads(blobs.buckets["ours"][f"inferq/inputs/{job_id}.json"]) == big


async def test_api_keeps_a_small_input_inline(api) -> None:
    client, broker, _, _ = api
    r = await client.post("/v1/jobs", json={"model": "identity", "input": {"tensor": [1.0]}})
    assert r.status_code == 202
    [(_, value, headers)] = broker.messages("jobs")
    assert decode_message(headers, value).data.input == {"tensor": [1.0]}


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        (
            {"model": "identity", "input_url": "s3://elsewhere/x.json"},
            "input_not_allowed",
            "input_url",
        ),
        ({"model": "identity", "input_url": "http://theirs/x"}, "field_invalid", "input_url"),
        (
            {"model": "identity", "input": {"tensor": [1]}, "input_url": "s3://theirs/x"},
            "field_invalid",
            "input",
        ),
        ({"model": "identity"}, "field_missing", "input"),
    ],
    ids=["bucket-not-allowed", "not-s3", "both", "neither"],
)
async def test_api_rejects_bad_input_urls(api, body: dict, code: str, field: str) -> None:
    client, broker, _, _ = api
    r = await client.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    assert (r.json()["error"]["code"], r.json()["error"]["field"]) == (code, field)
    assert broker.messages("jobs") == []


async def test_api_accepts_an_allowed_input_url(api) -> None:
    client, broker, _, _ = api
    r = await client.post(
        "/v1/jobs", json={"model": "identity", "input_url": "s3://theirs/in.json"}
    )
    assert r.status_code == 202, r.text
    [(_, value, headers)] = broker.messages("jobs")
    assert decode_message(headers, value).data.input_url == "s3://theirs/in.json"


async def test_get_returns_a_large_result_as_a_presigned_url(api) -> None:
    client, _, store, _ = api
    r = await client.post("/v1/jobs", json={"model": "identity", "input": {"tensor": [1.0]}})
    job_id = r.json()["id"]
    [record] = store.claim([job_id], worker_id="w", lease_s=60).claimed
    ref = {REF: f"s3://ours/inferq/results/{job_id}.json"}
    store.complete([Outcome(job_id, record.attempts, JobStatus.SUCCEEDED, result=ref)])
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["result"] is None
    assert job["result_url"] == f"memory://ours/inferq/results/{job_id}.json?ttl=3600"


# --- the worker side, on moto_server's S3 ------------------------------------------------------


@pytest.fixture
def s3(aws_endpoint: str):
    client = boto3.client("s3", endpoint_url=aws_endpoint)
    for bucket in ("ours", "theirs", "forbidden"):
        client.create_bucket(Bucket=bucket)
    yield client
    client.close()


def _with_claim_check(harness: SqsHarness, aws_endpoint: str) -> S3Blobs:
    blobs = S3Blobs(endpoint_url=aws_endpoint)
    harness.claim_check = _policy(blobs)
    return blobs


@pytest.mark.sqs
async def test_worker_reads_an_input_url_and_offloads_a_large_result(
    harness: SqsHarness, s3, aws_endpoint: str
) -> None:
    blobs = _with_claim_check(harness, aws_endpoint)
    big = {"tensor": [float(i) for i in range(100)]}
    s3.put_object(Bucket="theirs", Key="in/big.json", Body=json.dumps(big).encode())
    harness.send(
        harness.event("from-s3", {"model": "identity", "input_url": "s3://theirs/in/big.json"})
    )
    await harness.run_until(lambda: harness.status("from-s3") is JobStatus.SUCCEEDED)
    record = harness.store.get("from-s3")
    assert record is not None and record.result == {REF: "s3://ours/inferq/results/from-s3.json"}
    url = await blobs.presign("ours", "inferq/results/from-s3.json", 60)
    async with httpx.AsyncClient() as http:
        assert (await http.get(url)).json() == big
    blobs.close()


@pytest.mark.sqs
@pytest.mark.parametrize(
    ("url", "setup", "code"),
    [
        ("s3://theirs/missing.json", None, "input_not_found"),
        ("s3://ours-but-gone/x.json", None, "input_not_found"),
        ("s3://forbidden/x.json", "forbidden", "input_not_allowed"),
        ("s3://theirs/huge.json", "huge", "input_too_large"),
    ],
    ids=["missing-key", "missing-bucket", "not-allowed", "over-size-limit"],
)
async def test_worker_fails_bad_input_urls_with_a_clear_code(
    harness: SqsHarness, s3, aws_endpoint: str, url: str, setup: str | None, code: str
) -> None:
    _with_claim_check(harness, aws_endpoint)
    if "ours-but-gone" in url:
        assert harness.claim_check is not None
        harness.claim_check = _policy(
            harness.claim_check.blobs, allowed_buckets=frozenset({"ours-but-gone"})
        )
    if setup == "forbidden":
        s3.put_object(Bucket="forbidden", Key="x.json", Body=b'{"tensor": [1]}')
    if setup == "huge":
        s3.put_object(
            Bucket="theirs", Key="huge.json", Body=json.dumps({"tensor": [1.0] * 500}).encode()
        )
    harness.send(harness.event("bad-url", {"model": "identity", "input_url": url}))
    harness.send(harness.event("fine", TENSOR))
    await harness.run_until(
        lambda: (
            harness.status("bad-url") is JobStatus.FAILED
            and harness.status("fine") is JobStatus.SUCCEEDED
        )
    )
    record = harness.store.get("bad-url")
    assert record is not None and record.error_code == code and record.error_message
    [dead] = await harness.dead_letters(1)
    assert reason_from_headers(dict(dead.headers))["code"] == code
