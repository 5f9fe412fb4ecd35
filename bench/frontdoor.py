"""`python -m bench.frontdoor`: inferq's front door against the queues users would otherwise
pick, side by side in one run (`make bench-frontdoor`).

It starts everything itself: a Kafka-protocol broker (noida-db) on a free port, per model an
`inferq api` and an `inferq worker` on their own topic and store (SQLite, or with
`--store postgres` a PostgreSQL database of their own, dropped at the end), and Celery and
Dramatiq workers on Redis; it prints a table and can write the figures as JSON.

Phases (`--only` takes a comma-separated list of these names):
  submit   POST only (identity, no waiting) from 1, 8, 64 and 256 concurrent clients
  wait     64 clients submit and wait: Prefer: wait=30, and POST then GET ?wait=30
  direct   identity jobs published straight onto the topic, drained with results stored
  refs     Celery (delay().get() from 64 threads, and a drain) and Dramatiq, on Redis
  minilm   MiniLM straight onto the topic and over HTTP with Prefer: wait (64 clients),
           against raw ONNX Runtime on the same graph, batch and threads
  idle     1,000 open ?wait=60 requests and 1,000 open SSE streams: the API's CPU while
           they idle, and the p50 of a POST made meanwhile, against none open
  latency  one MiniLM job at a time: p50 submit -> terminal minus the model's own latency
The API's and the worker's CPU per job is reported for every phase that runs jobs.

The HTTP clients are asyncio lanes in this process, one keep-alive HTTP/1.1 connection each
with hand-written requests (~0.3 ms of client CPU per job; httpx cost 2-17 ms here, taken
from the API on 2 cores); the held requests are raw sockets too. Celery's and Dramatiq's
clients are 64 threads.

    python -m bench.frontdoor --quick                # small counts: proves it runs (~2 min)
    python -m bench.frontdoor --only submit,wait --json front.json
    python -m bench.frontdoor --store postgres
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console

from bench import baselines, frontdoor_report, reference_queues
from bench import frontdoor_phases as ph
from bench.frontdoor_stack import DEFAULT_POSTGRES, Database, FrontStack, raise_open_files
from bench.harness import BenchError, Children, free_port, machine_info, other_load
from bench.run import model_repository

PHASES = ("submit", "wait", "direct", "refs", "minilm", "idle", "latency")
IDENTITY_PHASES = {"submit", "wait", "direct", "idle"}
MINILM_PHASES = {"minilm", "latency"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.frontdoor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small counts (proves it runs)")
    p.add_argument("--only", metavar="PHASES", help=f"comma-separated: {','.join(PHASES)}")
    p.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument(
        "--postgres-url",
        default=DEFAULT_POSTGRES,
        help="a database on the server where --store postgres may CREATE DATABASE",
    )
    p.add_argument("--held", type=int, metavar="N", help="held requests in `idle` (1000)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, stores)")
    args = p.parse_args(argv)
    wanted = [s.strip() for s in (args.only or ",".join(PHASES)).split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(PHASES))
    if unknown:
        p.error(f"unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    args.phases = [s for s in PHASES if s in wanted]
    sizes = ph.Sizes.quick() if args.quick else ph.Sizes()
    if args.held is not None:
        if args.held < 1:
            p.error("--held must be at least 1")
        sizes = ph.Sizes(**{**sizes.__dict__, "held": args.held})
    args.sizes = sizes
    return args


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class Run:
    def __init__(self, args: argparse.Namespace, root: Path, say: ph.Log) -> None:
        self.args, self.root, self.say = args, root, say
        self.sizes: ph.Sizes = args.sizes
        self.children = Children(root / "logs")
        self.database = Database(args.store, args.postgres_url)
        self.broker: Any = None
        self.results: dict[str, Any] = {}

    def start_broker(self) -> None:
        from transports.kafka import EmbeddedKafka

        self.broker = EmbeddedKafka(self.root / "broker", free_port())
        self.broker.start()
        self.say(f"noida-db at {self.broker.bootstrap}, store {self.args.store}, in {self.root}")

    def stack(self, name: str, models: Path) -> FrontStack:
        stack = FrontStack(name, self.root, self.broker.bootstrap, models, self.children)
        stack.attach(self.database)
        stack.start()
        return stack

    def identity(self, models: Path) -> None:
        phases = set(self.args.phases)
        stack = self.stack("identity", models)
        bpid = self.broker.pid
        try:
            ph.warm_up(stack, ph.IDENTITY_BODY, 256)
            if "submit" in phases:
                self.results["submit"] = ph.submit(stack, self.sizes, bpid, self.say)
            if "wait" in phases:
                self.results["wait"] = ph.submit_wait(stack, self.sizes, bpid, self.say)
            if "direct" in phases:
                requests = [{"model": "identity", "input": ph.IDENTITY_INPUT}] * (
                    self.sizes.direct_jobs
                )
                self.results["direct"] = ph.direct(
                    stack, self.broker.bootstrap, requests, bpid, self.say, "direct"
                )
            if "idle" in phases:
                self.results["idle"] = ph.held_requests(stack, self.sizes, self.say)
        except BaseException:
            self.say(stack.logs())
            raise
        finally:
            stack.stop()

    def minilm(self, models: Path) -> None:
        from workers.export import MINILM_CONFIG
        from workers.runtime import choose_providers

        phases = set(self.args.phases)
        texts = baselines.sentences(self.sizes.minilm_jobs)
        short = baselines.short_texts(self.sizes.latency_samples + 20)
        model_dir = models / MINILM_CONFIG.name / MINILM_CONFIG.version
        out: dict[str, Any] = {}
        if "minilm" in phases:
            self.say(f"minilm: raw ONNX Runtime, batch {MINILM_CONFIG.max_batch_size}, 2 threads")
            with other_load() as other:  # at least 32 batches, so a quick run means something
                raw = baselines.raw_ort_throughput(
                    model_dir,
                    baselines.sentences(max(len(texts), 32 * MINILM_CONFIG.max_batch_size)),
                    MINILM_CONFIG.max_batch_size,
                    2,
                    choose_providers(None),
                )
            out["raw_ort"] = {
                "per_s": raw.per_s,
                "batch": raw.batch_size,
                "threads": 2,
                "other_cores": other["other_cores"],
            }
        model_p50 = ph.model_latency_ms(models, short) if "latency" in phases else 0.0
        stack = self.stack("minilm", models)
        bpid = self.broker.pid
        try:
            ph.warm_up(stack, ph.fc.body("minilm", {"text": "warm up"}), 64)
            if "minilm" in phases:
                requests = [{"model": "minilm", "input": {"text": t}} for t in texts]
                out["direct"] = ph.direct(
                    stack, self.broker.bootstrap, requests, bpid, self.say, "minilm"
                )
                out["http_prefer_wait"] = ph.minilm_http(
                    stack, texts, self.sizes.minilm_clients, bpid, self.say
                )
                self.results["minilm"] = out
            if "latency" in phases:
                self.results["latency"] = ph.one_at_a_time(stack, short[20:], model_p50, self.say)
        except BaseException:
            self.say(stack.logs())
            raise
        finally:
            stack.stop()

    def refs(self) -> None:
        n = self.sizes.wait_jobs
        self.results["refs"] = reference_queues.measure(
            self.children, jobs=n, clients=self.sizes.wait_clients, log=self.say
        )

    def run(self) -> None:
        phases = set(self.args.phases)
        wanted_fds = 4 * self.sizes.held + 1024  # client and server ends, plus the rest
        soft, hard = raise_open_files(wanted_fds)
        self.results["open_files_limit"] = {"soft": soft, "hard": hard}
        if "idle" in phases and soft < wanted_fds:
            self.say(f"open files limited to {soft} (< {wanted_fds}): held requests may fail")
        if phases & (IDENTITY_PHASES | MINILM_PHASES):
            models = model_repository()
            self.start_broker()
            if phases & IDENTITY_PHASES:
                self.identity(models)
            if phases & MINILM_PHASES:
                self.minilm(models)
        # after inferq's roles are gone, so that neither competes with the other
        if "refs" in phases:
            self.refs()

    def close(self) -> None:
        self.children.stop_all()
        if self.broker is not None:
            self.broker.stop()
        self.database.drop_all()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=150)
    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGTERM, _raise_interrupt)

    def say(message: str) -> None:
        console.print(f"[dim]{time.strftime('%H:%M:%S')} {message}[/dim]", markup=True)

    info = machine_info()
    root = Path(tempfile.mkdtemp(prefix="inferq-frontdoor-"))
    run = Run(args, root, say)
    started = time.perf_counter()
    code = 0
    try:
        run.run()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopping everything this benchmark started[/yellow]")
        code = 130
    except BenchError as exc:
        console.print(f"[red]benchmark failed: {exc}[/red]")
        code = 1
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            run.close()
        finally:
            signal.signal(signal.SIGINT, previous)
            if args.keep:
                console.print(f"kept {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)
    figures = {
        "machine": info,
        "config": {"store": args.store, "quick": args.quick, "sizes": args.sizes.__dict__},
        "phases": run.results,
        "ratios": frontdoor_report.ratios(run.results),
        "wall_seconds": time.perf_counter() - started,
    }
    frontdoor_report.print_all(console, figures)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2, sort_keys=True, default=str))
        console.print(f"figures written to {args.json}")
    return code


if __name__ == "__main__":
    sys.exit(main())
