"""A ``jax.profiler`` trace of a window of train steps (``config.profile_steps = "A:B"``).

The trace starts before train step A (the step that begins with ``state.step == A``) and
stops after step B-1, once the device has finished it; each step of the window runs inside
``jax.profiler.StepTraceAnnotation("train", step_num=step)``, so TensorBoard's profile
plugin (XProf) shows per-step times. The files go to ``WORKDIR/profile/plugins/profile/
RUN/HOST.xplane.pb`` (view: ``tensorboard --logdir WORKDIR/profile``, or ``xprof``).

A run that stops inside the window (its last step, a preemption, an error) stops the trace
there; a run resumed inside the window traces the rest of it as a new trace run.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import jax
from absl import logging

PROFILE_DIR = "profile"


class StepProfiler:
    """Traces the train steps ``window[0]..window[1]-1`` (no window: does nothing)."""

    def __init__(self, window: tuple[int, int] | None, workdir: str, num_steps: int):
        self.window = window
        self.logdir = os.path.join(workdir, PROFILE_DIR)
        self.active = False
        if window is not None and window[0] >= num_steps:
            logging.warning("config.profile_steps=%d:%d starts after the run's last step (%d "
                            "steps): nothing is traced", *window, num_steps)

    def _inside(self, step: int) -> bool:
        return self.window is not None and self.window[0] <= step < self.window[1]

    @contextlib.contextmanager
    def step(self, step: int):
        """Runs train step ``step`` (the state's step before it), traced inside the window."""
        if not self._inside(step):
            yield
            return
        if not self.active:
            logging.info("Profiling train steps %d..%d into %s", step, self.window[1] - 1,
                         self.logdir)
            jax.profiler.start_trace(self.logdir)
            self.active = True
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            yield

    def after_step(self, step: int, state: Any) -> None:
        """Called with the step count after a step: stops the trace after step B-1."""
        if self.active and step >= self.window[1]:
            self.stop(state)

    def stop(self, state: Any = None) -> None:
        """Stops the trace if one runs, after the device finished ``state`` (if given)."""
        if not self.active:
            return
        self.active = False
        try:
            if state is not None:
                jax.block_until_ready(state)  # the trace holds the steps' device work
        finally:
            jax.profiler.stop_trace()
        logging.info("Profile written to %s", self.logdir)
