"""A local `noida-db` Kafka-protocol broker process, for `inferq dev` and the test suite.

The broker binary is started directly (not through the package's Python wrapper script) so
that the PID held here is the broker's own and stop/kill reach it, never a bystander.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from transports.base import TransportError

log = logging.getLogger(__name__)

LOG_NAME = "noida-db.log"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it; a race is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


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
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_NAME

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
        self._log = self.log_path.open("ab")
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
        log.info("noida-db started, pid %s, kafka at %s", self._proc.pid, self.bootstrap)
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.kill()
            raise

    def stop(self, timeout_s: float = 10) -> None:
        """SIGTERM (the broker saves its data), then SIGKILL if it does not exit in time."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("noida-db pid %s ignored SIGTERM; killing it", proc.pid)
                proc.kill()
                proc.wait()
        self._proc = None
        self._close_log()

    def kill(self) -> None:
        """SIGKILL, as a crash would; nothing gets a chance to flush."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._proc = None
        self._close_log()

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

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _log_tail(self, limit: int = 2000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-limit:]

    def _check_alive(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            code = None if proc is None else proc.returncode
            raise TransportError(
                f"noida-db exited with status {code} while starting; log tail:\n{self._log_tail()}"
            )

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last_error: BaseException | None = None
        # first the listening socket: cheap, and the process may still be loading its data
        while True:
            self._check_alive()
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    break
            except OSError as exc:
                last_error = exc
            if time.monotonic() > deadline:
                raise TransportError(
                    f"noida-db did not listen on {self.bootstrap} within {timeout_s}s"
                ) from last_error
            time.sleep(0.05)
        # then a real Kafka round trip, so that clients started next do not race the broker
        while True:
            self._check_alive()
            try:
                _run_in_thread(_probe_metadata(self.bootstrap))
                return
            except Exception as exc:
                last_error = exc
            if time.monotonic() > deadline:
                raise TransportError(
                    f"noida-db at {self.bootstrap} did not answer metadata within {timeout_s}s"
                ) from last_error
            time.sleep(0.1)


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
