"""Grouped inserts: the rows of concurrent submits written in shared transactions.

One transaction per ``POST /v1/jobs`` made concurrent requests queue on the store's single
writer (SQLite) and pay a thread hop each. Here, a request whose row arrives while a
transaction is in flight waits for the next one, which writes every row that queued
meanwhile (``JobStore.create_many``: one multi-row INSERT). A request alone is written at
once: grouping adds no wait, it only uses the wait there already was.

Each request still gets its own outcome: its row, the replay of its idempotency key, or the
``JobStoreError`` it alone met (a key used with another body, a row the database refused;
``create_many`` then judges each job alone, so only the one at fault fails). When the
database cannot be reached, nothing of the group was written and each of its requests
gets ``StoreUnavailable``: no request is told its job was accepted unless its row is in.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from jobstore.creation import Created
from jobstore.errors import JobStoreError, StoreUnavailable
from jobstore.records import JobRecord, NewJob
from jobstore.store import JobStore

MAX_GROUP_JOBS = 500  # rows per transaction: a bulk request's size, far under bind limits

log = logging.getLogger(__name__)

_Waiting = tuple[NewJob, "asyncio.Future[Created]"]


class InsertGroups:
    """``create(job)`` as ``JobStore.create`` answers it, written with the rows of the
    other requests that came meanwhile. One transaction in flight at a time per process
    (the store's writer is single on SQLite; on PostgreSQL, groups keep transactions few).
    """

    def __init__(
        self,
        store: JobStore,
        *,
        max_jobs: int = MAX_GROUP_JOBS,
        observe: Callable[[int], object] | None = None,
    ) -> None:
        self.store = store
        self.max_jobs = max_jobs
        self.observe = observe  # called with the size of each group written
        self._waiting: list[_Waiting] = []
        self._writer: asyncio.Task[None] | None = None

    async def create(self, job: NewJob) -> tuple[JobRecord, bool]:
        """``(record, created)``; raises the ``JobStoreError`` this job met."""
        future: asyncio.Future[Created] = asyncio.get_running_loop().create_future()
        self._waiting.append((job, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_all(), name="inferq-insert-groups")
        outcome = await future
        if isinstance(outcome, JobStoreError):
            raise outcome
        return outcome

    async def _write_all(self) -> None:
        """Write groups while requests wait; stop when none does (the next request starts
        a writer again)."""
        group: list[_Waiting] = []
        try:
            while self._waiting:
                # one turn of the event loop first: the requests already runnable reach
                # the queue and join this group, at no cost to a request alone
                await asyncio.sleep(0)
                group = self._waiting[: self.max_jobs]
                del self._waiting[: self.max_jobs]
                await self._write(group)
                group = []
        finally:
            # cancelled (the app stops): no request may wait forever on an unwritten row
            for _, future in group + self._waiting:
                _settle(future, StoreUnavailable("the API is stopping; the job was not written"))
            self._waiting.clear()
            self._writer = None

    async def _write(self, group: list[_Waiting]) -> None:
        jobs = [job for job, _ in group]
        try:
            outcomes = await asyncio.to_thread(self.store.create_many, jobs)
        except StoreUnavailable as exc:
            for _, future in group:
                _settle(future, _copy(StoreUnavailable(str(exc)), exc))
            return
        except Exception as exc:  # a bug: nothing written, each request answers 500
            log.exception("a group of %d job inserts failed", len(jobs))
            for _, future in group:
                _settle(future, _copy(JobStoreError(f"the job could not be written: {exc}"), exc))
            return
        if self.observe is not None:
            self.observe(len(jobs))
        for (_, future), outcome in zip(group, outcomes, strict=True):
            _settle(future, outcome)


def _copy(error: JobStoreError, cause: BaseException) -> JobStoreError:
    """One exception object per waiting request: each raises it with its own traceback."""
    error.__cause__ = cause
    return error


def _settle(future: asyncio.Future[Created], outcome: Created) -> None:
    # a request whose client went away has a cancelled future: nothing to tell it
    if not future.done():
        future.set_result(outcome)
