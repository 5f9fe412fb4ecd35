"""`inferq dev`: the embedded all-in-one supervisor.

It starts a Kafka-protocol broker (noida-db, data kept in the data dir), the API and the
worker pool as child processes, shows where they listen, and stops them all on Ctrl-C. A
child that dies is reported and takes the whole group down: nothing restarts silently.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from inferq.settings import Settings


@dataclass(frozen=True)
class DevOptions:
    port: int = 8000
    kafka_port: int = 19092
    workers: int = 1
    transport: str = "kafka"
    build_models: bool = True
    aws_port: int = 15000  # the local moto_server, when AWS_ENDPOINT_URL is not set


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]


def _say(message: str) -> None:
    print(f"[inferq dev] {message}", flush=True)


def _ensure_models(settings: Settings, build: bool) -> bool:
    from workers.repository import ModelRepository

    repo = ModelRepository(settings.resolved_model_repository)
    if repo.configs():
        return True
    if not build:
        _say(f"no models in {repo.root}; run `inferq models build`")
        return False
    from workers.export import ExportError, build_all

    _say(f"building models into {repo.root} (once; cached afterwards)")
    try:
        build_all(repo.root)
    except ExportError as exc:
        _say(f"cannot build models: {exc}")
        return False
    return True


def _wait_http(url: str, timeout_s: float, children: list[Child]) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(c.process.poll() is not None for c in children):
            return False
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def _stop(children: list[Child], timeout_s: float = 15.0) -> None:
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for child in children:
        remaining = max(deadline - time.monotonic(), 0.1)
        try:
            child.process.wait(remaining)
        except subprocess.TimeoutExpired:
            _say(f"{child.name} did not stop in time; killing pid {child.process.pid}")
            child.process.kill()
            child.process.wait()


def control_broker(settings: Settings) -> str:
    """Redis when it answers, else a broker that needs no server; says which."""
    from inferq.control import local_broker_url, redis_reachable

    if redis_reachable(settings.redis_url):
        _say(f"control plane (Celery) broker: Redis at {settings.redis_url}")
        return settings.redis_url
    url = local_broker_url(settings)
    _say(f"Redis at {settings.redis_url} is not reachable; control plane broker: {url}")
    return url


def run_dev(settings: Settings, options: DevOptions) -> int:
    from transports.broker import EmbeddedKafka

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if not _ensure_models(settings, options.build_models):
        return 2

    if options.transport == "sqs":
        from inferq.dev_sqs import run_dev_sqs

        return run_dev_sqs(settings, options)

    broker: EmbeddedKafka | None = None
    bootstrap = settings.kafka_bootstrap
    if not bootstrap:
        broker = EmbeddedKafka(settings.data_dir / "kafka", options.kafka_port)
        _say(f"starting Kafka-protocol broker (noida-db) on 127.0.0.1:{options.kafka_port}")
        try:
            broker.start()
        except Exception as exc:
            _say(f"the embedded broker did not start: {exc}")
            return 2
        bootstrap = broker.bootstrap

    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    env = dict(os.environ)
    env.update(
        {
            "INFERQ_KAFKA_BOOTSTRAP": bootstrap,
            "INFERQ_DATA_DIR": str(settings.data_dir),
            "INFERQ_API_PORT": str(options.port),
            "PYTHONUNBUFFERED": "1",
        }
    )
    children: list[Child] = []
    code = 0
    try:
        from inferq.wiring import kafka_config, open_store
        from transports.kafka import ensure_topics

        asyncio.run(
            ensure_topics(
                kafka_config(settings.model_copy(update={"kafka_bootstrap": bootstrap}), "dev"),
                {settings.kafka_topic: settings.kafka_partitions, settings.dlq_topic: 1},
            )
        )
        open_store(settings).close()  # schema in place before the children race for it

        def spawn(name: str, args: list[str], extra: dict[str, str]) -> None:
            # a session of its own: Ctrl-C reaches only us, and we stop children in order
            process = subprocess.Popen(
                [sys.executable, "-m", "inferq", *args],
                env={**env, **extra},
                start_new_session=True,
            )
            children.append(Child(name, process))

        for i in range(options.workers):
            port = settings.worker_metrics_port + i
            spawn(
                f"worker-{i}",
                ["worker"],
                {"INFERQ_WORKER_METRICS_PORT": str(port), "INFERQ_WORKER_ID": f"dev-worker-{i}"},
            )
        spawn("api", ["api", "--port", str(options.port)], {})
        spawn("control", ["control"], {"INFERQ_REDIS_URL": control_broker(settings)})

        api = f"http://127.0.0.1:{options.port}"
        if not _wait_http(f"{api}/healthz", 60, children):
            raise RuntimeError("the API did not come up")
        _say("ready")
        _say(f"  API        {api}   (docs {api}/docs, AsyncAPI {api}/asyncapi.json)")
        _say(
            f"  metrics    {api}/metrics, workers on 127.0.0.1:{settings.worker_metrics_port}"
            f"..{settings.worker_metrics_port + options.workers - 1}"
        )
        _say(f"  Kafka      {bootstrap}   topics {settings.kafka_topic}, {settings.dlq_topic}")
        _say(f"  job store  {settings.resolved_database_url}")
        _say(f"  models     {settings.resolved_model_repository}")
        _say(
            f"  try: curl -s -XPOST {api}/v1/jobs -H 'content-type: application/json' "
            '-d \'{"model":"minilm","input":{"text":"hello"}}\''
        )
        _say("Ctrl-C stops everything")
        while not stopping:
            for child in children:
                rc = child.process.poll()
                if rc is not None:
                    _say(f"{child.name} exited with code {rc}; stopping everything")
                    code = 1
                    stopping = True
                    break
            time.sleep(0.2)
    except Exception as exc:
        _say(f"error: {exc}; stopping everything")
        code = 1
    finally:
        _say("stopping")
        # API first so no new work arrives, then workers drain, then the broker
        _stop(list(reversed(children)))
        if broker is not None:
            broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _say("stopped")
    return code


def data_dir_default() -> Path:
    return Path(".inferq")
