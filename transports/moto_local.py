"""A local SQS/S3 endpoint (`moto_server`, from the optional `moto[server]` extra) for
`inferq dev --transport sqs` and the test suite, started and stopped by its own PID.

It is an emulator: fine for development and tests, slow with long queues, never a
performance reference.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from transports.base import TransportError

LOG_NAME = "moto_server.log"


def moto_server_binary() -> Path:
    """`moto_server` next to this interpreter (a virtualenv), else on PATH."""
    local = Path(sys.executable).parent / "moto_server"
    if local.is_file():
        return local
    found = shutil.which("moto_server")
    if found is None:
        raise TransportError("moto_server is not installed (pip install 'inferq[sqs-local]')")
    return Path(found)


class LocalAws:
    """One `moto_server` process on ``host:port`` serving SQS and S3 (memory only)."""

    def __init__(self, data_dir: Path, port: int, host: str = "127.0.0.1") -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.host = host
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 30) -> None:
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [str(moto_server_binary()), "-H", self.host, "-p", str(self.port)]
        self._log = (self.data_dir / LOG_NAME).open("ab")
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C must not reach it: its owner stops it
            )
        except OSError as exc:
            self._close_log()
            raise TransportError(f"cannot execute {argv[0]}") from exc
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last: BaseException | None = None
        while time.monotonic() < deadline:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                raise TransportError(f"moto_server exited while starting; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1):
                    return
            except OSError as exc:
                last = exc
            time.sleep(0.1)
        raise TransportError(
            f"moto_server did not answer on {self.endpoint_url} within {timeout_s}s"
        ) from last

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_NAME

    def stop(self, timeout_s: float = 10) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
