"""Redrive: put dead letters back on the jobs topic, once each.

Each entry is claimed (marked redriven) before anything else, so running the same redrive
twice, or two operators at once, enqueues it once. Its job row goes back to ``queued``
with its id and attempt count kept; the original message is published again as it was,
minus the dead-letter reason headers.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from dlq.router import HEADER_PREFIX
from dlq.store import DeadLetterRecord, DeadLetterStore
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
        self,
        letters: DeadLetterStore,
        publisher: Publisher,
        topic: str,
        jobs: RedriveJobs,
        *,
        load_payload: Callable[[str], Awaitable[bytes]] | None = None,
    ) -> None:
        self.letters = letters
        self.publisher = publisher
        self.topic = topic
        self.jobs = jobs
        # reads the whole payload of a letter that was cut down (ClaimCheck.load_dead_letter)
        self.load_payload = load_payload

    async def _payload(self, entry: DeadLetterRecord) -> bytes:
        """The original message; ValueError when only its head was kept."""
        if not entry.trimmed:
            return entry.payload
        cut = f"payload was cut to {len(entry.payload)} of {entry.payload_size} bytes"
        if entry.payload_url is None or self.load_payload is None:
            raise ValueError(f"{cut} and no whole copy was kept: it cannot be replayed")
        whole = await self.load_payload(entry.payload_url)
        if hashlib.sha256(whole).hexdigest() != entry.payload_sha256:
            raise ValueError(f"{cut}; {entry.payload_url} does not match its sha256")
        return whole

    async def redrive(
        self, ids: Sequence[str], progress: Callable[[int], None] | None = None
    ) -> RedriveReport:
        report = RedriveReport()
        entries = await asyncio.to_thread(self.letters.get_many, ids)
        for entry_id in ids:
            entry = entries[entry_id]
            try:
                payload = await self._payload(entry)
            except Exception as exc:  # left as it is: nothing claimed, the job stays failed
                report.failed[entry_id] = str(exc) or type(exc).__name__
                log.warning("redrive of %s refused: %s", entry_id, exc)
                if progress is not None:
                    progress(1)
                continue
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
                        self.topic, payload, key=entry.key, headers=headers
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
