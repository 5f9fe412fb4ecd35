"""Process plumbing for the benchmarks: child processes, ports, CPU accounting, store watching.

Every process started here runs in its own session (so a Ctrl-C in the terminal reaches only
the benchmark, which then stops them in order) and is stopped by its own process-group id.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

TERMINAL = ("succeeded", "failed", "cancelled", "expired")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """The benchmark could not set something up (a role did not start, a job got lost, ...)."""


def free_port() -> int:
    """A local TCP port the OS just handed out (free a moment ago)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    check: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"gave up after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


# --- child processes -------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, limit: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return "(no log)"


@dataclass
class Children:
    """The child processes of one benchmark run, stopped together (newest first)."""

    log_dir: Path
    items: list[Child] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], env: Mapping[str, str]) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                argv,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        child = Child(name, proc, log_path)
        self.items.append(child)
        return child

    def stop(self, child: Child, timeout_s: float = 15) -> None:
        if child.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
            try:
                child.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.proc.wait()
        if child in self.items:
            self.items.remove(child)

    def stop_all(self) -> None:
        for child in reversed(list(self.items)):
            self.stop(child)


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


# --- inferq roles ----------------------------------------------------------------------------


@dataclass
class InferqStack:
    """One scenario's `inferq api` and `inferq worker`, on their own topic, group and store."""

    scenario: str
    root: Path
    bootstrap: str
    models: Path
    children: Children
    threads: int = 2
    topic: str = ""
    api_url: str = ""
    metrics_url: str = ""
    api: Child | None = None
    worker: Child | None = None

    def __post_init__(self) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.topic = self.topic or f"bench.{self.scenario}.{suffix}"
        self.data_dir = self.root / self.scenario
        self.data_dir.mkdir(parents=True, exist_ok=True)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "jobs.db"

    @property
    def worker_id(self) -> str:
        return f"bench-{self.scenario}-worker"

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "INFERQ_TRANSPORT": "kafka",
                "INFERQ_KAFKA_BOOTSTRAP": self.bootstrap,
                "INFERQ_KAFKA_TOPIC": self.topic,
                "INFERQ_KAFKA_GROUP": f"{self.topic}.workers",
                "INFERQ_DATA_DIR": str(self.data_dir),
                "INFERQ_DATABASE_URL": f"sqlite:///{self.db_path}",
                "INFERQ_MODEL_REPOSITORY": str(self.models),
                "INFERQ_INFERENCE_THREADS": str(self.threads),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(extra)
        return env

    def start(self, timeout_s: float = 90) -> None:
        """Start both roles side by side; return when the API answers and the worker has
        joined its group (its first heartbeat row appears only after the assignment)."""
        metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.worker = self.children.spawn(
            f"{self.scenario}-worker",
            python_module("inferq", "worker"),
            self.env(INFERQ_WORKER_ID=self.worker_id, INFERQ_WORKER_METRICS_PORT=str(metrics_port)),
        )
        api_port = free_port()
        self.api_url = f"http://127.0.0.1:{api_port}"
        self.api = self.children.spawn(
            f"{self.scenario}-api",
            python_module("inferq", "api", "--host", "127.0.0.1", "--port", str(api_port)),
            self.env(),
        )
        wait_until(self._api_up, timeout_s, f"the {self.scenario} API")
        wait_until(self._worker_joined, timeout_s, f"the {self.scenario} worker")

    def _require_alive(self, child: Child | None) -> Child:
        if child is None:
            raise BenchError("role not started")
        if not child.alive():
            raise BenchError(
                f"{child.name} exited with status {child.proc.returncode}:\n{child.log_tail()}"
            )
        return child

    def _api_up(self) -> bool:
        self._require_alive(self.api)
        try:
            return httpx.get(f"{self.api_url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def _worker_joined(self) -> bool:
        self._require_alive(self.worker)
        if not self.db_path.exists():
            return False
        try:
            with _read_only(self.db_path) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM workers WHERE worker_id = ?", (self.worker_id,)
                ).fetchone()
        except sqlite3.Error:
            return False  # the schema may not be there yet
        return bool(row and row[0])

    def pids(self) -> dict[str, int]:
        return {
            role: child.pid
            for role, child in (("api", self.api), ("worker", self.worker))
            if child is not None
        }

    def stop(self) -> None:
        for child in (self.api, self.worker):
            if child is not None:
                self.children.stop(child)

    def logs(self) -> str:
        parts = []
        for child in (self.api, self.worker):
            if child is not None:
                parts.append(f"--- {child.name} ({child.log_path})\n{child.log_tail()}")
        return "\n".join(parts)


# --- the job store, read from the side ---------------------------------------------------------


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        yield conn
    finally:
        conn.close()


def terminal_count(path: Path) -> int:
    """Jobs in a terminal state (served from the (status, ...) index)."""
    marks = ",".join("?" * len(TERMINAL))
    with _read_only(path) as conn:
        row = conn.execute(
            f"SELECT count(*) FROM jobs WHERE status IN ({marks})", TERMINAL
        ).fetchone()
    return int(row[0])


def status_counts(path: Path) -> dict[str, int]:
    with _read_only(path) as conn:
        rows = conn.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall()
    return {str(status): int(n) for status, n in rows}


def wait_for_terminal(path: Path, target: int, timeout_s: float, interval_s: float = 0.02) -> float:
    """Poll (one COUNT per ``interval_s`` on one connection) until ``target`` jobs are
    terminal; returns the ``time.perf_counter()`` at which that was first seen."""
    marks = ",".join("?" * len(TERMINAL))
    query = f"SELECT count(*) FROM jobs WHERE status IN ({marks})"
    deadline = time.monotonic() + timeout_s
    conn: sqlite3.Connection | None = None
    try:
        while True:
            try:
                if conn is None:
                    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
                done = int(conn.execute(query, TERMINAL).fetchone()[0])
            except sqlite3.Error:
                done = 0  # not created yet
                if conn is not None:
                    conn.close()
                    conn = None
            if done >= target:
                return time.perf_counter()
            if time.monotonic() > deadline:
                raise BenchError(f"only {done} of {target} jobs terminal after {timeout_s:.0f}s")
            time.sleep(interval_s)
    finally:
        if conn is not None:
            conn.close()


# --- CPU accounting --------------------------------------------------------------------------


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads), from /proc; None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime


def _proc_reader(pid: int) -> Callable[[], float | None]:
    return lambda: process_cpu_s(pid)


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class CpuMeter:
    """CPU seconds spent by each named process between ``start`` and ``stop``.

    ``extra`` sources are callables returning cumulative CPU seconds (e.g. Redis's own
    INFO counters), for processes that are not ours.
    """

    def __init__(
        self, pids: Mapping[str, int], extra: Mapping[str, Callable[[], float | None]] | None = None
    ) -> None:
        self.sources: dict[str, Callable[[], float | None]] = {
            name: _proc_reader(pid) for name, pid in pids.items()
        }
        self.sources["bench (client)"] = own_cpu_s
        self.sources.update(extra or {})
        self._before: dict[str, float | None] = {}
        self.used: dict[str, float] = {}

    def start(self) -> None:
        self._machine_before = machine_busy_s()
        self._before = {name: read() for name, read in self.sources.items()}

    def stop(self) -> dict[str, float]:
        for name, read in self.sources.items():
            before, after = self._before.get(name), read()
            if before is not None and after is not None:
                self.used[name] = after - before
        machine = machine_busy_s() - self._machine_before
        # whatever else ran meanwhile (other people's tests, the kernel): a disturbance gauge
        self.used[OTHER] = max(0.0, machine - sum(self.used.values()))
        return self.used


OTHER = "(everything else on the machine)"


@contextlib.contextmanager
def other_load() -> Iterator[dict[str, float]]:
    """Cores kept busy by processes other than this one while the block ran (filled in on
    exit): in-process baselines are only as good as the quiet they had."""
    meter = CpuMeter({})
    out: dict[str, float] = {}
    started = time.perf_counter()
    meter.start()
    try:
        yield out
    finally:
        used = meter.stop()
        out["other_cores"] = used[OTHER] / max(time.perf_counter() - started, 1e-9)


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent not idle, from /proc/stat (0 if unreadable)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return 0.0
    ticks = [int(x) for x in first[1:9]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / _CLOCK_TICKS


# --- worker metrics --------------------------------------------------------------------------


def scrape(url: str) -> dict[str, float]:
    """A Prometheus text page as {'name{label="v",...}': value}; {} if it cannot be read."""
    try:
        text = httpx.get(url, timeout=5).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[name] = float(value)
    return out


def metric(samples: Mapping[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    for key, value in samples.items():
        base = key.split("{", 1)[0]
        if base == name and all(w in key for w in wanted):
            total += value
    return total


# --- the machine -----------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu_model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
        ort_providers = onnxruntime.get_available_providers()
    except ImportError:
        ort_version, ort_providers = "not installed", []
    return {
        "nproc": os.cpu_count(),
        "sched_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "onnxruntime": ort_version,
        "onnxruntime_providers": ort_providers,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "git": _git_revision(),
    }


def _git_revision() -> str | None:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}{' (uncommitted changes)' if dirty else ''}"


class Stopwatch(threading.Thread):
    """Waits for ``target`` terminal jobs in a thread, while the caller submits."""

    def __init__(self, path: Path, target: int, timeout_s: float) -> None:
        super().__init__(name="bench-watch", daemon=True)
        self.path, self.target, self.timeout_s = path, target, timeout_s
        self.done_at: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.done_at = wait_for_terminal(self.path, self.target, self.timeout_s)
        except BaseException as exc:
            self.error = exc

    def result(self) -> float:
        self.join()
        if self.error is not None:
            raise self.error
        assert self.done_at is not None
        return self.done_at
