"""`/asyncapi.json` describes the bus of the configured transport, Kafka or SQS."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from inferq.settings import Settings
from inferq.wiring import build_api
from transports.sqs import SqsConfig


def _document(settings: Settings) -> dict:
    # no lifespan: the document needs no broker connection
    r = TestClient(build_api(settings)).get("/asyncapi.json")
    assert r.status_code == 200, r.text
    doc: dict = r.json()
    return doc


@pytest.mark.sqs
def test_asyncapi_under_sqs_names_the_queues_and_the_envelope(
    tmp_path: Path, sqs_config: SqsConfig, queue: str, model_repo: Path
) -> None:
    settings = Settings(
        transport="sqs", data_dir=tmp_path, sqs_queue=queue, model_repository=model_repo,
        aws_endpoint_url=sqs_config.endpoint_url,
    )  # fmt: skip
    doc = _document(settings)
    assert doc["asyncapi"].startswith("3.")
    assert {s["protocol"] for s in doc["servers"].values()} == {"sqs"}
    addresses = {c["address"] for c in doc["channels"].values()}
    assert addresses == {queue, f"{queue}-dlq", f"{queue}-events"}
    envelope = doc["components"]["schemas"]["JobEnvelope"]
    assert {"id", "source", "type", "data"} <= set(envelope["properties"])
    # the job events: an SNS topic whose messages are the job resource
    events = doc["channels"]["job_events"]
    assert "sns" in events["bindings"] and "inferq.job.succeeded" in events["description"]
    message = doc["components"]["messages"]["JobEvent"]["payload"]["$ref"]
    assert message.endswith("/JobResource") and "result_url" in str(doc["components"]["schemas"])
    assert {op["action"] for op in doc["operations"].values()} == {"send", "receive"}


@pytest.mark.kafka
def test_asyncapi_under_kafka_is_faststreams(
    tmp_path: Path, kafka_bootstrap_for_docs: str, model_repo: Path
) -> None:
    settings = Settings(
        transport="kafka", data_dir=tmp_path, kafka_bootstrap=kafka_bootstrap_for_docs,
        model_repository=model_repo,
    )  # fmt: skip
    doc = _document(settings)
    assert {s["protocol"] for s in doc["servers"].values()} == {"kafka"}
    assert {c["address"] for c in doc["channels"].values()} >= {
        "inferq.jobs",
        "inferq.jobs.dlq",
        "inferq.jobs.events",
    }
    events = next(c for c in doc["channels"].values() if c["address"] == "inferq.jobs.events")
    assert "inferq.job.succeeded" in events["description"]
    assert "JobResource" in str(doc["components"]["schemas"])


@pytest.fixture
def kafka_bootstrap_for_docs(kafka_config) -> str:
    return str(kafka_config.bootstrap)
