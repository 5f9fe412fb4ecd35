"""The whole chain: HTTP -> Kafka -> worker -> outcome + outbox row (one transaction) ->
`inferq control` (Celery on Redis) -> a signed webhook, verified by `standardwebhooks`.
And the stale-lease sweep re-publishing a job onto the topic for a worker to finish."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest

from jobstore.outbox import webhook_id
from jobstore.records import NewJob
from jobstore.store import JobStore
from schemas.jobs import JobStatus
from tests.procs import Stack, wait_for
from tests.test_e2e_kafka import stack as stack
from tests.webhook_receiver import Receiver
from webhooks.signing import generate_secret

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
def webhook_env(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> Iterator[str]:
    secret = generate_secret()
    for name, value in {
        "INFERQ_WEBHOOK_SECRET": secret,
        "INFERQ_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "INFERQ_REDIS_URL": redis_url,
        "INFERQ_CONTROL_QUEUE": f"test-{uuid.uuid4().hex[:8]}",
        "INFERQ_CONTROL_METRICS_PORT": "0",
        "INFERQ_WEBHOOK_DISPATCH_INTERVAL_S": "0.2",
        "INFERQ_SWEEP_INTERVAL_S": "1",
    }.items():
        monkeypatch.setenv(name, value)
    yield secret


@pytest.mark.timeout(240)  # the API 60 s, webhooks 90 s, the delivery log 30 s
def test_http_job_to_verified_webhook(stack: Stack, webhook_env: str) -> None:
    hook = Receiver(webhook_env)
    hook.start()
    try:
        _, url = stack.api()
        stack.worker()
        stack.spawn(["control"], "control")
        events = ["job.started", "job.succeeded"]
        with httpx.Client(base_url=url, timeout=60) as client:
            ids = []
            for i in range(5):
                r = client.post(
                    "/v1/jobs",
                    json={
                        "model": "identity",
                        "input": {"tensor": [float(i)]},
                        "webhook": {"url": hook.url, "events": events},
                    },
                )
                assert r.status_code == 202, r.text
                ids.append(r.json()["id"])
            wait_for(
                lambda: sum(len(v) for v in hook.ids_by_job().values()) >= 10,
                90,
                f"10 webhooks\n{stack.log('control')}\n{stack.log('worker')}",
                interval=0.2,
            )
            assert hook.rejected == []
            for job_id in ids:
                assert hook.ids_by_job()[job_id] == {webhook_id(job_id, e) for e in events}
            wait_for(
                lambda: (
                    {d["status"] for d in client.get(f"/v1/jobs/{ids[0]}/webhooks").json()["data"]}
                    == {"delivered"}
                ),
                30,
                "the delivery log",
            )
            log = client.get(f"/v1/jobs/{ids[0]}/webhooks").json()["data"]
            assert sorted(d["event"] for d in log) == events
            assert all(d["attempt_log"][-1]["status_code"] == 200 for d in log)
            succeeded = next(r for r in hook.received if r.event == "job.succeeded")
            assert succeeded.job_id in ids
    finally:
        hook.stop()


@pytest.mark.timeout(180)  # the orphan's webhook 120 s
def test_stale_lease_is_republished_and_finished(stack: Stack, webhook_env: str) -> None:
    hook = Receiver(webhook_env)
    hook.start()
    store = JobStore(f"sqlite:///{stack.data_dir / 'jobs.db'}")
    store.create_schema()
    try:
        # a job whose worker died holding it: running, lease lapsed, its message long committed
        store.create(
            NewJob(
                id="orphan",
                model="identity",
                version="1",
                input={"tensor": [4.0]},
                webhook={"url": hook.url},
            )
        )
        store.claim(["orphan"], worker_id="dead-worker", lease_s=0.1)
        stack.worker()
        stack.spawn(["control"], "control")
        wait_for(
            lambda: "orphan" in hook.ids_by_job(),
            120,
            f"the orphan's webhook\n{stack.log('control')}\n{stack.log('worker')}",
            interval=0.2,
        )
        job = store.get("orphan")
        assert job is not None and job.status == JobStatus.SUCCEEDED
        assert job.attempts == 2 and job.lease_owner is None
        assert hook.received[0].event == "job.succeeded"
        assert job.completed_at is not None
        assert job.completed_at - job.started_at < timedelta(minutes=5)  # type: ignore[operator]
    finally:
        hook.stop()
        store.close()
