"""The API's CPU per POST: `inferq api` (alone, no worker) on a local Kafka-protocol broker
and a SQLite store, N identity jobs POSTed by C clients; CPU seconds of the API's processes
(all of them with ``--workers``) over the POSTs, from /proc, divided by N.

    python -m bench.api_cpu [--jobs 2000] [--clients 8] [--workers 1]
    python -m bench.api_cpu --quick           # 300 jobs: a smoke run of the harness

On a shared machine the figure moves with the neighbours' load: compare runs made together.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console

from bench import profile, report
from bench.harness import Children, free_port, process_cpu_s, python_module, wait_until
from bench.run import model_repository
from bench.scenarios import _body, _post_all


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (uvicorn's worker processes), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_of(pids: list[int]) -> float:
    return sum(process_cpu_s(p) or 0.0 for p in pids)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--workers", type=int, default=1, help="inferq api --workers N")
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--profile", type=Path, metavar="DIR", help="py-spy the API meanwhile (disturbs the CPU)"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.jobs = 300

    from transports.kafka import EmbeddedKafka

    root = Path(tempfile.mkdtemp(prefix="inferq-bench-api-cpu-"))
    children = Children(root / "logs")
    broker = EmbeddedKafka(root / "broker", free_port())
    try:
        broker.start()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "INFERQ_KAFKA_BOOTSTRAP": broker.bootstrap,
            "INFERQ_KAFKA_TOPIC": "bench.api-cpu",
            "INFERQ_DATA_DIR": str(root / "data"),
            "INFERQ_MODEL_REPOSITORY": str(model_repository()),
        }
        argv_api = ["api", "--port", str(port)]
        if args.workers > 1:
            argv_api += ["--workers", str(args.workers)]
        api = children.spawn("api", python_module("inferq", *argv_api), env)

        def up() -> bool:
            if not api.alive():
                raise SystemExit(f"the API exited:\n{api.log_tail()}")
            try:
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 90, "the API")
        body = _body("identity", {"tensor": [1.0]})
        asyncio.run(_post_all(url, [body] * 50, args.clients))  # warm: imports, connections
        pids = tree(api.pid)
        before = cpu_of(pids)
        started = time.perf_counter()
        with profile.record(args.profile, "api-cpu", {"api": api.pid}):
            asyncio.run(_post_all(url, [body] * args.jobs, args.clients))
        elapsed = time.perf_counter() - started
        used = cpu_of(pids) - before
        if args.profile is not None:
            report.profiles(Console(width=150), args.profile, "api-cpu")
        print(
            f"inferq api (--workers {args.workers}, {len(pids)} processes): {args.jobs} POSTs "
            f"from {args.clients} clients in {elapsed:.2f} s = {args.jobs / elapsed:.0f}/s; "
            f"API CPU {used:.2f} s = {used / args.jobs * 1000:.2f} ms per POST"
        )
    finally:
        children.stop_all()
        broker.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
