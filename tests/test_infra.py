"""The compose file is for users' machines; here it is validated by parsing, not running."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.cli_helpers import parse

ROOT = Path(__file__).resolve().parents[1]


def test_compose_file_parses_and_names_the_stack() -> None:
    doc = yaml.safe_load((ROOT / "infra" / "docker-compose.yml").read_text())
    services = doc["services"]
    assert {"kafka", "postgres", "redis", "sqs", "prometheus", "grafana", "api", "worker"} <= set(
        services
    )
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["INFERQ_KAFKA_BOOTSTRAP"] == "kafka:9092"
        assert env["INFERQ_DATABASE_URL"].startswith("postgresql+psycopg://")
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    for service in services.values():
        build = service.get("build")
        if build:
            assert (ROOT / "infra" / Path(build["dockerfile"]).name).exists()
            assert f"AS {build['target']}" in dockerfile


def test_compose_commands_are_real_cli_commands() -> None:
    doc = yaml.safe_load((ROOT / "infra" / "docker-compose.yml").read_text())
    for _name, service in doc["services"].items():
        command = service.get("command")
        if command and command[0] == "inferq":
            parse(command[1:])  # raises (fails the test) on an unknown command or option


def test_prometheus_scrapes_api_and_worker() -> None:
    doc = yaml.safe_load((ROOT / "infra" / "prometheus.yml").read_text())
    targets = {
        t for job in doc["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    assert targets == {"api:8000", "worker:9400"}


def test_keda_examples_parse_and_match_the_api() -> None:
    from schemas.jobs import AutoscaleResource

    k8s = ROOT / "infra" / "k8s"
    docs = {p.name: yaml.safe_load(p.read_text()) for p in k8s.glob("*.yaml")}
    deployment = docs["worker-deployment.yaml"]["metadata"]["name"]
    kinds = {}
    for name, doc in docs.items():
        if doc["kind"] == "ScaledObject":
            assert doc["spec"]["scaleTargetRef"]["name"] == deployment, name
            [trigger] = doc["spec"]["triggers"]
            kinds[trigger["type"]] = trigger["metadata"]
    assert set(kinds) == {"kafka", "aws-sqs-queue", "metrics-api"}
    assert kinds["kafka"]["consumerGroup"] == "inferq-workers"
    assert kinds["kafka"]["topic"] == "inferq.jobs"
    assert kinds["metrics-api"]["url"].endswith("/v1/autoscale")
    assert kinds["metrics-api"]["valueLocation"] in AutoscaleResource.model_fields
