"""Tests for rpg_jax.study: the resumable study runner and its report.

A tiny study (tests/tiny_config.py: synthetic images, 8 steps) is run once per module through
the command line entry point, in four invocations: interrupted by Ctrl-C in its first run,
resumed with ``--only``, completed, and rerun. The tests check what each invocation trained
and that every number of the report equals what the runs wrote. The report's aggregates and
tables are also checked exactly on hand-written run files with known numbers. The
Fashion-MNIST study file is only loaded and listed (no training).
"""

from __future__ import annotations

import json
import math
import os
import signal
import textwrap
from pathlib import Path
from unittest import mock

import jax
import numpy as np
import pytest

import rpg_jax.study.__main__ as study_main
from rpg_jax import experiment, study
from rpg_jax import train as train_lib
from rpg_jax.metrics import read_metrics
from rpg_jax.study import Comparison, Curves, Run, Scaling, Study, fit_log_linear, report, runner
from step_hooks import at_step
from tiny_config import tiny_config

REPO = Path(__file__).resolve().parents[1]
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
RUNS = ("rpg_s0", "rpg_s1")

pytestmark = pytest.mark.usefixtures("compile_cache")

TINY_STUDY = '''
from rpg_jax.study import Comparison, Curves, Run, Scaling, Study
from tiny_config import tiny_config


def run(seed):
    config = tiny_config(**{"seed": seed, "rpg.seed": seed})
    return Run(f"rpg_s{seed}", config, {"tiny": True, "seed": seed})


def get_study():
    arms = {"seed 0": {"seed": 0}, "both": {"tiny": True}}
    return Study("tiny", [run(0), run(1)], [
        Scaling("sweep", "error vs parameters", where={"tiny": True},
                reference={"seed 1": {"seed": 1}}),
        Comparison("versus", "seeds", arms=arms, baseline="seed 0"),
        Curves("curves", "convergence", arms=arms),
    ], description="A tiny study.")
'''


def send_ctrl_c(step: int) -> None:
    # Never interrupt the test process unless the study handles SIGINT.
    assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    signal.raise_signal(signal.SIGINT)


def write_study(root: Path, text: str, name: str = "tiny") -> Path:
    path = root / "studies" / f"{name}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def cli(*args: str) -> int:
    return study_main.main(study_main.parse_args(["rpg_jax.study", *args]))


class Spy:
    """Wraps train_and_evaluate, recording the run directories it was called with and
    passing each run the ``on_step`` callback given to ``patch``."""

    def __init__(self):
        self.calls: list[str] = []
        self.on_step = None
        self.real = train_lib.train_and_evaluate

    def __call__(self, config, workdir, stop=None):
        self.calls.append(Path(workdir).name)
        return self.real(config, workdir, stop=stop, on_step=self.on_step)

    def patch(self, on_step=None):
        self.calls, self.on_step = [], on_step
        return mock.patch.object(train_lib, "train_and_evaluate", self)


def summary_of(workdir: Path, run: str) -> dict:
    return json.loads((workdir / run / "summary.json").read_text())


def mtimes(workdir: Path) -> dict[str, int]:
    return {run: (workdir / run / "summary.json").stat().st_mtime_ns for run in RUNS}


def experiment_named(results: dict, name: str) -> dict:
    return next(e for e in results["experiments"] if e["name"] == name)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Runs the tiny study in four invocations; returns what each one did."""
    root = tmp_path_factory.mktemp("study")
    path, workdir, out = write_study(root, TINY_STUDY), root / "work", root / "report"
    args = (f"--study={path}", f"--workdir={workdir}", f"--out={out}")
    spy, seen = Spy(), {"path": path, "workdir": workdir, "out": out}

    # 1. Ctrl-C during step 5 of the first run: it checkpoints, the study stops.
    seen["handlers_before"] = (signal.getsignal(signal.SIGINT),
                               signal.getsignal(signal.SIGTERM))
    with spy.patch(on_step=at_step(5, send_ctrl_c)):
        seen["stopped_exit"] = cli(*args)
    seen["stopped_calls"] = spy.calls
    seen["stopped_summary"] = summary_of(workdir, "rpg_s0")
    seen["stopped_dirs"] = sorted(os.listdir(workdir))
    seen["handlers_after"] = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    seen["report_after_stop"] = out.exists()

    # 2. Only rpg_s0: resumes it; the report lists rpg_s1 as missing.
    with spy.patch():
        seen["only_exit"] = cli(*args, "--only=_s0$")
    seen["only_calls"] = spy.calls
    seen["partial"] = json.loads((out / "results.json").read_text())
    seen["partial_md"] = (out / "study.md").read_text()

    # 3. Everything: trains rpg_s1 only.  4. Again: trains nothing.
    with spy.patch():
        seen["full_exit"] = cli(*args)
    seen["full_calls"] = spy.calls
    seen["mtimes_full"] = mtimes(workdir)
    with spy.patch():
        seen["again_exit"] = cli(*args)
    seen["again_calls"] = spy.calls
    seen["mtimes_again"] = mtimes(workdir)
    seen["results"] = json.loads((out / "results.json").read_text())
    return seen


# ------------------------------------------------------------------- running and resuming


def test_ctrl_c_stops_the_study_after_saving_and_starts_no_other_run(tiny):
    assert tiny["stopped_exit"] == study_main.EXIT_STOPPED
    assert tiny["stopped_calls"] == ["rpg_s0"]
    assert tiny["stopped_dirs"] == ["rpg_s0"]  # the next run never started
    assert tiny["stopped_summary"]["preempted"] is True
    assert tiny["stopped_summary"]["step"] == 5
    assert not tiny["report_after_stop"]  # stopping is prompt: no report
    assert tiny["handlers_after"] == tiny["handlers_before"]  # restored


def test_rerunning_resumes_the_interrupted_run_and_only_selects_matching_runs(tiny):
    assert tiny["only_exit"] == 0
    assert tiny["only_calls"] == ["rpg_s0"]
    final = summary_of(tiny["workdir"], "rpg_s0")
    assert final["step"] == 8 and final["preempted"] is False
    records = read_metrics(str(tiny["workdir"] / "rpg_s0"))
    steps = [(r["step"], "eval_top1" in r) for r in records]
    assert len(steps) == len(set(steps)) == 6  # resumed, not restarted or duplicated


def test_partial_report_covers_finished_runs_and_lists_the_missing(tiny):
    partial = tiny["partial"]
    assert partial["finished"] == 1 and partial["total"] == 2
    assert partial["missing"] == ["rpg_s1"]
    assert [r["name"] for r in partial["runs"]] == ["rpg_s0"]
    for exp in partial["experiments"]:
        assert exp["missing"] == ["rpg_s1"]
    versus = experiment_named(partial, "versus")
    assert [a["top1_pct"]["n"] for a in versus["arms"]] == [1, 1]
    sweep = experiment_named(partial, "sweep")
    assert sweep["reference"][0]["runs"] == [] and sweep["fit"]["slope"] is None
    assert "not finished yet: rpg_s1" in tiny["partial_md"]


def test_finished_runs_are_skipped(tiny):
    assert tiny["full_exit"] == tiny["again_exit"] == 0
    assert tiny["full_calls"] == ["rpg_s1"]
    assert tiny["again_calls"] == []
    assert tiny["mtimes_again"] == tiny["mtimes_full"]


def test_a_finished_run_trained_with_another_config_is_an_error(tiny):
    changed = study.load_study(tiny["path"])
    changed.runs[1].config.learning_rate = 0.05
    with pytest.raises(ValueError, match=r"run 'rpg_s1'.*learning_rate: 0.1 -> 0.05"):
        study.run_study(changed, str(tiny["workdir"]))


def test_sigterm_after_a_run_stops_before_the_next_run(tmp_path):
    """A SIGTERM outside train_and_evaluate's own handler (here: as a run returns) reaches
    the study's handler: no further run starts."""
    path = write_study(tmp_path, TINY_STUDY)
    calls, before = [], signal.getsignal(signal.SIGTERM)

    def finish_with_sigterm(config, workdir, stop):
        calls.append(Path(workdir).name)
        signal.raise_signal(signal.SIGTERM)  # reaches the study's handler: no train loop here
        assert stop.is_set()
        return {"preempted": False, "eval_top1": 0.5, "step": 8, "num_steps": 8}

    with mock.patch.object(train_lib, "train_and_evaluate", finish_with_sigterm):
        assert not study.run_study(study.load_study(path), str(tmp_path / "work"))
    assert calls == ["rpg_s0"]
    assert signal.getsignal(signal.SIGTERM) == before


def test_sigterm_before_the_train_loop_handles_it_stops_the_run_at_once(tmp_path):
    """A SIGTERM while a run is set up, before train_and_evaluate installs its own handler,
    still stops that run after its first step, with a checkpoint, and then the study."""
    path = write_study(tmp_path, TINY_STUDY)
    real = train_lib.train_and_evaluate

    def sigterm_then_train(config, workdir, stop):
        signal.raise_signal(signal.SIGTERM)
        return real(config, workdir, stop=stop)

    with mock.patch.object(train_lib, "train_and_evaluate", sigterm_then_train):
        assert not study.run_study(study.load_study(path), str(tmp_path / "work"))
    summary = summary_of(tmp_path / "work", "rpg_s0")
    assert summary["preempted"] is True and summary["step"] == 1
    assert (tmp_path / "work" / "rpg_s0" / "checkpoints" / "1").is_dir()
    assert not (tmp_path / "work" / "rpg_s1").exists()


# ------------------------------------------------------------------- the report of real runs


def test_results_equal_the_run_files(tiny):
    results, workdir = tiny["results"], tiny["workdir"]
    assert results["finished"] == 2 and results["missing"] == []
    assert [r["name"] for r in results["runs"]] == list(RUNS)
    for r in results["runs"]:
        summary = summary_of(workdir, r["name"])
        for key in ("eval_top1", "eval_top5", "eval_loss", "eval_count", "epochs", "step",
                    "train_seconds", "images_per_sec", "params"):
            assert r[key] == summary[key], (r["name"], key)
        records = read_metrics(str(workdir / r["name"]))
        assert r["eval_curve"] == [[e["step"], e["epoch"], e["eval_top1"], e["eval_loss"]]
                                   for e in records if "eval_top1" in e]
        assert r["train_curve"] == [[e["step"], e["epoch"], e["train_loss"]]
                                    for e in records if "train_loss" in e]
        assert [p[0] for p in r["eval_curve"]] == [4, 8]
        assert [p[0] for p in r["train_curve"]] == [2, 4, 6, 8]
        assert r["tags"] == {"tiny": True, "seed": int(r["name"][-1])}
        assert 0 < r["params"]["ring_dof"] < r["params"]["trainable"]


def test_aggregates_of_real_runs(tiny):
    s0, s1 = (summary_of(tiny["workdir"], run) for run in RUNS)
    top1 = [100 * s0["eval_top1"], 100 * s1["eval_top1"]]
    versus = experiment_named(tiny["results"], "versus")
    both = next(a for a in versus["arms"] if a["label"] == "both")
    assert both["runs"] == list(RUNS) and both["trainable"] == [s0["params"]["trainable"]]
    assert both["top1_pct"] == {"n": 2, "mean": pytest.approx(np.mean(top1)),
                                "spread": pytest.approx(abs(top1[0] - top1[1]) / 2)}
    assert both["diff_vs_baseline_pct"] == pytest.approx(np.mean(top1) - top1[0])
    sweep = experiment_named(tiny["results"], "sweep")
    assert [p["error_pct"] for p in sweep["points"]] == pytest.approx([100 - t for t in top1])
    assert sweep["fit"] == {"slope": None, "intercept": None, "r2": None, "n": 2}  # one size
    curves = experiment_named(tiny["results"], "curves")
    evals = [[r for r in read_metrics(str(tiny["workdir"] / run)) if "eval_top1" in r]
             for run in RUNS]
    points = next(a for a in curves["arms"] if a["label"] == "both")["top1_pct"]
    for i, point in enumerate(points):
        values = [100 * e[i]["eval_top1"] for e in evals]
        assert point["step"] == evals[0][i]["step"] and point["n"] == 2
        assert point["mean"] == pytest.approx(np.mean(values))
        assert point["spread"] == pytest.approx((max(values) - min(values)) / 2)


def test_markdown_and_plots_of_real_runs(tiny):
    out = tiny["out"]
    text = (out / "study.md").read_text()
    for name in ("sweep", "versus", "curves"):
        assert f"## {name}:" in text and f"]({name}.png)" in text
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for r in tiny["results"]["runs"]:
        assert f"| {r['name']} |" in text
        assert f"{100 * r['eval_top1']:.2f}" in text
        assert f"{r['params']['trainable']:,}" in text


def test_report_only_rewrites_the_report_without_training(tiny, tmp_path):
    spy = Spy()
    with spy.patch():
        assert cli(f"--study={tiny['path']}", f"--workdir={tiny['workdir']}",
                   f"--out={tmp_path}", "--report_only") == 0
    assert spy.calls == []
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == tiny["results"]["runs"]


def test_list(tiny, capsys):
    assert cli(f"--study={tiny['path']}", f"--workdir={tiny['workdir']}", "--list") == 0
    text = capsys.readouterr().out
    for run in RUNS:
        (line,) = [line for line in text.splitlines() if line.startswith(run + " ")]
        assert "finished" in line
        assert f"{summary_of(tiny['workdir'], run)['params']['trainable']:,}" in line
    assert "2 runs (2 finished)" in text


# ------------------------------------------------------------------- the report of known numbers


def fake_run(workdir: Path, name: str, trainable: int, top1: list[float],
             loss: list[float]) -> None:
    """Writes the summary.json and metrics.jsonl of a finished run evaluated at steps 2, 4."""
    run_dir = workdir / name
    run_dir.mkdir(parents=True)
    records = []
    for i, (acc, value) in enumerate(zip(top1, loss, strict=True)):
        step = 2 * (i + 1)
        records += [{"step": step, "epoch": step / 4, "train_loss": value, "train_accuracy": 0.5,
                     "learning_rate": 0.1, "images_per_sec": 100.0},
                    {"step": step, "epoch": step / 4, "eval_loss": value + 0.1, "eval_top1": acc,
                     "eval_top5": 1.0, "eval_count": 100}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"step": 4, "num_steps": 4, "epochs": 1.0, "preempted": False,
               "compile_seconds": 1.0, "train_seconds": 60.0, "images_per_sec": 100.0,
               **{k: v for k, v in records[-1].items() if k.startswith("eval_")},
               "params": {"ring_dof": trainable - 100, "trainable": trainable,
                          "generated": 10**6, "plain_model": 10**6 + 100}}
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_report_of_known_numbers(tmp_path):
    def run(name, seed=0, **tags):
        return Run(name, tiny_config(), {"seed": seed, **tags})

    runs = [run("r3", sweep=True), run("r4a", sweep=True, kind="mid"),
            run("r4b", 1, sweep=True, kind="mid"), run("r5", sweep=True),
            run("plain", kind="plain"), run("unfinished", sweep=True, kind="mid")]
    final = {"r3": (2000, 0.85), "r4a": (20000, 0.91), "r4b": (20000, 0.89),
             "r5": (200000, 0.95), "plain": (10**6, 0.96)}
    for name, (trainable, top1) in final.items():
        fake_run(tmp_path, name, trainable, [top1 - 0.1, top1], [1.0, 0.5])
    known = Study("known", runs, [
        Scaling("sweep", "sweep", where={"sweep": True},
                reference={"plain": {"kind": "plain"}}),
        Comparison("cmp", "cmp", arms={"plain": {"kind": "plain"}, "mid": {"kind": "mid"}},
                   baseline="plain"),
        Curves("curves", "curves", arms={"mid": {"kind": "mid"}}),
    ])
    report = study.write_report(known, str(tmp_path), str(tmp_path / "out"))
    assert report["missing"] == ["unfinished"]
    # Two log windows of 2 steps x batch 16 at 100 images/s: 0.64 s of training in all.
    assert [r["train_seconds_all"] for r in report["runs"]] == [pytest.approx(0.64)] * 5

    # Errors 15, 9, 11, 5 % at 0, 1, 1, 2 decades above 2000: slope -5, SSres 2, SStot 52.
    sweep = experiment_named(report, "sweep")
    assert [p["run"] for p in sweep["points"]] == ["r3", "r4a", "r4b", "r5"]
    assert sweep["fit"] == pytest.approx({"slope": -5.0, "intercept": 15 + 5 * math.log10(2000),
                                          "r2": 1 - 2 / 52, "n": 4})
    # fake_run's ring is trainable - 100: a slightly wider span, so a flatter ring-DoF fit.
    assert sweep["fit_ring_dof"] == pytest.approx(
        fit_log_linear([1900, 19900, 19900, 199900], [15.0, 9.0, 11.0, 5.0]))
    assert -5.0 < sweep["fit_ring_dof"]["slope"] < -4.9
    assert sweep["missing"] == ["unfinished"]
    assert [(s["trainable"], s["error_pct"]["n"]) for s in sweep["by_size"]] == [
        (2000, 1), (20000, 2), (200000, 1)]
    assert sweep["reference"][0]["runs"] == ["plain"]

    mid = experiment_named(report, "cmp")["arms"][1]
    assert mid["runs"] == ["r4a", "r4b"] and mid["trainable"] == [20000]
    assert mid["top1_pct"] == pytest.approx({"n": 2, "mean": 90.0, "spread": 1.0})
    assert mid["diff_vs_baseline_pct"] == pytest.approx(-6.0)
    curve = experiment_named(report, "curves")["arms"][0]
    assert [(p["step"], p["epoch"], p["n"]) for p in curve["top1_pct"]] == [(2, 0.5, 2),
                                                                           (4, 1.0, 2)]
    assert [p["mean"] for p in curve["top1_pct"]] == pytest.approx([80.0, 90.0])
    assert [p["spread"] for p in curve["top1_pct"]] == pytest.approx([1.0, 1.0])
    assert [p["mean"] for p in curve["train_loss"]] == pytest.approx([1.0, 0.5])

    text = (tmp_path / "out" / "study.md").read_text()
    assert "5 of 6 runs finished; not finished yet: unfinished." in text
    assert "| r4a, r4b | 19,900 | 20,000 | 2 | 10.00 ± 1.00 |" in text
    assert "-5.000 · log10(trainable), R² = 0.9615" in text
    assert f"{sweep['fit_ring_dof']['slope']:+.3f} · log10(ring DoF)" in text
    assert "| plain | 1 | 1,000,000 | 999,900 | 96.00 ± 0.00 | +0.00 | plain |" in text
    assert "| mid | 2 | 20,000 | 19,900 | 90.00 ± 1.00 | -6.00 | r4a, r4b |" in text
    assert "| mid | 2 | 80.00 ± 1.00 | 90.00 ± 1.00 | 0.5000 ± 0.0000 | r4a, r4b |" in text
    for name in ("sweep", "cmp", "curves"):
        assert (tmp_path / "out" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_report_with_no_finished_runs(tmp_path):
    path = write_study(tmp_path, TINY_STUDY)
    report = study.write_report(study.load_study(path), str(tmp_path / "none"),
                                str(tmp_path / "out"))
    assert report["finished"] == 0 and report["missing"] == list(RUNS)
    assert "0 of 2 runs finished" in (tmp_path / "out" / "study.md").read_text()
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        "curves.png", "sweep.png", "versus.png"]


# ------------------------------------------------------------------- the fit


def test_fit_log_linear_on_exact_numbers():
    fit = fit_log_linear([1e3, 1e4, 1e5], [15.0, 10.0, 5.0])  # error = 30 - 5 log10(x)
    assert fit["slope"] == pytest.approx(-5.0) and fit["intercept"] == pytest.approx(30.0)
    assert fit["r2"] == pytest.approx(1.0) and fit["n"] == 3
    # log10 x = 1, 2, 3, 4; y = 1, 3, 2, 4: slope 4/5, intercept 0.5, R^2 = 1 - 1.8/5.
    fit = fit_log_linear([10, 100, 1000, 10000], [1.0, 3.0, 2.0, 4.0])
    assert fit["slope"] == pytest.approx(0.8) and fit["intercept"] == pytest.approx(0.5)
    assert fit["r2"] == pytest.approx(0.64) and fit["n"] == 4


def test_fit_log_linear_degenerate_inputs():
    assert fit_log_linear([100, 100], [1.0, 2.0]) == {"slope": None, "intercept": None,
                                                      "r2": None, "n": 2}
    assert fit_log_linear([], [])["n"] == 0
    flat = fit_log_linear([10, 100], [3.0, 3.0])
    assert flat["slope"] == pytest.approx(0.0) and flat["r2"] is None


# ------------------------------------------------------------------- bad studies


def tiny_run(name: str, **overrides) -> Run:
    return Run(name, tiny_config(**overrides), {"rpg": True})


@pytest.mark.parametrize("runs, match", [
    ([tiny_run("a"), tiny_run("b"), tiny_run("a")], "duplicate run name 'a'"),
    ([tiny_run("a/b")], "run name 'a/b' is not filesystem-safe"),
    ([tiny_run("..")], r"run name '\.\.'"),
    ([tiny_run("ok"), tiny_run("bad", optimizer="adam")], r"run 'bad'.*optimizer='adam'"),
    ([tiny_run("bad", **{"rpg.mode": "random"})], r"run 'bad'.*rpg\.mode='random'"),
])
def test_bad_runs_are_errors_naming_them(runs, match):
    with pytest.raises(ValueError, match=match):
        Study("bad", runs, [])


@pytest.mark.parametrize("experiments, match", [
    ([Comparison("c", "t", {"x": {"rpg": True}}, baseline="y")], "baseline 'y'"),
    ([Curves("c", "t", {"x": {"rpg": False}})], r"experiment 'c': arm 'x'.*matches no run"),
    ([Scaling("s", "t", {"rpg": True}, reference={"p": {"seed": 3}})], "reference 'p'"),
    ([Curves("c", "t", {}), Curves("c", "t", {})], "duplicate experiment name 'c'"),
    ([Curves("a b", "t", {})], "experiment name 'a b'"),
])
def test_bad_experiments_are_errors_naming_them(experiments, match):
    with pytest.raises(ValueError, match=match):
        Study("bad", [tiny_run("a")], experiments)


def test_a_run_that_cannot_be_built_fails_before_anything_trains(tmp_path):
    path = write_study(tmp_path, """
        from rpg_jax.study import Run, Study
        from tiny_config import tiny_config

        def get_study():
            return Study("s", [Run("fine", tiny_config(), {}),
                               Run("huge", tiny_config(**{"rpg.ring_size": 10**7}), {})], [])
    """)
    spy = Spy()
    with spy.patch(), pytest.raises(ValueError, match=r"run 'huge'.*ring_size=10000000"):
        cli(f"--study={path}", f"--workdir={tmp_path / 'work'}")
    assert spy.calls == []
    assert not (tmp_path / "work").exists()


def test_study_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        study.load_study(tmp_path / "missing.py")
    with pytest.raises(ValueError, match="defines no get_study"):
        study.load_study(write_study(tmp_path, "x = 1\n"))
    with pytest.raises(ValueError, match="--only='zzz' matches none"):
        study.select_runs(Study("s", [tiny_run("a")], []), "zzz")
    with pytest.raises(ValueError, match="not a valid regex"):
        study.select_runs(Study("s", [tiny_run("a")], []), "(")


# ------------------------------------------------------------------- the Fashion-MNIST study


@pytest.fixture(scope="module")
def fmnist():
    if not FMNIST_DIR.is_dir():
        pytest.skip(f"no Fashion-MNIST in {FMNIST_DIR}")
    return study.load_study(REPO / "studies" / "fashion_mnist.py")


def plain_trainable(width: float) -> int:
    from configs import fashion_mnist

    config = fashion_mnist.get_config("plain")
    config.width = width
    exp = runner._build(config)
    shapes = experiment.param_shapes(exp.model, exp.info)["params"]
    return int(sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)))


def test_fashion_mnist_study_runs(fmnist):
    names = [r.name for r in fmnist.runs]
    assert len(names) == len(set(names)) == 26
    assert names[:9] == ["plain_s0", "rpg_ring15100_s0", "thin_w0.25_s0", "naive_ring15100_s0",
                         "perm_only_ring15100_s0", "sign_only_ring15100_s0",
                         "stage_ring15100_s0", "layer_ring15100_s0", "resnet56_ring15100_s0"]
    assert names[9:18] == [n.replace("_s0", "_s1") for n in names[:9]]
    for run in fmnist.runs:
        c = run.config
        assert c.dataset == "fashion_mnist" and c.num_epochs == 1.5
        assert c.eval_every_steps == c.checkpoint_every_steps == 234
        assert c.seed == c.rpg.seed == run.tags["seed"]
        assert c.batch_size == 128 and c.learning_rate == 0.1 and c.lr_schedule == "cosine"


def test_fashion_mnist_study_budgets_and_rings(fmnist):
    rpg = [r for r in fmnist.runs if r.tags["variant"] == "rpg"]
    rings = sorted({r.tags["ring"] for r in rpg})
    assert all(r.config.rpg.ring_size == r.tags["ring"] for r in rpg)
    assert rings[0] == 1000 and rings[-1] == 135000 and rings[-1] / rings[0] >= 100
    assert len(rings) == 6 and all(isinstance(x, int) for x in rings)
    ring_a, ring_b = rings[3], rings[4]
    assert rings[:3] == [1000, 3000, 7000]
    free = study.param_counts(rpg[0].config)["free"]
    assert ring_a + free == plain_trainable(0.25)
    assert ring_b + free == plain_trainable(0.5)
    run = next(r for r in fmnist.runs if r.name == f"rpg_ring{ring_a}_s0")
    assert study.param_counts(run.config)["trainable"] == plain_trainable(0.25)
    deep = study.param_counts(next(r for r in fmnist.runs if r.tags["variant"] == "resnet56")
                              .config)
    assert deep["ring_dof"] == ring_a and deep["trainable"] > plain_trainable(0.25)


def test_fashion_mnist_study_experiments_select_two_seeds_per_arm(fmnist):
    kinds = [e.kind for e in fmnist.experiments]
    assert kinds.count("scaling") == 1 and kinds.count("curves") == 1
    for exp in fmnist.experiments:
        for label, where in exp.filters().items():
            members = [r for r in fmnist.runs if report.matches(r, where)]
            if exp.kind == "scaling" and label == "fit":
                assert len(members) == 8  # 6 rings, two of them with two seeds
            else:
                assert sorted(r.tags["seed"] for r in members) == [0, 1], (exp.name, label)


def test_fashion_mnist_study_list(fmnist, tmp_path, capsys):
    assert cli(f"--study={REPO / 'studies' / 'fashion_mnist.py'}", f"--workdir={tmp_path}",
               "--list") == 0
    text = capsys.readouterr().out
    assert "26 runs (0 finished)" in text and "not started" in text


def test_fashion_mnist_long_study_runs_and_arms():
    if not FMNIST_DIR.is_dir():
        pytest.skip(f"no Fashion-MNIST in {FMNIST_DIR}")
    long = study.load_study(REPO / "studies" / "fashion_mnist_long.py")
    assert [r.name for r in long.runs] == [
        f"{n}_s{s}" for s in (0, 1)
        for n in ("plain", "rpg_ring15100", "rpg_resnet32_ring15100")]
    for run in long.runs:
        c = run.config
        assert c.num_epochs == 10.0 and c.eval_every_steps == c.checkpoint_every_steps == 234
        assert c.model == run.tags["model"] and c.seed == c.rpg.seed == run.tags["seed"]
    for exp in long.experiments:
        for label, where in exp.filters().items():
            members = [r for r in long.runs if report.matches(r, where)]
            assert sorted(r.tags["seed"] for r in members) == [0, 1], (exp.name, label)


def test_fashion_mnist_record_study_fills_each_budget_exactly():
    if not FMNIST_DIR.is_dir():
        pytest.skip(f"no Fashion-MNIST in {FMNIST_DIR}")
    record = study.load_study(REPO / "studies" / "fashion_mnist_record.py")
    assert [r.name for r in record.runs] == [
        "rpg_30k_ring27638_s0", "plain_30k_w0.32_s0", "rpg_100k_ring97638_s0",
        "plain_100k_w0.6_s0"]
    trainable = [study.param_counts(r.config)["trainable"] for r in record.runs]
    assert trainable == [30_000, 27_095, 100_000, 97_163]
    # the plain width is the widest in steps of 0.01 within the budget
    assert plain_trainable(0.33) > 30_000 and plain_trainable(0.61) > 100_000
    for run in record.runs:
        c = run.config
        assert c.num_epochs == 20.0 and c.eval_every_steps == 0  # test set seen once
        assert c.checkpoint_every_steps == -1 and c.seed == c.rpg.seed == 0
        assert (c.batch_size, c.learning_rate, c.lr_schedule) == (128, 0.1, "cosine")
        assert c.label_smoothing == 0 and c.ema_decay == 0 and c.mixup_alpha == 0
    for exp in record.experiments:
        for label, where in exp.filters().items():
            assert len([r for r in record.runs if report.matches(r, where)]) == 1, label
