"""An ``on_step`` callback for ``train_and_evaluate`` that runs an action at a given train
step, for interrupting runs in tests.

``rpg_jax.train`` calls ``on_step`` right after each train step, before logging it, and checks
for preemption after logging; the action therefore happens at a known point of a known step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def at_step(step: int, action: Callable[[int], Any]) -> Callable[..., None]:
    """An ``on_step`` callback that calls ``action(step)`` when the run reaches train step
    ``step`` (a resumed run counts from its own step); it never asks for a stop itself."""

    def on_step(reached: int, state: Any, metrics: Any) -> None:
        if reached == step:
            action(step)

    return on_step
