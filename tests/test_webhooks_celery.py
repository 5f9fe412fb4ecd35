"""Webhook delivery end to end: a real Celery worker (`inferq control`) on real Redis, a real
HTTP receiver on loopback, every delivery verified with the `standardwebhooks` package."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from jobstore.outbox import WebhookOutbox, webhook_id
from jobstore.records import NewJob, Outcome, utcnow
from jobstore.store import JobStore
from schemas.jobs import JobStatus
from tests.consistency import webhook_consistency
from tests.local_servers import LocalRedis
from tests.procs import wait_for
from tests.webhook_receiver import Receiver
from webhooks.signing import generate_secret

pytestmark = pytest.mark.redis


class Control:
    """`inferq control` as a child process, with fast retry settings for tests."""

    def __init__(self, tmp: Path, redis_url: str, secret: str) -> None:
        self.tmp = tmp
        self.db = f"sqlite:///{tmp / 'jobs.db'}"
        self.env = dict(os.environ)
        self.env.update(
            {
                "INFERQ_DATA_DIR": str(tmp),
                "INFERQ_DATABASE_URL": self.db,
                "INFERQ_REDIS_URL": redis_url,
                "INFERQ_CONTROL_QUEUE": f"test-{uuid.uuid4().hex[:8]}",
                "INFERQ_WEBHOOK_SECRET": secret,
                "INFERQ_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
                "INFERQ_WEBHOOK_RETRY_SCHEDULE": ",".join(["0"] + ["0.5"] * 60),
                "INFERQ_WEBHOOK_RETRY_JITTER": "0",
                "INFERQ_WEBHOOK_DISPATCH_INTERVAL_S": "0.2",
                "INFERQ_WEBHOOK_LEASE_S": "4",
                "INFERQ_WEBHOOK_CONNECT_TIMEOUT_S": "1",
                "INFERQ_WEBHOOK_READ_TIMEOUT_S": "2",
                "INFERQ_CONTROL_METRICS_PORT": "0",
                "INFERQ_SWEEP_INTERVAL_S": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.env.pop("INFERQ_KAFKA_BOOTSTRAP", None)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.store = JobStore(self.db)
        self.store.create_schema()
        self.outbox = WebhookOutbox(self.store.engine, writer=self.store.writer)

    def start(self, *extra: str) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"control-{len(self.procs)}.log", "ab")  # noqa: SIM115
        with log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "inferq", "control", "--concurrency", "8", *extra],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def log(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in sorted(self.tmp.glob("control-*.log")))

    def kill(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        proc.wait(20)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.store.close()

    def finish_jobs(self, url: str, n: int, prefix: str = "job") -> list[str]:
        """n jobs with a webhook, run to success; one claim and one complete per 500."""
        ids = [f"{prefix}-{i:05d}" for i in range(n)]
        for start in range(0, n, 500):
            chunk = ids[start : start + 500]
            self.store.ensure(
                [
                    NewJob(id=i, model="identity", version="1", input={}, webhook={"url": url})
                    for i in chunk
                ]
            )
            claimed = self.store.claim(chunk, worker_id="test", lease_s=60).claimed
            self.store.complete(
                [
                    Outcome(r.id, r.attempts, JobStatus.SUCCEEDED, result={"ok": True})
                    for r in claimed
                ]
            )
        return ids

    def statuses(self, ids: list[str]) -> dict[str, str]:
        out = {}
        for job_id in ids:
            for d in self.outbox.for_job(job_id):
                out[job_id] = d.status.value
        return out


@pytest.fixture
def secret() -> str:
    return generate_secret()


@pytest.fixture
def control(tmp_path: Path, redis_url: str, secret: str) -> Iterator[Control]:
    c = Control(tmp_path, redis_url, secret)
    try:
        yield c
    finally:
        # no test here checks how `inferq control` stops (test_dev does): a warm shutdown
        # only cost each test ~2 s of teardown; its queue is the test's own
        for proc in c.procs:
            c.kill(proc)
        c.stop()


@pytest.fixture
def hook(secret: str) -> Iterator[Receiver]:
    r = Receiver(secret)
    r.start()
    yield r
    r.stop()


def _all_delivered(control: Control, hook: Receiver, ids: list[str], timeout: float) -> None:
    def done() -> bool:
        assert all(p.poll() is None for p in control.procs[-1:]), control.log()
        return set(hook.ids_by_job()) >= set(ids)

    try:
        wait_for(done, timeout, f"{len(ids)} deliveries", interval=0.2)
    except AssertionError:
        missing = set(ids) - set(hook.ids_by_job())
        raise AssertionError(f"{len(missing)} not delivered\n{control.log()}") from None


def _one_id_per_job(hook: Receiver, ids: list[str]) -> None:
    by_job = hook.ids_by_job()
    assert hook.rejected == []  # every request verified with standardwebhooks
    for job_id in ids:
        assert by_job[job_id] == {webhook_id(job_id, "job.succeeded")}


@pytest.mark.timeout(150)  # deliveries 60 s, rows settled 30 s
def test_delivers_verified_webhooks(control: Control, hook: Receiver) -> None:
    control.start()
    ids = control.finish_jobs(hook.url, 20)
    _all_delivered(control, hook, ids, 60)
    _one_id_per_job(hook, ids)
    wait_for(lambda: set(control.statuses(ids).values()) == {"delivered"}, 30, "rows settled")
    (delivery,) = control.outbox.for_job(ids[0])
    assert delivery.attempt_log[-1].status_code == 200


@pytest.mark.timeout(210)  # retries 60 s, deliveries 90 s
def test_receiver_down_then_back_loses_nothing(control: Control, hook: Receiver) -> None:
    port = hook.port
    hook.stop()  # down: connection refused
    control.start()
    ids = control.finish_jobs(f"http://127.0.0.1:{port}/hook", 30)

    def retried() -> bool:
        deliveries = [d for i in ids[:5] for d in control.outbox.for_job(i)]
        return all(len(d.attempt_log) >= 2 for d in deliveries)

    wait_for(retried, 60, "failed attempts to be recorded and retried", interval=0.2)
    hook.port = port
    hook.start()  # back on the same port
    _all_delivered(control, hook, ids, 90)
    _one_id_per_job(hook, ids)
    (delivery,) = control.outbox.for_job(ids[0])
    assert delivery.attempt_log[0].error and "ConnectError" in delivery.attempt_log[0].error


@pytest.mark.slow
@pytest.mark.timeout(240)  # in flight 60 s, the kill 20 s, deliveries 120 s
def test_worker_killed_mid_delivery_loses_nothing(control: Control, hook: Receiver) -> None:
    hook.mode, hook.hang_s = "slow", 1.5  # every request is in flight for a while
    first = control.start()
    ids = control.finish_jobs(hook.url, 30)
    wait_for(lambda: hook.requests >= 4, 60, "deliveries in flight", interval=0.05)
    control.kill(first)  # SIGKILL: no chance to ack or record anything
    hook.mode = "ok"
    control.start()
    _all_delivered(control, hook, ids, 120)
    _one_id_per_job(hook, ids)


@pytest.mark.timeout(180)  # the delivery 60 s, the replay 60 s
def test_replayed_delivery_keeps_its_webhook_id(control: Control, hook: Receiver) -> None:
    control.start()
    (job_id,) = control.finish_jobs(hook.url, 1)
    _all_delivered(control, hook, [job_id], 60)
    assert control.outbox.replay(job_id) == 1
    wait_for(lambda: len(hook.received) >= 2, 60, "the replay")
    assert {r.msg_id for r in hook.received} == {webhook_id(job_id, "job.succeeded")}


@pytest.mark.timeout(180)  # the expiry webhook 60 s, the stale job 60 s
def test_sweeps_expire_and_requeue(control: Control, hook: Receiver) -> None:
    store = control.store
    store.create(
        NewJob(
            id="late",
            model="identity",
            version="1",
            input={},
            webhook={"url": hook.url},
            expires_at=utcnow() + timedelta(seconds=0.5),
        )
    )
    # a job whose worker died: its lease lapses; without a bus it is failed at the limit
    store.create(NewJob(id="stuck", model="identity", version="1", input={}))
    for _ in range(5):
        store.claim(["stuck"], worker_id="dead", lease_s=0.1)
    control.start()
    wait_for(lambda: "late" in hook.ids_by_job(), 60, "the job.expired webhook")
    assert hook.received[0].event == "job.expired"
    wait_for(lambda: _status(store, "stuck") == JobStatus.FAILED, 60, "the stale job failed")
    stuck = store.get("stuck")
    assert stuck is not None and stuck.error_code == "lease_expired"


@pytest.mark.slow
@pytest.mark.timeout(360)  # deliveries 300 s
def test_a_thousand_jobs_a_thousand_verified_deliveries(control: Control, hook: Receiver) -> None:
    control.start()
    ids = control.finish_jobs(hook.url, 1000)
    _all_delivered(control, hook, ids, 300)
    _one_id_per_job(hook, ids)


@pytest.mark.slow
@pytest.mark.timeout(150)  # deliveries 90 s
def test_local_broker_fallback_without_redis(tmp_path: Path, secret: str, hook: Receiver) -> None:
    """No Redis: `inferq control --local-broker-fallback` says so and delivers anyway."""
    c = Control(tmp_path, "redis://127.0.0.1:1/0", secret)
    try:
        c.start("--local-broker-fallback")
        ids = c.finish_jobs(hook.url, 5)
        _all_delivered(c, hook, ids, 90)
        _one_id_per_job(hook, ids)
        text = "".join(p.read_text() for p in tmp_path.glob("control-*.log"))
        assert "sqla+sqlite" in text and "not reachable" in text
    finally:
        c.stop()


def _shutdown_after_pubsub_kill(server: LocalRedis) -> None:
    """Redis drops its pub/sub clients, then shuts down, in one read of one packet: a consumer
    sees its pub/sub socket fail first, while its BRPOP is still outstanding."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"CLIENT KILL TYPE pubsub\r\nSHUTDOWN NOSAVE\r\n")
        with contextlib.suppress(OSError):
            while sock.recv(4096):
                pass
    server.stop()


@pytest.mark.timeout(150)  # in flight 60 s, the outage 30 s, deliveries 60 s
def test_redis_shutdown_with_deliveries_in_flight_keeps_control_running(
    tmp_path: Path, secret: str
) -> None:
    """Issue 8: `inferq control` exited (Celery's "Unrecoverable error: AttributeError("'NoneType'
    object has no attribute 'hostname'")") when Redis went away while tasks were unacked and
    the broker connection still carried the pidbox's pub/sub subscription. It must reconnect,
    and every webhook must still arrive once."""
    server = LocalRedis(tmp_path / "redis")
    server.start()
    hook = Receiver(secret, mode="slow", hang_s=1.0)  # deliveries stay unacked a while
    hook.start()
    c = Control(tmp_path, server.url, secret)
    try:
        proc = c.start()
        # fewer than the prefetch limit (4 x 8 threads): all are taken, so the consumer has a
        # BRPOP outstanding for more while 8 run and 4 wait, none acknowledged
        ids = c.finish_jobs(hook.url, 12, prefix="rl")
        wait_for(lambda: hook.requests >= 8, 60, "deliveries in flight", interval=0.05)
        _shutdown_after_pubsub_kill(server)

        def reconnecting() -> bool:  # the consumer has cleaned up and is retrying
            assert proc.poll() is None, f"inferq control exited ({proc.returncode})\n{c.log()}"
            return "Trying again in" in c.log()

        wait_for(reconnecting, 30, "the consumer retrying the broker", interval=0.05)
        server.start()  # the same port, empty
        hook.mode = "ok"

        def delivered() -> bool:
            assert proc.poll() is None, f"inferq control exited ({proc.returncode})\n{c.log()}"
            return set(hook.ids_by_job()) >= set(ids)

        wait_for(delivered, 60, "every webhook after Redis came back", interval=0.2)
        wait_for(lambda: set(c.statuses(ids).values()) == {"delivered"}, 30, "rows settled")
        assert webhook_consistency(c.outbox, list(hook.received), ids) == []
        assert hook.rejected == []
    finally:
        c.stop()
        hook.stop()
        server.stop()


def _status(store: JobStore, job_id: str) -> JobStatus | None:
    record = store.get(job_id)
    return None if record is None else record.status
