"""Backpressure, autoscaling signals and dead-letter repair over a real Kafka-protocol broker,
with the API and workers as real processes."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from jobstore.store import JobStore
from schemas.jobs import JobStatus
from tests.procs import Stack, wait_for
from transports.kafka import EmbeddedKafka

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@pytest.mark.timeout(330)  # the API 60 s, a heartbeat 60 s, the drain 120 s, calm 30 s
def test_flood_gets_429s_every_accepted_job_finishes_and_desired_workers_rise_and_fall(
    tmp_path: Path, kafka_broker: EmbeddedKafka, topic: str, model_repo: Path
) -> None:
    stack = Stack(tmp_path, kafka_broker.bootstrap, topic, model_repo)
    extra = {
        "INFERQ_MAX_BACKLOG": "40",
        "INFERQ_AUTOSCALE_TARGET_DRAIN_S": "0.02",
        "INFERQ_AUTOSCALE_SCALE_DOWN_DELAY_S": "3",
        "INFERQ_AUTOSCALE_MAX_WORKERS": "8",
        "INFERQ_WORKER_HEARTBEAT_S": "0.5",
        "INFERQ_KAFKA_PARTITIONS": "3",
    }
    try:
        _, url = stack.api(**extra)
        stack.spawn(["worker"], "worker", INFERQ_WORKER_ID="flood-worker", **extra)
        wait_for(
            lambda: httpx.get(f"{url}/v1/autoscale").json()["workers"] == 1,
            60,
            "the worker's first heartbeat",
        )
        desired: list[int] = []
        seen: list[dict] = []

        async def flood() -> tuple[list[str], list[httpx.Response]]:
            accepted: list[str] = []
            refused: list[httpx.Response] = []
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:

                async def one(i: int) -> None:
                    text = f"flood sentence number {i}, long enough to keep the model busy " * 3
                    r = await client.post(
                        "/v1/jobs", json={"model": "minilm", "input": {"text": text}}
                    )
                    if r.status_code == 202:
                        accepted.append(r.json()["id"])
                    else:
                        assert r.status_code == 429, r.text
                        refused.append(r)

                async def watch() -> None:
                    for _ in range(40):
                        body = (await client.get("/v1/autoscale")).json()
                        desired.append(body["desired_workers"])
                        seen.append(body)
                        await asyncio.sleep(0.05)

                watcher = asyncio.create_task(watch())
                sem = asyncio.Semaphore(32)

                async def bounded(i: int) -> None:
                    async with sem:
                        await one(i)

                await asyncio.gather(*(bounded(i) for i in range(400)))
                await watcher
            return accepted, refused

        accepted, refused = asyncio.run(flood())
        assert refused, "nothing was refused: the flood did not reach the limit"
        assert accepted, "nothing was accepted"
        for r in refused:
            assert r.json()["error"]["code"] == "backlog_full"
            assert int(r.headers["retry-after"]) >= 1
        store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
        wait_for(
            lambda: (
                sum(
                    1
                    for rec in store.get_many(accepted).values()
                    if rec.status is JobStatus.SUCCEEDED
                )
                == len(accepted)
            ),
            120,
            "every accepted job to finish",
            interval=0.2,
        )
        counts = store.counts()
        assert counts[JobStatus.SUCCEEDED] == len(accepted)  # refused jobs were never created
        assert sum(counts.values()) == len(accepted)
        store.close()
        assert max(desired) >= 2, str(max(seen, key=lambda b: b["backlog"]))

        def calm() -> bool:
            body = httpx.get(f"{url}/v1/autoscale").json()
            return body["desired_workers"] == 1 and body["backlog"] == 0

        wait_for(calm, 30, "the desired worker count to fall back after the drain", interval=0.3)
    finally:
        stack.stop_all()


# the API 60 s, ?wait=30 (jobs published together), the worker's stop 30 s, the redriven job 30 s
@pytest.mark.timeout(210)
def test_poison_to_dlq_good_jobs_flow_and_redrive_after_the_fix(
    tmp_path: Path, kafka_broker: EmbeddedKafka, topic: str, model_repo: Path
) -> None:
    repo = tmp_path / "models"
    shutil.copytree(model_repo / "identity", repo / "identity")
    stack = Stack(tmp_path, kafka_broker.bootstrap, topic, repo)
    try:
        _, url = stack.api()
        worker = stack.worker("w")

        async def publish() -> None:
            producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, acks="all")
            await producer.start()
            try:
                for i in range(60):
                    version = "2" if i == 10 else "1"  # identity/2 is not deployed yet
                    event = {
                        "specversion": "1.0",
                        "id": f"job-{i}",
                        "source": "urn:t",
                        "type": "inferq.job.requested",
                        "data": {"model": "identity", "version": version, "input": {"tensor": [i]}},
                    }
                    await producer.send_and_wait(
                        stack.topic, json.dumps(event).encode(), key=f"job-{i}".encode()
                    )
            finally:
                await producer.stop()

        asyncio.run(publish())
        with httpx.Client(base_url=url, timeout=60) as client:
            for i in range(60):
                job = client.get(f"/v1/jobs/job-{i}", params={"wait": 30}).json()
                if i == 10:
                    assert job["status"] == "failed"
                    assert job["error"]["code"] == "unknown_version"
                else:
                    assert job["status"] == "succeeded", (job, stack.log("w"))
            [letter] = client.get("/v1/dlq", params={"model": "identity"}).json()["data"]
            assert letter["job_id"] == "job-10" and letter["code"] == "unknown_version"
            assert letter["origin"] == stack.topic and "@" in letter["position"]

            # the fix: deploy identity/2, restart the worker, redrive
            shutil.copytree(repo / "identity" / "1", repo / "identity" / "2")
            config = json.loads((repo / "identity" / "2" / "config.json").read_text())
            config.update(version="2", default=False)
            (repo / "identity" / "2" / "config.json").write_text(json.dumps(config))
            worker.terminate()
            worker.wait(30)
            stack.worker("w")
            r = client.post("/v1/dlq/redrive", json={"ids": [letter["id"]]})
            assert r.status_code == 200 and r.json()["redriven"] == [letter["id"]]
            again = client.post("/v1/dlq/redrive", json={"ids": [letter["id"]]}).json()
            assert again["already_redriven"] == [letter["id"]]
            job = client.get("/v1/jobs/job-10", params={"wait": 30}).json()
            assert job["status"] == "succeeded", (job, stack.log("w"))
            assert job["result"] == {"tensor": [10.0]} and job["version"] == "2"
            assert client.get("/v1/dlq").json()["data"] == []
    finally:
        stack.stop_all()
