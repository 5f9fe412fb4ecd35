"""What retries cost the healthy traffic, and how fast the autoscaling signal reacts.

    python -m bench.retries [--jobs 4000]

1. Drain rate of a pre-published backlog on the real Kafka-protocol broker, by one in-process
   Worker running the real identity ONNX model: once with every job healthy, once with 5% of
   the jobs failing transiently twice before they pass (exponential backoff, not-before
   scheduling in the store). Printed: healthy jobs/s in each run and their ratio.
2. Spike to signal: a backlog spike is published onto the topic; the time until the API's
   backlog monitor (bus lag + store + heartbeats) raises the desired worker count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from dlq.router import DeadLetterRouter
from jobstore.store import JobStore
from producers.autoscale import AutoscalePolicy
from producers.backpressure import BacklogMonitor
from schemas.contracts import TensorInput
from schemas.jobs import JobStatus
from transports.kafka import (
    EmbeddedKafka,
    KafkaConfig,
    KafkaConsumer,
    KafkaDepth,
    KafkaPublisher,
    Outgoing,
    ensure_topics,
)
from transports.local_process import free_port
from workers.adapters import LoadedModel, load_model
from workers.errors import InferenceError
from workers.loop import Worker, WorkerConfig
from workers.metrics import WorkerMetrics
from workers.repository import ModelRepository
from workers.retry import RetryPolicy, RetryPump


class FlakyShare:
    """Wraps the real identity model; inputs whose first value is negative fail twice."""

    def __init__(self, inner: LoadedModel) -> None:
        self.inner, self.config, self.provider = inner, inner.config, inner.provider
        self.calls: dict[float, int] = {}

    def run(self, inputs: list[BaseModel]) -> list[dict[str, Any]]:
        for i in inputs:
            assert isinstance(i, TensorInput)
            v = i.tensor[0]
            if v < 0:
                self.calls[v] = self.calls.get(v, 0) + 1
                if self.calls[v] <= 2:
                    raise InferenceError("transient", retryable=True)
        return self.inner.run(inputs)


def _events(n: int, failing_every: int | None, prefix: str) -> list[Outgoing]:
    out = []
    for i in range(n):
        bad = failing_every is not None and i % failing_every == 0
        event = {
            "specversion": "1.0",
            "id": f"{prefix}-{i}",
            "source": "urn:bench",
            "type": "inferq.job.requested",
            "data": {"model": "identity", "input": {"tensor": [-(i + 1) if bad else i]}},
        }
        out.append(Outgoing(json.dumps(event).encode(), f"{prefix}-{i}".encode()))
    return out


async def drain(
    boot: str, tmp: Path, models: Path, n: int, failing_every: int | None, name: str
) -> dict[str, float]:
    topic = f"bench.{name}"
    config = KafkaConfig(bootstrap=boot, client_id=f"bench-{name}")
    await ensure_topics(config, {topic: 3, f"{topic}.dlq": 1})
    store = JobStore(f"sqlite:///{tmp / f'{name}.db'}")
    store.create_schema()
    repo = ModelRepository(models)
    [identity_cfg] = [c for c in repo.configs() if c.name == "identity"]
    model = FlakyShare(load_model(repo, identity_cfg, ["CPUExecutionProvider"], 1))
    publisher = KafkaPublisher(config)
    await publisher.start()
    healthy = [f"{name}-{i}" for i in range(n) if not (failing_every and i % failing_every == 0)]
    flaky = [f"{name}-{i}" for i in range(n) if failing_every and i % failing_every == 0]
    worker = Worker(
        consumer=KafkaConsumer(config, topic, f"{topic}-g"),
        store=store,
        models={identity_cfg.key: model},
        dead_letters=DeadLetterRouter(publisher, f"{topic}.dlq"),
        metrics=WorkerMetrics(CollectorRegistry()),
        config=WorkerConfig(worker_id=name),
        retry=RetryPolicy(max_attempts=5, base_delay_s=0.2, max_delay_s=2),
        retry_pump=RetryPump(store, publisher, topic, interval_s=0.05),
    )
    stop = asyncio.Event()
    consumer = worker.consumer
    task = asyncio.create_task(worker.run(stop))
    assert isinstance(consumer, KafkaConsumer)
    while not consumer.assignment():  # joined and warm before the clock starts
        await asyncio.sleep(0.01)
    started = time.perf_counter()
    await publisher.publish_many(topic, _events(n, failing_every, name))

    def done(ids: list[str]) -> bool:
        return all(r.status is JobStatus.SUCCEEDED for r in store.get_many(ids).values()) and len(
            store.get_many(ids)
        ) == len(ids)

    while not await asyncio.to_thread(done, healthy):
        await asyncio.sleep(0.05)
    healthy_s = time.perf_counter() - started
    while flaky and not await asyncio.to_thread(done, flaky):
        await asyncio.sleep(0.05)
    all_s = time.perf_counter() - started
    stop.set()
    await task
    await publisher.stop()
    store.close()
    return {
        "healthy_jobs": len(healthy),
        "healthy_s": healthy_s,
        "healthy_rate": len(healthy) / healthy_s,
        "all_s": all_s,
        "retried_jobs": len(flaky),
    }


async def spike(boot: str, tmp: Path, n: int) -> dict[str, float]:
    topic = "bench.spike"
    config = KafkaConfig(bootstrap=boot, client_id="bench-spike")
    await ensure_topics(config, {topic: 3})
    store = JobStore(f"sqlite:///{tmp / 'spike.db'}")
    store.create_schema()
    store.heartbeat(
        "w1", [{"name": "identity", "version": "1", "provider": "cpu", "jobs_per_s": "50"}]
    )
    depth = KafkaDepth(config, topic, "bench-spike-g")
    await depth.start()
    monitor = BacklogMonitor(
        store,
        depth=depth,
        registry=CollectorRegistry(),
        ttl_s=0.0,
        policy=AutoscalePolicy(target_drain_s=10, max_workers=64),
    )
    before = (await monitor.current()).signal
    assert before is not None
    publisher = KafkaPublisher(config)
    await publisher.start()
    t0 = time.perf_counter()
    await publisher.publish_many(topic, _events(n, None, "spike"))
    published = time.perf_counter() - t0
    while True:
        snap = await monitor.current()
        assert snap.signal is not None
        if snap.signal.desired_workers > before.desired_workers:
            break
    reacted = time.perf_counter() - t0
    await publisher.stop()
    await depth.stop()
    store.close()
    return {
        "spike": n,
        "publish_s": published,
        "signal_s": reacted,
        "desired_before": before.desired_workers,
        "desired_after": snap.signal.desired_workers,
    }


async def main_async(args: argparse.Namespace) -> None:
    models = Path(args.models).resolve()
    runs: dict[str, list[dict[str, float]]] = {"healthy": [], "mixed": []}
    with tempfile.TemporaryDirectory(prefix="inferq-bench-") as d:
        tmp = Path(d)
        broker = EmbeddedKafka(tmp / "kafka", free_port())
        broker.start()
        try:
            await drain(broker.bootstrap, tmp, models, 500, None, "warmup")
            for r in range(args.rounds):  # alternate, so drift on a shared machine hits both
                runs["healthy"].append(
                    await drain(broker.bootstrap, tmp, models, args.jobs, None, f"healthy{r}")
                )
                runs["mixed"].append(
                    await drain(broker.bootstrap, tmp, models, args.jobs, 20, f"mixed{r}")
                )
            base = sorted(runs["healthy"], key=lambda x: x["healthy_rate"])[args.rounds // 2]
            mixed = sorted(runs["mixed"], key=lambda x: x["healthy_rate"])[args.rounds // 2]
            sp = await spike(broker.bootstrap, tmp, 2000)
        finally:
            broker.stop()
    print(
        f"drain of {args.jobs} jobs published onto the topic, one worker, identity model "
        f"(ONNX Runtime, CPU); median of {args.rounds} alternating rounds"
    )
    print(
        f"  all healthy        : {base['healthy_jobs']} jobs in {base['healthy_s']:.2f}s "
        f"= {base['healthy_rate']:.0f} jobs/s"
    )
    print(
        f"  5% failing twice   : {mixed['healthy_jobs']} healthy jobs in "
        f"{mixed['healthy_s']:.2f}s = {mixed['healthy_rate']:.0f} jobs/s; the "
        f"{mixed['retried_jobs']} retried ones done after {mixed['all_s']:.2f}s"
    )
    print(
        f"  ratio healthy drain with/without failures: "
        f"{mixed['healthy_rate'] / base['healthy_rate']:.2f}"
    )
    print(
        "  every round (healthy jobs/s): healthy "
        + ", ".join(f"{x['healthy_rate']:.0f}" for x in runs["healthy"])
        + "; mixed "
        + ", ".join(f"{x['healthy_rate']:.0f}" for x in runs["mixed"])
    )
    print("backlog spike to autoscaling signal")
    print(
        f"  {sp['spike']} jobs published in {sp['publish_s'] * 1000:.0f} ms; desired workers "
        f"{sp['desired_before']} -> {sp['desired_after']} after {sp['signal_s'] * 1000:.0f} ms "
        "(from the start of the publish)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default=".inferq/test-models")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
