"""A local `noida-db` Kafka-protocol broker process, for `inferq dev` and the test suite.

The broker binary is started directly (not through the package's Python wrapper script) so
that the PID held here is the broker's own and stop/kill reach it, never a bystander.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import stat
import threading
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from transports.base import TransportError
from transports.local_process import LocalProcess

LOG_NAME = "noida-db.log"


def broker_binary() -> Path:
    """The `noida-db` executable shipped inside the `noida_db` wheel, made executable."""
    try:
        resource = importlib.resources.files("noida_db") / "noida-db"
    except ModuleNotFoundError as exc:
        raise TransportError("noida-db is not installed (pip install noida-db)") from exc
    path = Path(str(resource))
    if not path.is_file():
        raise TransportError(f"noida-db binary not found at {path}")
    mode = path.stat().st_mode
    if not mode & stat.S_IXUSR:
        # wheels do not always keep the executable bit
        path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


class EmbeddedKafka:
    """One `noida-db` process serving only the Kafka protocol on ``host:port``.

    Data lives in ``data_dir`` and survives stop/start (and, as far as the broker manages it,
    a kill), so a restart on the same port and directory looks like a broker restart to clients.
    """

    def __init__(self, data_dir: Path, port: int, host: str = "127.0.0.1") -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.host = host
        self._process = LocalProcess("noida-db", self.data_dir / LOG_NAME, host, port)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """What clients connect to: the bootstrap servers."""
        return self.bootstrap

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
        return {}  # its clients need nothing but the bootstrap address

    def start(self, timeout_s: float = 20) -> None:
        """Start the broker and return once it answers Kafka metadata requests."""
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            str(broker_binary()),
            "start",
            "--data-dir",
            str(self.data_dir),
            "--host",
            self.host,
            "--only",
            "kafka",
            "--kafka-port",
            str(self.port),
        ]
        bootstrap = self.bootstrap
        self._process.start(
            argv,
            timeout_s,
            ready=lambda: _run_in_thread(_probe_metadata(bootstrap)),
            what="answer metadata",
        )

    def stop(self, timeout_s: float = 10) -> None:
        """SIGTERM (the broker saves its data), then SIGKILL if it does not exit in time."""
        self._process.stop(timeout_s)

    def kill(self) -> None:
        """SIGKILL, as a crash would; nothing gets a chance to flush."""
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


async def _probe_metadata(bootstrap: str) -> None:
    # imported here so that managing the process does not pay for aiokafka's import
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, client_id="inferq-broker-probe", request_timeout_ms=3000
    )
    try:
        await admin.start()
        await admin.list_topics()
    finally:
        await admin.close()


def _run_in_thread(coro: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine to completion on a private loop, even when the caller has a loop."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(coro)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="noida-db-probe", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
