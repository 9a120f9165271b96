"""A tqdm subclass that runs an action at a given train step, for interrupting runs in tests.

``rpg_jax.train`` updates its progress bar once per train step (also when the bar is hidden),
right after the step and before logging it, and checks for preemption after logging; an
action run from ``update`` therefore happens at a known point of a known step.
"""

from __future__ import annotations

from collections.abc import Callable


def bar_acting_at_step(base: type, at_step: int, action: Callable[[int], None]) -> type:
    """A subclass of the tqdm class ``base`` whose ``update`` calls ``action(step)`` once the
    bar's count (its ``initial`` included, so resumed runs count from their step) reaches
    ``at_step``."""

    class StepActionBar(base):
        def __init__(self, *args, initial=0, **kwargs):
            super().__init__(*args, initial=initial, **kwargs)
            self._step = initial

        def update(self, n=1):
            out = super().update(n)
            self._step += n
            if self._step == at_step:
                action(self._step)
            return out

    return StepActionBar
