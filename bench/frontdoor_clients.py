"""The clients of the front-door benchmark, all asyncio in the benchmark process.

The HTTP clients are lanes: one keep-alive HTTP/1.1 connection each, on asyncio streams
with the requests written by hand. On a 2-core machine every ms of client CPU is taken from
the API and the worker, and httpx costs several ms per request here (one AsyncClient per
lane builds an SSL context each, a shared pool is scanned on every request): with 256
clients the client alone took ~15 ms of CPU per job. A lane costs a few tens of µs. The
1,000 held requests (``?wait`` and SSE) are raw sockets too.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from bench.harness import TERMINAL, BenchError

PREFER_WAIT_S = 30
RETRY_STATUSES = (429, 503)


def body(model: str, inp: dict[str, Any]) -> bytes:
    return json.dumps({"model": model, "input": inp}, separators=(",", ":")).encode()


def p50_ms(samples: Sequence[float]) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return 1000 * ordered[len(ordered) // 2]


@dataclass
class Answer:
    status_code: int
    headers: dict[str, str]
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")


class Lane:
    """One keep-alive HTTP/1.1 connection to the API; one request at a time."""

    def __init__(self, url: str, timeout_s: float = 120) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.timeout_s = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Answer:
        return await asyncio.wait_for(self._request(method, path, body, headers), self.timeout_s)

    async def _request(
        self, method: str, path: str, body: bytes, headers: dict[str, str] | None
    ) -> Answer:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        lines = [f"{method} {path} HTTP/1.1", f"host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body or method == "POST":
            lines.append(f"content-length: {len(body)}")
        self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        status_line = await self._reader.readline()
        if not status_line:
            raise BenchError(f"the API closed the connection on {method} {path}")
        raw = await self._reader.readuntil(b"\r\n\r\n")
        got: dict[str, str] = {}
        for line in raw.decode("latin-1").split("\r\n"):
            name, sep, value = line.partition(":")
            if sep:
                got[name.strip().lower()] = value.strip()
        if got.get("transfer-encoding", "").lower() == "chunked":
            content = await self._chunks()
        else:
            content = await self._reader.readexactly(int(got.get("content-length", "0")))
        if got.get("connection", "").lower() == "close":
            await self.close()
        return Answer(int(status_line.split()[1]), got, content)

    async def _chunks(self) -> bytes:
        assert self._reader is not None
        parts: list[bytes] = []
        while True:
            size = int((await self._reader.readline()).split(b";")[0], 16)
            if size == 0:
                await self._reader.readline()
                return b"".join(parts)
            parts.append(await self._reader.readexactly(size))
            await self._reader.readline()

    async def post_job(self, payload: bytes, headers: dict[str, str]) -> tuple[Answer, int]:
        """POST /v1/jobs until it is not refused for backpressure; (answer, retries)."""
        retries = 0
        while True:
            r = await self.request("POST", "/v1/jobs", payload, headers)
            if r.status_code not in RETRY_STATUSES:
                return r, retries
            retries += 1
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        self._reader = self._writer = None


async def _lanes(url: str, n: int) -> list[Lane]:
    """``n`` lanes, connected before any clock starts."""
    lanes = [Lane(url) for _ in range(n)]
    for lane in lanes:
        await lane.request("GET", "/healthz")
    return lanes


JSON = {"content-type": "application/json"}


# --- submit only ----------------------------------------------------------------------------


async def submit_only(url: str, bodies: Sequence[bytes], concurrency: int) -> dict[str, Any]:
    """POST every body, ``concurrency`` in flight; figures up to the last 202."""
    clients = await _lanes(url, concurrency)
    queue = iter(bodies)
    latencies: list[float] = []
    ids: list[str] = []
    retries = 0

    async def lane(client: Lane) -> None:
        nonlocal retries
        for payload in queue:
            t0 = time.perf_counter()
            r, n = await client.post_job(payload, JSON)
            retries += n
            if r.status_code != 202:
                raise BenchError(f"POST /v1/jobs answered {r.status_code}: {r.text[:300]}")
            latencies.append(time.perf_counter() - t0)
            ids.append(r.json()["id"])

    try:
        started = time.perf_counter()
        await asyncio.gather(*(lane(c) for c in clients))
        seconds = time.perf_counter() - started
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    return {
        "clients": concurrency,
        "jobs": len(bodies),
        "seconds": seconds,
        "per_s": len(bodies) / seconds,
        "p50_ms": p50_ms(latencies),
        "retries": retries,
        "ids": ids,
    }


# --- submit and wait ------------------------------------------------------------------------


@dataclass
class WaitTally:
    latencies: list[float] = field(default_factory=list)
    # per job answered by its POST: where its round trip went, ms each (see ``stages``)
    stages: list[tuple[float, ...]] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    answered_200: int = 0  # POST answered the terminal job itself (Prefer applied)
    fell_back: int = 0  # POST answered 202; the lane then waited with GET ?wait
    retries: int = 0


# a round trip's legs, from the job's own timestamps (same machine, same clock):
# request sent -> row written (created_at) -> claimed by a worker (started_at) -> outcome
# stored (completed_at) -> answer received
STAGES = ("to_created", "to_started", "to_completed", "to_answered")


def _stages(sent: float, job: dict[str, Any], received: float) -> tuple[float, ...]:
    marks = [sent, *(_epoch(job[k]) for k in ("created_at", "started_at", "completed_at"))]
    marks.append(received)
    return tuple(1000 * (b - a) for a, b in itertools.pairwise(marks))


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


async def _get_until_terminal(client: Lane, job_id: str, wait_s: float) -> str:
    while True:
        r = await client.request("GET", f"/v1/jobs/{job_id}?wait={wait_s:g}")
        if r.status_code != 200:
            raise BenchError(f"GET /v1/jobs/{job_id} answered {r.status_code}: {r.text[:300]}")
        status = str(r.json()["status"])
        if status in TERMINAL:
            return status


async def submit_and_wait(
    url: str, bodies: Sequence[bytes], concurrency: int, *, prefer: bool
) -> dict[str, Any]:
    """Each lane: POST (with ``Prefer: wait=30`` when ``prefer``) and, unless that answered
    the terminal job, ``GET ?wait=30`` until terminal; figures up to the last terminal."""
    headers = dict(JSON)
    if prefer:
        headers["prefer"] = f"wait={PREFER_WAIT_S}"
    clients = await _lanes(url, concurrency)
    queue = iter(bodies)
    tally = WaitTally()

    async def lane(client: Lane) -> None:
        for payload in queue:
            t0, sent = time.perf_counter(), time.time()
            r, n = await client.post_job(payload, headers)
            tally.retries += n
            if r.status_code == 200 and r.json().get("status") in TERMINAL:
                tally.answered_200 += 1
                tally.stages.append(_stages(sent, r.json(), time.time()))
                status = str(r.json()["status"])
            elif r.status_code == 202:
                tally.fell_back += 1 if prefer else 0
                status = await _get_until_terminal(client, r.json()["id"], PREFER_WAIT_S)
            else:
                raise BenchError(f"POST /v1/jobs answered {r.status_code}: {r.text[:300]}")
            tally.statuses[status] += 1
            tally.latencies.append(time.perf_counter() - t0)

    try:
        started = time.perf_counter()
        await asyncio.gather(*(lane(c) for c in clients))
        seconds = time.perf_counter() - started
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    out: dict[str, Any] = {
        "clients": concurrency,
        "jobs": len(bodies),
        "seconds": seconds,
        "per_s": len(bodies) / seconds,
        "p50_ms": p50_ms(tally.latencies),
        "statuses": dict(tally.statuses),
        "retries": tally.retries,
    }
    if tally.stages:
        out["stages_p50_ms"] = {
            name: p50_ms([s[i] / 1000 for s in tally.stages]) for i, name in enumerate(STAGES)
        }
    if prefer:
        out["prefer_answered_200"] = tally.answered_200
        out["prefer_fell_back_to_get_wait"] = tally.fell_back
        out["prefer_supported"] = tally.answered_200 > 0
    return out


async def one_at_a_time(url: str, bodies: Sequence[bytes], wait_s: float) -> dict[str, Any]:
    """Sequential jobs: POST with ``Prefer: wait`` (a 202 falls back to ``GET ?wait``);
    seconds from the POST to the terminal job in hand, per job."""
    headers = {**JSON, "prefer": f"wait={int(wait_s)}"}
    samples: list[float] = []
    fell_back = 0
    statuses: Counter[str] = Counter()
    stages: list[tuple[float, ...]] = []
    client = Lane(url, timeout_s=wait_s + 30)
    try:
        for payload in bodies:
            t0, sent = time.perf_counter(), time.time()
            r = await client.request("POST", "/v1/jobs", payload, headers)
            if r.status_code == 202:
                fell_back += 1
                status = await _get_until_terminal(client, r.json()["id"], wait_s)
            elif r.status_code == 200:
                status = str(r.json()["status"])
                stages.append(_stages(sent, r.json(), time.time()))
            else:
                raise BenchError(f"POST /v1/jobs answered {r.status_code}: {r.text[:300]}")
            samples.append(time.perf_counter() - t0)
            statuses[status] += 1
    finally:
        await client.close()
    legs = {n: p50_ms([s[i] / 1000 for s in stages]) for i, n in enumerate(STAGES)}
    return {
        "samples": samples,
        "fell_back": fell_back,
        "statuses": dict(statuses),
        "stages_p50_ms": legs if stages else None,
    }


async def post_latencies(url: str, payload: bytes, n: int, budget_s: float = 60) -> list[float]:
    """Up to ``n`` sequential POSTs (no waiting) from one lane, stopping after ``budget_s``:
    seconds each."""
    out: list[float] = []
    deadline = time.monotonic() + budget_s
    client = Lane(url)
    try:
        await client.request("GET", "/healthz")  # connected before the first sample
        while len(out) < n and time.monotonic() < deadline:
            t0 = time.perf_counter()
            r, _n = await client.post_job(payload, JSON)
            if r.status_code != 202:
                raise BenchError(f"POST /v1/jobs answered {r.status_code}: {r.text[:300]}")
            out.append(time.perf_counter() - t0)
    finally:
        await client.close()
    return out


# --- straight onto the topic ----------------------------------------------------------------


async def publish_direct(
    bootstrap: str, topic: str, requests: Sequence[dict[str, Any]]
) -> tuple[float, float]:
    """One CloudEvent per request, binary mode as ``transports.kafka`` encodes it, keyed by
    job id; (started, all acknowledged) perf_counter times."""
    from aiokafka import AIOKafkaProducer

    from schemas.envelope import new_envelope
    from schemas.jobs import JobRequest
    from transports.transport import encode_event

    run = uuid.uuid4().hex[:8]
    messages = []
    for i, request in enumerate(requests):
        job_id = f"bench-{run}-{i}"
        value, headers = encode_event(
            new_envelope(job_id, JobRequest.model_validate(request), "//bench"), structured=False
        )
        messages.append((job_id.encode(), value, list(headers)))
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        started = time.perf_counter()
        acks = [await producer.send(topic, v, key=k, headers=h) for k, v, h in messages]
        await asyncio.gather(*acks)
        return started, time.perf_counter()
    finally:
        await producer.stop()


# --- held requests: ?wait and SSE -----------------------------------------------------------


class Held:
    """Requests held open on raw sockets; each finishes when the server answers (``?wait``)
    or ends the stream (SSE). ``opened`` counts those the server had started to answer
    (SSE: its headers and first event came), ``refused`` those answered other than 200."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.tasks: list[asyncio.Task[int]] = []
        self.opened = 0
        self.statuses: Counter[int] = Counter()

    async def _one(self, path: str, sse: bool, started: asyncio.Event | None) -> int:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        accept = "text/event-stream" if sse else "application/json"
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\nAccept: {accept}\r\n\r\n".encode()
        )
        await writer.drain()
        if started is not None:
            started.set()
        try:
            status_line = await reader.readline()
            status = int(status_line.split()[1]) if status_line else 0
            self.statuses[status] += 1
            if sse and status == 200:
                await reader.readuntil(b"\r\n\r\n")  # the headers
                # the first bytes of the body (the first event, however framed: chunked,
                # LF or CRLF lines): the stream is live
                if await reader.read(65536):
                    self.opened += 1
            while await reader.read(65536):  # until the server ends it
                pass
            return status
        finally:
            writer.close()

    async def open(self, paths: Sequence[str], *, sse: bool, burst: int = 100) -> None:
        """Open one held request per path, ``burst`` connections at a time (the listen
        backlog is finite); return once every request is written."""
        for start in range(0, len(paths), burst):
            events = []
            for path in paths[start : start + burst]:
                ev = asyncio.Event()
                events.append(ev)
                self.tasks.append(asyncio.create_task(self._one(path, sse, ev)))
            await asyncio.gather(*(e.wait() for e in events))

    async def settle_sse(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.opened + sum(n for s, n in self.statuses.items() if s != 200) < count:
            if time.monotonic() > deadline:
                raise BenchError(f"only {self.opened} of {count} SSE streams opened")
            await asyncio.sleep(0.05)

    async def finish(self, timeout_s: float) -> Counter[int]:
        done, pending = await asyncio.wait(self.tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        answers: Counter[int] = Counter()
        for task in done:
            answers[task.result() if not task.exception() else -1] += 1
        if pending:
            answers[0] += len(pending)  # still held at the end: cut here
        return answers
