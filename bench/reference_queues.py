"""The queues a user would otherwise pick, doing what inferq's identity scenarios do, with
their results stored (Redis as broker and result backend for both):

- **drain**: send N identity tasks, then read every result (send + drain + results);
- **round trip**: C client threads, each doing ``delay(x).get()`` (Celery) or
  ``send(x).get_result(block=True)`` (Dramatiq) in a loop: submit and wait.

Run alone with ``python -m bench.reference_queues [--jobs N] [--clients C]``; the main
benchmark puts the same figures beside inferq's in one run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from bench import queue_apps
from bench.harness import BenchError, Child, Children, CpuMeter, python_module

WORKER_THREADS = 8


def _redis_cpu(client: redis.Redis) -> Callable[[], float | None]:
    def read() -> float | None:
        try:
            cpu: Any = client.info("cpu")
        except redis.RedisError:
            return None
        return float(cpu.get("used_cpu_sys", 0)) + float(cpu.get("used_cpu_user", 0))

    return read


def _group_cpu(pgid: int) -> Callable[[], float | None]:
    """CPU seconds of every live process in a process group: Dramatiq's main process forks
    its workers, so the leader's own counters show almost nothing."""
    ticks = os.sysconf("SC_CLK_TCK")

    def read() -> float | None:
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:  # pgrp
                total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / ticks

    return read


def _meter(queue: _Queue, child: Child, client: redis.Redis) -> CpuMeter:
    return CpuMeter(
        {}, extra={f"{queue.name} worker": _group_cpu(child.pid), "redis": _redis_cpu(client)}
    )


def _reachable(url: str) -> str | None:
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"Redis at {url} is not reachable: {exc}"
    finally:
        client.close()
    return None


class _Queue:
    """One reference queue: how to start its worker, send a task, and read its result."""

    name: str
    url_env: str

    def __init__(self, url: str) -> None:
        self.url = url

    def worker_argv(self, run: str) -> list[str]:
        raise NotImplementedError

    def send(self, x: int) -> Any:
        raise NotImplementedError

    def result(self, handle: Any, timeout_s: float) -> Any:
        raise NotImplementedError

    def version(self) -> str:
        raise NotImplementedError


class _Celery(_Queue):
    name = "celery"
    url_env = queue_apps.CELERY_URL_ENV

    def __init__(self, url: str) -> None:
        super().__init__(url)
        # this process sends with the same app the worker runs, pointed at this run's Redis
        queue_apps.celery_app.conf.broker_url = url
        queue_apps.celery_app.conf.result_backend = url

    def worker_argv(self, run: str) -> list[str]:
        return python_module(
            "celery", "-A", "bench.queue_apps:celery_app", "worker", "--pool", "threads",
            "--concurrency", str(WORKER_THREADS), "--queues", queue_apps.QUEUE,
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel", "WARNING", "--hostname", f"bench-{run}@%h",
        )  # fmt: skip

    def send(self, x: int) -> Any:
        return queue_apps.celery_identity.delay(x)

    def result(self, handle: Any, timeout_s: float) -> Any:
        return handle.get(timeout=timeout_s)

    def version(self) -> str:
        import celery

        return f"Celery {celery.__version__}, --pool threads -c {WORKER_THREADS}"


class _Dramatiq(_Queue):
    name = "dramatiq"
    url_env = queue_apps.DRAMATIQ_URL_ENV

    def __init__(self, url: str, processes: int) -> None:
        super().__init__(url)
        self.processes = processes
        # Dramatiq's actor is bound to the broker set when queue_apps was imported
        import dramatiq

        dramatiq.set_broker(queue_apps._dramatiq_broker(url))
        queue_apps.dramatiq_identity.broker = dramatiq.get_broker()

    def worker_argv(self, run: str) -> list[str]:
        return python_module(
            "dramatiq", "bench.queue_apps", "--processes", str(self.processes),
            "--threads", str(WORKER_THREADS), "--queues", queue_apps.QUEUE,
        )  # fmt: skip

    def send(self, x: int) -> Any:
        return queue_apps.dramatiq_identity.send(x)

    def result(self, handle: Any, timeout_s: float) -> Any:
        return handle.get_result(block=True, timeout=int(timeout_s * 1000))

    def version(self) -> str:
        import dramatiq

        return (
            f"Dramatiq {dramatiq.__version__}, --processes {self.processes} "
            f"--threads {WORKER_THREADS}"
        )


@contextlib.contextmanager
def _worker(queue: _Queue, children: Children) -> Any:
    client = redis.Redis.from_url(queue.url, socket_connect_timeout=1, socket_timeout=5)
    client.flushdb()  # this benchmark's own database number only
    run = uuid.uuid4().hex[:8]
    env = dict(os.environ)
    env.update({queue.url_env: queue.url, "PYTHONUNBUFFERED": "1"})
    child = children.spawn(f"{queue.name}-worker", queue.worker_argv(run), env)
    try:
        # warm-up: connected and running tasks before any clock starts
        handles = [queue.send(i) for i in range(100)]
        for h in handles:
            _result(queue, child, h, 60)
        yield child, client
    finally:
        children.stop(child)
        with contextlib.suppress(redis.RedisError):
            client.flushdb()
        client.close()


def _result(queue: _Queue, child: Child, handle: Any, timeout_s: float) -> Any:
    try:
        return queue.result(handle, timeout_s)
    except Exception as exc:
        if not child.alive():
            raise BenchError(f"{queue.name} worker exited:\n{child.log_tail()}") from exc
        raise


def drain(queue: _Queue, child: Child, client: redis.Redis, n: int) -> dict[str, Any]:
    meter = _meter(queue, child, client)
    meter.start()
    started = time.perf_counter()
    handles = [queue.send(i) for i in range(n)]
    sent = time.perf_counter()
    for i, handle in enumerate(handles):
        if _result(queue, child, handle, 120) != i:
            raise BenchError(f"{queue.name} returned a wrong result for task {i}")
    seconds = time.perf_counter() - started
    return {
        "jobs": n,
        "seconds": seconds,
        "per_s": n / seconds,
        "send_seconds": sent - started,
        "cpu_seconds": meter.stop(),
    }


def round_trip(
    queue: _Queue, child: Child, client: redis.Redis, n: int, clients: int
) -> dict[str, Any]:
    latencies: list[float] = []

    def one(i: int) -> None:
        t0 = time.perf_counter()
        if _result(queue, child, queue.send(i), 60) != i:
            raise BenchError(f"{queue.name} returned a wrong result for task {i}")
        latencies.append(time.perf_counter() - t0)

    meter = _meter(queue, child, client)
    meter.start()
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(one, i) for i in range(n)]:
            future.result()
    seconds = time.perf_counter() - started
    latencies.sort()
    return {
        "jobs": n,
        "clients": clients,
        "seconds": seconds,
        "per_s": n / seconds,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "cpu_seconds": meter.stop(),
    }


def measure(
    children: Children,
    *,
    jobs: int,
    clients: int,
    celery_url: str = queue_apps.DEFAULT_CELERY_URL,
    dramatiq_url: str = queue_apps.DEFAULT_DRAMATIQ_URL,
    dramatiq_processes: int = 2,
    log: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Drain and round-trip figures of Celery and Dramatiq, each entry skipped with its
    reason when its Redis does not answer."""
    out: dict[str, Any] = {}
    queues: list[_Queue] = [_Celery(celery_url), _Dramatiq(dramatiq_url, dramatiq_processes)]
    for queue in queues:
        skipped = _reachable(queue.url)
        if skipped:
            out[queue.name] = {"skipped": skipped}
            continue
        log(f"{queue.name}: drain of {jobs} and {clients}-client round trips")
        with _worker(queue, children) as (child, client):
            out[queue.name] = {
                "version": queue.version(),
                "broker": queue.url,
                "drain": drain(queue, child, client, jobs),
                "round_trip": round_trip(queue, child, client, jobs, clients),
            }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--jobs", type=int, default=3000, help="tasks per measurement (3000)")
    p.add_argument("--clients", type=int, default=64, help="round-trip client threads (64)")
    p.add_argument("--dramatiq-processes", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="inferq-bench-") as tmp:
        children = Children(Path(tmp))
        try:
            figures = measure(
                children,
                jobs=args.jobs,
                clients=args.clients,
                dramatiq_processes=args.dramatiq_processes,
                log=lambda m: print(m, file=sys.stderr),
            )
        finally:
            children.stop_all()
    json.dump(figures, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
