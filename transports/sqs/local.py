"""A local SQS/S3 endpoint (`moto_server`, from the optional `moto[server]` extra) for
`inferq dev --transport sqs` and the test suite, started and stopped by its own PID.

It is an emulator: fine for development and tests, slow with long queues, never a
performance reference.
"""

from __future__ import annotations

import shutil
import sys
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Self

from transports.base import TransportError
from transports.local_process import LocalProcess

LOG_NAME = "moto_server.log"
# boto3 needs a region and credentials even for moto: these, unless the environment has its own
LOCAL_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


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
        self._process = LocalProcess("moto_server", self.data_dir / LOG_NAME, host, port)

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """What clients connect to: the endpoint URL."""
        return self.endpoint_url

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process.running

    @property
    def log_path(self) -> Path:
        return self._process.log_path

    def environment(self) -> dict[str, str]:
        return dict(LOCAL_CREDENTIALS)

    def start(self, timeout_s: float = 30) -> None:
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [str(moto_server_binary()), "-H", self.host, "-p", str(self.port)]
        self._process.start(argv, timeout_s, ready=self._answers, what="answer HTTP")

    def _answers(self) -> None:
        with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1):
            return

    def stop(self, timeout_s: float = 10) -> None:
        self._process.stop(timeout_s)

    def kill(self) -> None:
        self._process.kill()

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
