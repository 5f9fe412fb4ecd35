"""`inferq dev --transport sqs`: the all-in-one on SQS (and S3 for the claim-check).

It uses ``AWS_ENDPOINT_URL`` when set; otherwise it starts a local moto_server (the
``sqs-local`` extra) with its log in the data dir, stopped by its own PID on the way out.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

from inferq.dev import Child, DevOptions, _ensure_models, _say, _stop, _wait_http
from inferq.settings import Settings

_LOCAL_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def run_dev_sqs(settings: Settings, options: DevOptions) -> int:
    from transports.moto_local import LocalAws

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if not _ensure_models(settings, options.build_models):
        return 2
    env = dict(os.environ)
    local: LocalAws | None = None
    endpoint = settings.aws_endpoint_url
    if not endpoint:
        local = LocalAws(settings.data_dir / "aws", options.aws_port)
        _say(f"starting a local SQS/S3 endpoint (moto_server) on 127.0.0.1:{options.aws_port}")
        try:
            local.start()
        except Exception as exc:
            _say(f"the local SQS/S3 endpoint did not start: {exc}")
            return 2
        endpoint = local.endpoint_url
        for name, value in _LOCAL_CREDENTIALS.items():
            env.setdefault(name, value)
            os.environ.setdefault(name, value)  # for our own boto3 calls below
    env.update(
        {
            "INFERQ_TRANSPORT": "sqs",
            "AWS_ENDPOINT_URL": endpoint,
            "INFERQ_DATA_DIR": str(settings.data_dir),
            "INFERQ_API_PORT": str(options.port),
            "PYTHONUNBUFFERED": "1",
        }
    )
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    children: list[Child] = []
    code = 0
    try:
        from inferq.sqs_wiring import prepare_queues
        from inferq.wiring import open_store

        resolved = settings.model_copy(update={"aws_endpoint_url": endpoint})
        asyncio.run(prepare_queues(resolved, create=True))
        if local is not None and settings.s3_bucket:
            _create_bucket(endpoint, settings.s3_bucket)
        open_store(settings).close()

        def spawn(name: str, args: list[str], extra: dict[str, str]) -> None:
            process = subprocess.Popen(
                [sys.executable, "-m", "inferq", *args],
                env={**env, **extra},
                start_new_session=True,
            )
            children.append(Child(name, process))

        for i in range(options.workers):
            spawn(
                f"worker-{i}",
                ["worker"],
                {
                    "INFERQ_WORKER_METRICS_PORT": str(settings.worker_metrics_port + i),
                    "INFERQ_WORKER_ID": f"dev-worker-{i}",
                },
            )
        spawn("api", ["api", "--port", str(options.port)], {})
        api = f"http://127.0.0.1:{options.port}"
        if not _wait_http(f"{api}/healthz", 60, children):
            raise RuntimeError("the API did not come up")
        _say("ready")
        _say(f"  API        {api}   (docs {api}/docs)")
        _say(f"  SQS        {endpoint}   queues {settings.sqs_queue_name}, {settings.sqs_dlq}")
        _say(f"  job store  {settings.resolved_database_url}")
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
        _stop(list(reversed(children)))
        if local is not None:
            local.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _say("stopped")
    return code


def _create_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    try:
        s3.create_bucket(Bucket=bucket)
    finally:
        s3.close()
