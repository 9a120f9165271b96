"""Elapsed time and ETA for the training log lines of cluster jobs (stderr not a terminal).

The ETA is the remaining steps over the recent rate: steps per second of wall time (eval and
checkpoint pauses included) over the last ``window`` log points.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable


def hms(seconds: float) -> str:
    """``h:mm:ss`` (hours unbounded); "?" for an unknown (infinite or NaN) duration."""
    if not math.isfinite(seconds):
        return "?"
    total = max(0, int(round(seconds)))
    return f"{total // 3600}:{total // 60 % 60:02d}:{total % 60:02d}"


class Progress:
    """``update(step)`` -> (seconds since ``start_time``, ETA in seconds) at each log point.

    ``start_time`` is when the run (re)started, on ``clock``; the rate starts counting at
    construction, from ``step`` (so a resumed run's rate is its own).
    """

    def __init__(self, step: int, num_steps: int, start_time: float | None = None,
                 clock: Callable[[], float] = time.perf_counter, window: int = 10):
        self.num_steps = num_steps
        self._clock = clock
        now = clock()
        self.start_time = now if start_time is None else start_time
        self._points = collections.deque([(now, step)], maxlen=window + 1)

    def update(self, step: int) -> tuple[float, float]:
        now = self._clock()
        self._points.append((now, step))
        (then, step_then) = self._points[0]
        remaining = max(0, self.num_steps - step)
        if remaining == 0:
            eta = 0.0
        elif step > step_then and now > then:
            eta = remaining * (now - then) / (step - step_then)
        else:
            eta = math.inf
        return now - self.start_time, eta
