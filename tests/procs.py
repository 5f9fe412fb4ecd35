"""Running inferq roles as real child processes, for end-to-end and crash tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Stack:
    """Environment for API and worker processes sharing a broker, a store and models."""

    data_dir: Path
    bootstrap: str
    topic: str
    models: Path
    database_url: str | None = None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "INFERQ_DATA_DIR": str(self.data_dir),
                "INFERQ_KAFKA_BOOTSTRAP": self.bootstrap,
                "INFERQ_KAFKA_TOPIC": self.topic,
                "INFERQ_KAFKA_GROUP": f"{self.topic}-workers",
                "INFERQ_MODEL_REPOSITORY": str(self.models),
                "INFERQ_INFERENCE_THREADS": "2",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.database_url:
            env["INFERQ_DATABASE_URL"] = self.database_url
        env.update(extra)
        return env

    def spawn(self, args: list[str], log_name: str, **extra: str) -> subprocess.Popen[bytes]:
        with open(self.data_dir / f"{log_name}.log", "ab") as log:  # the child keeps its copy
            proc = subprocess.Popen(
                [sys.executable, "-m", "inferq", *args],
                env=self.env(**extra),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def api(self, **extra: str) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        proc = self.spawn(["api", "--port", str(port)], "api", **extra)
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert proc.poll() is None, self.log("api")
            try:
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 60, "the API")
        return proc, url

    def worker(self, name: str = "worker", **extra: str) -> subprocess.Popen[bytes]:
        return self.spawn(
            ["worker"],
            f"{name}-{len(self.procs)}",
            INFERQ_WORKER_METRICS_PORT=str(free_port()),
            INFERQ_WORKER_ID=name,
            **extra,
        )

    def log(self, name: str) -> str:
        """The tail of every log whose name starts with ``name``."""
        paths = sorted(self.data_dir.glob(f"{name}*.log"))
        return (
            "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in paths)
            or "(no log)"
        )

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
