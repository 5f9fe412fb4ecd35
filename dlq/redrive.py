"""Redrive: put dead letters back on the jobs topic, once each.

Each entry is claimed (marked redriven) before anything else, so running the same redrive
twice, or two operators at once, enqueues it once. Its job row goes back to ``queued``
with its id and attempt count kept; the original message is published again as it was,
minus the dead-letter reason headers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from dlq.router import HEADER_PREFIX
from dlq.store import DeadLetterStore
from transports.base import Publisher

log = logging.getLogger(__name__)


@dataclass
class RedriveReport:
    redriven: list[str] = field(default_factory=list)
    already_redriven: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


class RedriveJobs(Protocol):
    """The two job-store transitions a redrive needs (``JobStore`` has both)."""

    def requeue_failed(self, ids: Sequence[str]) -> object: ...

    def restore_failed(self, job_id: str, code: str, message: str) -> bool: ...


class Redriver:
    def __init__(
        self, letters: DeadLetterStore, publisher: Publisher, topic: str, jobs: RedriveJobs
    ) -> None:
        self.letters = letters
        self.publisher = publisher
        self.topic = topic
        self.jobs = jobs

    async def redrive(
        self, ids: Sequence[str], progress: Callable[[int], None] | None = None
    ) -> RedriveReport:
        report = RedriveReport()
        entries = await asyncio.to_thread(self.letters.get_many, ids)
        for entry_id in ids:
            entry = entries[entry_id]
            claimed = await asyncio.to_thread(self.letters.mark_redriven, entry_id)
            if not claimed:
                report.already_redriven.append(entry_id)
            else:
                requeued = False
                try:
                    # the row is queued before the publish: a worker that gets the message
                    # first would otherwise find the job terminal and skip it
                    if entry.job_id:
                        await asyncio.to_thread(self.jobs.requeue_failed, [entry.job_id])
                        requeued = True
                    headers = [
                        (k, v) for k, v in entry.headers.items() if not k.startswith(HEADER_PREFIX)
                    ]
                    await self.publisher.publish(
                        self.topic, entry.payload, key=entry.key, headers=headers
                    )
                    report.redriven.append(entry_id)
                except Exception as exc:  # give the entry back so a later redrive can retry
                    if requeued and entry.job_id:
                        # nothing is on the bus: a queued row would wait (and count) forever
                        await asyncio.to_thread(
                            self.jobs.restore_failed, entry.job_id, entry.code, entry.message
                        )
                    await asyncio.to_thread(self.letters.unmark_redriven, entry_id)
                    report.failed[entry_id] = str(exc) or type(exc).__name__
                    log.warning("redrive of %s failed: %s", entry_id, exc)
            if progress is not None:
                progress(1)
        return report
