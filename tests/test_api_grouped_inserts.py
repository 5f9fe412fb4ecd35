"""Concurrent `POST /v1/jobs` requests share store transactions: the rows of requests that
arrive while a transaction is in flight are written together in the next one. Each request
still gets its own answer: a replay or an idempotency conflict only for its own key, a row
the database refuses fails only its own request, a store outage fails the requests of
that group with 503 (never a 202 for a row that was not written), and every 202 is a row
written and a message the broker acknowledged. On the in-memory bus, SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, event, text
from sqlalchemy.pool import NullPool

from jobstore.creation import Created
from jobstore.errors import StoreUnavailable
from jobstore.records import NewJob
from jobstore.store import JobStore
from producers.app import ApiConfig, ApiDeps, create_app
from schemas.envelope import decode_message
from tests.test_api import MODELS, TOPIC, Api
from transports.memory import MemoryBroker, MemoryPublisher

N = 64


class _OutageStore(JobStore):
    """A store whose database goes away for any transaction that would write a job whose
    text says ``outage`` (the transaction is rolled back: nothing of it is written)."""

    def create_many(self, jobs: Sequence[NewJob]) -> list[Created]:
        if any("outage" in str(j.input) for j in jobs):
            raise StoreUnavailable("job store unavailable: injected outage")
        return super().create_many(jobs)

    def create(self, job: NewJob) -> Any:
        if "outage" in str(job.input):
            raise StoreUnavailable("job store unavailable: injected outage")
        return super().create(job)


def _api(store: JobStore) -> tuple[httpx.AsyncClient, MemoryBroker]:
    broker = MemoryBroker()
    registry = CollectorRegistry()
    # the backlog read as served: cached for its default 0.25 s, not once per request
    config = ApiConfig(topic=TOPIC, publish_attempts=2, publish_timeout_s=2)
    app = create_app(
        ApiDeps(
            store=store,
            publisher=MemoryPublisher(broker),
            models=lambda: MODELS,
            config=config,
            registry=registry,
        )
    )
    # a 500 is an answer here, as a client sees it (not the exception re-raised in the test)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    client = httpx.AsyncClient(transport=transport, base_url="http://api")
    return client, broker


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str | None]]:
    """(url, schema): a SQLite file, or a PostgreSQL schema of this test's own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.db'}", None
        return
    url: str = request.getfixturevalue("postgres_url")
    schema = f"t_{uuid.uuid4().hex}"
    admin = create_engine(url, poolclass=NullPool)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        yield url, schema
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


@pytest.fixture
async def make_api(
    store_url: tuple[str, str | None],
) -> AsyncIterator[Callable[[type[JobStore]], Api]]:
    opened: list[tuple[httpx.AsyncClient, JobStore]] = []

    def make(kind: type[JobStore] = JobStore) -> Api:
        url, schema = store_url
        store = kind(url, schema=schema)
        store.create_schema()
        client, broker = _api(store)
        opened.append((client, store))
        return Api(client, store, broker, ApiConfig(topic=TOPIC))

    yield make
    for client, store in opened:
        await client.aclose()
        store.close()


def _count_job_inserts(store: JobStore) -> list[str]:
    seen: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO JOBS"):
            seen.append(statement)

    event.listen(store.engine, "before_cursor_execute", count)
    return seen


def _text(t: str) -> dict[str, Any]:
    return {"model": "minilm", "input": {"text": t}}


async def _together(api: Api, requests: Sequence[tuple[dict[str, Any], str | None]]) -> list:
    async def one(body: dict[str, Any], key: str | None) -> httpx.Response:
        headers = {"Idempotency-Key": key} if key else {}
        return await api.client.post("/v1/jobs", json=body, headers=headers)

    return list(await asyncio.gather(*(one(b, k) for b, k in requests)))


def _published_ids(api: Api) -> list[str]:
    return [decode_message(h, v).id for _, v, h in api.broker.messages(TOPIC)]


def _queued_ids(api: Api) -> set[str]:
    with api.store.engine.connect() as conn:
        return {r[0] for r in conn.execute(text("SELECT id FROM jobs WHERE status = 'queued'"))}


async def test_concurrent_submits_share_far_fewer_transactions(make_api: Any) -> None:
    api = make_api()
    inserts = _count_job_inserts(api.store)
    answers = await _together(api, [(_text(f"job {i}"), None) for i in range(N)])
    assert [r.status_code for r in answers] == [202] * N
    ids = [r.json()["id"] for r in answers]
    assert len(set(ids)) == N
    assert sorted(_published_ids(api)) == sorted(ids)  # each accepted job published once
    rows = api.store.get_many(ids)
    assert [rows[i].input["text"] for i in ids] == [f"job {i}" for i in range(N)]
    # one per request before grouping; a few groups now (3 to 18 seen on a busy machine)
    assert 1 <= len(inserts) <= N // 3, f"{len(inserts)} INSERT transactions for {N} requests"
    # the same, seen from /metrics: transactions and the jobs they wrote
    page = (await api.client.get("/metrics")).text
    assert f"inferq_submit_insert_group_jobs_count {float(len(inserts))}" in page
    assert f"inferq_submit_insert_group_jobs_sum {float(N)}" in page


async def test_a_lone_request_is_written_at_once(make_api: Any) -> None:
    api = make_api()
    inserts = _count_job_inserts(api.store)
    r = await api.submit(_text("alone"))
    assert r.status_code == 202 and len(inserts) == 1
    assert _published_ids(api) == [r.json()["id"]]


async def test_idempotency_keys_within_one_group(make_api: Any) -> None:
    api = make_api()
    before = await api.client.post(
        "/v1/jobs", json=_text("kept"), headers={"Idempotency-Key": "old"}
    )
    assert before.status_code == 202
    inserts = _count_job_inserts(api.store)
    fillers: list[tuple[dict[str, Any], str | None]] = [
        (_text(f"filler {i}"), None)
        for i in range(16)  # keeps a group in flight
    ]
    keyed: list[tuple[dict[str, Any], str | None]] = [
        (_text("same"), "k1"),
        (_text("same"), "k1"),  # the same key and body: the same job
        (_text("other"), "k1"),  # the key with another body: 409
        (_text("kept"), "old"),  # a replay of a committed job
        (_text("changed"), "old"),  # a committed key with another body: 409
        (_text("own"), "k2"),
    ]
    answers = await _together(api, fillers + keyed)
    assert len(inserts) < len(answers) // 2
    assert [r.status_code for r in answers[: len(fillers)]] == [202] * len(fillers)
    same_a, same_b, other, replay, changed, own = answers[len(fillers) :]
    k1 = [same_a, same_b, other]
    winners = [r for r in k1 if r.status_code == 202]
    assert len(winners) == 1, [r.status_code for r in k1]
    winner = winners[0].json()["id"]
    for r, body in zip(k1, ("same", "same", "other"), strict=True):
        if r is winners[0]:
            continue
        won_with = api.store.get(winner).input["text"]
        if body == won_with:
            assert r.status_code == 200 and r.json()["id"] == winner
        else:
            assert r.status_code == 409, r.text
            error = r.json()["error"]
            assert error["code"] == "idempotency_conflict" and error["field"] == "Idempotency-Key"
            assert error["details"]["job_id"] == winner
    assert replay.status_code == 200 and replay.json()["id"] == before.json()["id"]
    assert changed.status_code == 409
    assert changed.json()["error"]["details"]["job_id"] == before.json()["id"]
    assert own.status_code == 202
    published = _published_ids(api)
    assert published.count(winner) == 1 and published.count(before.json()["id"]) == 1
    assert len(published) == 1 + len(fillers) + 2  # the replays published nothing


def _refuse_poison(store: JobStore) -> None:
    """The database itself refuses rows whose input says ``poison`` (a trigger)."""
    with store.engine.begin() as conn:
        if store.engine.dialect.name == "sqlite":
            conn.exec_driver_sql(
                "CREATE TRIGGER refuse_poison BEFORE INSERT ON jobs "
                "WHEN NEW.input LIKE '%poison%' BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
            return
        conn.exec_driver_sql(
            "CREATE FUNCTION refuse_poison() RETURNS trigger AS $$ BEGIN "
            "IF strpos(CAST(NEW.input AS text), 'poison') > 0 THEN RAISE EXCEPTION 'refused'; "
            "END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON jobs "
            "FOR EACH ROW EXECUTE FUNCTION refuse_poison()"
        )


async def test_a_row_the_database_refuses_fails_only_its_own_request(make_api: Any) -> None:
    api = make_api()
    _refuse_poison(api.store)
    inserts = _count_job_inserts(api.store)
    bodies = [(_text("poison" if i in (5, 20) else f"fine {i}"), None) for i in range(32)]
    answers = await _together(api, bodies)
    for i, r in enumerate(answers):
        if i in (5, 20):
            assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        else:
            assert r.status_code == 202, (i, r.text)
    accepted = {r.json()["id"] for r in answers if r.status_code == 202}
    assert len(accepted) == 30
    # every 202 is a written row and a published message; no row was left unpublished
    assert set(_published_ids(api)) == accepted == _queued_ids(api)
    # its group was judged job by job: the others in it were written and published
    assert len(inserts) > 2


async def test_an_outage_fails_its_group_with_503_and_never_a_202(make_api: Any) -> None:
    api = make_api(_OutageStore)
    bodies = [(_text("outage" if i == 10 else f"fine {i}"), None) for i in range(40)]
    answers = await _together(api, bodies)
    codes = [r.status_code for r in answers]
    assert set(codes) <= {202, 503}, codes
    assert codes[10] == 503
    for r in answers:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "store_unavailable"
            assert "retry-after" in r.headers
    accepted = {r.json()["id"] for r in answers if r.status_code == 202}
    assert accepted, "requests outside the failed group are accepted"
    assert set(_published_ids(api)) == accepted == _queued_ids(api)
    # and the store serves the next requests as before
    assert (await api.submit(_text("after"))).status_code == 202


async def test_a_refused_row_in_a_bulk_request_fails_only_its_item(make_api: Any) -> None:
    """The bulk route writes through the same ``create_many``: a row the database refuses
    used to fail the whole batch after the rows before it were written (queued, never
    published)."""
    api = make_api()
    _refuse_poison(api.store)
    jobs = [_text("first"), _text("poison"), _text("last")]
    r = await api.client.post("/v1/jobs/batch", json={"jobs": jobs})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["status"] for d in data] == [202, 500, 202]
    assert data[1]["error"]["code"] == "internal_error" and data[1]["error"]["field"] == "jobs[1]"
    accepted = {data[0]["job"]["id"], data[2]["job"]["id"]}
    assert set(_published_ids(api)) == accepted == _queued_ids(api)
