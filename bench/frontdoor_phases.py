"""The phases of ``bench.frontdoor``: each takes a started stack and returns plain dicts of
figures, with the CPU each process spent over its window (per job where jobs ran)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from bench import baselines
from bench import frontdoor_clients as fc
from bench.frontdoor_stack import FrontStack, GroupMeter, paused
from bench.harness import metric, scrape

IDENTITY_INPUT = {"tensor": [1.0, 2.0, 3.0, 4.0]}
IDENTITY_BODY = fc.body("identity", IDENTITY_INPUT)


@dataclass(frozen=True)
class Sizes:
    """How many of each; ``--quick`` shrinks them all to prove the harness runs."""

    submit_jobs: int = 2000  # per client level
    submit_levels: tuple[int, ...] = (1, 8, 64, 256)
    wait_jobs: int = 3000  # per mode, and per reference queue
    wait_clients: int = 64
    direct_jobs: int = 20000
    minilm_jobs: int = 2000
    minilm_clients: int = 64
    held: int = 1000  # open ?wait=60 requests, and open SSE streams
    idle_window_s: float = 10.0
    probe_posts: int = 50
    latency_samples: int = 200

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            submit_jobs=200,
            wait_jobs=300,
            direct_jobs=2000,
            minilm_jobs=256,
            held=300,
            idle_window_s=3.0,
            probe_posts=20,
            latency_samples=30,
        )


Log = Callable[[str], None]


def meter(stack: FrontStack, broker_pid: int | None) -> GroupMeter:
    groups = {"api": stack.api.pid, "worker": stack.worker.pid}  # type: ignore[union-attr]
    return GroupMeter(groups, {"broker": broker_pid} if broker_pid else None)


def _cpu(m: GroupMeter, jobs: int) -> dict[str, Any]:
    return {"cpu_s": m.used, "cpu_ms_per_job": m.per_job_ms(jobs), "cores": m.cores()}


def _drain(stack: FrontStack, target: int, jobs: int) -> float:
    return stack.probe.wait_terminal(target, timeout_s=max(120.0, jobs / 10))


def warm_up(stack: FrontStack, payload: bytes, n: int) -> None:
    target = stack.probe.terminal() + n
    asyncio.run(fc.submit_only(stack.api_url, [payload] * n, 32))
    _drain(stack, target, n)


# --- 1: submit only --------------------------------------------------------------------------


def submit(stack: FrontStack, sizes: Sizes, broker: int | None, log: Log) -> dict[str, Any]:
    levels = []
    for clients in sizes.submit_levels:
        n = max(sizes.submit_jobs, clients * 2)
        log(f"submit: {n} identity POSTs, {clients} concurrent clients")
        target = stack.probe.terminal() + n
        groups_before = _insert_groups(stack)
        with meter(stack, broker) as m:
            r = asyncio.run(fc.submit_only(stack.api_url, [IDENTITY_BODY] * n, clients))
        r.pop("ids")
        r |= _cpu(m, n)
        groups_after = _insert_groups(stack)
        if groups_before is not None and groups_after is not None:
            txns = groups_after[0] - groups_before[0]
            r["insert_transactions"] = txns
            r["mean_insert_group"] = (groups_after[1] - groups_before[1]) / txns if txns else None
        levels.append(r)
        _drain(stack, target, n)  # the next level starts on an empty queue
    return {"levels": levels}


def _insert_groups(stack: FrontStack) -> tuple[float, float] | None:
    """(store transactions, jobs they wrote) of grouped submits so far, from the API's
    /metrics; None where the API does not group its inserts."""
    samples = scrape(f"{stack.api_url}/metrics")
    name = "inferq_submit_insert_group_jobs"
    if f"{name}_count" not in samples:
        return None
    return metric(samples, f"{name}_count"), metric(samples, f"{name}_sum")


# --- 2: submit and wait ----------------------------------------------------------------------


def submit_wait(stack: FrontStack, sizes: Sizes, broker: int | None, log: Log) -> dict[str, Any]:
    n, c = sizes.wait_jobs, sizes.wait_clients
    out: dict[str, Any] = {}
    for mode, prefer in (("prefer_wait", True), ("post_then_get_wait", False)):
        log(f"wait: {n} identity jobs, {c} clients, {mode}")
        with meter(stack, broker) as m:
            r = asyncio.run(
                fc.submit_and_wait(stack.api_url, [IDENTITY_BODY] * n, c, prefer=prefer)
            )
        out[mode] = r | _cpu(m, n)
    return out


# --- 3 and 4: straight onto the topic --------------------------------------------------------


def direct(
    stack: FrontStack,
    bootstrap: str,
    requests: list[dict[str, Any]],
    broker: int | None,
    log: Log,
    what: str,
) -> dict[str, Any]:
    n = len(requests)
    log(f"{what}: {n} jobs published straight onto {stack.topic}")
    target = stack.probe.terminal() + n
    with meter(stack, broker) as m:
        started, acked = asyncio.run(fc.publish_direct(bootstrap, stack.topic, requests))
        done = _drain(stack, target, n)
    seconds = done - started
    return {
        "jobs": n,
        "seconds": seconds,
        "per_s": n / seconds,
        "publish_seconds": acked - started,
        **_cpu(m, n),
    }


def minilm_http(
    stack: FrontStack, texts: list[str], clients: int, broker: int | None, log: Log
) -> dict[str, Any]:
    bodies = [fc.body("minilm", {"text": t}) for t in texts]
    log(f"minilm: {len(bodies)} jobs over HTTP with Prefer: wait, {clients} clients")
    with meter(stack, broker) as m:
        r = asyncio.run(fc.submit_and_wait(stack.api_url, bodies, clients, prefer=True))
    return r | _cpu(m, len(bodies))


# --- 5: held requests ------------------------------------------------------------------------


def _api_idle(stack: FrontStack, seconds: float) -> float:
    with GroupMeter({"api": stack.api.pid}) as m:  # type: ignore[union-attr]
        time.sleep(seconds)
    return m.cores()["api"]


async def _probe_posts(stack: FrontStack, n: int, budget_s: float) -> list[float]:
    """Up to ``n`` sequential POSTs, stopping after ``budget_s`` (held requests expire)."""
    return await fc.post_latencies(stack.api_url, IDENTITY_BODY, n, budget_s)


async def _settle(stack: FrontStack, limit_s: float = 10.0) -> float:
    """Seconds until the API's CPU over 0.5 s falls under 5% of a core (or ``limit_s``)."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        with GroupMeter({"api": stack.api.pid}) as m:  # type: ignore[union-attr]
            await asyncio.sleep(0.5)
        if m.cores()["api"] < 0.05:
            break
    return time.monotonic() - started


def _queued_ids(stack: FrontStack, n: int) -> list[str]:
    r = asyncio.run(fc.submit_only(stack.api_url, [IDENTITY_BODY] * n, 64))
    ids: list[str] = r["ids"]
    return ids


def sse_supported(stack: FrontStack, job_id: str) -> bool:
    with httpx.stream(
        "GET", f"{stack.api_url}/v1/jobs/{job_id}/events", timeout=10
    ) as r:  # the first answer is enough: 404/405 means no such route here
        return r.status_code not in (404, 405)


async def _held_window(
    stack: FrontStack, kind: str, ids: list[str], sizes: Sizes, log: Log
) -> tuple[dict[str, Any], fc.Held]:
    held = fc.Held(stack.api_url)
    if kind == "wait":
        paths = [f"/v1/jobs/{i}?wait=60" for i in ids]
    else:
        paths = [f"/v1/jobs/{i}/events" for i in ids]
    opened_at = time.monotonic()
    await held.open(paths, sse=kind == "sse")
    if kind == "sse":
        await held.settle_sse(len(paths), timeout_s=60)
    settle_s = await _settle(stack)
    log(f"idle: {len(paths)} {kind} requests open (settled after {settle_s:.1f}s)")
    loop = asyncio.get_running_loop()
    cores = await loop.run_in_executor(None, _api_idle, stack, sizes.idle_window_s)
    budget = max(1.0, 50 - (time.monotonic() - opened_at))  # before ?wait=60 answers
    probes = await _probe_posts(stack, sizes.probe_posts, budget)
    early = sum(1 for t in held.tasks if t.done())
    return {
        "held": len(paths),
        "settle_s": settle_s,
        "api_cores_idle": cores,
        "post_p50_ms": fc.p50_ms(probes),
        "posts": len(probes),
        "answered_before_release": early,
        "first_answers": dict(held.statuses),
    }, held


def held_requests(stack: FrontStack, sizes: Sizes, log: Log) -> dict[str, Any]:
    """1,000 open ``?wait=60`` requests (and SSE streams) on queued jobs (the worker is
    stopped meanwhile): the API's CPU while they idle and a POST's p50, against the same
    with none open."""
    out: dict[str, Any] = {}
    with paused(stack):
        log("idle: the API with nothing held open")
        time.sleep(0.5)
        out["none"] = {
            "api_cores_idle": _api_idle(stack, sizes.idle_window_s),
            "post_p50_ms": fc.p50_ms(asyncio.run(_probe_posts(stack, sizes.probe_posts, 60))),
        }
    for kind in ("wait", "sse"):
        with paused(stack):
            ids = _queued_ids(stack, sizes.held)
            if kind == "sse" and not sse_supported(stack, ids[0]):
                log("idle: GET /v1/jobs/{id}/events: not supported (404/405), skipped")
                out[kind] = {"skipped": "not supported: GET /v1/jobs/{id}/events is 404/405"}
                continue

            async def run(kind: str = kind, ids: list[str] = ids) -> dict[str, Any]:
                figures, held = await _held_window(stack, kind, ids, sizes, log)
                stack.resume_worker()  # the jobs run; every held request must now end
                answers = await held.finish(timeout_s=90)
                figures["final_answers"] = {str(k): v for k, v in answers.items()}
                return figures

            out[kind] = asyncio.run(run())
    base = out["none"]
    for kind in ("wait", "sse"):
        r = out[kind]
        if "skipped" not in r and base["post_p50_ms"] and r["post_p50_ms"]:
            r["post_p50_ratio_to_none"] = r["post_p50_ms"] / base["post_p50_ms"]
    return out


# --- 6: one job at a time --------------------------------------------------------------------


def one_at_a_time(
    stack: FrontStack, texts: list[str], model_p50_ms: float, log: Log
) -> dict[str, Any]:
    log(f"latency: {len(texts)} MiniLM jobs one at a time, Prefer: wait=10")
    bodies = [fc.body("minilm", {"text": t}) for t in texts]
    asyncio.run(fc.one_at_a_time(stack.api_url, bodies[:5], 10))  # warm
    r = asyncio.run(fc.one_at_a_time(stack.api_url, bodies, 10))
    e2e = fc.p50_ms(r["samples"]) or 0.0
    return {
        "samples": len(r["samples"]),
        "e2e_p50_ms": e2e,
        "model_p50_ms": model_p50_ms,
        "overhead_p50_ms": e2e - model_p50_ms,
        "fell_back_to_get_wait": r["fell_back"],
        "statuses": r["statuses"],
        "stages_p50_ms": r["stages_p50_ms"],
    }


def model_latency_ms(models: Any, texts: list[str]) -> float:
    from workers.export import MINILM_CONFIG

    adapter = baselines.open_adapter(models, MINILM_CONFIG, 2)
    samples = baselines.adapter_latencies(adapter, texts)
    del adapter
    return fc.p50_ms(samples) or 0.0
