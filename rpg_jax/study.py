"""A resumable study runner: many training runs, then one report over all of them.

    python -m rpg_jax.study --study=studies/fashion_mnist.py --workdir=DIR \
        [--out=results/fashion_mnist] [--only=REGEX] [--report_only] [--list]

A study file defines ``get_study()`` returning a :class:`Study`: named runs (a config and
tags each) and the experiments of the report, which select runs by their tags. Runs train in
order into ``DIR/<run name>`` with ``train_and_evaluate``; a run whose ``summary.json`` says
it finished is skipped, an interrupted one resumes from its checkpoints. SIGTERM or Ctrl-C
saves the running run and stops the study; the same command resumes it. The report
(``results.json``, ``study.md``, one PNG per experiment, in ``--out``, default DIR) is
written after running, or alone with ``--report_only``; every number in it is read from the
runs' ``summary.json`` and ``metrics.jsonl``, and runs not finished yet are listed as missing.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # python -m rpg_jax.study
    # One module, not two copies: the study file's ``from rpg_jax.study import Study`` gets
    # this one, whose Study and Run classes main() checks against.
    sys.modules.setdefault("rpg_jax.study", sys.modules[__name__])
    from rpg_jax import cli

    cli.check_study_args(sys.argv)  # --help and flag errors answer before JAX is imported

import dataclasses
import functools
import importlib.util
import itertools
import json
import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import ml_collections
import numpy as np
from absl import app, logging
from tqdm import tqdm

from rpg_jax import cli, data, experiment, preemption, train
from rpg_jax import config as config_lib
from rpg_jax.metrics import read_metrics

EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: stopped early, rerun the same command to resume
SPREAD = "mean ± half range: ± (max - min) / 2 over the n finished runs (seeds)"
# Forward-only evaluation processes images at least this many times faster than training
# (ResNet-20 on the 2-core CPU machine: 3-7x); used only for --list's cost estimate.
EVAL_SPEEDUP = 3.0
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

Where = Mapping[str, Any]  # a tag filter: the runs whose tags have all these values


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run: ``config`` trains into ``WORKDIR/<name>``; ``tags`` describe it."""

    name: str
    config: ml_collections.ConfigDict
    tags: dict[str, Any] = dataclasses.field(default_factory=dict)


def _matches(run: Run, where: Where) -> bool:
    return all(k in run.tags and run.tags[k] == v for k, v in where.items())


def _stats(values: Sequence[float]) -> dict[str, Any]:
    """n, mean and spread (half the range) of ``values``; None for an empty list."""
    if not values:
        return {"n": 0, "mean": None, "spread": None}
    return {"n": len(values), "mean": float(np.mean(values)),
            "spread": float(max(values) - min(values)) / 2}


def fit_log_linear(trainable: Sequence[float], error_pct: Sequence[float]) -> dict[str, Any]:
    """Least squares error_pct = intercept + slope * log10(trainable) over the given points.

    Returns slope, intercept, r2 and n; slope and intercept are None with fewer than two
    distinct sizes, r2 is None when the errors are all equal.
    """
    x, y = np.log10(np.asarray(trainable, float)), np.asarray(error_pct, float)
    if len(np.unique(x)) < 2:
        return {"slope": None, "intercept": None, "r2": None, "n": len(x)}
    design = np.stack([np.ones_like(x), x], axis=1)
    (intercept, slope), *_ = np.linalg.lstsq(design, y, rcond=None)
    ss_res = float(np.sum((y - intercept - slope * x) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return {"slope": float(slope), "intercept": float(intercept),
            "r2": 1 - ss_res / ss_tot if ss_tot > 0 else None, "n": len(x)}


def _pm(stats: Mapping[str, Any], digits: int = 2) -> str:
    if not stats["n"]:
        return "(none finished)"
    return f"{stats['mean']:.{digits}f} ± {stats['spread']:.{digits}f}"


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _new_figure(ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(6.4 * ncols, 4.4), squeeze=False)
    return plt, fig, list(axes[0])


def _save(plt, fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _params_cell(values: Sequence[int]) -> str:
    return " / ".join(f"{v:,}" for v in values) if values else "-"


@dataclasses.dataclass(frozen=True)
class Scaling:
    """Test error vs trainable parameters (log x) of the runs matching ``where``, with the
    least-squares fit error(%) = a + b·log10(trainable) over the runs (not their means), and
    the same fit against log10(ring DoF), the paper's DoF, when every fitted run has a ring.
    ``reference`` (label -> tag filter) adds runs drawn with their own marker, not fitted."""

    kind: ClassVar[str] = "scaling"
    name: str
    title: str
    where: Where
    reference: Mapping[str, Where] = dataclasses.field(default_factory=dict)

    def filters(self) -> dict[str, Where]:
        return {"fit": self.where, **{f"reference {k!r}": v for k, v in self.reference.items()}}

    def summarize(self, runs: Sequence[Run], results: Mapping[str, dict]) -> dict[str, Any]:
        def point(name: str) -> dict[str, Any]:
            r = results[name]
            return {"run": name, "trainable": r["params"]["trainable"],
                    "ring_dof": r["params"]["ring_dof"], "top1": r["eval_top1"],
                    "error_pct": 100 * (1 - r["eval_top1"])}

        fitted = [point(r.name) for r in runs if _matches(r, self.where) and r.name in results]
        by_size: dict[int, list[dict]] = {}
        for p in fitted:
            by_size.setdefault(p["trainable"], []).append(p)
        sizes = [{"trainable": t, "ring_dof": ps[0]["ring_dof"],
                  "runs": [p["run"] for p in ps], "error_pct": _stats([p["error_pct"] for p in ps])}
                 for t, ps in sorted(by_size.items())]
        reference = []
        for label, where in self.reference.items():
            ps = [point(r.name) for r in runs if _matches(r, where) and r.name in results]
            reference.append({"label": label, "runs": [p["run"] for p in ps],
                              "trainable": sorted({p["trainable"] for p in ps}),
                              "points": ps, "error_pct": _stats([p["error_pct"] for p in ps])})
        fit = fit_log_linear([p["trainable"] for p in fitted], [p["error_pct"] for p in fitted])
        with_ring = fitted if all(p["ring_dof"] > 0 for p in fitted) else []
        fit_ring = fit_log_linear([p["ring_dof"] for p in with_ring],
                                  [p["error_pct"] for p in with_ring])
        return {"points": fitted, "by_size": sizes, "reference": reference, "fit": fit,
                "fit_ring_dof": fit_ring}

    def markdown(self, summary: Mapping[str, Any]) -> str:
        lines = ["| runs | ring DoF | trainable | n | test error % (mean ± half range) |",
                 "| --- | --- | --- | --- | --- |"]
        for s in summary["by_size"]:
            lines.append(f"| {', '.join(s['runs'])} | {s['ring_dof']:,} | {s['trainable']:,} | "
                         f"{s['error_pct']['n']} | {_pm(s['error_pct'])} |")
        for ref in summary["reference"]:
            lines.append(f"| {ref['label']} (reference, not fitted): {', '.join(ref['runs'])} | "
                         f"- | {_params_cell(ref['trainable'])} | {ref['error_pct']['n']} | "
                         f"{_pm(ref['error_pct'])} |")
        fit = summary["fit"]
        if fit["slope"] is None:
            lines.append(f"\nFit: needs runs of at least two sizes (n = {fit['n']}).")
        else:
            lines.append(f"\nLeast-squares fit over the n = {fit['n']} runs: test error (%) = "
                         f"{fit['intercept']:.3f} {fit['slope']:+.3f} · log10(trainable), "
                         f"R² = {_num(fit['r2'], '.4f')}; slope = {fit['slope']:+.3f} points "
                         "per decade of trainable parameters.")
        ring = summary["fit_ring_dof"]
        if ring["slope"] is not None:
            lines.append(f"Against the ring DoF alone (the paper's DoF): test error (%) = "
                         f"{ring['intercept']:.3f} {ring['slope']:+.3f} · log10(ring DoF), "
                         f"R² = {_num(ring['r2'], '.4f')}.")
        return "\n".join(lines)

    def plot(self, summary: Mapping[str, Any], path: str) -> None:
        plt, fig, (ax,) = _new_figure()
        points, fit = summary["points"], summary["fit"]
        ax.plot([p["trainable"] for p in points], [p["error_pct"] for p in points], "o",
                color="C0", label="runs (fitted)")
        if fit["slope"] is not None:
            xs = np.logspace(*np.log10([min(p["trainable"] for p in points),
                                        max(p["trainable"] for p in points)]), 50)
            ax.plot(xs, fit["intercept"] + fit["slope"] * np.log10(xs), "-", color="C0",
                    alpha=0.6, label=f"fit: {fit['slope']:+.2f} pts/decade, "
                                     f"R² {_num(fit['r2'], '.3f')}")
        for i, ref in enumerate(summary["reference"]):
            ax.plot([p["trainable"] for p in ref["points"]],
                    [p["error_pct"] for p in ref["points"]], "sD^v<>"[i % 6],
                    color=f"C{i + 1}", label=f"{ref['label']} (not fitted)")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("test top-1 error (%)")
        ax.set_title(self.title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        _save(plt, fig, path)


def _arm_runs(runs: Sequence[Run], arms: Mapping[str, Where]) -> dict[str, list[Run]]:
    return {label: [r for r in runs if _matches(r, where)] for label, where in arms.items()}


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Named arms (label -> tag filter, typically the seeds of one setting): test top-1
    mean ± spread, n and trainable parameters per arm, and each arm's difference to
    ``baseline``."""

    kind: ClassVar[str] = "comparison"
    name: str
    title: str
    arms: Mapping[str, Where]
    baseline: str

    def filters(self) -> dict[str, Where]:
        return {f"arm {k!r}": v for k, v in self.arms.items()}

    def summarize(self, runs: Sequence[Run], results: Mapping[str, dict]) -> dict[str, Any]:
        arms = []
        for label, members in _arm_runs(runs, self.arms).items():
            done = [results[r.name] for r in members if r.name in results]
            arms.append({"label": label, "runs": [r["name"] for r in done],
                         "top1": [r["eval_top1"] for r in done],
                         "top1_pct": _stats([100 * r["eval_top1"] for r in done]),
                         "trainable": sorted({r["params"]["trainable"] for r in done}),
                         "ring_dof": sorted({r["params"]["ring_dof"] for r in done})})
        base = next(a for a in arms if a["label"] == self.baseline)["top1_pct"]["mean"]
        for arm in arms:
            mean = arm["top1_pct"]["mean"]
            arm["diff_vs_baseline_pct"] = None if None in (mean, base) else mean - base
        return {"baseline": self.baseline, "arms": arms}

    def markdown(self, summary: Mapping[str, Any]) -> str:
        lines = ["| arm | n | trainable | ring DoF | test top-1 % (mean ± half range) | "
                 f"Δ vs {summary['baseline']} (points) | runs |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]
        for a in summary["arms"]:
            lines.append(f"| {a['label']} | {a['top1_pct']['n']} | {_params_cell(a['trainable'])}"
                         f" | {_params_cell(a['ring_dof'])} | {_pm(a['top1_pct'])} | "
                         f"{_num(a['diff_vs_baseline_pct'], '+.2f')} | {', '.join(a['runs'])} |")
        return "\n".join(lines)

    def plot(self, summary: Mapping[str, Any], path: str) -> None:
        plt, fig, (ax,) = _new_figure()
        arms = summary["arms"]
        for i, a in enumerate(arms):
            if a["top1_pct"]["n"]:
                ax.bar(i, a["top1_pct"]["mean"], yerr=a["top1_pct"]["spread"], capsize=6,
                       color=f"C{i}", alpha=0.7)
                ax.plot([i] * len(a["top1"]), [100 * v for v in a["top1"]], "k.", ms=8)
        values = [100 * v for a in arms for v in a["top1"]]
        if values:
            pad = max(0.5, (max(values) - min(values)) * 0.3)
            ax.set_ylim(max(0.0, min(values) - pad), min(100.0, max(values) + pad))
        ax.set_xticks(range(len(arms)),
                      [textwrap.fill(a["label"], 18) + f"\n{_params_cell(a['trainable'])} params"
                       for a in arms],
                      fontsize=8)
        ax.set_ylabel("test top-1 (%), bars: mean ± half range, dots: runs")
        ax.set_title(self.title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        _save(plt, fig, path)


def _curve_stats(curves: Sequence[Sequence[Sequence[float]]],
                 scale: float) -> list[dict[str, Any]]:
    """Per step over the runs' (step, epoch, value, ...) rows: epoch, n, mean and spread of
    ``scale * value``."""
    by_step: dict[int, list] = {}
    for curve in curves:
        for row in curve:
            by_step.setdefault(row[0], []).append(row)
    return [{"step": step, "epoch": rows[0][1], **_stats([scale * row[2] for row in rows])}
            for step, rows in sorted(by_step.items())]


@dataclasses.dataclass(frozen=True)
class Curves:
    """Named arms: test top-1 per evaluation (mean over seeds, spread as a band) and training
    loss vs epoch."""

    kind: ClassVar[str] = "curves"
    name: str
    title: str
    arms: Mapping[str, Where]

    def filters(self) -> dict[str, Where]:
        return {f"arm {k!r}": v for k, v in self.arms.items()}

    def summarize(self, runs: Sequence[Run], results: Mapping[str, dict]) -> dict[str, Any]:
        arms = []
        for label, members in _arm_runs(runs, self.arms).items():
            done = [results[r.name] for r in members if r.name in results]
            arms.append({"label": label, "runs": [r["name"] for r in done],
                         "top1_pct": _curve_stats([r["eval_curve"] for r in done], 100.0),
                         "train_loss": _curve_stats([r["train_curve"] for r in done], 1.0)})
        return {"arms": arms}

    def markdown(self, summary: Mapping[str, Any]) -> str:
        epochs = sorted({p["epoch"] for a in summary["arms"] for p in a["top1_pct"]})
        lines = ["| arm | n | " + " | ".join(f"top-1 % at epoch {e:g}" for e in epochs)
                 + " | final train loss | runs |",
                 "| --- | --- | " + "--- | " * len(epochs) + "--- | --- |"]
        for a in summary["arms"]:
            at = {p["epoch"]: p for p in a["top1_pct"]}
            cells = [_pm(at[e]) if e in at else "-" for e in epochs]
            loss = _pm(a["train_loss"][-1], 4) if a["train_loss"] else "-"
            lines.append(f"| {a['label']} | {len(a['runs'])} | {' | '.join(cells)} | {loss} | "
                         f"{', '.join(a['runs'])} |")
        lines.append("\nCells: mean ± half range over the n runs.")
        return "\n".join(lines)

    def plot(self, summary: Mapping[str, Any], path: str) -> None:
        plt, fig, (top1, loss) = _new_figure(ncols=2)
        for i, a in enumerate(summary["arms"]):
            for ax, points in ((top1, a["top1_pct"]), (loss, a["train_loss"])):
                if not points:
                    continue
                x = [p["epoch"] for p in points]
                mean = np.array([p["mean"] for p in points])
                spread = np.array([p["spread"] for p in points])
                ax.plot(x, mean, "o-" if ax is top1 else "-", color=f"C{i}",
                        label=f"{a['label']} (n={len(a['runs'])})")
                ax.fill_between(x, mean - spread, mean + spread, color=f"C{i}", alpha=0.2)
        top1.set_ylabel("test top-1 (%)")
        loss.set_ylabel("training loss (logged window means)")
        for ax in (top1, loss):
            ax.set_xlabel("epoch")
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        fig.suptitle(f"{self.title} (band: ± half range over seeds)", fontsize=10)
        _save(plt, fig, path)


EXPERIMENT_KINDS = (Scaling, Comparison, Curves)


def _check_name(what: str, name: Any) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{what} name {name!r} is not filesystem-safe: use 1-100 letters, "
                         "digits, '.', '_' or '-', starting with a letter or digit")


@dataclasses.dataclass(frozen=True)
class Study:
    """Runs (trained in this order) and the experiments of the report; validated on creation
    (names, every run's config, every experiment's tag filters), so a bad study fails before
    anything trains. ``images_per_sec`` maps (model, width) to the training images/s of the
    machine the study is meant for; it only feeds the cost estimate of ``--list``."""

    name: str
    runs: list[Run]
    experiments: list[Scaling | Comparison | Curves]
    description: str = ""
    images_per_sec: Mapping[tuple[str, float], float] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _check_name("study", self.name)
        seen: set[str] = set()
        for run in self.runs:
            _check_name("run", run.name)
            if run.name in seen:
                raise ValueError(f"duplicate run name {run.name!r} in study {self.name!r}")
            seen.add(run.name)
            try:
                json.dumps(run.tags)
            except TypeError as e:
                raise ValueError(f"run {run.name!r}: tags must be JSON-serialisable: {e}") from e
            if not isinstance(run.config, ml_collections.ConfigDict):
                raise ValueError(f"run {run.name!r}: config must be an ml_collections.ConfigDict")
            try:
                config_lib.validate(run.config)
            except (ValueError, KeyError, AttributeError, TypeError) as e:
                raise ValueError(f"run {run.name!r}: invalid config: {e}") from e
        names: set[str] = set()
        for exp in self.experiments:
            if not isinstance(exp, EXPERIMENT_KINDS):
                raise ValueError(f"experiment {exp!r} is not one of Scaling, Comparison, Curves")
            _check_name("experiment", exp.name)
            if exp.name in names:
                raise ValueError(f"duplicate experiment name {exp.name!r}")
            names.add(exp.name)
            for label, where in exp.filters().items():
                if not any(_matches(r, where) for r in self.runs):
                    raise ValueError(f"experiment {exp.name!r}: {label} {dict(where)} matches "
                                     "no run's tags")
            if isinstance(exp, Comparison) and exp.baseline not in exp.arms:
                raise ValueError(f"experiment {exp.name!r}: baseline {exp.baseline!r} is not "
                                 f"one of its arms {list(exp.arms)}")


def load_study(path: str | os.PathLike) -> Study:
    """Imports the study file at ``path`` and returns its ``get_study()``.

    The file's grandparent directory (the repository root for ``studies/NAME.py``) goes on
    ``sys.path`` so the file can ``from configs import ...``.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise ValueError(f"study file {str(path)!r} does not exist")
    root = str(path.parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    module_name = f"_rpg_study_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_study", None)):
        raise ValueError(f"study file {str(path)!r} defines no get_study()")
    study = module.get_study()
    if not isinstance(study, Study):
        raise ValueError(f"get_study() of {str(path)!r} returned {type(study).__name__}, "
                         "not a rpg_jax.study.Study")
    return study


# ----------------------------------------------------------------------- sizes and costs


@functools.cache
def _dataset_info(dataset: str, data_dir: str, synthetic_size: int) -> data.DatasetInfo:
    return data.dataset_info(dataset, data_dir or None, synthetic_size=synthetic_size or None)


def _build(config: ml_collections.ConfigDict) -> experiment.Experiment:
    info = _dataset_info(config.dataset, config.data_dir, config.synthetic_size)
    return experiment.build(config, info)


def _counts(exp: experiment.Experiment) -> dict[str, int]:
    c = exp.param_count()
    return {"ring_dof": c.ring_dof, "free": c.free, "trainable": c.trainable,
            "generated": c.generated}


def param_counts(config: ml_collections.ConfigDict) -> dict[str, int]:
    """Trainable parameters of the model ``config`` describes (shapes only, no init):
    ``ring_dof``, ``free`` (trainable, not generated), ``trainable`` and ``generated``. A
    plain model (RPG disabled) has ``free == trainable`` and no ring."""
    return _counts(_build(config))


def plan(run: Run, images_per_sec: Mapping[tuple[str, float], float]) -> dict[str, Any]:
    """Parameter counts, steps, evaluations and the estimated seconds (None without a speed
    for its (model, width)) of ``run``; raises ValueError naming the run for a config that
    cannot be built (e.g. a ring larger than the weights it generates)."""
    config = run.config
    try:
        exp = _build(config)
    except ValueError as e:
        raise ValueError(f"run {run.name!r}: {e}") from e
    eval_batch = config.eval_batch_size or config.batch_size
    eval_examples = (exp.info.num_eval if config.eval_steps < 0
                     else min(exp.info.num_eval, config.eval_steps * eval_batch))
    speed = images_per_sec.get((config.model, float(config.width)))
    seconds = None
    if speed:
        seconds = ((exp.num_steps * config.batch_size
                    + exp.num_evals * eval_examples / EVAL_SPEEDUP) / speed)
    return {**_counts(exp), "num_steps": exp.num_steps, "evals": exp.num_evals,
            "seconds": seconds}


# ----------------------------------------------------------------------- running


def _read_summary(run_dir: str) -> dict[str, Any] | None:
    path = os.path.join(run_dir, train.SUMMARY_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def is_finished(run_dir: str) -> bool:
    """Whether the run in ``run_dir`` has a summary.json that is not from a preemption."""
    summary = _read_summary(run_dir)
    return summary is not None and not summary["preempted"]


def _steps_done(run_dir: str) -> int:
    summary = _read_summary(run_dir)
    if summary is not None:
        return summary["step"]
    return max((r["step"] for r in read_metrics(run_dir)), default=0)


def _check_saved_config(run: Run, run_dir: str) -> None:
    """A run directory trained with another config (on the fields both have) is an error."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = _flatten(json.load(f))
    wanted = _flatten(json.loads(run.config.to_json()))
    changed = sorted(k for k in saved.keys() & wanted.keys() if saved[k] != wanted[k])
    if changed:
        diffs = ", ".join(f"{k}: {saved[k]!r} -> {wanted[k]!r}" for k in changed)
        raise ValueError(f"run {run.name!r}: {run_dir} was trained with another config "
                         f"({diffs}); use another workdir or delete that run directory")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def select_runs(study: Study, only: str | None) -> list[Run]:
    """The study's runs whose names match the regex ``only`` (``re.search``); all if None."""
    if only is None:
        return list(study.runs)
    try:
        pattern = re.compile(only)
    except re.error as e:
        raise ValueError(f"--only={only!r} is not a valid regex: {e}") from e
    runs = [r for r in study.runs if pattern.search(r.name)]
    if not runs:
        raise ValueError(f"--only={only!r} matches none of the runs of study {study.name!r}")
    return runs


def run_study(study: Study, workdir: str, only: str | None = None) -> bool:
    """Trains the (selected) unfinished runs in order; True when all of them are finished.

    Every selected config is built first, and checked against what an existing run
    directory was trained with, so a bad run fails before anything trains. A run that comes
    back preempted (SIGTERM, Ctrl-C) stops the study: False, rerunning resumes.
    """
    runs = select_runs(study, only)
    for run in runs:
        plan(run, study.images_per_sec)
        _check_saved_config(run, os.path.join(workdir, run.name))
    todo = [r for r in runs if not is_finished(os.path.join(workdir, r.name))]
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), unit="run", dynamic_ncols=True,
               disable=not sys.stderr.isatty())
    try:
        # Each run watches ``stop`` from its set-up on: it saves after its current step.
        with preemption.stop_on_sigterm(ctrl_c=True) as stop:
            for i, run in enumerate(todo, start=len(runs) - len(todo) + 1):
                if stop.is_set():
                    return False
                tqdm.write(f"[{i}/{len(runs)}] {run.name}: training into "
                           f"{os.path.join(workdir, run.name)}")
                bar.set_description(run.name)
                summary = train.train_and_evaluate(run.config, os.path.join(workdir, run.name),
                                                   stop=stop)
                if summary["preempted"]:
                    tqdm.write(f"{run.name}: stopped at step {summary['step']} of "
                               f"{summary['num_steps']} (checkpoint saved)")
                    return False
                tqdm.write(f"{run.name}: test top-1 {100 * summary['eval_top1']:.2f}%")
                bar.update(1)
            return True
    finally:
        bar.close()


# ----------------------------------------------------------------------- collect and report


def collect(study: Study, workdir: str) -> dict[str, dict[str, Any]]:
    """The finished runs' results, read from their summary.json and metrics.jsonl.

    Per run: name, tags, the final evaluation, params (ring_dof, trainable, generated,
    plain_model), steps, epochs, timings, ``eval_curve`` [(step, epoch, top1, loss)] and
    ``train_curve`` [(step, epoch, train_loss)] (the last record of a step wins).
    ``train_seconds`` and ``images_per_sec`` of summary.json cover the run's last session;
    ``train_seconds_all`` adds up every log window of metrics.jsonl (steps x batch size /
    the window's images/s: training only, over all sessions of a resumed run).
    """
    results = {}
    for run in study.runs:
        run_dir = os.path.join(workdir, run.name)
        summary = _read_summary(run_dir)
        if summary is None or summary["preempted"]:
            continue
        records = read_metrics(run_dir)
        evals = {r["step"]: r for r in records if "eval_top1" in r}
        logs = {r["step"]: r for r in records if "train_loss" in r}
        steps_done = [0, *sorted(logs)]
        train_seconds_all = sum((b - a) * run.config.batch_size / logs[b]["images_per_sec"]
                                for a, b in itertools.pairwise(steps_done))
        results[run.name] = {
            "name": run.name,
            "tags": dict(run.tags),
            **{k: summary.get(k) for k in ("eval_top1", "eval_top5", "eval_loss", "eval_count",
                                           "step", "num_steps", "epochs", "train_seconds",
                                           "images_per_sec", "compile_seconds")},
            "train_seconds_all": train_seconds_all,
            "batch_size": run.config.batch_size,
            "params": summary["params"],
            "eval_curve": [[s, r["epoch"], r["eval_top1"], r["eval_loss"]]
                           for s, r in sorted(evals.items())],
            "train_curve": [[s, r["epoch"], r["train_loss"]] for s, r in sorted(logs.items())],
        }
    return results


def _runs_table(results: Mapping[str, dict]) -> str:
    lines = ["| run | tags | ring DoF | trainable | test top-1 % | test top-5 % | test loss | "
             "epochs | training time | images/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results.values():
        tags = ", ".join(f"{k}={v}" for k, v in r["tags"].items())
        seconds = r["train_seconds_all"]
        rate = f"{r['step'] * r['batch_size'] / seconds:.0f}" if seconds else "-"
        lines.append(f"| {r['name']} | {tags} | {r['params']['ring_dof']:,} | "
                     f"{r['params']['trainable']:,} | {100 * r['eval_top1']:.2f} | "
                     f"{100 * r['eval_top5']:.2f} | {r['eval_loss']:.4f} | {r['epochs']:g} | "
                     f"{seconds / 60:.1f} min | {rate} |")
    return "\n".join(lines)


def write_report(study: Study, workdir: str, out: str) -> dict[str, Any]:
    """Writes results.json, study.md and EXPERIMENT.png files to ``out``; returns the results.

    Covers the finished runs; the others are listed as missing, overall and per experiment.
    """
    results = collect(study, workdir)
    missing = [r.name for r in study.runs if r.name not in results]
    os.makedirs(out, exist_ok=True)
    experiments, sections = [], []
    for exp in study.experiments:
        members = [r.name for r in study.runs
                   if any(_matches(r, w) for w in exp.filters().values())]
        summary = exp.summarize(study.runs, results)
        exp_missing = [name for name in members if name not in results]
        experiments.append({"name": exp.name, "kind": exp.kind, "title": exp.title,
                            **summary, "missing": exp_missing})
        exp.plot(summary, os.path.join(out, f"{exp.name}.png"))
        note = f"\n\nNot finished yet: {', '.join(exp_missing)}." if exp_missing else ""
        sections.append(f"## {exp.name}: {exp.title}\n\n{exp.markdown(summary)}{note}\n\n"
                        f"![{exp.name}]({exp.name}.png)\n")
    report = {"study": study.name, "description": study.description,
              "workdir": workdir, "spread": SPREAD,
              "finished": len(results), "total": len(study.runs), "missing": missing,
              "runs": list(results.values()), "experiments": experiments}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    header = [f"# Study {study.name}", "", study.description.strip(), "",
              f"{len(results)} of {len(study.runs)} runs finished"
              + (f"; not finished yet: {', '.join(missing)}." if missing else "."),
              f"Every number is read from `WORKDIR/<run>/summary.json` and `metrics.jsonl` "
              f"(`{workdir}`). Tables show the {SPREAD}; test top-1 is the "
              "final evaluation of each run.", ""]
    text = ("\n".join(header) + "\n" + "\n".join(sections) + "\n## Runs\n\n"
            "Training time sums the log windows of all sessions (evaluation and checkpoints "
            "excluded).\n\n")
    with open(os.path.join(out, "study.md"), "w") as f:
        f.write(text + _runs_table(results) + "\n")
    return report


# ----------------------------------------------------------------------- command line


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.2f} h"


def list_runs(study: Study, workdir: str, only: str | None = None) -> str:
    """One line per (selected) run: status, parameter counts, estimated cost and tags."""
    runs = select_runs(study, only)
    lines = [f"{'run':<26} {'status':<18} {'trainable':>10} {'ring DoF':>9} {'est. cost':>10}"
             "  tags"]
    total = remaining = 0.0
    finished, unknown = 0, False
    for run in runs:
        p = plan(run, study.images_per_sec)
        run_dir = os.path.join(workdir, run.name)
        finished += is_finished(run_dir)
        done = p["num_steps"] if is_finished(run_dir) else min(_steps_done(run_dir),
                                                                p["num_steps"])
        status = ("finished" if is_finished(run_dir) else
                  f"step {done}/{p['num_steps']}" if done else "not started")
        if p["seconds"] is None:
            unknown = True
        else:
            total += p["seconds"]
            remaining += p["seconds"] * (1 - done / p["num_steps"])
        tags = " ".join(f"{k}={v}" for k, v in run.tags.items())
        lines.append(f"{run.name:<26} {status:<18} {p['trainable']:>10,} {p['ring_dof']:>9,} "
                     f"{_duration(p['seconds']):>10}  {tags}")
    lines.append(f"\n{len(runs)} runs ({finished} finished); estimated CPU time "
                 f"{_duration(total)} in all, {_duration(remaining)} remaining"
                 + (" (runs without a speed in the study's images_per_sec: '?')"
                    if unknown else "")
                 + "; training images/s: "
                 + ", ".join(f"{m} x{w:g} {v:.0f}" for (m, w), v in study.images_per_sec.items())
                 + f", evaluation taken as {EVAL_SPEEDUP:g}x faster per image.")
    return "\n".join(lines)


def parse_args(argv: Sequence[str]):
    """Parses the command line (``argv[0]`` is the program name; flags: ``rpg_jax.cli``)."""
    return cli.parse_study_args(argv)


def main(args) -> int:
    """Runs the command line parsed by :func:`parse_args`; returns the exit status."""
    study = load_study(args.study)
    if args.list:
        print(list_runs(study, args.workdir, args.only))
        return 0
    if not args.report_only and not run_study(study, args.workdir, args.only):
        print(f"Study {study.name!r} stopped before all runs finished; run the same command "
              "again to resume (--report_only writes the report of the finished runs).",
              file=sys.stderr)
        return EXIT_STOPPED
    out = args.out or args.workdir
    report = write_report(study, args.workdir, out)
    print(f"Report of {report['finished']}/{report['total']} finished runs: "
          f"{os.path.join(out, 'study.md')}, results.json and "
          f"{len(study.experiments)} plots in {out}")
    return 0


def _cli(args) -> None:
    logging.get_absl_handler().addFilter(train.quiet_library_logs)
    sys.exit(main(args))


if __name__ == "__main__":
    app.run(_cli, flags_parser=parse_args)
