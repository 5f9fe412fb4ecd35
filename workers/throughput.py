"""A time-decayed rate: jobs per second, smoothed (EWMA), for autoscaling signals."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Ewma:
    """Exponentially weighted rate of events; ``half_life_s`` sets how fast old load fades."""

    half_life_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    _rate: float = 0.0
    _pending: int = 0
    _last: float | None = None

    def add(self, count: int) -> None:
        self._pending += count
        if self._last is None:
            self._last = self.clock()

    def rate(self) -> float:
        """Fold what arrived since the last reading into the smoothed rate."""
        now = self.clock()
        if self._last is None:
            return 0.0
        dt = now - self._last
        if dt > 0:
            alpha = 1 - math.exp(-dt * math.log(2) / self.half_life_s)
            self._rate += alpha * (self._pending / dt - self._rate)
            self._pending = 0
            self._last = now
        return self._rate
