"""Throwaway PostgreSQL and Redis servers that a fault test may stop and start at will.

The shared servers on 5432/6379 are never touched: each object here owns one server process
on a free port, in a directory of its own, and stops it by its own PID (or its own data dir).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from tests.procs import free_port, port_open, wait_for


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]  # the newest major version
    on_path = shutil.which(name)
    if on_path is None:
        raise FileNotFoundError(f"no PostgreSQL {name} under /usr/lib/postgresql/*/bin or PATH")
    return on_path


class ThrowawayPostgres:
    """initdb + pg_ctl in a temp dir on a free port, trust auth, run as a non-root user.

    PostgreSQL refuses to run as root, so as root every command runs as ``postgres`` through
    ``runuser``; the temp dir is created outside pytest's 0700 tmp tree and given to that user.
    """

    def __init__(self, port: int | None = None, user: str = "postgres") -> None:
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="inferq-pg-"))
        self.data = self.root / "data"
        self.logfile = self.root / "postgres.log"
        self._as_root = os.geteuid() == 0
        self._user = user
        if self._as_root:
            shutil.chown(self.root, user=user)
        self._initdb()

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str, timeout: float = 60) -> None:
        cmd = list(argv)
        if self._as_root:
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} failed ({done.returncode}):\n"
                f"{done.stdout.decode(errors='replace')}{done.stderr.decode(errors='replace')}"
                f"\n--- log\n{self.log_tail()}"
            )

    def _initdb(self) -> None:
        self._run(
            _pg_bin("initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            timeout=120,
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=200"
        )
        self._run(
            _pg_bin("pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.logfile),
            "-w",
            "-t",
            "60",
            "start",
        )
        wait_for(lambda: port_open(self.port), 30, f"PostgreSQL on {self.port}")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` disconnects clients and stops cleanly; ``immediate`` is a crash."""
        if not (self.data / "postmaster.pid").exists():
            return
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")
        wait_for(lambda: not port_open(self.port), 30, f"PostgreSQL on {self.port} to stop")

    def log_tail(self, limit: int = 3000) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-limit:]
        except OSError:
            return "(no PostgreSQL log)"

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()


class ThrowawayRedis:
    """``redis-server`` on a free port without persistence: a stop loses everything in it,
    as a restarted cache-only Redis does."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not on PATH")
        self.root.mkdir(parents=True, exist_ok=True)
        self._log = (self.root / "redis.log").open("ab")
        self._proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.root),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        proc = self._proc
        wait_for(lambda: proc.poll() is None and port_open(self.port), 20, f"redis on {self.port}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        deadline = time.monotonic() + 10
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)
