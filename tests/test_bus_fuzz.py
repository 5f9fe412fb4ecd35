"""Bus fuzz: random and adversarial CloudEvents, published with confluent-kafka (librdkafka, a
client inferq did not write) onto a topic that a real worker on PostgreSQL consumes.

Every message must end up run once or dead-lettered with a reason, and a good job published
afterwards on each partition must succeed. Outcomes are read from outside only: job rows via
GET /v1/jobs/{id} on a real API process, dead letters from ``<topic>.dlq`` (a confluent-kafka
Consumer) and from GET /v1/dlq.

The shapes come from a seeded generator (INFERQ_FUZZ_SEED, default below) so that a failure
is replayable: the seed and every message's case name are in the failure message.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.bus_client import (
    STRUCTURED,
    Headers,
    Message,
    Stored,
    binary_headers,
    job_event,
    publish,
    read_all,
)
from tests.fixtures_servers import fresh_database
from tests.procs import Stack, wait_for
from transports.kafka import EmbeddedKafka

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

SEED = int(os.environ.get("INFERQ_FUZZ_SEED", "20261202"))
# for diagnosis only: leave out cases whose name starts with one of these (comma-separated),
# e.g. to see what else fails once a crash-looping shape is out of the way
EXCLUDE = tuple(x for x in os.environ.get("INFERQ_FUZZ_EXCLUDE", "").split(",") if x)
N_CASES = 200
PARTITIONS = 3  # the `topic` fixture's partition count
# the poison's value is this many bytes: it fits under noida-db's ~1 MiB limit, but its
# dead-letter copy (the same value plus the reason headers) may not
OVERSIZE_BYTES = 1_048_000


class Want(Enum):
    RUN = "run"  # succeeds, attempts 1, the expected result; no dead letter for it
    DEAD = "dead"  # a dead letter with a reason; its row (if its id is readable) is failed
    DUP = "dup"  # a second copy of an earlier RUN message: no dead letter, ran once
    EITHER = "either"  # RUN or DEAD, exactly one of them, never left queued/running


@dataclass
class Case:
    seq: int
    name: str
    want: Want
    message: Message
    job_id: str | None = None  # a valid id to GET, when the case has one
    result: dict[str, Any] | None = None  # the result a RUN must have (None: any)
    metadata: Any = None  # echoed back when it runs
    row_must_stay: dict[str, Any] | None = None  # reused id: the first request's result
    position: str = ""  # partition@offset once published


def _tensor(rng: random.Random) -> list[float]:
    return [float(rng.randint(-1000, 1000)) / 4 for _ in range(rng.randint(1, 6))]


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.randint(-(2**31), 2**31)
    if kind == 1:
        return rng.choice([True, False, None, 0.5, -1e10])
    if kind in (2, 3):
        alphabet = "abc xyz éü中文🙂\t\n\"\\/'<>&"
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
    if kind in (4, 5):
        return {f"k{i}{rng.choice('aé中')}": _random_json(rng, depth + 1) for i in range(3)}
    return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]


def _deep(levels: int) -> dict[str, Any]:
    node: dict[str, Any] = {"leaf": 1}
    for _ in range(levels):
        node = {"d": node}
    return node


class Fuzz:
    """Builds the cases: each one message, or two for duplicates and reused ids."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.cases: list[Case] = []

    def _id(self) -> str:
        return f"fz{len(self.cases):04d}-{self.rng.randrange(16**6):06x}"

    def add(self, name: str, want: Want, message: Message, **kw: Any) -> Case:
        if name.startswith(EXCLUDE) and EXCLUDE:
            return Case(-1, name, want, message, **kw)  # built, not kept
        case = Case(len(self.cases), name, want, message, **kw)
        self.cases.append(case)
        return case

    def good(self, partition: int, mode: str | None = None) -> Case:
        rng = self.rng
        job_id = self._id()
        tensor = _tensor(rng)
        metadata = _random_json(rng) if rng.random() < 0.5 else None
        data: dict[str, Any] = {"model": "identity", "input": {"tensor": tensor}}
        if isinstance(metadata, dict):
            data["metadata"] = metadata
        else:
            metadata = None
        mode = mode or rng.choice(["binary", "structured"])
        if mode == "binary":
            msg = Message(
                json.dumps(data).encode(),
                job_id.encode(),
                binary_headers(job_id),
                partition,
            )
        else:
            msg = Message(job_event(job_id, data), job_id.encode(), list(STRUCTURED), partition)
        return self.add(
            f"good-{mode}",
            Want.RUN,
            msg,
            job_id=job_id,
            result={"tensor": tensor},
            metadata=metadata,
        )

    def build(self, n: int) -> list[Case]:
        rng = self.rng
        builders = [
            (20, self._good),
            (3, self._minilm),
            (6, self._exact_duplicate),
            (6, self._reused_id),
            (5, self._garbage),
            (4, self._tombstone),
            (3, self._not_an_object),
            (10, self._bad_headers),
            (4, self._unknown_model),
            (5, self._invalid_input),
            (5, self._nul),
            (4, self._surrogate),
            (3, self._deep_metadata),
            (5, self._mutated_structured),
        ]
        weights = [w for w, _ in builders]
        while len(self.cases) < n:
            (_, build) = rng.choices(builders, weights)[0]
            build(rng.randrange(PARTITIONS))
        # two oversize poison messages, on different partitions, in the middle of the run
        for partition in (0, 1):
            self._oversize(partition, rng.randrange(len(self.cases)))
        return self.cases

    # -- the shapes ------------------------------------------------------------------------

    def _good(self, p: int) -> None:
        self.good(p)

    def _minilm(self, p: int) -> None:
        job_id = self._id()
        data = {"model": "minilm", "input": {"text": f"fuzz sentence {self.rng.random()}"}}
        self.add(
            "good-minilm",
            Want.RUN,
            Message(job_event(job_id, data), job_id.encode(), list(STRUCTURED), p),
            job_id=job_id,
        )

    def _exact_duplicate(self, p: int) -> None:
        first = self.good(p)
        self.add("exact-duplicate", Want.DUP, first.message, job_id=first.job_id)

    def _reused_id(self, p: int) -> None:
        first = self.good(p, "structured")
        assert first.job_id is not None
        other = {"model": "identity", "input": {"tensor": [123456.0, *_tensor(self.rng)]}}
        if self.rng.random() < 0.5:
            msg = Message(
                json.dumps(other).encode(), b"x", binary_headers(first.job_id, "//other"), p
            )
        else:
            msg = Message(job_event(first.job_id, other, "//other"), b"x", list(STRUCTURED), p)
        self.add(
            "reused-id-other-content",
            Want.DEAD,
            msg,
            job_id=first.job_id,
            row_must_stay=first.result,
        )

    def _garbage(self, p: int) -> None:
        value = self.rng.randbytes(self.rng.randint(1, 300))
        self.add("garbage-bytes", Want.DEAD, Message(value, None, [], p))

    def _tombstone(self, p: int) -> None:
        job_id = self._id()
        headers: Headers = binary_headers(job_id) if self.rng.random() < 0.5 else []
        self.add(
            "tombstone",
            Want.DEAD,
            Message(None, job_id.encode(), headers, p),
            job_id=job_id if headers else None,
        )

    def _not_an_object(self, p: int) -> None:
        value = self.rng.choice([b"[1, 2, 3]", b'"a string"', b"42", b"null", b"{", b"{}"])
        self.add("structured-not-an-event", Want.DEAD, Message(value, None, list(STRUCTURED), p))

    def _bad_headers(self, p: int) -> None:
        rng = self.rng
        job_id = self._id()
        data = json.dumps({"model": "identity", "input": {"tensor": [1.0]}}).encode()
        headers = dict(binary_headers(job_id))
        variant = rng.choice(
            [
                "specversion-2",
                "wrong-type",
                "no-source",
                "no-type",
                "non-utf8-id",
                "non-utf8-source",
                "bad-id-chars",
                "id-too-long",
                "empty-id",
                "bad-time",
                "value-not-json",
                "value-not-utf8",
            ]
        )
        readable_id: str | None = job_id
        value: bytes | None = data
        if variant == "specversion-2":
            headers["ce_specversion"] = b"2.0"
        elif variant == "wrong-type":
            headers["ce_type"] = b"com.example.other"
        elif variant == "no-source":
            del headers["ce_source"]
        elif variant == "no-type":
            del headers["ce_type"]
        elif variant == "non-utf8-id":
            headers["ce_id"], readable_id = b"\xff\xfe\xfd", None
        elif variant == "non-utf8-source":
            headers["ce_source"] = b"//\xc3\x28"
        elif variant == "bad-id-chars":
            headers["ce_id"], readable_id = b"has space/and slash", None
        elif variant == "id-too-long":
            headers["ce_id"], readable_id = b"L" * 300, None
        elif variant == "empty-id":
            headers["ce_id"], readable_id = b"", None
        elif variant == "bad-time":
            headers["ce_time"] = b"yesterday-ish"
        elif variant == "value-not-json":
            value = b"{not json"
        else:
            value = b'{"model": "identity", "input": {"tensor": [1.0]}, "x": "\xff"}'
        self.add(
            f"bad-header-{variant}",
            Want.DEAD,
            Message(value, job_id.encode(), list(headers.items()), p),
            job_id=readable_id,
        )

    def _unknown_model(self, p: int) -> None:
        job_id = self._id()
        data = {"model": self.rng.choice(["nope", "minilm-9000"]), "input": {"tensor": [1.0]}}
        if self.rng.random() < 0.5:
            data = {"model": "identity", "version": "77", "input": {"tensor": [1.0]}}
        self.add(
            "unknown-model-or-version",
            Want.DEAD,
            Message(job_event(job_id, data), job_id.encode(), list(STRUCTURED), p),
            job_id=job_id,
        )

    def _invalid_input(self, p: int) -> None:
        job_id = self._id()
        data: dict[str, Any] = self.rng.choice(
            [
                {"model": "identity", "input": {"text": "not a tensor"}},
                {"model": "identity", "input": {"tensor": []}},
                {"model": "identity", "input": {"tensor": ["a"]}},
                {"model": "identity", "input": {"tensor": [1.0]}, "priority": 42},
                {"model": "identity", "input": {"tensor": [1.0]}, "surprise": True},
                {"model": "minilm", "input": {"text": 5}},
                {"model": "identity"},
            ]
        )
        binary = self.rng.random() < 0.5
        msg = (
            Message(json.dumps(data).encode(), job_id.encode(), binary_headers(job_id), p)
            if binary
            else Message(job_event(job_id, data), job_id.encode(), list(STRUCTURED), p)
        )
        self.add("invalid-input", Want.DEAD, msg, job_id=job_id)

    def _either(self, name: str, p: int, data: dict[str, Any], binary: bool) -> None:
        job_id = self._id()
        msg = (
            Message(json.dumps(data).encode(), job_id.encode(), binary_headers(job_id), p)
            if binary
            else Message(job_event(job_id, data), job_id.encode(), list(STRUCTURED), p)
        )
        result = {"tensor": data["input"]["tensor"]} if data["model"] == "identity" else None
        # NUL, lone surrogates and deep metadata break the request contract (schemas.storable),
        # over the bus as over HTTP: dead-lettered as invalid_input, never run
        self.add(name, Want.DEAD, msg, job_id=job_id, result=result)

    def _nul(self, p: int) -> None:
        where = self.rng.choice(["metadata", "text", "metadata-key"])
        if where == "text":
            data: dict[str, Any] = {"model": "minilm", "input": {"text": "a\u0000b"}}
        elif where == "metadata":
            data = {"model": "identity", "input": {"tensor": [1.0]}, "metadata": {"n": "a\u0000b"}}
        else:
            data = {"model": "identity", "input": {"tensor": [2.0]}, "metadata": {"a\u0000b": 1}}
        self._either(f"nul-in-{where}", p, data, self.rng.random() < 0.5)

    def _surrogate(self, p: int) -> None:
        lone = self.rng.choice(["\ud800", "\udfff", "x\udc00y"])
        data = {"model": "identity", "input": {"tensor": [3.0]}, "metadata": {"s": lone}}
        self._either("lone-surrogate-in-metadata", p, data, self.rng.random() < 0.5)

    def _deep_metadata(self, p: int) -> None:
        data = {"model": "identity", "input": {"tensor": [4.0]}, "metadata": _deep(300)}
        self._either("metadata-300-deep", p, data, self.rng.random() < 0.5)

    def _mutated_structured(self, p: int) -> None:
        job_id = self._id()
        event: dict[str, Any] = json.loads(
            job_event(job_id, {"model": "identity", "input": {"tensor": [5.0]}})
        )
        variant = self.rng.choice(
            ["id-int", "no-data", "no-specversion", "data-string", "extension", "base64"]
        )
        want = Want.DEAD
        if variant == "id-int":
            event["id"] = 12345
        elif variant == "no-data":
            del event["data"]
        elif variant == "no-specversion":
            del event["specversion"]
        elif variant == "data-string":
            event["data"] = json.dumps(event["data"])
        elif variant == "base64":
            del event["data"]
            event["data_base64"] = "eyJtb2RlbCI6ICJpZGVudGl0eSJ9"
        else:
            event["inferqtrace"] = "abc"  # a CloudEvents extension attribute: fine
            want = Want.RUN
        self.add(
            f"structured-{variant}",
            want,
            Message(json.dumps(event).encode(), job_id.encode(), list(STRUCTURED), p),
            job_id=job_id if variant != "id-int" else None,
            result={"tensor": [5.0]} if want is Want.RUN else None,
        )

    def _oversize(self, p: int, at: int) -> None:
        """A message that the broker takes (value + headers just under its limit) and that
        is poison (its input is not a tensor): its dead-letter copy, with the reason headers
        added, no longer fits as it is."""
        if EXCLUDE and "oversize-poison".startswith(EXCLUDE):
            return
        job_id = f"fzbig-{p}-{self.rng.randrange(16**6):06x}"
        data: dict[str, Any] = {"model": "identity", "input": {"tensor": [""]}}
        trace: Headers = [("x-trace", b"t" * 250)]
        binary = p % 2 == 0
        if binary:
            headers, overhead = binary_headers(job_id) + trace, len(json.dumps(data))
        else:
            headers, overhead = list(STRUCTURED) + trace, len(job_event(job_id, data))
        data["input"]["tensor"] = ["x" * (OVERSIZE_BYTES - overhead)]
        value = json.dumps(data).encode() if binary else job_event(job_id, data)
        assert len(value) == OVERSIZE_BYTES
        case = Case(
            -1,
            f"oversize-poison-{'binary' if binary else 'structured'}",
            Want.DEAD,
            Message(value, job_id.encode(), headers, p),
            job_id=job_id,
        )
        self.cases.insert(at, case)
        for i, c in enumerate(self.cases):
            c.seq = i


@pytest.fixture
def fuzz_database(postgres_url: str) -> Iterator[str]:
    """A fresh database on the shared PostgreSQL, dropped afterwards."""
    with fresh_database(postgres_url, "inferq_fuzz") as url:
        yield url


@dataclass
class Supervisor:
    """Restarts the worker when it dies, as a process supervisor would; counts the deaths."""

    stack: Stack
    proc: Any = None
    deaths: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.proc = self.stack.worker("worker-1")

    def check(self) -> None:
        if self.proc.poll() is not None:
            self.deaths.append(self.proc.returncode)
            if len(self.deaths) <= 3:
                self.start()


def _dead_letter_positions(letters: list[Stored], topic: str) -> dict[str, list[Stored]]:
    out: dict[str, list[Stored]] = {}
    for m in letters:
        origin = m.headers.get("inferq-dlq-origin", b"").decode(errors="replace")
        position = m.headers.get("inferq-dlq-position", b"").decode(errors="replace")
        if origin == topic:
            out.setdefault(position, []).append(m)
    return out


def _last_errors(stack: Stack) -> str:
    """The last error line of every worker log (a crash loop shows one log per restart)."""
    out = []
    for path in sorted(stack.data_dir.glob("worker-*.log")):
        lines = path.read_text(errors="replace").splitlines()
        errors = [ln for ln in lines if ln and not ln.startswith((" ", "\t")) and "Error" in ln]
        out.append(f"{path.name}: {errors[-1][:400] if errors else '(no error)'}")
    return "\n".join(out)


@pytest.mark.timeout(300)
def test_bus_fuzz_every_message_runs_once_or_is_dead_lettered(
    tmp_path: Path,
    kafka_broker: EmbeddedKafka,
    topic: str,
    model_repo: Path,
    fuzz_database: str,
) -> None:
    cases = Fuzz(SEED).build(N_CASES)
    stack = Stack(tmp_path, kafka_broker.bootstrap, topic, model_repo, database_url=fuzz_database)
    try:
        _, url = stack.api()
        worker = Supervisor(stack)
        worker.start()
        positions = publish(kafka_broker.bootstrap, topic, [c.message for c in cases])
        for case, (partition, offset) in zip(cases, positions, strict=True):
            assert partition == case.message.partition
            case.position = f"{partition}@{offset}"
        fz = Fuzz(SEED + 1)
        canaries = [fz.good(p, "binary") for p in range(PARTITIONS)]
        publish(kafka_broker.bootstrap, topic, [c.message for c in canaries])
        started = time.monotonic()
        problems: list[str] = []
        with httpx.Client(base_url=url, timeout=30) as client:

            def canaries_done() -> bool:
                worker.check()
                for c in canaries:
                    r = client.get(f"/v1/jobs/{c.job_id}")
                    if r.status_code != 200 or r.json()["status"] != "succeeded":
                        return False
                return True

            try:
                wait_for(canaries_done, 90, "a good job on every partition", interval=0.25)
            except AssertionError as exc:
                stuck = [
                    (c.message.partition, client.get(f"/v1/jobs/{c.job_id}").json())
                    for c in canaries
                ]
                problems.append(f"{exc}: {stuck}")
            drained_s = time.monotonic() - started
            worker.check()

            want_dead = sum(1 for c in cases if c.want is Want.DEAD)
            letters = read_all(kafka_broker.bootstrap, f"{topic}.dlq", expect=want_dead, timeout=30)
            by_position = _dead_letter_positions(letters, topic)
            listed = client.get("/v1/dlq", params={"limit": 1000}).json()["data"]
            api_positions = Counter(d["position"] for d in listed if d["origin"] == topic)
            jobs: dict[str, httpx.Response | None] = {}
            for c in cases + canaries:
                if c.job_id is None or c.job_id in jobs:
                    continue
                try:
                    try:
                        jobs[c.job_id] = client.get(f"/v1/jobs/{c.job_id}")
                    except httpx.ReadError:  # a connection the server dropped after a 500
                        jobs[c.job_id] = client.get(f"/v1/jobs/{c.job_id}")
                except httpx.HTTPError as exc:  # a GET must answer, whatever the job holds
                    jobs[c.job_id] = None
                    problems.append(f"#{c.seq} {c.name}: GET /v1/jobs/{c.job_id} failed: {exc!r}")
            for job_id, r in jobs.items():
                if r is not None and r.status_code >= 500:
                    problems.append(
                        f"GET /v1/jobs/{job_id} answered {r.status_code}: {r.text[:200]}"
                    )
            ghosts = [
                j["id"]
                for status in ("queued", "running")
                for j in client.get("/v1/jobs", params={"status": status, "limit": 500}).json()[
                    "data"
                ]
            ]

        def job(c: Case) -> dict[str, Any] | None:
            r = jobs.get(c.job_id) if c.job_id else None
            return r.json() if r is not None and r.status_code == 200 else None

        def ran_once(c: Case, j: dict[str, Any] | None) -> str | None:
            if j is None:
                return "no job row"
            if j["status"] != "succeeded":
                return f"status {j['status']} {j.get('error')}"
            if j["attempts"] != 1:
                return f"attempts {j['attempts']}"
            if c.result is not None and j["result"] != c.result:
                return f"result {j['result']!r} != {c.result!r}"
            if (
                c.result is None
                and c.name == "good-minilm"
                and len(j["result"]["embedding"]) != 384
            ):
                return "not an embedding"
            if c.metadata is not None and j["metadata"] != c.metadata:
                return "metadata not echoed back"
            return None

        def dead_lettered(c: Case) -> str | None:
            found = by_position.get(c.position, [])
            if len(found) != 1:
                return f"{len(found)} dead letters on {topic}.dlq"
            if not found[0].headers.get("inferq-dlq-code"):
                return "a dead letter without a reason"
            if api_positions[c.position] != 1:
                return f"{api_positions[c.position]} entries in /v1/dlq"
            return None

        for c in cases + canaries:
            label = f"#{c.seq} {c.name} ({c.want.value}, {c.position}, id {c.job_id})"
            j = job(c)
            if c.want in (Want.RUN, Want.DUP):
                why = ran_once(c, j)
                if why:
                    problems.append(f"{label}: did not run once: {why}")
                if by_position.get(c.position):
                    problems.append(f"{label}: dead-lettered but should have run")
            elif c.want is Want.DEAD:
                why = dead_lettered(c)
                if why:
                    problems.append(f"{label}: not dead-lettered once: {why}")
                if c.row_must_stay is not None:
                    if j is None or j["status"] != "succeeded" or j["result"] != c.row_must_stay:
                        problems.append(f"{label}: the first request's result did not stay: {j}")
                elif j is not None and j["status"] != "failed":
                    problems.append(f"{label}: its row is {j['status']}, not failed")
            else:  # EITHER
                ran, dead = ran_once(c, j), dead_lettered(c)
                if ran is not None and dead is not None:
                    problems.append(f"{label}: neither ran once ({ran}) nor dead-lettered ({dead})")
                if ran is None and dead is None:
                    problems.append(f"{label}: ran AND was dead-lettered")
                if j is not None and j["status"] in ("queued", "running"):
                    problems.append(f"{label}: left {j['status']}")
        strays = set(by_position) - {c.position for c in cases}
        if strays:
            problems.append(f"dead letters for positions never published: {sorted(strays)[:5]}")
        if ghosts:
            problems.append(f"{len(ghosts)} jobs left queued/running: {ghosts[:8]}")
        if worker.deaths:
            problems.append(f"the worker died {len(worker.deaths)} times: {worker.deaths}")
        kinds = Counter(f"{c.name}:{c.want.value}" for c in cases)
        failing = Counter(line.split(" ")[1] for line in problems if line.startswith("#"))
        print(
            f"\n[fuzz] seed {SEED}: {len(cases)} messages "
            f"({sum(1 for c in cases if c.want is Want.DEAD)} poison), "
            f"{len(letters)} dead letters, drained in {drained_s:.1f}s; kinds {dict(kinds)}"
        )
        assert not problems, (
            f"seed {SEED}: {len(problems)} problems; failing cases by shape {dict(failing)}\n"
            + "\n".join(problems[:40])
            + "\n--- the last error line of each worker log (one log per start):\n"
            + _last_errors(stack)
        )
    finally:
        stack.stop_all()
