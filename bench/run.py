"""`python -m bench.run`: inferq's throughput and latency next to their baselines, in one run.

It starts its own Kafka-protocol broker (noida-db) on a free port in a temp dir, runs
`inferq api` and `inferq worker` as child processes per scenario (own topic, group and SQLite
store), measures, prints a table per scenario and stops everything it started, also on Ctrl-C.

    python -m bench.run                      # all three scenarios, default sizes (~2-3 min)
    python -m bench.run --only latency       # one scenario
    python -m bench.run --jobs 300           # every scenario with 300 jobs (a quick look)
    python -m bench.run --json bench.json    # the figures as JSON too
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console

from bench import profile, report, scenarios
from bench.harness import BenchError, Children, free_port, machine_info

REPO_ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("minilm", "identity", "latency")


def model_repository() -> Path:
    """INFERQ_MODEL_REPOSITORY, else the repository the tests use; built if missing."""
    configured = os.environ.get("INFERQ_MODEL_REPOSITORY")
    root = Path(configured) if configured else REPO_ROOT / ".inferq" / "test-models"
    root = root.expanduser().resolve()
    if not all((root / name / "1" / "model.onnx").is_file() for name in ("minilm", "identity")):
        from workers.export import build_all

        build_all(root)
    return root


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--only",
        action="append",
        choices=SCENARIOS,
        help="run only this scenario (repeatable); default: all",
    )
    p.add_argument(
        "--jobs",
        type=int,
        metavar="N",
        help="job count for every scenario (overrides the defaults below)",
    )
    p.add_argument("--minilm-jobs", type=int, metavar="N", help="MiniLM e2e jobs (2000)")
    p.add_argument("--http-jobs", type=int, metavar="N", help="identity HTTP jobs (3000)")
    p.add_argument(
        "--direct-jobs",
        type=int,
        metavar="N",
        help="identity jobs published straight onto the topic (20000)",
    )
    p.add_argument("--celery-jobs", type=int, metavar="N", help="Celery no-op tasks (3000)")
    p.add_argument(
        "--latency-samples",
        type=int,
        metavar="N",
        help="sequential MiniLM jobs for the latency scenario (200)",
    )
    p.add_argument(
        "--celery-prefetch",
        type=int,
        default=4,
        metavar="K",
        help="Celery worker_prefetch_multiplier (default 4)",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    p.add_argument(
        "--worker-threads",
        type=int,
        default=scenarios.THREADS,
        metavar="T",
        help="INFERQ_INFERENCE_THREADS for the workers (default 2; the in-process baselines "
        "always use 2), to see how intra-op threads fare next to the API on few cores",
    )
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="sample the api and worker with py-spy during each timed window and print "
        "their top costs (files kept in DIR; the profiler's own CPU disturbs the figures)",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the temp dir (role logs, stores) and print where it is",
    )
    args = p.parse_args(argv)

    def pick(specific: int | None, default: int) -> int:
        value = specific if specific is not None else (args.jobs or default)
        if value < 1:
            p.error("job counts must be at least 1")
        return value

    args.minilm_n = pick(args.minilm_jobs, 2000)
    args.http_n = pick(args.http_jobs, 3000)
    args.direct_n = pick(args.direct_jobs, 20000)
    args.celery_n = pick(args.celery_jobs, 3000)
    args.latency_n = pick(args.latency_samples, 200)
    args.scenarios = [s for s in SCENARIOS if not args.only or s in args.only]
    return args


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=150)  # a log file: don't wrap at 80
    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGTERM, _raise_interrupt)

    def say(message: str) -> None:
        console.print(f"[dim]{time.strftime('%H:%M:%S')} {message}[/dim]")

    info = machine_info()
    results: dict[str, Any] = {
        "machine": info,
        "config": {
            "scenarios": args.scenarios,
            "minilm_jobs": args.minilm_n,
            "http_jobs": args.http_n,
            "direct_jobs": args.direct_n,
            "celery_jobs": args.celery_n,
            "latency_samples": args.latency_n,
            "baseline_threads": scenarios.THREADS,
            "worker_threads": args.worker_threads,
            "celery_prefetch": args.celery_prefetch,
        },
        "scenarios": {},
    }
    report.machine(console, info)
    cores = int(info["sched_cpus"] or info["nproc"] or 1)

    root = Path(tempfile.mkdtemp(prefix="inferq-bench-"))
    children = Children(root / "logs")
    broker = None
    started = time.perf_counter()
    code = 0
    try:
        from transports.kafka import EmbeddedKafka

        models = model_repository()
        broker = EmbeddedKafka(root / "broker", free_port())
        broker.start()
        say(f"noida-db broker at {broker.bootstrap}, models from {models}, work dir {root}")
        env = scenarios.Env(root, broker.bootstrap, broker.pid, models, children, say)
        env.worker_threads = args.worker_threads
        if args.profile is not None:
            if profile.py_spy() is None:
                raise BenchError("--profile needs py-spy: pip install py-spy")
            env.profile_dir = args.profile.resolve()

        if "minilm" in args.scenarios:
            r = scenarios.minilm(env, args.minilm_n)
            results["scenarios"]["minilm"] = r
            report.minilm(console, r, cores)
            if env.profile_dir:
                report.profiles(console, env.profile_dir, "minilm")
                report.profiles(console, env.profile_dir, "minilm-direct")
        if "identity" in args.scenarios:
            r = scenarios.identity(
                env, args.http_n, args.direct_n, args.celery_n, celery_prefetch=args.celery_prefetch
            )
            results["scenarios"]["identity"] = r
            report.identity(console, r, cores)
            if env.profile_dir:
                report.profiles(console, env.profile_dir, "identity-http")
                report.profiles(console, env.profile_dir, "identity-direct")
        if "latency" in args.scenarios:
            r = scenarios.latency(env, args.latency_n)
            results["scenarios"]["latency"] = r
            report.latency(console, r)
            if env.profile_dir:
                report.profiles(console, env.profile_dir, "latency")
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopping everything this benchmark started[/yellow]")
        code = 130
    except BenchError as exc:
        console.print(f"[red]benchmark failed: {exc}[/red]")
        code = 1
    finally:
        # ignore a second Ctrl-C while cleaning up, so nothing is left running
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            children.stop_all()
            if broker is not None:
                broker.stop()
        finally:
            signal.signal(signal.SIGINT, previous)
            if args.keep:
                console.print(f"kept {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)

    results["wall_seconds"] = time.perf_counter() - started
    console.print(f"[dim]total {results['wall_seconds']:.0f} s[/dim]")
    if args.json is not None and results["scenarios"]:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True, default=str))
        console.print(f"figures written to {args.json}")
    return code


if __name__ == "__main__":
    sys.exit(main())
