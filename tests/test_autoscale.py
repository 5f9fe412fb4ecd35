"""The desired worker count: formula, clamps, and stabilisation against flapping."""

from __future__ import annotations

from producers.autoscale import AutoscalePolicy, Autoscaler


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_formula_and_clamps() -> None:
    a = Autoscaler(AutoscalePolicy(target_drain_s=60, min_workers=1, max_workers=10))
    assert a.raw(backlog=0, throughput_per_worker=50, workers=3) == 1  # min
    assert a.raw(backlog=6_000, throughput_per_worker=50, workers=1) == 2  # 6000/(50*60)
    assert a.raw(backlog=6_001, throughput_per_worker=50, workers=1) == 3  # ceil
    assert a.raw(backlog=10**6, throughput_per_worker=50, workers=1) == 10  # max
    assert a.raw(backlog=100, throughput_per_worker=0, workers=0) == 1  # nothing measured
    kafka = Autoscaler(AutoscalePolicy(max_workers=64, max_partitions=4))
    assert kafka.raw(backlog=10**6, throughput_per_worker=1, workers=1) == 4
    scale_to_zero = Autoscaler(AutoscalePolicy(min_workers=0))
    assert scale_to_zero.raw(backlog=0, throughput_per_worker=10, workers=2) == 0


def test_rises_at_once_and_falls_only_after_the_window() -> None:
    clock = Clock()
    a = Autoscaler(
        AutoscalePolicy(target_drain_s=10, max_workers=20, scale_down_delay_s=60), clock=clock
    )
    assert a.observe(100, 10, 1).desired_workers == 1
    clock.now = 5
    assert a.observe(1_000, 10, 1).desired_workers == 10  # a spike: up at once
    for t in (10, 30, 60):
        clock.now = t
        signal = a.observe(50, 10, 10)
        assert signal.raw_workers == 1 and signal.desired_workers == 10  # held: no flapping
    clock.now = 66
    assert a.observe(50, 10, 10).desired_workers == 1  # calm for the whole window
