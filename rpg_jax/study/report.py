"""What a study is and what its report computes: runs, the study, the report kinds
(``Scaling``, ``Comparison``, ``Curves``) with their statistics, tables and figures, and the
selection of runs by tags or names.

Each report kind has ``filters()`` (label -> tag filter: the runs it selects),
``summarize(runs, results)`` (its numbers), ``markdown(summary)`` (its table) and
``figure(summary)`` (a matplotlib figure). No I/O and no JAX here: the runs' results come in
as dicts (``runner.collect`` reads them), and ``runner.write_report`` writes what comes out.
"""

from __future__ import annotations

import dataclasses
import json
import re
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import ml_collections
import numpy as np

from rpg_jax import config as config_lib

SPREAD = "mean ± half range: ± (max - min) / 2 over the n finished runs (seeds)"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

Where = Mapping[str, Any]  # a tag filter: the runs whose tags have all these values


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run: ``config`` trains into ``WORKDIR/<name>``; ``tags`` describe it."""

    name: str
    config: ml_collections.ConfigDict
    tags: dict[str, Any] = dataclasses.field(default_factory=dict)


def matches(run: Run, where: Where) -> bool:
    """Whether ``run``'s tags have every value of the filter ``where``."""
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
    return fig, list(axes[0])


def _wrapped_title(title: str, ncols: int = 1) -> str:
    """``title`` broken into lines that fit a figure of ``ncols`` panels at font size 10."""
    return textwrap.fill(title, 75 * ncols)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """The lines of a markdown table: ``header``, its rule, then one line per row of cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


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

        fitted = [point(r.name) for r in runs if matches(r, self.where) and r.name in results]
        by_size: dict[int, list[dict]] = {}
        for p in fitted:
            by_size.setdefault(p["trainable"], []).append(p)
        sizes = [{"trainable": t, "ring_dof": ps[0]["ring_dof"],
                  "runs": [p["run"] for p in ps], "error_pct": _stats([p["error_pct"] for p in ps])}
                 for t, ps in sorted(by_size.items())]
        reference = []
        for label, where in self.reference.items():
            ps = [point(r.name) for r in runs if matches(r, where) and r.name in results]
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
        rows = [[", ".join(s["runs"]), f"{s['ring_dof']:,}", f"{s['trainable']:,}",
                 s["error_pct"]["n"], _pm(s["error_pct"])] for s in summary["by_size"]]
        rows += [[f"{ref['label']} (reference, not fitted): {', '.join(ref['runs'])}", "-",
                  _params_cell(ref["trainable"]), ref["error_pct"]["n"], _pm(ref["error_pct"])]
                 for ref in summary["reference"]]
        lines = _table(["runs", "ring DoF", "trainable", "n",
                        "test error % (mean ± half range)"], rows)
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

    def figure(self, summary: Mapping[str, Any]) -> Any:
        fig, (ax,) = _new_figure()
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
        ax.set_title(_wrapped_title(self.title), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig


@dataclasses.dataclass(frozen=True)
class _ArmedExperiment:
    """What Comparison and Curves share: named arms, each a tag filter over the runs."""

    name: str
    title: str
    arms: Mapping[str, Where]

    def filters(self) -> dict[str, Where]:
        return {f"arm {k!r}": v for k, v in self.arms.items()}

    def finished_by_arm(self, runs: Sequence[Run],
                        results: Mapping[str, dict]) -> dict[str, list[dict]]:
        """Per arm label, the results of its finished runs (in the study's order)."""
        return {label: [results[r.name] for r in runs if matches(r, where) and r.name in results]
                for label, where in self.arms.items()}


@dataclasses.dataclass(frozen=True)
class Comparison(_ArmedExperiment):
    """Named arms (label -> tag filter, typically the seeds of one setting): test top-1
    mean ± spread, n and trainable parameters per arm, and each arm's difference to
    ``baseline``."""

    kind: ClassVar[str] = "comparison"
    baseline: str

    def summarize(self, runs: Sequence[Run], results: Mapping[str, dict]) -> dict[str, Any]:
        arms = []
        for label, done in self.finished_by_arm(runs, results).items():
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
        header = ["arm", "n", "trainable", "ring DoF", "test top-1 % (mean ± half range)",
                  f"Δ vs {summary['baseline']} (points)", "runs"]
        return "\n".join(_table(header, (
            [a["label"], a["top1_pct"]["n"], _params_cell(a["trainable"]),
             _params_cell(a["ring_dof"]), _pm(a["top1_pct"]),
             _num(a["diff_vs_baseline_pct"], "+.2f"), ", ".join(a["runs"])]
            for a in summary["arms"])))

    def figure(self, summary: Mapping[str, Any]) -> Any:
        fig, (ax,) = _new_figure()
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
        ax.set_title(_wrapped_title(self.title), fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        return fig


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
class Curves(_ArmedExperiment):
    """Named arms: test top-1 per evaluation (mean over seeds, spread as a band) and training
    loss vs epoch."""

    kind: ClassVar[str] = "curves"

    def summarize(self, runs: Sequence[Run], results: Mapping[str, dict]) -> dict[str, Any]:
        arms = []
        for label, done in self.finished_by_arm(runs, results).items():
            arms.append({"label": label, "runs": [r["name"] for r in done],
                         "top1_pct": _curve_stats([r["eval_curve"] for r in done], 100.0),
                         "train_loss": _curve_stats([r["train_curve"] for r in done], 1.0)})
        return {"arms": arms}

    def markdown(self, summary: Mapping[str, Any]) -> str:
        epochs = sorted({p["epoch"] for a in summary["arms"] for p in a["top1_pct"]})
        rows = []
        for a in summary["arms"]:
            at = {p["epoch"]: p for p in a["top1_pct"]}
            cells = [_pm(at[e]) if e in at else "-" for e in epochs]
            loss = _pm(a["train_loss"][-1], 4) if a["train_loss"] else "-"
            rows.append([a["label"], len(a["runs"]), *cells, loss, ", ".join(a["runs"])])
        lines = _table(["arm", "n", *(f"top-1 % at epoch {e:g}" for e in epochs),
                        "final train loss", "runs"], rows)
        lines.append("\nCells: mean ± half range over the n runs.")
        return "\n".join(lines)

    def figure(self, summary: Mapping[str, Any]) -> Any:
        fig, (top1, loss) = _new_figure(ncols=2)
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
        fig.suptitle(_wrapped_title(f"{self.title} (band: ± half range over seeds)", 2),
                     fontsize=10)
        fig.tight_layout()
        return fig


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
                if not any(matches(r, where) for r in self.runs):
                    raise ValueError(f"experiment {exp.name!r}: {label} {dict(where)} matches "
                                     "no run's tags")
            if isinstance(exp, Comparison) and exp.baseline not in exp.arms:
                raise ValueError(f"experiment {exp.name!r}: baseline {exp.baseline!r} is not "
                                 f"one of its arms {list(exp.arms)}")


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


def runs_table(results: Mapping[str, dict]) -> str:
    """The markdown table of the runs' results (``runner.collect``), one row a run."""
    rows = []
    for r in results.values():
        seconds = r["train_seconds_all"]
        rows.append([r["name"], ", ".join(f"{k}={v}" for k, v in r["tags"].items()),
                     f"{r['params']['ring_dof']:,}", f"{r['params']['trainable']:,}",
                     f"{100 * r['eval_top1']:.2f}", f"{100 * r['eval_top5']:.2f}",
                     f"{r['eval_loss']:.4f}", f"{r['epochs']:g}", f"{seconds / 60:.1f} min",
                     f"{r['step'] * r['batch_size'] / seconds:.0f}" if seconds else "-"])
    return "\n".join(_table(["run", "tags", "ring DoF", "trainable", "test top-1 %",
                              "test top-5 %", "test loss", "epochs", "training time",
                              "images/s"], rows))
