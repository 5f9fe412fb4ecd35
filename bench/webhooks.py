"""Webhook delivery benchmark: delivered webhooks/s to a fast local receiver, and the lag from
job completion to delivery (p50/p99), through the real control plane (`inferq control`, a
Celery worker with the beat embedded, on Redis) and a SQLite job store.

    python -m bench.webhooks [--jobs 2000] [--lag-jobs 300] [--redis redis://127.0.0.1:6379/13]
    python -m bench.webhooks --quick        # a smoke run: 200 jobs, 60 lag jobs per path

Throughput: N jobs complete at once; time from the commit to the last verified delivery
(committed rows handed to the control plane at once, as the roles do by default).
Lag: jobs complete in small batches at a steady pace; per job, arrival at the receiver minus
the moment its outcome committed. Measured twice in the same run, against the same control
plane: with the handoff (INFERQ_WEBHOOK_HANDOFF, the default) and with the dispatch sweep as
the only path (the handoff off: the behaviour before issue 10). Every delivery is verified
with the ``standardwebhooks`` package.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

from control.handoff import CelerySender, Handoff
from jobstore.records import NewJob, Outcome
from jobstore.store import JobStore
from schemas.jobs import JobStatus
from webhooks.receiver import Receiver
from webhooks.signing import generate_secret


def _finish(store: JobStore, url: str, ids: list[str]) -> dict[str, float]:
    store.ensure(
        [NewJob(id=i, model="identity", version="1", input={}, webhook={"url": url}) for i in ids]
    )
    claimed = store.claim(ids, worker_id="bench", lease_s=60).claimed
    store.complete(
        [Outcome(r.id, r.attempts, JobStatus.SUCCEEDED, result={"ok": True}) for r in claimed]
    )
    done = time.time()
    return dict.fromkeys(ids, done)


def _wait(hook: Receiver, ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    wanted = set(ids)
    while time.monotonic() < deadline:
        if wanted <= set(hook.ids_by_job()):
            return
        time.sleep(0.02)
    missing = len(wanted - set(hook.ids_by_job()))
    raise SystemExit(f"timed out: {missing} of {len(ids)} webhooks not delivered")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _lags(
    store: JobStore, hook: Receiver, prefix: str, n: int, batch: int, pace_s: float
) -> list[float]:
    """n jobs completed ``batch`` at a time every ``pace_s``; per job, first arrival minus
    the moment its outcome committed."""
    completed: dict[str, float] = {}
    ids = [f"{prefix}-{i:06d}" for i in range(n)]
    for start in range(0, len(ids), batch):
        completed.update(_finish(store, hook.url, ids[start : start + batch]))
        time.sleep(pace_s)
    _wait(hook, ids, 300)
    first: dict[str, float] = {}
    with hook.lock:
        for r in hook.received:
            if r.job_id in completed:
                first[r.job_id] = min(first.get(r.job_id, r.at), r.at)
    return [first[i] - completed[i] for i in ids]


def _describe(lags: list[float]) -> str:
    return (
        f"p50 {statistics.median(lags) * 1000:.0f} ms, p99 {_pct(lags, 0.99) * 1000:.0f} ms,"
        f" max {max(lags) * 1000:.0f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 jobs, 60 lag jobs per path")
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--lag-jobs", type=int, default=300)
    parser.add_argument("--batch", type=int, default=10, help="jobs per completion (lag run)")
    parser.add_argument("--pace-s", type=float, default=0.1, help="between batches (lag run)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--dispatch-interval-s", type=float, default=0.5)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.lag_jobs = 200, 60

    secret = generate_secret()
    hook = Receiver(secret)
    hook.start()
    tmp = Path(tempfile.mkdtemp(prefix="inferq-bench-webhooks-"))
    db = f"sqlite:///{tmp / 'jobs.db'}"
    queue = f"bench-webhooks-{uuid.uuid4().hex[:8]}"
    # two stores on one database: one hands its committed rows over (as the roles do), the
    # other leaves them to the dispatch sweep
    sender = CelerySender(args.redis, queue)
    handoff = Handoff(sender, closing=sender.close)
    store = JobStore(db, on_outbox=handoff)
    store.create_schema()
    swept = JobStore(db)
    env = {
        **os.environ,
        "INFERQ_DATA_DIR": str(tmp),
        "INFERQ_DATABASE_URL": db,
        "INFERQ_REDIS_URL": args.redis,
        "INFERQ_CONTROL_QUEUE": queue,
        "INFERQ_WEBHOOK_SECRET": secret,
        "INFERQ_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "INFERQ_WEBHOOK_DISPATCH_INTERVAL_S": str(args.dispatch_interval_s),
        "INFERQ_CONTROL_METRICS_PORT": "0",
    }
    log = open(tmp / "control.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "inferq", "control", "--concurrency", str(args.concurrency)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        warm = [f"warm-{i}" for i in range(20)]
        _finish(store, hook.url, warm)
        _wait(hook, warm, 60)

        ids = [f"tput-{i:06d}" for i in range(args.jobs)]
        started = time.perf_counter()
        for start in range(0, len(ids), 500):
            _finish(store, hook.url, ids[start : start + 500])
        _wait(hook, ids, 600)
        elapsed = time.perf_counter() - started
        rate = len(ids) / elapsed

        sweep_lags = _lags(swept, hook, "sweep", args.lag_jobs, args.batch, args.pace_s)
        handoff_lags = _lags(store, hook, "handoff", args.lag_jobs, args.batch, args.pace_s)
        dupes = len(hook.received) - len(hook.ids_by_job())
        assert not hook.rejected, hook.rejected[:3]

        print(f"webhook delivery, {args.concurrency} delivery threads, Redis broker, SQLite store")
        print(f"  throughput: {len(ids)} webhooks in {elapsed:.2f} s = {rate:.0f} delivered/s")
        print(
            f"  lag completion -> verified delivery ({args.lag_jobs} jobs per path, "
            f"{args.batch} every {args.pace_s * 1000:.0f} ms, dispatch sweep every "
            f"{args.dispatch_interval_s * 1000:.0f} ms):"
        )
        print(f"    sweep only (handoff off): {_describe(sweep_lags)}")
        print(f"    handoff (the default):    {_describe(handoff_lags)}")
        ratio = statistics.median(sweep_lags) / max(statistics.median(handoff_lags), 1e-6)
        print(f"    p50 ratio sweep/handoff: {ratio:.1f}x")
        print(f"  all verified with standardwebhooks; duplicate deliveries: {dupes}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        hook.stop()
        handoff.close()
        store.close()
        swept.close()
        client = redis.Redis.from_url(args.redis)
        client.delete(queue)
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
