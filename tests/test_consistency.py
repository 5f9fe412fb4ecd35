"""The consistency checker of the fault tests must be able to fail: each kind of breakage it
claims to catch is caught here, on a SQLite store, without any server."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobstore.outbox import WebhookOutbox, webhook_id
from jobstore.records import NewJob, Outcome
from jobstore.store import JobStore
from schemas.jobs import JobStatus
from tests.consistency import assert_consistent, job_consistency, webhook_consistency
from tests.webhook_receiver import Received


def _store(tmp_path: Path) -> JobStore:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    return store


def _run(store: JobStore, ids: list[str], result: dict[str, list[float]] | None = None) -> None:
    store.ensure([NewJob(id=i, model="identity", version="1", input={}) for i in ids])
    claimed = store.claim(ids, worker_id="t", lease_s=60).claimed
    store.complete(
        [
            Outcome(r.id, r.attempts, JobStatus.SUCCEEDED, result=result or {"tensor": [1.0]})
            for r in claimed
        ]
    )


def test_a_clean_run_is_consistent(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _run(store, ["a", "b"])
    report = job_consistency(store, ["a", "b"], expected_results={"a": {"tensor": [1.0]}})
    assert report.ok, report.summary()
    assert_consistent(report)
    store.close()


def test_lost_open_duplicated_and_crossed_jobs_are_caught(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _run(store, ["a", "b", "extra"])
    store.ensure([NewJob(id="open", model="identity", version="1", input={})])
    report = job_consistency(
        store,
        ["a", "b", "b", "open", "lost"],
        expected_results={"a": {"tensor": [2.0]}},
        max_attempts=0,
    )
    text = report.summary()
    for needle in (
        "accepted more than once",
        "LOST: 1",
        "not terminal",
        "another input's result",
        "ran more than 0 times",
        "DUPLICATED",
    ):
        assert needle in text, text
    with pytest.raises(AssertionError, match="consistency check failed"):
        assert_consistent(report)
    store.close()


def test_refused_rows_are_not_duplicates_but_a_run_refused_row_is(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _run(store, ["a"])
    store.ensure([NewJob(id="refused", model="identity", version="1", input={})])
    assert store.abandon_unpublished("refused", "publish_unavailable", "down")
    assert job_consistency(store, ["a"], refused_code="publish_unavailable").ok
    _run(store, ["ran-anyway"])
    report = job_consistency(store, ["a"], refused_code="publish_unavailable")
    assert "DUPLICATED" in report.summary()
    store.close()


def test_webhooks_lost_and_repeated_are_caught(tmp_path: Path) -> None:
    store = _store(tmp_path)
    outbox = WebhookOutbox(store.engine, writer=store.writer)
    got = [Received(webhook_id("a", "job.succeeded"), "job.succeeded", "a", 0.0)] * 2
    problems = webhook_consistency(outbox, got, ["a", "b"])
    text = "\n".join(problems)
    assert "LOST: 1" in text and "DUPLICATED: 1" in text and "outbox row" in text, text
    assert not any(
        "DUPLICATED" in p for p in webhook_consistency(outbox, got, ["a"], allow_repeats=True)
    )
    store.close()
