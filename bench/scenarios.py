"""The three scenarios. Each returns plain dicts of figures; bench.report prints them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench import baselines, profile
from bench.harness import (
    BenchError,
    Children,
    CpuMeter,
    InferqStack,
    Stopwatch,
    metric,
    other_load,
    python_module,
    scrape,
    status_counts,
    terminal_count,
    wait_for_terminal,
    wait_until,
)
from workers.export import IDENTITY_CONFIG, MINILM_CONFIG
from workers.runtime import choose_providers

THREADS = 2


@dataclass
class Env:
    """What every scenario shares: the broker, the models, where to put things."""

    root: Path
    bootstrap: str
    broker_pid: int | None
    models: Path
    children: Children
    log: Callable[[str], None]
    profile_dir: Path | None = None
    worker_threads: int = THREADS  # INFERQ_INFERENCE_THREADS of the workers

    def stack(self, scenario: str) -> InferqStack:
        return InferqStack(
            scenario,
            self.root,
            self.bootstrap,
            self.models,
            self.children,
            threads=self.worker_threads,
        )


@dataclass
class Window:
    """One timed stretch: first submit -> all terminal, with what each process spent."""

    jobs: int
    seconds: float
    submit_seconds: float
    statuses: dict[str, int]
    cpu_s: dict[str, float]
    retries: int = 0
    worker: dict[str, float] = field(default_factory=dict)

    @property
    def per_s(self) -> float:
        return self.jobs / self.seconds

    def as_dict(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "seconds": self.seconds,
            "jobs_per_s": self.per_s,
            "submit_seconds": self.submit_seconds,
            "submit_per_s": self.jobs / self.submit_seconds if self.submit_seconds else None,
            "statuses": self.statuses,
            "retries": self.retries,
            "cpu_seconds": self.cpu_s,
            "worker": self.worker,
        }


# --- submitting -----------------------------------------------------------------------------


def _body(model: str, inp: dict[str, Any]) -> bytes:
    return json.dumps({"model": model, "input": inp}, separators=(",", ":")).encode()


@dataclass
class Submitted:
    started: float  # perf_counter just before the first POST
    finished: float  # perf_counter when the last 202 arrived
    retries: int


async def _post_all(
    url: str,
    bodies: Sequence[bytes],
    concurrency: int,
    on_start: Callable[[], None] | None = None,
) -> Submitted:
    """POST every body with at most ``concurrency`` requests in flight.

    Each lane has its own one-connection httpx.AsyncClient: one shared client with a
    64-connection pool costs ~4 ms of client CPU per request here (httpcore scans its pool on
    every request), against ~1.1 ms per request this way, and on 2 cores that CPU is taken
    from the API and the worker. 429/503 (backpressure) are retried after a short pause and
    counted; any other answer but 202 stops the benchmark, as a lost job voids the figures.
    """
    headers = {"content-type": "application/json"}
    retries = 0
    queue = iter(bodies)
    clients = [
        httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=1), timeout=60)
        for _ in range(concurrency)
    ]

    async def lane(client: httpx.AsyncClient) -> None:
        nonlocal retries
        for body in queue:
            while True:
                r = await client.post("/v1/jobs", content=body, headers=headers)
                if r.status_code == 202:
                    break
                if r.status_code in (429, 503):
                    retries += 1
                    await asyncio.sleep(0.05)
                    continue
                raise BenchError(f"POST /v1/jobs answered {r.status_code}: {r.text[:300]}")

    try:
        if on_start is not None:
            on_start()
        started = time.perf_counter()
        await asyncio.gather(*(lane(c) for c in clients))
        return Submitted(started, time.perf_counter(), retries)
    finally:
        for client in clients:
            await client.aclose()


def _worker_snapshot(stack: InferqStack) -> dict[str, float]:
    return scrape(stack.metrics_url)


def _worker_delta(
    before: dict[str, float], after: dict[str, float], model: str, seconds: float
) -> dict[str, float]:
    def d(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    batches = d("inferq_batch_size_jobs_count", model=model)
    jobs = d("inferq_batch_size_jobs_sum", model=model)
    infer_s = d("inferq_inference_duration_seconds_sum", model=model)
    out = {"batches": batches, "jobs_in_batches": jobs, "inference_s": infer_s}
    if batches:
        out["mean_batch"] = jobs / batches
        out["mean_inference_ms"] = 1000 * infer_s / batches
        out["mean_batch_wait_ms"] = 1000 * d("inferq_batch_wait_seconds_sum", model=model) / batches
    if seconds:
        out["inference_busy"] = infer_s / seconds
    return out


def _meter(env: Env, stack: InferqStack) -> CpuMeter:
    pids = stack.pids()
    if env.broker_pid:
        pids["broker"] = env.broker_pid
    return CpuMeter(pids)


def http_window(
    env: Env,
    stack: InferqStack,
    model: str,
    inputs: Sequence[dict[str, Any]],
    concurrency: int,
    label: str,
) -> Window:
    """Time ``inputs`` as jobs over HTTP: first POST -> all of them terminal in the store."""
    bodies = [_body(model, i) for i in inputs]
    target = terminal_count(stack.db_path) + len(bodies)
    before_metrics = _worker_snapshot(stack)
    meter = _meter(env, stack)
    watch = Stopwatch(stack.db_path, target, timeout_s=max(120.0, len(bodies) / 20))

    def on_start() -> None:
        meter.start()
        watch.start()

    with profile.record(env.profile_dir, label, stack.pids()):
        sub = asyncio.run(_post_all(stack.api_url, bodies, concurrency, on_start))
        done_at = watch.result()
        cpu = meter.stop()
    seconds = done_at - sub.started
    after_metrics = _worker_snapshot(stack)
    return Window(
        len(bodies),
        seconds,
        sub.finished - sub.started,
        status_counts(stack.db_path),
        cpu,
        sub.retries,
        _worker_delta(before_metrics, after_metrics, model, seconds),
    )


def warm_up(
    stack: InferqStack, model: str, inputs: Sequence[dict[str, Any]], concurrency: int
) -> None:
    target = terminal_count(stack.db_path) + len(inputs)
    asyncio.run(_post_all(stack.api_url, [_body(model, i) for i in inputs], concurrency))
    wait_for_terminal(stack.db_path, target, timeout_s=120)


def idle_cpu(env: Env, stack: InferqStack, seconds: float = 2.0) -> dict[str, float]:
    """Cores each role keeps busy with no jobs at all (after warm-up): what the roles take
    from the model before any work arrives."""
    time.sleep(0.5)  # let the warm-up's last commits and writes settle
    meter = _meter(env, stack)
    meter.start()
    time.sleep(seconds)
    used = meter.stop()
    return {k: v / seconds for k, v in used.items() if k in ("api", "worker", "broker")}


# --- scenario 1: MiniLM throughput ----------------------------------------------------------


def minilm(env: Env, jobs: int, concurrency: int = 32, direct: bool = True) -> dict[str, Any]:
    config = MINILM_CONFIG
    model_dir = env.models / config.name / config.version
    texts = baselines.sentences(jobs)
    lengths = baselines.token_lengths(model_dir / "tokenizer.json", texts)
    providers = choose_providers(None)

    env.log(
        f"minilm: raw ONNX Runtime over {jobs} sentences (batch {config.max_batch_size}, "
        f"{THREADS} threads)"
    )
    with other_load() as raw_other:
        raw = baselines.raw_ort_throughput(
            model_dir, texts, config.max_batch_size, THREADS, providers
        )
    env.log("minilm: adapter.run over the same sentences")
    adapter = baselines.open_adapter(env.models, config, THREADS)
    with other_load() as ad_other:
        ad = baselines.adapter_throughput(adapter, texts, config.max_batch_size, THREADS)
    del adapter

    env.log("minilm: starting api + worker")
    stack = env.stack("minilm")
    direct_w: Window | None = None
    try:
        stack.start()
        warm_up(stack, "minilm", [{"text": t} for t in baselines.sentences(64, seed=99)], 32)
        idle = idle_cpu(env, stack)
        env.log(f"minilm: {jobs} jobs over HTTP, concurrency {concurrency}")
        window = http_window(
            env, stack, "minilm", [{"text": t} for t in texts], concurrency, "minilm"
        )
        if direct:
            # the same jobs without the HTTP API: what the worker itself makes of the model
            env.log(f"minilm: the same {jobs} jobs published straight onto the topic")
            direct_w = direct_window(
                env, stack, "minilm", [{"text": t} for t in texts], "minilm-direct"
            )
    except BaseException:
        env.log(stack.logs())
        raise
    finally:
        stack.stop()

    return {
        "corpus": {
            "sentences": jobs,
            "mean_tokens": sum(lengths) / len(lengths),
            "min_tokens": min(lengths),
            "max_tokens": max(lengths),
        },
        "batch_size": config.max_batch_size,
        "max_wait_ms": config.max_wait_ms,
        "threads": THREADS,
        "worker_threads": env.worker_threads,
        "concurrency": concurrency,
        "raw_ort": {
            "per_s": raw.per_s,
            "seconds": raw.seconds,
            "provider": raw.provider,
            "other_cores": raw_other["other_cores"],
        },
        "adapter": {
            "per_s": ad.per_s,
            "seconds": ad.seconds,
            "provider": ad.provider,
            "other_cores": ad_other["other_cores"],
        },
        "idle_cores": idle,
        "e2e": window.as_dict(),
        "ratio_e2e_raw": window.per_s / raw.per_s,
        "direct": direct_w.as_dict() if direct_w else None,
        "ratio_direct_raw": direct_w.per_s / raw.per_s if direct_w else None,
        "ratio_e2e_adapter": window.per_s / ad.per_s,
        "ratio_adapter_raw": ad.per_s / raw.per_s,
    }


# --- scenario 2: identity overhead, and Celery next to it ------------------------------------

IDENTITY_INPUT = {"tensor": [1.0, 2.0, 3.0, 4.0]}


async def _publish_direct(
    bootstrap: str, topic: str, values: Sequence[bytes], run: str
) -> tuple[float, float]:
    """Publish one binary-mode CloudEvent per value (the job request as the message value,
    ``ce_*`` headers); returns (started, all acked) perf_counter times."""
    from aiokafka import AIOKafkaProducer

    messages = []
    for i, value in enumerate(values):
        job_id = f"bench-{run}-{i}"
        headers = [
            ("ce_specversion", b"1.0"),
            ("ce_id", job_id.encode()),
            ("ce_source", b"//bench"),
            ("ce_type", b"inferq.job.requested"),
            ("content-type", b"application/json"),
        ]
        messages.append((job_id.encode(), value, headers))
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        started = time.perf_counter()
        acks = [
            await producer.send(topic, value, key=key, headers=headers)
            for key, value, headers in messages
        ]
        await asyncio.gather(*acks)
        return started, time.perf_counter()
    finally:
        await producer.stop()


def direct_window(
    env: Env, stack: InferqStack, model: str, inputs: Sequence[dict[str, Any]], label: str
) -> Window:
    """Time ``inputs`` as jobs published straight onto the topic: first publish -> all of
    them terminal in the store (the worker is running and warm)."""
    values = [_body(model, i) for i in inputs]
    run = uuid.uuid4().hex[:8]
    target = terminal_count(stack.db_path) + len(values)
    before_metrics = _worker_snapshot(stack)
    meter = _meter(env, stack)
    watch = Stopwatch(stack.db_path, target, timeout_s=max(120.0, len(values) / 20))
    with profile.record(env.profile_dir, label, stack.pids()):
        meter.start()
        watch.start()
        started, acked = asyncio.run(_publish_direct(env.bootstrap, stack.topic, values, run))
        done_at = watch.result()
        cpu = meter.stop()
    seconds = done_at - started
    after_metrics = _worker_snapshot(stack)
    return Window(
        len(values),
        seconds,
        acked - started,
        status_counts(stack.db_path),
        cpu,
        0,
        _worker_delta(before_metrics, after_metrics, model, seconds),
    )


def identity(
    env: Env,
    http_jobs: int,
    direct_jobs: int,
    celery_jobs: int,
    http_concurrency: int = 64,
    celery_prefetch: int = 4,
) -> dict[str, Any]:
    adapter = baselines.open_adapter(env.models, IDENTITY_CONFIG, THREADS)
    model_alone = baselines.identity_throughput(adapter, 20_000, IDENTITY_CONFIG.max_batch_size)
    del adapter

    env.log("identity: starting api + worker")
    stack = env.stack("identity")
    try:
        stack.start()
        warm_up(stack, "identity", [IDENTITY_INPUT] * 256, http_concurrency)
        idle = idle_cpu(env, stack)
        env.log(f"identity: {http_jobs} jobs over HTTP, concurrency {http_concurrency}")
        http = http_window(
            env, stack, "identity", [IDENTITY_INPUT] * http_jobs, http_concurrency, "identity-http"
        )
        env.log(f"identity: {direct_jobs} CloudEvents published straight onto the topic")
        direct = direct_window(
            env, stack, "identity", [IDENTITY_INPUT] * direct_jobs, "identity-direct"
        )
    except BaseException:
        env.log(stack.logs())
        raise
    finally:
        stack.stop()

    # Celery runs after inferq's roles are gone, so neither competes with the other
    env.log(f"identity: Celery reference, {celery_jobs} no-op tasks")
    celery = celery_reference(env, celery_jobs, prefetch=celery_prefetch)
    out: dict[str, Any] = {
        "http_concurrency": http_concurrency,
        "identity_model_alone_per_s": model_alone.per_s,
        "idle_cores": idle,
        "http": http.as_dict(),
        "direct": direct.as_dict(),
        "celery": celery,
    }
    if celery.get("per_s"):
        out["ratio_direct_celery"] = direct.per_s / celery["per_s"]
        out["ratio_http_celery"] = http.per_s / celery["per_s"]
    return out


def celery_reference(
    env: Env, n: int, prefetch: int, db: int = 15, concurrency: int = 8
) -> dict[str, Any]:
    import redis

    from bench import celery_noop

    url = f"redis://127.0.0.1:6379/{db}"
    info: dict[str, Any] = {
        "broker": url,
        "pool": "threads",
        "concurrency": concurrency,
        "prefetch_multiplier": prefetch,
        "jobs": n,
    }
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        info["skipped"] = f"Redis at {url} is not reachable: {exc}"
        return info
    run = uuid.uuid4().hex[:8]
    queue, counter = f"bench-noop-{run}", f"bench:noop:{run}"
    client.flushdb()  # only this benchmark's own db number
    celery_env = dict(os.environ)
    celery_env.update(
        {
            celery_noop.BROKER_ENV: url,
            celery_noop.QUEUE_ENV: queue,
            celery_noop.COUNTER_ENV: counter,
            celery_noop.PREFETCH_ENV: str(prefetch),
            "PYTHONUNBUFFERED": "1",
        }
    )
    # the sending side is this process: the same names, set before first use
    celery_noop.app.conf.broker_url = url
    celery_noop.app.conf.task_default_queue = queue
    worker = env.children.spawn(
        "celery-worker",
        python_module(
            "celery",
            "-A",
            "bench.celery_noop",
            "worker",
            "--pool",
            "threads",
            "--concurrency",
            str(concurrency),
            "--queues",
            queue,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel",
            "WARNING",
            "--hostname",
            f"bench-{run}@%h",
        ),
        celery_env,
    )
    try:

        def done() -> int:
            if not worker.alive():
                raise BenchError(f"celery worker exited:\n{worker.log_tail()}")
            return int(client.get(counter) or 0)

        # warm-up: the worker is up, connected and has run tasks before the clock starts
        for _ in range(200):
            celery_noop.noop.delay()
        wait_until(lambda: done() >= 200, 60, "the Celery worker to warm up", 0.02)
        client.set(counter, 0)

        meter = CpuMeter({"celery worker": worker.pid}, extra={"redis": _redis_cpu(client)})
        finished: list[float] = []
        failure: list[BaseException] = []

        def watch() -> None:
            try:
                deadline = time.monotonic() + max(120.0, n / 20)
                while done() < n:
                    if time.monotonic() > deadline:
                        raise BenchError(f"Celery ran only {done()} of {n} tasks")
                    time.sleep(0.02)
                finished.append(time.perf_counter())
            except BaseException as exc:
                failure.append(exc)

        watcher = threading.Thread(target=watch, daemon=True)
        meter.start()
        started = time.perf_counter()
        watcher.start()
        for _ in range(n):
            celery_noop.noop.delay()
        sent = time.perf_counter()
        watcher.join()
        cpu = meter.stop()
        if failure:
            raise failure[0]
        seconds = finished[0] - started
        info.update(
            {
                "seconds": seconds,
                "per_s": n / seconds,
                "send_seconds": sent - started,
                "cpu_seconds": cpu,
                "celery": _celery_version(),
            }
        )
    finally:
        env.children.stop(worker)
        with contextlib.suppress(redis.RedisError):
            client.flushdb()
        client.close()
    return info


def _redis_cpu(client: Any) -> Callable[[], float | None]:
    def read() -> float | None:
        try:
            cpu = client.info("cpu")
        except Exception:
            return None
        return float(cpu.get("used_cpu_sys", 0)) + float(cpu.get("used_cpu_user", 0))

    return read


def _celery_version() -> str:
    import celery

    return str(celery.__version__)


# --- scenario 3: low-load latency -----------------------------------------------------------


def _ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


def latency(env: Env, samples: int, warmup: int = 20) -> dict[str, Any]:
    texts = baselines.short_texts(samples + warmup)
    env.log(f"latency: adapter.run([one]) x {samples}")
    adapter = baselines.open_adapter(env.models, MINILM_CONFIG, THREADS)
    with other_load() as model_other:
        model_s = baselines.adapter_latencies(adapter, texts[warmup:], warmup=warmup)
    del adapter

    env.log("latency: starting api + worker")
    stack = env.stack("latency")
    e2e: list[float] = []
    segments: dict[str, list[float]] = {
        "post": [],
        "created_to_started": [],
        "started_to_completed": [],
        "completed_to_client": [],
    }
    statuses: Counter[str] = Counter()
    try:
        stack.start()
        idle = idle_cpu(env, stack)
        env.log(f"latency: {samples} sequential jobs (POST, then GET ?wait=10)")
        with (
            profile.record(env.profile_dir, "latency", stack.pids()),
            httpx.Client(base_url=stack.api_url, timeout=30) as client,
        ):
            for i, text in enumerate(texts):
                started = time.perf_counter()
                r = client.post("/v1/jobs", json={"model": "minilm", "input": {"text": text}})
                posted = time.perf_counter()
                if r.status_code != 202:
                    raise BenchError(f"POST answered {r.status_code}: {r.text[:300]}")
                job = client.get(f"/v1/jobs/{r.json()['id']}", params={"wait": 10}).json()
                ended = time.perf_counter()
                seen_wall = time.time()
                if i < warmup:
                    continue
                statuses[job["status"]] += 1
                e2e.append(ended - started)
                segments["post"].append(posted - started)
                created, begun, completed = (
                    _ts(job.get(k)) for k in ("created_at", "started_at", "completed_at")
                )
                if created and begun and completed:
                    segments["created_to_started"].append(begun - created)
                    segments["started_to_completed"].append(completed - begun)
                    segments["completed_to_client"].append(seen_wall - completed)
    except BaseException:
        env.log(stack.logs())
        raise
    finally:
        stack.stop()

    model_p = baselines.percentiles(model_s)
    e2e_p = baselines.percentiles(e2e)
    return {
        "samples": samples,
        "statuses": dict(statuses),
        "model_batch1_s": model_p,
        "model_other_cores": model_other["other_cores"],
        "idle_cores": idle,
        "e2e_s": e2e_p,
        "p50_difference_ms": 1000 * (e2e_p["p50"] - model_p["p50"]),
        "segments_p50_ms": {
            k: 1000 * baselines.percentiles(v, (50,))["p50"] for k, v in segments.items() if v
        },
    }
