"""Metric files: one JSON object per line in ``WORKDIR/metrics.jsonl``, written by process 0."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
from absl import logging

METRICS_FILE = "metrics.jsonl"


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of a run's metrics file (an empty list if there is none).

    A torn last line (a kill during a write) is dropped with a warning; a damaged line
    before the last raises ValueError naming the file and line.
    """
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError as e:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {n} is not a JSON record ({e})") from e
            logging.warning("%s: dropping the torn last line %d (%r), written by a run killed "
                            "mid-write", path, n, line[:80])
    return records


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

    def write(self, step: int, **values: Any) -> dict[str, Any]:
        """Appends the record (process 0) and returns it, as a JSON-ready dict."""
        record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        if self.active:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        return record


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value
