"""The one process helper that the local servers for dev and the test suite share (noida-db for
Kafka, moto_server for SQS/S3): start a child, wait for its port, stop it by its own PID.

The child runs in a session of its own, so a terminal's Ctrl-C never reaches it: its owner
stops it, after the roles that use it. Its output goes to a log file in its data dir.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from transports.base import TransportError

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it; a race is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class LocalProcess:
    """One server process on ``host:port``, its output appended to ``log_path``."""

    def __init__(self, name: str, log_path: Path, host: str, port: int) -> None:
        self.name = name
        self.log_path = log_path
        self.host = host
        self.port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(
        self,
        argv: Sequence[str],
        timeout_s: float,
        ready: Callable[[], object] | None = None,
        what: str = "answer",
    ) -> None:
        """Start ``argv`` and return once its port accepts connections and ``ready()`` (a
        probe that raises until the server can serve) returned; killed if it never does."""
        if self.running:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        try:
            self._proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C must not reach it: its owner stops it
            )
        except OSError as exc:
            self._close_log()
            raise TransportError(f"cannot execute {argv[0]}") from exc
        log.info("%s started, pid %s, on %s:%s", self.name, self._proc.pid, self.host, self.port)
        try:
            self._wait_ready(timeout_s, ready, what)
        except BaseException:
            self.kill()
            raise

    def stop(self, timeout_s: float = 10) -> None:
        """SIGTERM (the server saves what it keeps), then SIGKILL if it does not exit in time."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s pid %s ignored SIGTERM; killing it", self.name, proc.pid)
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

    def log_tail(self, limit: int = 2000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-limit:]

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _check_alive(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            code = None if proc is None else proc.returncode
            raise TransportError(
                f"{self.name} exited with status {code} while starting; log tail:\n"
                f"{self.log_tail()}"
            )

    def _wait_ready(self, timeout_s: float, ready: Callable[[], object] | None, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        last_error: BaseException | None = None
        where = f"{self.host}:{self.port}"
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
                    f"{self.name} did not listen on {where} within {timeout_s}s"
                ) from last_error
            time.sleep(0.05)
        if ready is None:
            return
        # then a real round trip, so that clients started next do not race the server
        while True:
            self._check_alive()
            try:
                ready()
                return
            except Exception as exc:
                last_error = exc
            if time.monotonic() > deadline:
                raise TransportError(
                    f"{self.name} at {where} did not {what} within {timeout_s}s"
                ) from last_error
            time.sleep(0.1)
