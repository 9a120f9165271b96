"""Metric sinks next to ``metrics.jsonl``: TensorBoard event files and Weights & Biases.

``metrics.jsonl`` (``rpg_jax.metrics``) stays the source of truth; each sink mirrors its
records, written by process 0 only, and each is an optional dependency switched on by a
config field (``config.tensorboard``: tensorboardX; ``config.wandb.enabled``: wandb).

A resumed run continues the same TensorBoard run and the same W&B run without duplicated
steps. ``start(records)`` gets the metrics file as ``MetricWriter.truncate_after`` left it
(the records up to the resumed checkpoint):

- TensorBoard (derived data) rewrites its event file from those records, replacing the
  previous event files of ``WORKDIR/tensorboard``, then appends as training goes. A run
  killed anywhere thus ends with the event file of an uninterrupted run.
- W&B keeps its run id and the last step it committed in ``WORKDIR/wandb_run.json`` and
  resumes that run (``resume="allow"``). It never logs a step at or before the last
  committed one (the resume is bit-exact: records redone after a kill equal the logged ones),
  and commits the records of a step (train and eval) as one row once a later step comes or
  the run closes, so a kill loses at most that uncommitted row, which the next run logs.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
from typing import Any

import ml_collections

from rpg_jax import config as config_lib
from rpg_jax.metrics import read_metrics

TENSORBOARD_DIR = "tensorboard"
WANDB_STATE_FILE = "wandb_run.json"


def _scalars(record: dict[str, Any]) -> dict[str, float | int]:
    """The numeric values of a metrics record, without its ``step``."""
    return {k: v for k, v in record.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}


def _import(field: str, module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(f"config.{field}=True needs the {module!r} package: pip install "
                          f"{module} (or pip install 'rpg_jax[logging]')") from e


def hyperparameters(config: ml_collections.ConfigDict) -> dict[str, bool | int | float | str]:
    """The config as flat ``{dotted name: value}``, as TensorBoard's HParams want it."""
    values = {}
    for name in config_lib.field_names(config):
        value = config_lib.field_value(config, name)
        values[name] = value if isinstance(value, bool | int | float | str) else str(value)
    return values


class MetricSinks:
    """The sinks the config switches on; ``write`` mirrors each metrics record into them.

    Only process 0 writes; on other processes (and with every sink off) it does nothing.
    Use as a context manager (or call ``close``); leaving it on an exception marks the W&B
    run failed.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str,
                 process_index: int = 0):
        self.workdir = workdir
        self.sinks: list[Any] = []
        if process_index != 0:
            return
        if config.tensorboard:
            self.sinks.append(TensorBoardSink(config, workdir))
        if config.wandb.enabled:
            self.sinks.append(WandbSink(config, workdir))

    def start(self) -> None:
        """Brings every sink up to date with the metrics file (as ``truncate_after`` left
        it: the records up to the resumed step)."""
        records = read_metrics(self.workdir) if self.sinks else []
        for sink in self.sinks:
            sink.start(records)

    def write(self, step: int, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(int(step), record)

    def close(self, failed: bool = False) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close(failed)

    def __enter__(self) -> MetricSinks:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


class TensorBoardSink:
    """Scalars in ``WORKDIR/tensorboard`` (tags: the metrics.jsonl keys), the config as
    HParams of the same run. ``start`` rewrites the event file from the metrics records."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self._tbx = _import("tensorboard", "tensorboardX")
        self.logdir = os.path.join(workdir, TENSORBOARD_DIR)
        self._hparams = hyperparameters(config)
        self._writer = None
        self._step_tags: tuple[int, set[str]] = (-1, set())  # tags written at the last step

    def start(self, records: list[dict[str, Any]]) -> None:
        os.makedirs(self.logdir, exist_ok=True)
        for path in glob.glob(os.path.join(self.logdir, "events.out.tfevents.*")):
            os.remove(path)  # derived data: rewritten below from the source of truth
        self._writer = self._tbx.SummaryWriter(self.logdir, flush_secs=30)
        self._write_hparams(sorted({k for r in records for k in _scalars(r)}
                                   | {"train_loss", "train_accuracy", "eval_top1",
                                      "eval_top5", "eval_loss"}))
        for record in records:
            self._add(int(record["step"]), record)
        self._writer.flush()

    def _write_hparams(self, metric_tags: list[str]) -> None:
        from tensorboardX.summary import hparams

        experiment, start, end = hparams(self._hparams, dict.fromkeys(metric_tags, 0.0))
        file_writer = self._writer._get_file_writer()
        for summary in (experiment, start, end):
            file_writer.add_summary(summary)

    def _add(self, step: int, record: dict[str, Any]) -> None:
        if step != self._step_tags[0]:
            self._step_tags = (step, set())
        written = self._step_tags[1]
        for tag, value in _scalars(record).items():
            if tag not in written:  # "epoch" is in both the train and the eval record
                self._writer.add_scalar(tag, value, step)
                written.add(tag)

    def write(self, step: int, record: dict[str, Any]) -> None:
        self._add(step, record)
        self._writer.flush()  # once per log record: cheap, and a viewer sees it at once

    def close(self, failed: bool) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandbSink:
    """One W&B run per workdir (its id in ``WORKDIR/wandb_run.json``), the config as its
    config. Rows are committed per step, never at or before the last committed step.

    The file records the last step only once ``finish`` has returned: wandb-core buffers
    what it is sent (a SIGKILLed job had written nothing of its offline run), so after a
    kill the rerun logs again every step since the last clean finish (W&B keeps the first
    value of a step it already has; a resumed run's values are the same anyway)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self._wandb = _import("wandb.enabled", "wandb")
        self.workdir = workdir
        self.state_path = os.path.join(workdir, WANDB_STATE_FILE)
        self._config = config
        self._run = None
        self._pending: tuple[int, dict[str, Any]] | None = None  # the uncommitted row
        self.state = self._read_state()

    def _read_state(self) -> dict[str, Any]:
        if os.path.exists(self.state_path):
            with open(self.state_path) as f:
                return json.load(f)
        return {"id": secrets.token_hex(4), "step": -1}  # W&B ids: [a-z0-9]

    def _save_state(self) -> None:
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f)
        os.replace(tmp, self.state_path)

    def start(self, records: list[dict[str, Any]]) -> None:
        w = self._config.wandb
        self._run = self._wandb.init(
            project=w.project, entity=w.entity or None,
            name=w.name or os.path.basename(os.path.abspath(self.workdir)),
            tags=config_lib.wandb_tags(self._config) or None, id=self.state["id"],
            resume="allow", dir=self.workdir)
        # Through update, not init(config=...): a resumed run may change bookkeeping fields.
        self._run.config.update(self._config.to_dict(), allow_val_change=True)
        self._save_state()
        for record in records:
            self.write(int(record["step"]), record)

    def write(self, step: int, record: dict[str, Any]) -> None:
        if step <= self.state["step"]:
            return  # committed by an earlier run: the same values (bit-exact resume)
        if self._pending is not None and self._pending[0] != step:
            self._commit()
        if self._pending is None:
            self._pending = (step, {})
        self._pending[1].update(_scalars(record))

    def _commit(self) -> None:
        step, values = self._pending
        self._pending = None
        self._run.log(values, step=step, commit=True)
        self.state["step"] = step  # on disk once finish() returns (see the class docstring)

    def close(self, failed: bool) -> None:
        if self._run is None:
            return
        try:
            if self._pending is not None:
                self._commit()
        finally:
            run, self._run = self._run, None
            with contextlib.suppress(Exception) if failed else contextlib.nullcontext():
                run.finish(exit_code=1 if failed else 0)
                self._save_state()

