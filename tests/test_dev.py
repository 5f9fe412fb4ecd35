"""`inferq dev` as a user runs it: one real dev process (broker or moto, API, worker, control
plane as its children), crashed children restarted, Ctrl-C to its process group stopping the
roles before the local server, every port free afterwards and no traceback in the output."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.procs import free_port, port_open, wait_for
from tests.webhook_receiver import Receiver
from webhooks.signing import generate_secret

pytestmark = [pytest.mark.slow, pytest.mark.redis]


@pytest.fixture
def dev_redis_url(redis_url: str) -> Iterator[str]:
    """The session's Redis server, in a database of these tests' own (12): the other tests
    flush theirs at session start."""
    url = redis_url.rsplit("/", 1)[0] + "/12"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


class Dev:
    """`inferq dev` started the way a terminal would: in a process group of its own."""

    def __init__(self, tmp_path: Path, args: list[str], env: dict[str, str]) -> None:
        self.log_path = tmp_path / "dev.log"
        with open(self.log_path, "wb") as log:  # the child keeps its copy
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "inferq", "--data-dir", str(tmp_path / "data"), *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def out(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"inferq dev exited\n{self.out()}"
            return "[inferq dev] ready" in self.out()

        wait_for(ready, 120, "inferq dev", interval=0.2)

    def pid(self, role: str) -> int:
        """The pid of the latest start of ``role``, as dev logs it."""
        pids = re.findall(rf"started {re.escape(role)} \(pid (\d+)", self.out())
        assert pids, f"no 'started {role}' line\n{self.out()}"
        return int(pids[-1])

    def banner_port(self, label: str) -> int:
        found = re.search(rf"{re.escape(label)}\s+\S*?127\.0\.0\.1:(\d+)", self.out())
        assert found, f"no {label!r} in the banner\n{self.out()}"
        return int(found.group(1))

    def ctrl_c(self) -> str:
        os.killpg(self.proc.pid, signal.SIGINT)  # what a terminal sends to its foreground group
        assert self.proc.wait(90) == 0, self.out()
        return self.out()

    def kill(self) -> None:
        """After a failed test: dev and everything it logged starting (own sessions each)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid in re.findall(r"started .*?\(pid (\d+)", self.out()):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(pid), signal.SIGKILL)


def _env(model_repo: Path, redis_url: str, **extra: str) -> dict[str, str]:
    env = dict(
        os.environ,
        INFERQ_MODEL_REPOSITORY=str(model_repo),
        INFERQ_REDIS_URL=redis_url,
        INFERQ_CONTROL_QUEUE=f"dev-{uuid.uuid4().hex[:8]}",
        INFERQ_CONTROL_METRICS_PORT=str(free_port()),
        INFERQ_INFERENCE_THREADS="1",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    for name in ("INFERQ_KAFKA_BOOTSTRAP", "AWS_ENDPOINT_URL", "INFERQ_TRANSPORT"):
        env.pop(name, None)
    return env


def _bus_report(bootstrap: str, job_id: str) -> str:
    """Where the job's message is, and how far the worker group got, for a failure message:
    not on the topic (publish lost), behind the group's commit (skipped), or ahead of it on a
    partition that no member owns or fetches."""
    import asyncio

    from aiokafka import AIOKafkaConsumer
    from aiokafka.admin import AIOKafkaAdminClient

    from tests.bus_client import read_all

    topic, group = "inferq.jobs", "inferq-workers"  # dev's defaults
    lines = []
    try:
        mine = [m for m in read_all(bootstrap, topic, timeout=5) if m.key == job_id.encode()]
        where = ", ".join(f"partition {m.partition} offset {m.offset}" for m in mine)
        lines.append(f"message of {job_id}: {where or 'NOT on the topic'}")

        async def group_state() -> None:
            admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
            probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
            await admin.start()
            await probe.start()
            try:
                committed = await admin.list_consumer_group_offsets(group)
                ends = await probe.end_offsets(list(committed)) if committed else {}
                lines.append(
                    "group commit/end: "
                    + ", ".join(
                        f"p{tp.partition} {c.offset}/{ends.get(tp)}"
                        for tp, c in sorted(committed.items())
                    )
                )
                for described in await admin.describe_consumer_groups([group]):
                    lines.append(f"group: {described}")
            finally:
                await probe.stop()
                await admin.close()

        asyncio.run(group_state())
    except Exception as exc:  # a report, never a second failure
        lines.append(f"(bus report incomplete: {exc!r})")
    return "\n".join(lines)


def _job_succeeds(
    api: str, value: float, dev: Dev | None = None, bootstrap: str | None = None, **extra: object
) -> str:
    r = httpx.post(
        f"{api}/v1/jobs", json={"model": "identity", "input": {"tensor": [value]}, **extra}
    )
    assert r.status_code == 202, r.text
    job = httpx.get(f"{api}{r.headers['location']}", params={"wait": 60}, timeout=70).json()
    if job["status"] != "succeeded" and bootstrap is not None:
        job["bus"] = _bus_report(bootstrap, str(job["id"]))
    if job["status"] != "succeeded" and dev is not None:
        job["dev_log_tail"] = dev.out()[-6000:]
    ok = job["status"] == "succeeded" and job["result"] == {"tensor": [value]}
    # a string, not the dict: pytest shortens a dict to its first keys
    assert ok, "\n".join(f"{k}: {v}" for k, v in job.items())
    return str(job["id"])


def _healthy(api: str) -> bool:
    try:
        return httpx.get(f"{api}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _listening(ports: dict[str, int]) -> list[str]:
    return [f"{name} {port}" for name, port in ports.items() if port_open(port)]


@pytest.mark.kafka
def test_dev_restarts_crashed_roles_and_ctrl_c_stops_the_broker_last(
    tmp_path: Path, model_repo: Path, dev_redis_url: str
) -> None:
    # the worker's default metrics port is taken (a second dev on this machine, say)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    taken_port = taken.getsockname()[1]
    api_port, kafka_port = free_port(), free_port()
    env = _env(model_repo, dev_redis_url, INFERQ_WORKER_METRICS_PORT=str(taken_port))
    control_port = int(env["INFERQ_CONTROL_METRICS_PORT"])
    args = ["dev", "--port", str(api_port), "--kafka-port", str(kafka_port), "--no-build"]
    dev = Dev(tmp_path, args, env)
    try:
        dev.wait_ready()
        api = f"http://127.0.0.1:{api_port}"
        metrics_port = dev.banner_port("worker-0 metrics")
        assert metrics_port != taken_port and port_open(metrics_port), dev.out()
        assert dev.banner_port("control metrics") == control_port
        info = json.loads((tmp_path / "data" / "dev.json").read_text())
        assert info["env"]["INFERQ_KAFKA_BOOTSTRAP"] == f"127.0.0.1:{kafka_port}"
        assert info["ports"]["api"] == api_port
        bootstrap = info["env"]["INFERQ_KAFKA_BOOTSTRAP"]
        _job_succeeds(api, 1.0, dev, bootstrap)

        worker = dev.pid("worker-0")
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: dev.pid("worker-0") != worker, 60, "the worker's restart", 0.2)
        out = dev.out()
        assert re.search(r"WARNING .*worker-0 .*SIGKILL.*restart #1", out), out
        _job_succeeds(api, 2.0, dev, bootstrap)  # the restarted worker consumes

        api_pid = dev.pid("api")
        os.kill(api_pid, signal.SIGKILL)
        wait_for(lambda: dev.pid("api") != api_pid and _healthy(api), 60, "the API's restart", 0.2)
        assert re.search(r"WARNING .*api .*SIGKILL.*restart #1", dev.out()), dev.out()
        _job_succeeds(api, 3.0, dev, bootstrap)

        # the local broker too: same port and data dir, the roles reconnect
        broker = int(re.findall(r"noida-db started, pid (\d+)", dev.out())[-1])
        os.kill(broker, signal.SIGKILL)
        wait_for(lambda: "the local broker restarted" in dev.out(), 60, "the broker's restart")
        _job_succeeds(api, 5.0, dev, bootstrap)
        assert dev.proc.poll() is None

        out = dev.ctrl_c()
        assert not (tmp_path / "data" / "dev.json").exists()  # no stale pointer to a dead bus
        ports = {"api": api_port, "kafka": kafka_port, "worker metrics": metrics_port}
        ports["control metrics"] = control_port
        assert _listening(ports) == [], out
        assert "Traceback" not in out[out.index("[inferq dev] stopping") :], out
        order = [out.index(f"stopped {name}") for name in ("api", "worker-0", "control")]
        order.append(out.index("stopped the local broker"))
        assert order == sorted(order), out
    finally:
        dev.kill()
        taken.close()


@pytest.mark.sqs
def test_dev_on_sqs_runs_the_control_plane_and_delivers_webhooks(
    tmp_path: Path, model_repo: Path, dev_redis_url: str
) -> None:
    secret = generate_secret()
    hook = Receiver(secret)
    hook.start()
    api_port, aws_port = free_port(), free_port()
    env = _env(
        model_repo,
        dev_redis_url,
        INFERQ_WEBHOOK_SECRET=secret,
        INFERQ_WEBHOOK_ALLOWED_HOSTS="127.0.0.1",
        INFERQ_WEBHOOK_DISPATCH_INTERVAL_S="0.2",
        INFERQ_SQS_WAIT_TIME_S="1",
    )
    args = ["dev", "--transport", "sqs", "--no-build"]
    args += ["--port", str(api_port), "--aws-port", str(aws_port)]
    dev = Dev(tmp_path, args, env)
    try:
        dev.wait_ready()
        api = f"http://127.0.0.1:{api_port}"
        job_id = _job_succeeds(api, 4.0, webhook={"url": hook.url, "events": ["job.succeeded"]})
        wait_for(lambda: job_id in hook.ids_by_job(), 60, f"the webhook\n{dev.out()}", interval=0.2)
        assert hook.rejected == []
        metrics_port = dev.banner_port("worker-0 metrics")
        control_port = int(env["INFERQ_CONTROL_METRICS_PORT"])

        out = dev.ctrl_c()
        ports = {"api": api_port, "moto": aws_port, "worker metrics": metrics_port}
        ports["control metrics"] = control_port
        assert _listening(ports) == [], out
        assert "Traceback" not in out, out
        assert out.index("stopped control") < out.index("stopped the local SQS/S3 endpoint"), out
    finally:
        dev.kill()
        hook.stop()
