"""Per-partition offset tracking: out-of-order acks, in-order commits."""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable


class OffsetTracker:
    """Tracks delivered offsets per partition; the committable offset is the first not done.

    Work finishes out of order (batches per model run concurrently), but a Kafka commit means
    "everything before this offset is done", so only the contiguous done prefix may move it.
    """

    def __init__(self) -> None:
        self._pending: dict[Hashable, deque[int]] = {}
        self._done: dict[Hashable, set[int]] = {}
        self._next: dict[Hashable, int] = {}
        self._committed: dict[Hashable, int] = {}

    def delivered(self, partition: Hashable, offset: int) -> None:
        self._pending.setdefault(partition, deque()).append(offset)
        self._done.setdefault(partition, set())

    def done(self, partition: Hashable, offset: int) -> None:
        pending = self._pending.get(partition)
        if pending is None:
            return  # partition revoked meanwhile; its messages will be redelivered
        done = self._done[partition]
        done.add(offset)
        while pending and pending[0] in done:
            finished = pending.popleft()
            done.discard(finished)
            self._next[partition] = finished + 1

    def committable(self) -> dict[Hashable, int]:
        """Offsets (next to read) that moved since the last call to ``mark_committed``."""
        return {p: o for p, o in self._next.items() if self._committed.get(p) != o}

    def mark_committed(self, offsets: dict[Hashable, int]) -> None:
        self._committed.update(offsets)

    def forget(self, partition: Hashable) -> None:
        for table in (self._pending, self._done, self._next, self._committed):
            table.pop(partition, None)

    def outstanding(self) -> int:
        return sum(len(p) for p in self._pending.values())
