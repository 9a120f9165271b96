"""The training loop's clocks: training time per log window (``TrainClock``, for images/s),
and elapsed time and ETA for the log lines of cluster jobs (``Progress``, stderr not a
terminal).

The ETA is the remaining steps over the recent rate: steps per second of wall time (eval and
checkpoint pauses included) over the last ``window`` log points.
"""

from __future__ import annotations

import collections
import contextlib
import math
import time
from collections.abc import Callable, Iterator


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


class TrainClock:
    """Training seconds, one log window at a time: a window's wall time minus its pauses
    (evaluation, checkpoints). The time between ``stop`` and the next ``start`` (logging)
    counts in no window. ``steps`` is the caller's count of the window's train steps."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self.total = 0.0  # the stopped windows' training seconds
        self.start()

    def start(self) -> None:
        """Opens a window: no steps, nothing paused."""
        self.steps, self._start, self._paused = 0, self._clock(), 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The block's time is not training time."""
        start = self._clock()
        yield
        self._paused += self._clock() - start

    def stop(self) -> float:
        """Ends the window; returns its training seconds (also added to ``total``)."""
        seconds = self._clock() - self._start - self._paused
        self.total += seconds
        return seconds
