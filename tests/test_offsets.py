"""OffsetTracker: acks in any order, commits only over the contiguous done prefix."""

from __future__ import annotations

from transports.offsets import OffsetTracker


def _delivered(tracker: OffsetTracker, partition: str, offsets: range | list[int]) -> None:
    for offset in offsets:
        tracker.delivered(partition, offset)


def test_nothing_delivered_nothing_to_commit() -> None:
    tracker = OffsetTracker()
    assert tracker.committable() == {}
    assert tracker.outstanding() == 0


def test_in_order_done_commits_the_next_offset_to_read() -> None:
    tracker = OffsetTracker()
    _delivered(tracker, "p0", range(10, 13))
    tracker.done("p0", 10)
    tracker.done("p0", 11)
    assert tracker.committable() == {"p0": 12}  # Kafka: the next offset to read
    assert tracker.outstanding() == 1


def test_out_of_order_done_waits_for_the_gap() -> None:
    tracker = OffsetTracker()
    _delivered(tracker, "p0", range(5))
    tracker.done("p0", 3)
    tracker.done("p0", 1)
    tracker.done("p0", 4)
    assert tracker.committable() == {}  # offset 0 is still running
    tracker.done("p0", 0)
    assert tracker.committable() == {"p0": 2}  # 2 is the gap now
    tracker.done("p0", 2)
    assert tracker.committable() == {"p0": 5}
    assert tracker.outstanding() == 0


def test_partitions_are_independent() -> None:
    tracker = OffsetTracker()
    _delivered(tracker, "p0", range(3))
    _delivered(tracker, "p1", range(100, 102))
    tracker.done("p1", 100)
    tracker.done("p0", 1)
    assert tracker.committable() == {"p1": 101}
    tracker.done("p0", 0)
    assert tracker.committable() == {"p0": 2, "p1": 101}


def test_committable_only_moves_forward_and_reports_each_offset_once() -> None:
    tracker = OffsetTracker()
    _delivered(tracker, "p0", range(6))
    seen: list[int] = []
    for offset in (2, 0, 1, 5, 3, 4):
        tracker.done("p0", offset)
        moved = tracker.committable()
        if moved:
            seen.append(moved["p0"])
            tracker.mark_committed(moved)
        assert tracker.committable() == {}  # marked: not offered again
    assert seen == [1, 3, 4, 6]


def test_duplicate_and_stale_acks_do_not_move_the_commit_back() -> None:
    tracker = OffsetTracker()
    _delivered(tracker, "p0", range(3))
    for offset in range(3):
        tracker.done("p0", offset)
    tracker.mark_committed(tracker.committable())
    tracker.done("p0", 1)  # acked twice
    tracker.done("p0", 0)
    assert tracker.committable() == {}
    _delivered(tracker, "p0", [3])
    tracker.done("p0", 3)
    assert tracker.committable() == {"p0": 4}


def test_uncommitted_progress_is_offered_again_until_marked() -> None:
    tracker = OffsetTracker()
    _delivered(tracker, "p0", range(2))
    tracker.done("p0", 0)
    assert tracker.committable() == {"p0": 1}
    # the commit failed: nothing marked, so the same offset is still owed
    assert tracker.committable() == {"p0": 1}


def test_forget_drops_a_revoked_partition_and_ignores_its_late_acks() -> None:
    tracker = OffsetTracker()
    _delivered(tracker, "p0", range(3))
    _delivered(tracker, "p1", range(3))
    tracker.done("p0", 0)
    tracker.done("p1", 0)
    tracker.forget("p0")  # revoked: its new owner re-reads from the last commit
    assert tracker.committable() == {"p1": 1}
    assert tracker.outstanding() == 2  # only p1's offsets 1 and 2
    tracker.done("p0", 1)  # work that finished after the revoke
    tracker.done("p0", 2)
    assert tracker.committable() == {"p1": 1}


def test_a_reassigned_partition_is_tracked_afresh_from_its_commit() -> None:
    tracker = OffsetTracker()
    _delivered(tracker, "p0", range(4))
    tracker.done("p0", 0)
    tracker.done("p0", 1)
    tracker.mark_committed(tracker.committable())  # committed 2
    tracker.forget("p0")
    _delivered(tracker, "p0", range(2, 4))  # assigned back: delivery resumes at 2
    tracker.done("p0", 3)
    assert tracker.committable() == {}
    tracker.done("p0", 2)
    assert tracker.committable() == {"p0": 4}
    assert tracker.outstanding() == 0
