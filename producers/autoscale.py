"""The desired worker count: backlog over measured throughput and a target drain time.

    desired = ceil(backlog / (throughput per worker x target drain seconds))

clamped to [min, max] (and on Kafka to the partition count: more consumers than partitions
sit idle). Scaling up follows the signal at once; scaling down only once the lower value has
held for the whole stabilisation window, so a pause between bursts does not flap the pool
(the same rule as the Kubernetes HPA's scale-down stabilisation window).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class AutoscalePolicy:
    target_drain_s: float = 60.0
    min_workers: int = 1
    max_workers: int = 16
    scale_down_delay_s: float = 120.0
    max_partitions: int | None = None


@dataclass(frozen=True)
class ScaleSignal:
    desired_workers: int
    raw_workers: int  # before stabilisation
    backlog: int
    workers: int
    throughput_per_worker: float


@dataclass
class Autoscaler:
    policy: AutoscalePolicy
    clock: Callable[[], float] = time.monotonic
    _history: deque[tuple[float, int]] = field(default_factory=deque)

    def raw(self, backlog: int, throughput_per_worker: float, workers: int) -> int:
        p = self.policy
        if backlog <= 0:
            want = 0
        elif throughput_per_worker <= 0:
            # nothing measured yet: keep what runs, or start one
            want = max(workers, 1)
        else:
            want = math.ceil(backlog / (throughput_per_worker * p.target_drain_s))
        ceiling = p.max_workers
        if p.max_partitions is not None:
            ceiling = min(ceiling, p.max_partitions)
        return max(p.min_workers, min(want, ceiling))

    def observe(self, backlog: int, throughput_per_worker: float, workers: int) -> ScaleSignal:
        now = self.clock()
        raw = self.raw(backlog, throughput_per_worker, workers)
        self._history.append((now, raw))
        horizon = now - self.policy.scale_down_delay_s
        while self._history and self._history[0][0] < horizon:
            self._history.popleft()
        desired = max(v for _, v in self._history)
        return ScaleSignal(desired, raw, backlog, workers, throughput_per_worker)
