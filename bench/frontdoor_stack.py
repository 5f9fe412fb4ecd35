"""The processes of the front-door benchmark: an `inferq api` and an `inferq worker` on a
SQLite or a PostgreSQL job store, read from the side by the benchmark, and the CPU each
spends (its whole process group: `inferq api --workers N` forks, so the leader alone would
show almost nothing)."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import sqlite3
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from bench.harness import TERMINAL, BenchError, InferqStack, machine_busy_s, process_cpu_s

DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
_TICKS = os.sysconf("SC_CLK_TCK")


def raise_open_files(wanted: int) -> tuple[int, int]:
    """Lift this process's soft limit on open files towards ``wanted`` (at most the hard
    limit; the children it starts inherit it); returns (soft, hard) afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# --- the job store, read from the side ------------------------------------------------------


class StoreProbe:
    """Counts in the job store that the API and worker write (either backend)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = create_engine(url, poolclass=NullPool)
        self._marks = ",".join(f"'{s}'" for s in TERMINAL)

    def _scalar(self, sql: str, **params: Any) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(text(sql), params).scalar() or 0)

    def terminal(self) -> int:
        try:
            return self._scalar(f"SELECT count(*) FROM jobs WHERE status IN ({self._marks})")
        except Exception:
            return 0  # the schema is not there yet

    def statuses(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(text("SELECT status, count(*) FROM jobs GROUP BY status"))
            return {str(s): int(n) for s, n in rows}

    def worker_joined(self, worker_id: str) -> bool:
        try:
            return bool(
                self._scalar("SELECT count(*) FROM workers WHERE worker_id = :w", w=worker_id)
            )
        except Exception:
            return False

    def wait_terminal(self, target: int, timeout_s: float, interval_s: float = 0.02) -> float:
        """perf_counter when ``target`` jobs were first seen terminal."""
        deadline = time.monotonic() + timeout_s
        with self.engine.connect() as conn:
            query = text(f"SELECT count(*) FROM jobs WHERE status IN ({self._marks})")
            while True:
                done = int(conn.execute(query).scalar() or 0)
                conn.rollback()  # a fresh snapshot each time (PostgreSQL, SQLite WAL)
                if done >= target:
                    return time.perf_counter()
                if time.monotonic() > deadline:
                    raise BenchError(f"only {done} of {target} jobs terminal after {timeout_s}s")
                time.sleep(interval_s)

    def writable(self, timeout_s: float = 0.2) -> bool:
        """Whether a write transaction can start now: no one holds SQLite's write lock
        (PostgreSQL locks rows, not the database: always True there)."""
        if self.engine.dialect.name != "sqlite":
            return True
        path = self.engine.url.database or ""
        conn = sqlite3.connect(path, timeout=timeout_s, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return True
        except sqlite3.OperationalError:  # database is locked
            return False
        finally:
            conn.close()

    def close(self) -> None:
        self.engine.dispose()


@dataclass
class Database:
    """Where a stack's store lives: a SQLite file, or a PostgreSQL database of its own
    (created here, dropped at the end)."""

    kind: str  # "sqlite" | "postgres"
    admin_url: str = DEFAULT_POSTGRES
    created: list[str] = field(default_factory=list)

    def url_for(self, stack: InferqStack) -> str:
        if self.kind == "sqlite":
            return f"sqlite:///{stack.db_path}"
        name = f"inferq_bench_{stack.scenario}_{uuid.uuid4().hex[:8]}"
        self._admin(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)

    def _admin(self, sql: str) -> None:
        engine = create_engine(self.admin_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(sql))
        except Exception as exc:
            raise BenchError(f"PostgreSQL at {self.admin_url}: {exc}") from exc
        finally:
            engine.dispose()

    def drop_all(self) -> None:
        for name in self.created:
            with contextlib.suppress(BenchError):
                self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.created.clear()


class FrontStack(InferqStack):
    """`InferqStack` on either store, with its probe; the worker can be paused (SIGSTOP)
    so that jobs stay queued while clients wait on them."""

    database: Database
    probe: StoreProbe
    url: str

    def attach(self, database: Database) -> None:
        self.database = database
        self.url = database.url_for(self)
        self.probe = StoreProbe(self.url)

    def env(self, **extra: str) -> dict[str, str]:
        env = super().env(**extra)
        env["INFERQ_DATABASE_URL"] = self.url
        return env

    def _worker_joined(self) -> bool:
        self._require_alive(self.worker)
        return self.probe.worker_joined(self.worker_id)

    def pause_worker(self) -> None:
        """SIGSTOP the worker, but never while it holds SQLite's write lock (a stop inside
        a write transaction would leave every API write "database is locked")."""
        if self.worker is None:
            return
        for _ in range(100):
            os.killpg(self.worker.pid, signal.SIGSTOP)
            _until_stopped(self.worker.pid)
            if self.probe.writable():
                return
            os.killpg(self.worker.pid, signal.SIGCONT)
            time.sleep(0.05)
        raise BenchError("could not pause the worker outside a write transaction")

    def resume_worker(self) -> None:
        if self.worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.worker.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.resume_worker()  # a stopped process ignores SIGTERM until continued
        super().stop()
        self.probe.close()


# --- CPU of process groups ------------------------------------------------------------------


def _until_stopped(pid: int, timeout_s: float = 1.0) -> None:
    """Until the kernel shows ``pid`` stopped (SIGSTOP is delivered asynchronously)."""
    deadline = time.monotonic() + timeout_s
    stat = Path(f"/proc/{pid}/stat")
    while time.monotonic() < deadline:
        try:
            text_ = stat.read_text()
        except OSError:
            return
        if text_[text_.rindex(")") + 2] in "Tt":
            return
        time.sleep(0.001)


def group_cpu_s(pgid: int) -> float:
    """CPU seconds of every live process in a process group (user + system)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / _TICKS


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class GroupMeter:
    """CPU seconds per named process group over a window, the benchmark's own, and what
    the rest of the machine spent meanwhile (a gauge of how quiet the machine was)."""

    def __init__(self, groups: Mapping[str, int], pids: Mapping[str, int] | None = None) -> None:
        self.groups = dict(groups)  # name -> process group id (a child started in its session)
        self.pids = dict(pids or {})  # name -> a single process (the broker)

    def _read(self) -> dict[str, float]:
        out = {name: group_cpu_s(pgid) for name, pgid in self.groups.items()}
        for name, pid in self.pids.items():
            out[name] = process_cpu_s(pid) or 0.0
        return out

    def __enter__(self) -> GroupMeter:
        self.started = time.perf_counter()
        self._machine = machine_busy_s()
        self._own = own_cpu_s()
        self._before = self._read()
        self.used: dict[str, float] = {}
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started
        for name, value in self._read().items():
            self.used[name] = value - self._before[name]
        self.used["bench"] = own_cpu_s() - self._own
        machine = machine_busy_s() - self._machine
        self.used["other"] = max(0.0, machine - sum(self.used.values()))

    def per_job_ms(self, jobs: int) -> dict[str, float]:
        return {k: 1000 * v / jobs for k, v in self.used.items()} if jobs else {}

    def cores(self) -> dict[str, float]:
        return {k: v / self.seconds for k, v in self.used.items()} if self.seconds else {}


@contextlib.contextmanager
def paused(stack: FrontStack) -> Iterator[None]:
    stack.pause_worker()
    try:
        yield
    finally:
        stack.resume_worker()
