"""Faults against real processes, each followed by one consistency check (0 lost, 0 duplicated,
every accepted job terminal) and a measured recovery time: the time from the fault's end to the
first job completing again (for webhooks: the first verified delivery).

- the broker killed with -9 and restarted, while clients keep POSTing to a real API;
- PostgreSQL (a throwaway server of this test's own) stopped and started under a worker;
- the worker killed with -9 five times in a row;
- Redis (a throwaway server of this test's own) stopped during webhook delivery.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from dlq.store import DeadLetterStore
from jobstore.store import JobStore
from schemas.jobs import JobStatus
from tests.bus_client import STRUCTURED, Message, job_event, publish
from tests.consistency import (
    assert_consistent,
    job_consistency,
    measure_recovery,
    now,
    webhook_consistency,
)
from tests.local_servers import LocalPostgres, LocalRedis
from tests.procs import Stack, free_port, wait_for
from tests.test_webhooks_celery import Control
from tests.webhook_receiver import Receiver
from transports.kafka import EmbeddedKafka, KafkaConfig, ensure_topics
from webhooks.signing import generate_secret

pytestmark = pytest.mark.slow


def _say(what: str) -> None:
    """Recovery figures go to the terminal even without -s (and into the junit properties)."""
    print(f"\n[fault] {what}", flush=True)


def _sqlite_store(stack: Stack) -> JobStore:
    store = JobStore(f"sqlite:///{stack.data_dir / 'jobs.db'}")
    store.create_schema()
    return store


def _count(store: JobStore, ids: list[str], status: JobStatus = JobStatus.SUCCEEDED) -> int:
    try:
        return sum(1 for r in store.get_many(ids).values() if r.status is status)
    except Exception:  # the store may be the thing that is down
        return -1


def _alive(proc: subprocess.Popen[bytes], stack: Stack, role: str) -> None:
    assert proc.poll() is None, f"the {role} exited ({proc.returncode})\n{stack.log(role)}"


@dataclass
class HttpClients:
    """Clients POSTing identity jobs as fast as the API answers; records every 202."""

    url: str
    batch: int = 0  # > 0: POST /v1/jobs/batch with this many jobs per request
    accepted: dict[str, list[float]] = field(default_factory=dict)  # id -> its input
    answers: dict[int, int] = field(default_factory=dict)  # status code -> count
    first_202_after: dict[str, float] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)
    _n: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self, threads: int = 2) -> None:
        for _ in range(threads):
            t = threading.Thread(target=self._run, daemon=True)
            t.start()
            self._threads.append(t)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                with self._lock:
                    tensors = [[float(self._n + i + 1), 0.5] for i in range(max(self.batch, 1))]
                    self._n += len(tensors)
                jobs = [{"model": "identity", "input": {"tensor": t}} for t in tensors]
                try:
                    if self.batch:
                        r = client.post("/v1/jobs/batch", json={"jobs": jobs})
                    else:
                        r = client.post("/v1/jobs", json=jobs[0])
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.errors.append(type(exc).__name__)
                    time.sleep(0.05)
                    continue
                # a batch answers each job as a single submit would have been answered
                items = (
                    [(d["status"], d.get("job")) for d in r.json()["data"]]
                    if self.batch and r.status_code == 200
                    else [(r.status_code, r.json() if r.status_code == 202 else None)]
                )
                with self._lock:
                    for (status, job), tensor in zip(items, tensors, strict=False):
                        self.answers[status] = self.answers.get(status, 0) + 1
                        if status == 202:
                            self.accepted[job["id"]] = tensor
                if any(status >= 500 for status, _ in items):
                    time.sleep(0.05)
                time.sleep(0.01)

    def halt(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(40)

    def count(self) -> int:
        with self._lock:
            return len(self.accepted)


@pytest.mark.kafka
@pytest.mark.timeout(240)
# This test once lost jobs in 1 run of 5; three causes, each now fixed with its own test: the
# revoke hook's commit at generation -1 moved the group past the restored log end (noida-db
# loses ~1 s of acknowledged records on kill -9 and reuses their offsets); records the broker
# dropped after acking (the retry pump's stranded sweep republishes them); and an idle
# consumer that stopped fetching (tests/test_kafka_idle.py).
@pytest.mark.parametrize("batch", [0, 25], ids=["single", "bulk"])
def test_broker_kill_9_and_restart_loses_nothing(
    tmp_path: Path, model_repo: Path, record_property: Callable[[str, object], None], batch: int
) -> None:
    """With ``bulk``, clients submit 25 jobs per request: every job of a batch that the API
    accepted ends with one outcome, and an item answered 503 never runs."""
    broker = EmbeddedKafka(tmp_path / "broker", free_port())
    broker.start()
    topic = "fault.broker-kill"
    import asyncio

    asyncio.run(ensure_topics(KafkaConfig(broker.bootstrap), {topic: 3, f"{topic}.dlq": 1}))
    stack = Stack(tmp_path, broker.bootstrap, topic, model_repo)
    clients: HttpClients | None = None
    try:
        # noida-db keeps its log in memory and writes it out about once a second: a kill -9
        # loses the acknowledged records of the last second and hands their offsets out
        # again. What a consumer had not read by then is gone from the bus; the worker's
        # retry pump publishes such stranded jobs again (queued, unclaimed for
        # INFERQ_STRANDED_AFTER_S, no backlog), here after 2 x the publish timeout of 3 s
        timeouts = {"INFERQ_PUBLISH_TIMEOUT_S": "3", "INFERQ_STRANDED_AFTER_S": "6"}
        api, url = stack.api(**timeouts)
        worker = stack.worker("worker-1", **timeouts)
        store = _sqlite_store(stack)
        clients = HttpClients(url, batch=batch)
        clients.start()
        wait_for(lambda: clients.count() >= 60, 60, "jobs accepted before the kill")
        wait_for(
            lambda: _count(store, list(clients.accepted)) >= 30, 60, "progress before the kill"
        )
        broker.kill()  # SIGKILL
        killed_with = clients.count()
        time.sleep(3)
        broker.start()
        restarted = now()
        t0 = time.monotonic()
        # jobs published straight onto the bus after the restart: the worker's recovery is
        # measured even when the API's is not there
        direct = {f"bk-direct-{i}": [float(i), 9.0] for i in range(5)}
        publish(
            broker.bootstrap,
            topic,
            [
                Message(
                    job_event(i, {"model": "identity", "input": {"tensor": t}}),
                    key=i.encode(),
                    headers=STRUCTURED,
                )
                for i, t in direct.items()
            ],
        )

        def api_took_one() -> bool:
            _alive(api, stack, "api")
            return clients.count() > killed_with + 5

        api_problem: list[str] = []
        try:
            wait_for(api_took_one, 45, "the API to accept jobs again after the broker restart")
        except AssertionError as exc:  # still check what was accepted before the kill
            api_problem.append(
                f"{exc}: answers {clients.answers}, errors {clients.errors[-3:]}\n"
                f"{stack.log('api')[-1500:]}"
            )
        api_recovery = time.monotonic() - t0
        recovery = measure_recovery(
            store,
            [*clients.accepted, *direct],
            restarted,
            60,
            alive=lambda: _alive(worker, stack, "worker"),
        )
        if not api_problem:
            wait_for(lambda: clients.count() >= killed_with + 40, 60, "jobs after the restart")
        clients.halt()
        accepted = {**clients.accepted, **direct}
        ids = list(accepted)
        with contextlib.suppress(AssertionError):  # the check below names what is not
            wait_for(
                lambda: all(r.terminal for r in store.get_many(ids).values()),
                60,
                "every accepted job terminal",
            )
        report = job_consistency(
            store,
            ids,
            expected_results={i: {"tensor": t} for i, t in accepted.items()},
            max_attempts=2,
            refused_code="publish_unavailable",
            letters=DeadLetterStore(store.engine),
        )
        rescued = stack.log("worker").count("publishing them again")
        _say(
            f"broker kill -9 ({'bulk' if batch else 'single'} submits): first job completed "
            f"{recovery:.2f}s after the restart; the API "
            f"accepted again after {'never' if api_problem else f'{api_recovery:.2f}s'}; "
            f"{report.summary()}; "
            f"answers {clients.answers}; stranded-job rescues {rescued}"
        )
        record_property("recovery_s", round(recovery, 3))
        record_property("api_recovery_s", round(api_recovery, 3))
        assert_consistent(report, *api_problem, context=stack.log("worker"))
        store.close()
    finally:
        if clients is not None:
            clients.halt()
        stack.stop_all()
        broker.stop()


class BusPublisher:
    """Publishes identity jobs straight onto the topic in a thread (no store involved)."""

    def __init__(self, bootstrap: str, topic: str, prefix: str) -> None:
        self.bootstrap, self.topic, self.prefix = bootstrap, topic, prefix
        self.published: dict[str, list[float]] = {}
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        n = 0
        try:
            while not self.stop.is_set():
                batch = {}
                for _ in range(10):
                    n += 1
                    batch[f"{self.prefix}-{n:05d}"] = [float(n)]
                publish(
                    self.bootstrap,
                    self.topic,
                    [
                        Message(
                            job_event(i, {"model": "identity", "input": {"tensor": t}}),
                            key=i.encode(),
                            headers=STRUCTURED,
                        )
                        for i, t in batch.items()
                    ],
                )
                self.published.update(batch)
                time.sleep(0.05)
        except BaseException as exc:
            self.error = exc

    def halt(self) -> None:
        self.stop.set()
        self._thread.join(60)
        assert self.error is None, self.error


@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.timeout(200)
def test_postgres_stop_and_start_loses_nothing(
    tmp_path: Path,
    kafka_broker: EmbeddedKafka,
    topic: str,
    model_repo: Path,
    throwaway_postgres: LocalPostgres,
    record_property: Callable[[str, object], None],
) -> None:
    pg = throwaway_postgres
    stack = Stack(tmp_path, kafka_broker.bootstrap, topic, model_repo, database_url=pg.url)
    bus = BusPublisher(kafka_broker.bootstrap, topic, "pg")
    store = JobStore(pg.url)
    try:
        _, url = stack.api()
        worker = stack.worker("worker-1")
        bus.start()
        wait_for(lambda: _count(store, list(bus.published)) >= 50, 60, "progress before the stop")
        store.engine.dispose()
        pg.stop("fast")  # clients are disconnected; nothing listens on the port
        stopped_with = len(bus.published)
        down = time.monotonic()
        while time.monotonic() - down < 6:  # the worker meets the outage, not a blip
            assert worker.poll() is None, (
                f"the worker exited while PostgreSQL was down ({worker.returncode})\n"
                f"{stack.log('worker')}"
            )
            time.sleep(0.2)
        pg.start()
        restarted = now()
        recovery = measure_recovery(
            store,
            list(bus.published),
            restarted,
            60,
            alive=lambda: _alive(worker, stack, "worker"),
        )
        wait_for(lambda: len(bus.published) >= stopped_with + 60, 60, "more jobs published")
        bus.halt()
        ids = list(bus.published)
        wait_for(lambda: _count(store, ids) == len(ids), 90, "every published job succeeded")
        with httpx.Client(base_url=url, timeout=10) as client:  # seen from outside, too
            for job_id in ids[:: max(1, len(ids) // 10)]:
                job = client.get(f"/v1/jobs/{job_id}").json()
                assert job["status"] == "succeeded" and job["result"] == {
                    "tensor": bus.published[job_id]
                }, job
        report = job_consistency(
            store,
            ids,
            expected_results={i: {"tensor": t} for i, t in bus.published.items()},
            max_attempts=2,
            letters=DeadLetterStore(store.engine),
        )
        _say(
            f"PostgreSQL stop/start (down 6s): first job completed {recovery:.2f}s after the "
            f"start; {report.summary()}"
        )
        record_property("recovery_s", round(recovery, 3))
        assert_consistent(report, context=stack.log("worker"))
    finally:
        bus.stop.set()
        stack.stop_all()
        store.close()


def _minilm_jobs(bootstrap: str, topic: str, n: int, prefix: str) -> list[str]:
    ids = [f"{prefix}-{i:04d}" for i in range(n)]
    publish(
        bootstrap,
        topic,
        [
            Message(
                job_event(
                    job_id,
                    {"model": "minilm", "input": {"text": f"sentence number {i} of a long run"}},
                ),
                key=job_id.encode(),
                headers=STRUCTURED,
            )
            for i, job_id in enumerate(ids)
        ],
    )
    return ids


@pytest.mark.kafka
@pytest.mark.timeout(300)
def test_worker_kill_9_five_times_in_a_row_loses_nothing(
    tmp_path: Path,
    kafka_broker: EmbeddedKafka,
    topic: str,
    model_repo: Path,
    record_property: Callable[[str, object], None],
) -> None:
    stack = Stack(tmp_path, kafka_broker.bootstrap, topic, model_repo)
    try:
        # enough that the fifth kill still finds work: a restarted worker drains a backlog in
        # large batches (900 were all done before the fourth kill once, in CI)
        ids = _minilm_jobs(kafka_broker.bootstrap, topic, 2400, "k9x5")
        store = _sqlite_store(stack)
        worker = stack.worker("worker-1")
        recoveries: list[float] = []
        for kill in range(5):
            before = max(0, _count(store, ids))

            def progressed(w: subprocess.Popen[bytes] = worker, b: int = before) -> bool:
                _alive(w, stack, "worker")
                return _count(store, ids) >= b + 20

            wait_for(progressed, 90, f"progress before kill {kill + 1}", interval=0.02)
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
            assert _count(store, ids) < len(ids), f"all done before kill {kill + 1}"
            worker = stack.worker("worker-1")  # the same identity: static membership
            restarted = now()
            recoveries.append(
                measure_recovery(
                    store,
                    ids,
                    restarted,
                    90,
                    alive=lambda w=worker: _alive(w, stack, "worker"),  # type: ignore[misc]
                )
            )
        wait_for(lambda: _count(store, ids) == len(ids), 150, "every job after the fifth restart")
        report = job_consistency(store, ids, max_attempts=6, letters=DeadLetterStore(store.engine))
        records = store.get_many(ids).values()
        assert all(len(r.result["embedding"]) == 384 for r in records if r.result)
        rerun = sum(1 for r in records if r.attempts > 1)
        _say(
            "worker kill -9 x5: first job completed "
            + ", ".join(f"{s:.2f}s" for s in recoveries)
            + f" after each restart; {rerun} jobs were in flight at a kill; {report.summary()}"
        )
        record_property("recovery_s", [round(s, 3) for s in recoveries])
        assert_consistent(report, context=stack.log("worker"))
        assert rerun > 0, "no job was in flight at any kill: the test did not test a crash"
        store.close()
    finally:
        stack.stop_all()


@pytest.mark.redis
@pytest.mark.timeout(200)
def test_redis_stopped_during_webhook_delivery_loses_nothing(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    # Once an xfail (issue 8): `inferq control` exited when Redis went away while some tasks
    # were unacked and a BRPOP was outstanding; test_webhooks_celery.py's
    # test_redis_shutdown_with_deliveries_in_flight_keeps_control_running hits that moment
    # every time, this test only when the stop falls into it.
    redis_server = LocalRedis(tmp_path / "redis")
    redis_server.start()
    secret = generate_secret()
    hook = Receiver(secret, mode="slow", hang_s=0.2)  # deliveries stay in flight a while
    hook.start()
    control = Control(tmp_path, redis_server.url, secret)
    try:
        proc = control.start()
        ids = control.finish_jobs(hook.url, 80, prefix="rd")
        wait_for(lambda: hook.requests >= 8, 60, "deliveries in flight", interval=0.05)
        redis_server.stop()  # SIGTERM without persistence: its queues are gone
        time.sleep(4)
        assert proc.poll() is None, f"inferq control exited without Redis\n{control.log()}"
        redis_server.start()  # the same port, empty
        restarted = time.time()
        hook.mode = "ok"

        def first_after() -> bool:
            assert proc.poll() is None, control.log()
            return any(r.at >= restarted for r in hook.received)

        wait_for(first_after, 90, "a delivery after Redis came back", interval=0.05)
        recovery = min(r.at for r in hook.received if r.at >= restarted) - restarted

        def settled() -> bool:  # every event in, and every row delivered (or control died)
            if proc.poll() is not None:
                return True
            statuses = set(control.statuses(ids).values())
            return set(hook.ids_by_job()) >= set(ids) and statuses <= {"delivered"}

        with contextlib.suppress(AssertionError):  # the check below says what is missing
            wait_for(settled, 120, "every webhook", interval=0.2)
        assert proc.poll() is None, f"inferq control exited\n{control.log()}"
        report = job_consistency(control.store, ids)
        problems = webhook_consistency(control.outbox, list(hook.received), ids)
        assert hook.rejected == [], hook.rejected
        _say(
            f"Redis stop/start during delivery (down 4s): first delivery {recovery:.2f}s after "
            f"the start; {len(hook.received)} receipts for {len(ids)} events; "
            f"{'; '.join(problems) or 'webhooks consistent'}"
        )
        record_property("recovery_s", round(recovery, 3))
        assert_consistent(report, *problems, context=control.log())
    finally:
        control.stop()
        hook.stop()
        redis_server.stop()
