"""One consistency check for every fault test: 0 lost, 0 duplicated, every accepted job terminal.

Given the ids that clients got a 202 for (or published onto the bus), the store must hold each
of them exactly once and in a terminal state, with no extra job rows (a retried publish that
created a second job), no outcome given twice (a job that succeeded and was also
dead-lettered), the right result for each input where the test knows it, and, when webhooks
are in play, exactly one outbox delivery and one verified receipt per event id.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select

from dlq.store import DeadLetterFilter, DeadLetterStore
from jobstore.outbox import WebhookOutbox, webhook_id
from jobstore.sql import JOBS
from jobstore.store import JobStore
from schemas.jobs import JobStatus
from tests.webhook_receiver import Received


@dataclass(frozen=True)
class ConsistencyReport:
    accepted: int
    statuses: dict[str, int]
    attempts: dict[int, int]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = f"{self.accepted} accepted, statuses {self.statuses}, attempts {self.attempts}"
        if self.ok:
            return head
        return head + "\n" + "\n".join(f"  - {p}" for p in self.problems[:40])


def _sample(ids: Iterable[str], n: int = 8) -> str:
    ids = sorted(ids)
    more = f" (+{len(ids) - n} more)" if len(ids) > n else ""
    return ", ".join(ids[:n]) + more


def job_consistency(
    store: JobStore,
    accepted: Sequence[str],
    *,
    expected_results: Mapping[str, dict[str, Any]] | None = None,
    expected_status: JobStatus | None = JobStatus.SUCCEEDED,
    max_attempts: int | None = None,
    exclusive: bool = True,
    refused_code: str | None = None,
    letters: DeadLetterStore | None = None,
) -> ConsistencyReport:
    """Check the store against what was accepted; returns a report (see assert_consistent).

    ``exclusive``: the store holds this test's jobs only, so any row beyond the accepted ids
    is a duplicate job, except rows the API refused (503) when ``refused_code`` names their
    error code: those must have stayed failed, never run. ``letters``: a job that succeeded
    must not also be dead-lettered.
    """
    problems: list[str] = []
    counted = Counter(accepted)
    twice = [i for i, n in counted.items() if n > 1]
    if twice:
        problems.append(f"{len(twice)} ids were accepted more than once: {_sample(twice)}")
    ids = list(counted)
    records = store.get_many(ids)
    missing = [i for i in ids if i not in records]
    if missing:
        problems.append(f"LOST: {len(missing)} accepted jobs have no row: {_sample(missing)}")
    statuses = Counter(r.status.value for r in records.values())
    attempts = Counter(r.attempts for r in records.values())
    open_ = [i for i, r in records.items() if not r.status.terminal]
    if open_:
        problems.append(f"{len(open_)} jobs are not terminal: {_sample(open_)}")
    if expected_status is not None:
        other = [i for i, r in records.items() if r.terminal and r.status is not expected_status]
        if other:
            detail = {i: (records[i].status.value, records[i].error_code) for i in other[:5]}
            problems.append(f"{len(other)} jobs ended {detail} instead of {expected_status.value}")
    for job_id, r in records.items():
        if r.status is JobStatus.SUCCEEDED and (r.result is None or r.error_code is not None):
            problems.append(f"{job_id} succeeded without a clean result: {r.error_code}")
        if r.terminal and r.completed_at is None:
            problems.append(f"{job_id} is {r.status.value} without completed_at")
    if expected_results:
        wrong = [
            i
            for i, want in expected_results.items()
            if i in records
            and records[i].status is JobStatus.SUCCEEDED
            and records[i].result != want
        ]
        if wrong:
            problems.append(f"{len(wrong)} jobs hold another input's result: {_sample(wrong)}")
    if max_attempts is not None:
        over = [i for i, r in records.items() if r.attempts > max_attempts]
        if over:
            problems.append(f"{len(over)} jobs ran more than {max_attempts} times: {_sample(over)}")
    if exclusive:
        with store.engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(JOBS)).scalar_one()
            others = [
                (row.id, row.status, row.error_code, row.attempts)
                for row in conn.execute(
                    select(JOBS.c.id, JOBS.c.status, JOBS.c.error_code, JOBS.c.attempts)
                )
                if row.id not in counted
            ]
        refused = [
            o
            for o in others
            if refused_code is not None
            and o[1] == JobStatus.FAILED.value
            and o[2] == refused_code
            and o[3] == 0
        ]
        strays = [o for o in others if o not in refused]
        if strays:  # a row nobody was told about: a second job for one request
            problems.append(
                f"DUPLICATED: the store holds {total} jobs, {len(strays)} of them not accepted "
                f"(and {len(refused)} refused): e.g. {strays[:5]}"
            )
    if letters is not None:
        lettered = Counter(
            r.job_id
            for r in letters.list(DeadLetterFilter(include_redriven=True), limit=100_000)
            if r.job_id is not None
        )
        both = [i for i, r in records.items() if r.status is JobStatus.SUCCEEDED and lettered[i]]
        if both:
            problems.append(f"{len(both)} jobs succeeded AND were dead-lettered: {_sample(both)}")
    return ConsistencyReport(len(ids), dict(statuses), dict(attempts), problems)


def webhook_consistency(
    outbox: WebhookOutbox,
    received: Sequence[Received],
    job_ids: Sequence[str],
    *,
    event: str = "job.succeeded",
    allow_repeats: bool = False,
) -> list[str]:
    """One outbox delivery per (job, event), delivered; one verified receipt per event id.

    A receipt repeated with the same ``webhook-id`` is allowed by Standard Webhooks (the
    receiver dedupes on it) but is reported unless ``allow_repeats``.
    """
    problems: list[str] = []
    per_id = Counter(r.msg_id for r in received)
    by_job: dict[str, set[str]] = {}
    for r in received:
        by_job.setdefault(r.job_id, set()).add(r.msg_id)
    not_received: list[str] = []
    wrong_ids: list[str] = []
    repeats: list[str] = []
    rows_bad: list[str] = []
    for job_id in job_ids:
        want = webhook_id(job_id, event)
        if by_job.get(job_id, set()) != {want}:
            (not_received if job_id not in by_job else wrong_ids).append(job_id)
        if per_id[want] > 1:
            repeats.append(job_id)
        rows = [d for d in outbox.for_job(job_id) if d.event == event]
        if len(rows) != 1 or rows[0].status.value != "delivered":
            rows_bad.append(job_id)
    if not_received:
        problems.append(f"LOST: {len(not_received)} webhooks never came: {_sample(not_received)}")
    if wrong_ids:
        problems.append(f"{len(wrong_ids)} jobs got other webhook ids: {_sample(wrong_ids)}")
    if repeats and not allow_repeats:
        extra = sum(per_id[webhook_id(j, event)] - 1 for j in repeats)
        problems.append(
            f"DUPLICATED: {len(repeats)} event ids were delivered more than once "
            f"({extra} extra requests): {_sample(repeats)}"
        )
    if rows_bad:
        problems.append(f"{len(rows_bad)} jobs lack one delivered outbox row: {_sample(rows_bad)}")
    return problems


def assert_consistent(report: ConsistencyReport, *extra_problems: str, context: str = "") -> None:
    problems = report.problems + list(extra_problems)
    if problems:
        failed = ConsistencyReport(report.accepted, report.statuses, report.attempts, problems)
        raise AssertionError(
            "consistency check failed: " + failed.summary() + (f"\n{context}" if context else "")
        )


def completed_since(store: JobStore, ids: Sequence[str], since: datetime) -> datetime | None:
    """The earliest completion at or after ``since`` among ``ids``; None if none (or no store)."""
    try:
        records = store.get_many(ids)
    except Exception:  # the store may be the thing that is down
        return None
    done = [r.completed_at for r in records.values() if r.completed_at and r.completed_at >= since]
    return min(done) if done else None


def measure_recovery(
    store: JobStore,
    ids: Sequence[str],
    fault_ended: datetime,
    timeout: float,
    *,
    alive: Callable[[], None] | None = None,
) -> float:
    """Seconds from the fault's end to the first job completing again (a store timestamp)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None:
            alive()
        first = completed_since(store, ids, fault_ended)
        if first is not None:
            return max(0.0, (first - fault_ended).total_seconds())
        time.sleep(0.1)
    raise AssertionError(f"no job completed within {timeout}s after the fault ended")


def now() -> datetime:
    return datetime.now(UTC)
