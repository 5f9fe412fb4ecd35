"""A real Prometheus server scrapes the API and a worker; promtool accepts both outputs."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.procs import Stack, free_port, wait_for
from transports.kafka import EmbeddedKafka

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:  # CI installs Debian's prometheus package (.ci/run); never skip
        pytest.fail(f"{name} is not installed: apt-get install prometheus")
    return path


@pytest.mark.timeout(420)  # the API 60 s, five ?wait=30 one after another, then 30 + 60 + 30 + 30 s
def test_prometheus_scrapes_api_and_worker(
    tmp_path: Path, kafka_broker: EmbeddedKafka, topic: str, model_repo: Path
) -> None:
    promtool, prometheus = _tool("promtool"), _tool("prometheus")
    stack = Stack(tmp_path, kafka_broker.bootstrap, topic, model_repo)
    metrics_port = free_port()
    prom_port = free_port()
    prom = None
    try:
        _, url = stack.api()
        stack.spawn(
            ["worker"],
            "worker",
            INFERQ_WORKER_METRICS_PORT=str(metrics_port),
            INFERQ_WORKER_ID="prom-worker",
        )
        api_port = url.rsplit(":", 1)[1]
        for i in range(5):
            r = httpx.post(f"{url}/v1/jobs", json={"model": "identity", "input": {"tensor": [i]}})
            assert r.status_code == 202
            httpx.get(f"{url}{r.headers['location']}", params={"wait": 30}, timeout=40)
        httpx.post(f"{url}/v1/jobs", json={"model": "nope", "input": {}})

        worker_url = f"http://127.0.0.1:{metrics_port}/metrics"
        wait_for(lambda: _get(worker_url) is not None, 30, "worker metrics")
        for target in (f"{url}/metrics", worker_url):
            text = httpx.get(target).text
            check = subprocess.run(
                [promtool, "check", "metrics"],
                input=text,
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert check.returncode == 0, f"{target}\n{check.stdout}{check.stderr}"
            names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
            assert names and all(n.startswith("inferq_") for n in names), names

        config = tmp_path / "prometheus.yml"
        jobs = {"api": api_port, "worker": metrics_port}
        config.write_text(
            "global: {scrape_interval: 1s}\nscrape_configs:\n"
            + "".join(
                f"  - job_name: {job}\n    static_configs: [{{targets: ['127.0.0.1:{port}']}}]\n"
                for job, port in jobs.items()
            )
        )
        with open(tmp_path / "prometheus.log", "wb") as log:
            prom = subprocess.Popen(
                [
                    prometheus,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        api = f"http://127.0.0.1:{prom_port}/api/v1/query"

        def scraped(query: str) -> bool:
            try:
                body = httpx.get(api, params={"query": query}, timeout=2).json()
            except (httpx.HTTPError, ValueError):
                return False
            return body.get("status") == "success" and bool(body["data"]["result"])

        wait_for(
            lambda: scraped('up{job="api"} == 1') and scraped('up{job="worker"} == 1'),
            60,
            "prometheus to scrape both targets",
            interval=0.5,
        )
        wait_for(
            lambda: scraped('inferq_jobs_rejected_total{code="unknown_model"}'),
            30,
            "the API's counters in prometheus",
            interval=0.5,
        )
        wait_for(
            lambda: scraped(
                'inferq_jobs_processed_total{model="identity",outcome="succeeded"} >= 5'
            ),
            30,
            "the worker's counters in prometheus",
            interval=0.5,
        )
        assert scraped("inferq_desired_workers")
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(15)
        stack.stop_all()


def _get(url: str) -> str | None:
    try:
        return httpx.get(url, timeout=2).text
    except httpx.HTTPError:
        time.sleep(0.1)
        return None
