"""Metric files: one JSON object per line in ``WORKDIR/metrics.jsonl``, written by process 0."""

from __future__ import annotations

import json
import os
from typing import Any

import jax

METRICS_FILE = "metrics.jsonl"


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of a run's metrics file (an empty list if there is none)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricWriter:
    """Appends records to the metrics file; only process 0 writes.

    ``truncate_after(step)`` drops records of steps after ``step``: a resumed run rewrites
    what the interrupted run logged past its last checkpoint, so the file ends up identical
    to that of an uninterrupted run.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, METRICS_FILE)
        self.active = jax.process_index() == 0

    def truncate_after(self, step: int) -> None:
        if not self.active:
            return
        kept = [r for r in read_metrics(os.path.dirname(self.path)) if r["step"] <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, self.path)

    def write(self, step: int, **values: Any) -> None:
        if not self.active:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value
