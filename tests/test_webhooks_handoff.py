"""Webhooks without the tick (issue 10, point 6): a committed outcome is handed to the control
plane at once, so its webhook arrives tens of milliseconds after the job completed, while the
periodic outbox sweep (set to 5 s here, so it cannot be what delivers) stays the safety net.
With the handoff turned off (INFERQ_WEBHOOK_HANDOFF=false) the sweep alone still delivers.

Real parts: `inferq api`, `inferq worker`, `inferq control` (Celery on Redis) as processes, a
Kafka-protocol broker, and a receiver verifying every delivery with `standardwebhooks`."""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Iterator
from datetime import datetime

import httpx
import pytest

from jobstore.outbox import webhook_id
from tests.procs import Stack, wait_for
from tests.test_e2e_kafka import stack as stack
from tests.webhook_receiver import Receiver
from webhooks.signing import generate_secret

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
def secret() -> str:
    return generate_secret()


@pytest.fixture
def hook(secret: str) -> Iterator[Receiver]:
    r = Receiver(secret)
    r.start()
    yield r
    r.stop()


def _env(redis_url: str, secret: str, *, dispatch_s: float, handoff: bool) -> dict[str, str]:
    return {
        "INFERQ_WEBHOOK_SECRET": secret,
        "INFERQ_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "INFERQ_REDIS_URL": redis_url,
        "INFERQ_CONTROL_QUEUE": f"test-{uuid.uuid4().hex[:8]}",
        "INFERQ_CONTROL_METRICS_PORT": "0",
        "INFERQ_WEBHOOK_DISPATCH_INTERVAL_S": str(dispatch_s),
        "INFERQ_WEBHOOK_HANDOFF": "true" if handoff else "false",
    }


def _lags(stack: Stack, hook: Receiver, env: dict[str, str], n: int) -> list[float]:
    """Run n identity jobs one at a time (low load); per job, the arrival of its webhook at
    the receiver minus the job's ``completed_at`` as the API reports it."""
    _, url = stack.api(**env)
    stack.worker(**env)
    stack.spawn(["control"], "control", **env)
    lags: list[float] = []
    with httpx.Client(base_url=url, timeout=30) as client:
        # the first job waits for every role to be up, and is not measured
        for i in range(n + 1):
            r = client.post(
                "/v1/jobs",
                json={
                    "model": "identity",
                    "input": {"tensor": [float(i)]},
                    "webhook": {"url": hook.url},
                },
            )
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]

            def arrived(job_id: str = job_id) -> bool:
                return job_id in hook.ids_by_job()

            wait_for(
                arrived,
                90 if i == 0 else 30,
                f"the webhook of {job_id}\n{stack.log('control')}\n{stack.log('worker')}",
                interval=0.01,
            )
            if i == 0:
                continue
            job = client.get(f"/v1/jobs/{job_id}").json()
            completed = datetime.fromisoformat(job["completed_at"]).timestamp()
            with hook.lock:
                at = min(x.at for x in hook.received if x.job_id == job_id)
            lags.append(at - completed)
    return lags


def _each_once(hook: Receiver, count: int) -> None:
    assert hook.rejected == []  # every request verified with standardwebhooks
    by_job = hook.ids_by_job()
    assert len(by_job) == count
    for job_id, ids in by_job.items():
        assert ids == {webhook_id(job_id, "job.succeeded")}
    with hook.lock:
        assert len(hook.received) == count, "a webhook was delivered twice"


@pytest.mark.timeout(300)
def test_handoff_delivers_tens_of_ms_after_completion(
    stack: Stack, hook: Receiver, redis_url: str, secret: str
) -> None:
    env = _env(redis_url, secret, dispatch_s=5.0, handoff=True)
    lags = _lags(stack, hook, env, 20)
    p50 = statistics.median(lags)
    assert p50 < 0.25, f"p50 {p50 * 1000:.0f} ms: {[round(x * 1000) for x in lags]}"
    # the sweep runs meanwhile: it finds nothing left to deliver (no double delivery)
    time.sleep(6)
    _each_once(hook, 21)


@pytest.mark.timeout(300)
def test_without_handoff_the_sweep_alone_delivers(
    stack: Stack, hook: Receiver, redis_url: str, secret: str
) -> None:
    env = _env(redis_url, secret, dispatch_s=2.0, handoff=False)
    lags = _lags(stack, hook, env, 6)
    # delivered, and by the sweep: each waited for its tick, not tens of milliseconds
    p50 = statistics.median(lags)
    assert p50 > 0.25, f"p50 {p50 * 1000:.0f} ms: the handoff is not off"
    _each_once(hook, 7)
