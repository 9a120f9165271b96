"""Preemption: SIGTERM (and, for the study runner, Ctrl-C) turned into a flag.

The training loop (``rpg_jax.train``) checks the flag after every step, saves a checkpoint
and returns; the study runner (``rpg_jax.study``) hands its flag to each run and checks it
between runs.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from tqdm import tqdm

CTRL_C_MESSAGE = "Ctrl-C: stopping after the current step (Ctrl-C again to abort now)"


@contextlib.contextmanager
def stop_on_sigterm(stop: threading.Event | None = None,
                    ctrl_c: bool = False) -> Iterator[threading.Event]:
    """Yields ``stop`` (a new event if None), set by a SIGTERM inside the block.

    Whoever else sets the event (a caller's own handler, a step callback, another thread)
    stops the loop that watches it the same way. With ``ctrl_c``, a first Ctrl-C prints
    ``CTRL_C_MESSAGE`` and acts as SIGTERM; a second one interrupts at once. The previous
    handlers are back after the block; outside the main thread, signals are left alone.
    """
    stop = threading.Event() if stop is None else stop
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_sigint(signum, frame):
        signal.signal(signal.SIGINT, previous_int)
        tqdm.write(CTRL_C_MESSAGE)
        signal.raise_signal(signal.SIGTERM)

    previous_term = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    previous_int = signal.signal(signal.SIGINT, on_sigint) if ctrl_c else None
    try:
        yield stop
    finally:
        for signum, previous in ((signal.SIGTERM, previous_term), (signal.SIGINT, previous_int)):
            if previous is not None:  # None: not set from Python (or SIGINT left alone)
                signal.signal(signum, previous)
