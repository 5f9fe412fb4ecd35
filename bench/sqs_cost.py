"""The worker's own CPU cost per 1,000 messages: SQS path against Kafka path, in one run.

For each transport the same number of identity-model jobs is published first (not measured),
then one in-process Worker runs them all to ``succeeded`` with a fresh SQLite store. Measured:
``time.process_time()`` of this process over that run, i.e. every thread of the worker (its
event loop, boto3 or aiokafka client, the store, ONNX Runtime), and nothing of the servers,
which are separate processes (noida-db; moto_server). Wall time is printed for completeness
only: on SQS it is the emulator's speed, not ours, and must not be read as throughput.

    python -m bench.sqs_cost [--messages 1000] [--models DIR] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from dlq.router import DeadLetterRouter
from jobstore.store import JobStore
from schemas.jobs import JobStatus
from transports.base import Consumer, Publisher
from transports.kafka import (
    EmbeddedKafka,
    KafkaConfig,
    KafkaConsumer,
    KafkaPublisher,
    Outgoing,
    ensure_topics,
)
from transports.local_process import free_port
from transports.sqs import LocalAws, SqsConfig, SqsConsumer, SqsPublisher, ensure_queues
from workers.adapters import load_model
from workers.loop import Worker, WorkerConfig
from workers.metrics import WorkerMetrics
from workers.repository import ModelRepository


@dataclass
class Sample:
    transport: str
    messages: int
    cpu_s: float
    wall_s: float

    @property
    def cpu_ms_per_1000(self) -> float:
        return self.cpu_s * 1000 / self.messages * 1000


def _event(i: int, prefix: str) -> bytes:
    return json.dumps(
        {
            "specversion": "1.0",
            "id": f"{prefix}-{i}",
            "source": "urn:bench",
            "type": "inferq.job.requested",
            "data": {"model": "identity", "input": {"tensor": [float(i), 1.0, 2.0, 3.0]}},
        }
    ).encode()


async def _measure(
    name: str,
    n: int,
    models_dir: Path,
    workdir: Path,
    consumer: Consumer,
    dlq_publisher: Publisher,
    dlq: str,
    fetch_timeout_s: float,
    redelivers: bool = False,
) -> Sample:
    repo = ModelRepository(models_dir)
    [config] = [c for c in repo.configs() if c.name == "identity"]
    model = load_model(repo, config, ["CPUExecutionProvider"], 1)
    store = JobStore(f"sqlite:///{workdir / f'{name}.db'}")
    store.create_schema()
    await dlq_publisher.start()
    worker = Worker(
        consumer=consumer,
        store=store,
        models={config.key: model},
        dead_letters=DeadLetterRouter(dlq_publisher, dlq),
        metrics=WorkerMetrics(CollectorRegistry()),
        config=WorkerConfig(
            worker_id=f"bench-{name}", fetch_timeout_s=fetch_timeout_s, redelivers=redelivers
        ),
    )
    stop = asyncio.Event()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    task = asyncio.create_task(worker.run(stop))
    try:
        # watching the worker's own counter: polling the store would bill the wait to the
        # worker, and the wait is longest on the emulator
        while worker.processed < n:
            if task.done():
                task.result()
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    succeeded = store.counts().get(JobStatus.SUCCEEDED, 0)
    if succeeded != n:
        raise RuntimeError(f"{name}: {succeeded} of {n} jobs succeeded")
    await dlq_publisher.stop()
    store.close()
    return Sample(name, n, cpu, wall)


async def _kafka(n: int, models_dir: Path, workdir: Path, prefix: str) -> Sample:
    broker = EmbeddedKafka(workdir / "kafka", free_port())
    await asyncio.to_thread(broker.start)
    try:
        config = KafkaConfig(bootstrap=broker.bootstrap, client_id="bench")
        topic = f"bench-{prefix}"
        await ensure_topics(config, {topic: 1, f"{topic}.dlq": 1})
        async with KafkaPublisher(config) as publisher:
            items = [Outgoing(_event(i, prefix), f"{prefix}-{i}".encode()) for i in range(n)]
            await publisher.publish_many(topic, items)
        return await _measure(
            "kafka",
            n,
            models_dir,
            workdir,
            KafkaConsumer(config, topic, "bench"),
            KafkaPublisher(config),
            f"{topic}.dlq",
            0.1,
        )
    finally:
        await asyncio.to_thread(broker.stop)


async def _sqs(n: int, models_dir: Path, workdir: Path, prefix: str) -> Sample:
    for key, value in (
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(key, value)
    server = LocalAws(workdir / "aws", free_port())
    await asyncio.to_thread(server.start)
    try:
        config = SqsConfig(endpoint_url=server.endpoint_url, wait_time_s=1)
        queue = f"bench-{prefix}"
        await ensure_queues(config, queue)
        async with SqsPublisher(config) as publisher:
            await _in_parallel(
                [functools.partial(publisher.publish, queue, _event(i, prefix)) for i in range(n)],
                8,
            )
        return await _measure(
            "sqs",
            n,
            models_dir,
            workdir,
            SqsConsumer(config, queue),
            SqsPublisher(config),
            f"{queue}-dlq",
            1.0,
            redelivers=True,  # SqsTransport's capabilities: nack, not the store's pump
        )
    finally:
        await asyncio.to_thread(server.stop)


async def _in_parallel(calls: list[Callable[[], Awaitable[None]]], width: int) -> None:
    gate = asyncio.Semaphore(width)

    async def one(call: Callable[[], Awaitable[None]]) -> None:
        async with gate:
            await call()

    await asyncio.gather(*(one(c) for c in calls))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per transport")
    parser.add_argument(
        "--models",
        default=os.environ.get("INFERQ_TEST_MODELS", ".inferq/test-models"),
        help="a model repository holding identity/1",
    )
    args = parser.parse_args(argv)
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="inferq-sqs-cost-") as tmp:
        for r in range(args.rounds):
            for runner in (_kafka, _sqs):
                workdir = Path(tmp) / f"{runner.__name__}-{r}"
                workdir.mkdir()
                sample = asyncio.run(runner(args.messages, Path(args.models), workdir, f"r{r}"))
                samples.append(sample)
                print(
                    f"round {r + 1} {sample.transport:5s}: {sample.messages} messages, "
                    f"worker CPU {sample.cpu_s * 1000:.0f} ms "
                    f"({sample.cpu_ms_per_1000:.0f} ms per 1,000), wall {sample.wall_s:.1f} s",
                    flush=True,
                )
    best = {
        t: min(s.cpu_ms_per_1000 for s in samples if s.transport == t) for t in ("kafka", "sqs")
    }
    print(
        f"worker CPU per 1,000 messages (best of {args.rounds}): "
        f"kafka {best['kafka']:.0f} ms, sqs {best['sqs']:.0f} ms, "
        f"sqs/kafka = {best['sqs'] / best['kafka']:.2f}x"
    )
    print("wall times on SQS are moto_server's speed, not inferq's: do not report them")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
