"""Planning, running and reporting a study: parameter counts and cost estimates, the
resumable training of its runs (``train_and_evaluate`` into ``WORKDIR/<run name>``), and the
report read from the runs' files (``results.json``, ``study.md``, one PNG per experiment).
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections
from tqdm import tqdm

from rpg_jax import data, experiment, preemption, train
from rpg_jax.metrics import read_metrics
from rpg_jax.study.report import SPREAD, Run, Study, matches, runs_table, select_runs

# Forward-only evaluation processes images at least this many times faster than training
# (ResNet-20 on the 2-core CPU machine: 3-7x); used only for --list's cost estimate.
EVAL_SPEEDUP = 3.0


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
def _dataset_info(dataset: str, data_dir: str, synthetic_size: int,
                  holdout: int) -> data.DatasetInfo:
    return data.dataset_info(dataset, data_dir or None, synthetic_size=synthetic_size or None,
                             holdout=holdout)


def _build(config: ml_collections.ConfigDict) -> experiment.Experiment:
    info = _dataset_info(config.dataset, config.data_dir, config.synthetic_size,
                         config.holdout_examples)
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


def _save_figure(fig: Any, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)


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
                   if any(matches(r, w) for w in exp.filters().values())]
        summary = exp.summarize(study.runs, results)
        exp_missing = [name for name in members if name not in results]
        experiments.append({"name": exp.name, "kind": exp.kind, "title": exp.title,
                            **summary, "missing": exp_missing})
        _save_figure(exp.figure(summary), os.path.join(out, f"{exp.name}.png"))
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
        f.write(text + runs_table(results) + "\n")
    return report


# ----------------------------------------------------------------------- listing


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
