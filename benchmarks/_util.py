"""Shared bits of the benchmark scripts: machine description and JSON output."""

from __future__ import annotations

import json
import os
import platform

import jax


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "jax": jax.__version__}


def emit(result: dict, out: str | None) -> None:
    """Prints the JSON result and, if ``out`` is given, writes it there too."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")


def paired_times(one, kinds, pairs: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of ``one(kind)`` per kind: ``warmup`` untimed rounds, then ``pairs`` rounds
    with the order of ``kinds`` rotated each round (so drift and load hit every kind)."""
    kinds = tuple(kinds)
    for _ in range(warmup):
        for kind in kinds:
            one(kind)
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for i in range(pairs):
        for kind in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:
            times[kind].append(one(kind))
    return times
