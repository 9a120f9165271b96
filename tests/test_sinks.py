"""Tests for the metric sinks (TensorBoard, W&B offline), profiling, the ETA log lines and
``train.py --help``.

The sinks must hold what ``metrics.jsonl`` holds, also across a preemption (SIGTERM) and a
hard stop past the last checkpoint followed by a rerun: one continuous TensorBoard run and
one W&B run, without duplicated steps. W&B runs offline, with every directory it writes to
inside pytest's temp dir (tensorboardX, wandb and tensorboard, the event reader, are in
requirements-test.txt).
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import json
import logging
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rpg_jax import config as config_lib
from rpg_jax import progress as progress_lib
from rpg_jax import sinks as sinks_lib
from rpg_jax.metrics import read_metrics
from rpg_jax.train import train_and_evaluate
from step_hooks import at_step
from tiny_config import tiny_config

REPO = Path(__file__).resolve().parents[1]
PROFILE = (5, 8)  # train steps 5, 6, 7: a hard stop at step 7 lands inside the window
# The records of the reference run (tiny_config: 8 steps, a record every 2, eval every 4).
TRAIN_STEPS, EVAL_STEPS = [2, 4, 6, 8], [4, 8]
TIMING = {"images_per_sec"}  # the one value that differs between runs

pytestmark = pytest.mark.usefixtures("compile_cache")


def sink_config(**overrides):
    return tiny_config(tensorboard=True, profile_steps=f"{PROFILE[0]}:{PROFILE[1]}",
                       **{"wandb.enabled": True, "wandb.tags": "test,tiny"}, **overrides)


@pytest.fixture(scope="module", autouse=True)
def wandb_offline(tmp_path_factory):
    """W&B offline and silent, every directory it may write to inside the temp dir."""
    root = tmp_path_factory.mktemp("wandb_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_CONSOLE", "off")
        mp.setenv("WANDB_DISABLE_GIT", "true")
        # TMPDIR: wandb-core's socket and port files (it is a subprocess, so reads it anew)
        for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR",
                    "WANDB_ARTIFACT_DIR", "TMPDIR"):
            (root / var.lower()).mkdir()
            mp.setenv(var, str(root / var.lower()))
        yield root


class HardStop(Exception):
    """Stands for a crash: the run stops where it is, no checkpoint is saved."""


def _hard_stop(step: int) -> None:
    raise HardStop(f"hard stop at step {step}")


def _sigterm(step: int) -> None:
    import signal

    signal.raise_signal(signal.SIGTERM)  # the loop's handler turns it into a preemption


@contextlib.contextmanager
def captured_log():
    """The absl INFO lines logged inside the block."""
    lines: list[str] = []

    class Handler(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger, handler = logging.getLogger("absl"), Handler(logging.INFO)
    old = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``get(name)``: a finished run's workdir (and what it logged), run once per module.

    reference: uninterrupted. preempted: SIGTERM after step 5 (checkpoint 5), then resumed.
    hard_stop: an exception inside step 7 (records to step 6 logged, checkpoint 4 the last),
    then rerun from checkpoint 4.
    """
    done: dict[str, tuple[Path, dict]] = {}

    def get(name: str):
        if name in done:
            return done[name]
        workdir = tmp_path_factory.mktemp(name) / "run"
        info: dict = {}
        if name == "reference":
            with captured_log() as lines:
                info["summary"] = train_and_evaluate(sink_config(), str(workdir))
            info["log"] = lines
        elif name == "preempted":
            first = train_and_evaluate(sink_config(), str(workdir), on_step=at_step(5, _sigterm))
            assert first["preempted"] and first["step"] == 5
            info["first_wandb_dirs"] = wandb_run_dirs(workdir)
            info["summary"] = train_and_evaluate(sink_config(), str(workdir))
        elif name == "hard_stop":
            with pytest.raises(HardStop):
                train_and_evaluate(sink_config(), str(workdir), on_step=at_step(7, _hard_stop))
            info["steps_before_rerun"] = sorted({r["step"] for r in read_metrics(str(workdir))})
            info["tb_before_rerun"] = tb_scalars(workdir)
            info["traces_before_rerun"] = trace_files(workdir)
            info["summary"] = train_and_evaluate(sink_config(), str(workdir))
        done[name] = (workdir, info)
        return done[name]

    return get


# ------------------------------------------------------------------------ reading the sinks


def tb_event_files(workdir) -> list[Path]:
    return sorted((Path(workdir) / sinks_lib.TENSORBOARD_DIR).glob("events.out.tfevents.*"))


def _tb_events(workdir):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    for path in tb_event_files(workdir):
        yield from EventFileLoader(str(path)).Load()


def tb_scalars(workdir) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar event, in file order (duplicates kept)."""
    from tensorboard.util import tensor_util

    out = []
    for event in _tb_events(workdir):
        for value in event.summary.value:
            if value.metadata.plugin_data.plugin_name == "hparams":
                continue
            number = (value.simple_value if value.HasField("simple_value")
                      else float(tensor_util.make_ndarray(value.tensor)))
            out.append((value.tag, int(event.step), number))
    return out


def tb_hparams(workdir) -> dict:
    """The hyperparameters of the TensorBoard run's HParams session."""
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    for event in _tb_events(workdir):
        for value in event.summary.value:
            if value.tag == "_hparams_/session_start_info":
                data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
                return {k: getattr(v, v.WhichOneof("kind"))
                        for k, v in data.session_start_info.hparams.items()}
    return {}


def metrics_scalars(workdir) -> list[tuple[str, int, float]]:
    """What the TensorBoard run must hold: each (tag, step) of metrics.jsonl once."""
    seen = {}
    for record in read_metrics(str(workdir)):
        for key, value in record.items():
            if key != "step":
                seen.setdefault((key, record["step"]), value)
    return [(tag, step, value) for (tag, step), value in seen.items()]


def assert_tb_equals_metrics(workdir) -> None:
    got, want = tb_scalars(workdir), metrics_scalars(workdir)
    keys = collections.Counter((tag, step) for tag, step, _ in got)
    assert not [k for k, n in keys.items() if n > 1], "duplicated (tag, step) events"
    assert sorted(keys) == sorted((tag, step) for tag, step, _ in want)
    values = {(tag, step): v for tag, step, v in got}
    for tag, step, value in want:  # events store float32
        assert values[(tag, step)] == np.float32(value), (tag, step)


def wandb_run_dirs(workdir) -> list[Path]:
    return sorted((Path(workdir) / "wandb").glob("offline-run-*"))


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B transaction log (``run-ID.wandb``): the LevelDB log format,
    after a 7-byte ``:W&B`` header, 32 KiB blocks of (crc32, length, type) chunks."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, out, partial = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # padding to the end of the block
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:  # full
            out.append(chunk)
        elif kind == 2:  # first
            partial = chunk
        elif kind == 3:  # middle
            partial += chunk
        elif kind == 4:  # last
            out.append(partial + chunk)
    return out


def wandb_log(workdir) -> list[dict]:
    """Per offline run directory (oldest first): its run id, config and history rows."""
    from wandb.proto import wandb_internal_pb2

    runs = []
    for run_dir in wandb_run_dirs(workdir):
        (log_file,) = run_dir.glob("run-*.wandb")
        run = {"id": None, "config": {}, "rows": []}
        for raw in _wandb_records(log_file):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["id"] = record.run.run_id
                run["tags"] = list(record.run.tags)
            if kind in ("run", "config"):
                config = record.run.config if kind == "run" else record.config
                for item in config.update:
                    run["config"][item.key] = json.loads(item.value_json)
            if kind == "history":
                row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                       for item in record.history.item}
                run["rows"].append({k: v for k, v in row.items() if not k.startswith("_")}
                                   | {"step": row["_step"]})
        runs.append(run)
    return runs


def metrics_rows(workdir) -> list[dict]:
    """What the W&B run must hold: one row per step, its train and eval records merged."""
    rows: dict[int, dict] = {}
    for record in read_metrics(str(workdir)):
        rows.setdefault(record["step"], {}).update(record)
    return [rows[s] for s in sorted(rows)]


def assert_wandb_equals_metrics(workdir, segments: int) -> None:
    runs = wandb_log(workdir)
    assert len(runs) == segments
    run_id = json.loads((Path(workdir) / sinks_lib.WANDB_STATE_FILE).read_text())["id"]
    assert [r["id"] for r in runs] == [run_id] * segments  # one W&B run, resumed
    rows = [row for r in runs for row in r["rows"]]
    assert [r["step"] for r in rows] == TRAIN_STEPS  # in order, no step twice
    want = metrics_rows(workdir)
    assert [sorted(r) for r in rows] == [sorted(r) for r in want]
    # A step redone after a hard stop keeps the values W&B got first: equal but the timing.
    drop = lambda row: {k: v for k, v in row.items() if k not in TIMING}  # noqa: E731
    assert [drop(r) for r in rows] == [drop(r) for r in want]


def trace_files(workdir) -> list[Path]:
    return sorted((Path(workdir) / "profile").rglob("*.xplane.pb"))


def traced_steps(trace: Path) -> list[int]:
    """The step numbers of the StepTraceAnnotation("train") events of a trace."""
    (json_trace,) = trace.parent.glob("*.trace.json.gz")
    events = json.loads(gzip.decompress(json_trace.read_bytes()))["traceEvents"]
    return sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train")


# ---------------------------------------------------------------------------------- tests


def test_tensorboard_events_hold_the_metrics_records(runs):
    workdir, _ = runs("reference")
    assert len(tb_event_files(workdir)) == 1
    assert_tb_equals_metrics(workdir)
    steps = sorted({step for tag, step, _ in tb_scalars(workdir) if tag == "train_loss"})
    assert steps == TRAIN_STEPS
    assert sorted({s for t, s, _ in tb_scalars(workdir) if t == "eval_top1"}) == EVAL_STEPS


def test_tensorboard_hparams_are_the_config(runs):
    workdir, _ = runs("reference")
    config = sink_config()
    hparams = tb_hparams(workdir)
    assert set(hparams) == set(config_lib.field_names(config))
    assert hparams["batch_size"] == 16 and hparams["rpg.ring_size"] == pytest.approx(0.1)
    assert hparams["dataset"] == "synthetic_cifar" and hparams["tensorboard"] is True


def test_wandb_offline_run_holds_the_metrics_history_and_the_config(runs):
    workdir, _ = runs("reference")
    assert_wandb_equals_metrics(workdir, segments=1)
    (run,) = wandb_log(workdir)
    assert run["tags"] == ["test", "tiny"]
    assert run["config"]["batch_size"] == 16 and run["config"]["rpg"]["ring_size"] == 0.1
    assert run["config"]["wandb"]["project"] == "rpg_jax"


def test_preempted_and_resumed_run_is_one_continuous_run(runs):
    workdir, info = runs("preempted")
    ref_dir, _ = runs("reference")
    assert len(info["first_wandb_dirs"]) == 1
    assert len(tb_event_files(workdir)) == 1  # the resumed run replaced the event file
    assert_tb_equals_metrics(workdir)
    assert_wandb_equals_metrics(workdir, segments=2)
    drop = lambda rows: [(t, s, v) for t, s, v in rows if t not in TIMING]  # noqa: E731
    assert drop(tb_scalars(workdir)) == drop(tb_scalars(ref_dir))


def test_hard_stop_past_the_checkpoint_then_rerun_is_one_continuous_run(runs):
    workdir, info = runs("hard_stop")
    ref_dir, _ = runs("reference")
    # The stopped run had logged step 6 past its last checkpoint (4) to every sink.
    assert info["steps_before_rerun"] == [2, 4, 6]
    assert max(step for _, step, _ in info["tb_before_rerun"]) == 6
    assert len(tb_event_files(workdir)) == 1
    assert_tb_equals_metrics(workdir)  # steps 5, 6 redone, not duplicated
    assert_wandb_equals_metrics(workdir, segments=2)
    drop = lambda rows: [(t, s, v) for t, s, v in rows if t not in TIMING]  # noqa: E731
    assert drop(tb_scalars(workdir)) == drop(tb_scalars(ref_dir))


@pytest.mark.slow
def test_sigkill_of_the_job_past_the_checkpoint_then_rerun_is_one_continuous_run(
        runs, tmp_path, compile_cache):
    """As a cluster kills a job: SIGKILL to its whole process group (train.py's process and
    W&B's wandb-core service) with step 6 logged past checkpoint 4, then a rerun."""
    import os
    import signal

    from test_train import _summary_line, _tail, _wait_for, _worker_cmd, subprocess_env

    workdir, marker = tmp_path / "run", tmp_path / "paused"
    env = subprocess_env(compile_cache)  # with the W&B variables of the wandb_offline fixture
    # Not this pytest process's wandb-core (its address is in WANDB_SERVICE once an earlier
    # test ran W&B here): the job starts its own, which dies with it as on a cluster.
    env.pop("WANDB_SERVICE", None)
    cmd = _worker_cmd(workdir, sink_config(), pause_at_step=7, after_checkpoint=4,
                      marker=marker)
    with open(tmp_path / "killed.err", "w") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
        try:
            _wait_for(marker.exists, proc, 300, "step 7", tmp_path / "killed.err")
            os.killpg(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert sorted({r["step"] for r in read_metrics(str(workdir))}) == [2, 4, 6]
    # (the killed TensorBoard file may lag metrics.jsonl: the rerun rewrites it from there)
    assert max(step for _, step, _ in tb_scalars(workdir)) <= 6

    done = subprocess.run(_worker_cmd(workdir, sink_config()), env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, _tail(done.stderr)
    assert _summary_line(done.stdout)["step"] == 8
    ref_dir, _ = runs("reference")
    assert len(tb_event_files(workdir)) == 1
    assert_tb_equals_metrics(workdir)
    # wandb-core buffers its log (measured: the killed segment held only the file header),
    # so the rerun logs every step since the last clean finish again; W&B keeps a step's
    # first value. What matters: one run id and no step lost.
    segments = wandb_log(workdir)
    run_id = json.loads((workdir / sinks_lib.WANDB_STATE_FILE).read_text())["id"]
    assert len(segments) == 2 and {r["id"] for r in segments if r["id"]} == {run_id}
    first_seen: dict[int, dict] = {}
    for row in (row for r in segments for row in r["rows"]):
        first_seen.setdefault(row["step"], row)
    assert sorted(first_seen) == TRAIN_STEPS
    assert [sorted(first_seen[r["step"]]) for r in metrics_rows(workdir)] == [
        sorted(r) for r in metrics_rows(workdir)]
    drop = lambda rows: [(t, s, v) for t, s, v in rows if t not in TIMING]  # noqa: E731
    assert drop(tb_scalars(workdir)) == drop(tb_scalars(ref_dir))


def test_profile_window_writes_a_trace_of_its_steps(runs):
    workdir, info = runs("reference")
    (trace,) = trace_files(workdir)
    assert trace.stat().st_size > 0
    assert traced_steps(trace) == list(range(*PROFILE))
    assert any(f"Profiling train steps {PROFILE[0]}..{PROFILE[1] - 1}" in line
               for line in info["log"])


def test_a_stop_inside_the_profile_window_still_ends_the_trace(runs):
    workdir, info = runs("hard_stop")
    (stopped,) = info["traces_before_rerun"]  # written although the run died at step 7
    assert stopped.stat().st_size > 0 and traced_steps(stopped) == [5, 6]
    rerun = [t for t in trace_files(workdir) if t != stopped]
    assert len(rerun) == 1 and traced_steps(rerun[0]) == list(range(*PROFILE))


LOG_LINE = re.compile(r"step (\d+)/8 loss [\d.]+ acc [\d.]+ lr \S+ (\d+) img/s "
                      r"elapsed (\d+):(\d\d):(\d\d) ETA (\d+):(\d\d):(\d\d|\?)$")


def test_log_lines_carry_elapsed_eta_and_images_per_sec(runs):
    _, info = runs("reference")  # pytest's stderr is no terminal: no bar, log lines
    lines = [m for m in map(LOG_LINE.search, info["log"]) if m]
    assert [int(m[1]) for m in lines] == TRAIN_STEPS
    seconds = lambda h, m, s: int(h) * 3600 + int(m) * 60 + int(s)  # noqa: E731
    elapsed = [seconds(*m.groups()[2:5]) for m in lines]
    assert elapsed == sorted(elapsed)
    assert lines[-1].group(6, 7, 8) == ("0", "00", "00")  # ETA 0:00:00 at the last step
    assert all(int(m[2]) > 0 for m in lines)


def test_eta_is_remaining_steps_over_the_recent_rate():
    now = [100.0]
    progress = progress_lib.Progress(step=10, num_steps=110, start_time=40.0,
                                     clock=lambda: now[0], window=2)
    etas = []
    for step in (20, 30, 40):
        now[0] += 5.0  # 2 steps/s
        etas.append(progress.update(step))
    assert etas == [(65.0, 45.0), (70.0, 40.0), (75.0, 35.0)]
    now[0] += 50.0  # a slow stretch (10 steps in 50 s); the rate spans the last 2 intervals
    assert progress.update(50) == (125.0, 60 * (165.0 - 110.0) / (50 - 30))
    assert progress.update(110)[1] == 0.0
    assert [progress_lib.hms(s) for s in (0, 59.6, 3725, 100 * 3600, float("inf"))] == [
        "0:00:00", "0:01:00", "1:02:05", "100:00:00", "?"]


def test_train_clock_counts_each_window_without_its_pauses_or_the_logging():
    now = [100.0]
    clock = progress_lib.TrainClock(clock=lambda: now[0])
    now[0] = 103.0
    with clock.paused():  # an evaluation: 2 s
        now[0] = 105.0
    now[0], clock.steps = 106.0, 4
    assert clock.stop() == 4.0 and clock.total == 4.0
    now[0] = 110.0  # logging, between stop() and start(): in no window
    clock.start()
    assert clock.steps == 0
    now[0] = 111.5
    assert clock.stop() == 1.5 and clock.total == 5.5


@pytest.mark.parametrize("overrides, pattern", [
    ({"profile_steps": "5"}, r"config\.profile_steps='5'"),
    ({"profile_steps": "5:5"}, r"config\.profile_steps='5:5'.*0 <= A < B"),
    ({"profile_steps": "-1:3"}, r"config\.profile_steps='-1:3'"),
    ({"profile_steps": "a:b"}, r"config\.profile_steps='a:b'"),
    ({"wandb.enabled": True, "wandb.project": " "}, r"config\.wandb\.project"),
])
def test_bad_sink_configs_raise_before_training(overrides, pattern, tmp_path, no_training):
    with pytest.raises(ValueError, match=pattern):
        train_and_evaluate(tiny_config(**overrides), str(tmp_path))


@pytest.mark.parametrize("field, module", [("tensorboard", "tensorboardX"),
                                           ("wandb.enabled", "wandb")])
def test_a_missing_sink_package_raises_naming_field_and_package(field, module, tmp_path,
                                                                 monkeypatch, no_training):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == module else find_spec(name, *a))
    with pytest.raises(ValueError, match=rf"config\.{field}=True needs the '{module}' "
                                         rf"package.*pip install {module}"):
        train_and_evaluate(tiny_config(**{field: True}), str(tmp_path))


def test_only_process_0_writes_and_sinks_are_off_by_default(tmp_path):
    assert sinks_lib.MetricSinks(sink_config(), str(tmp_path), process_index=1).sinks == []
    assert sinks_lib.MetricSinks(tiny_config(), str(tmp_path)).sinks == []
    config = config_lib.base_config()
    assert (config.tensorboard, config.wandb.enabled, config.profile_steps) == (False, False, "")
    assert config_lib.profile_window(sink_config()) == PROFILE
    assert not list(tmp_path.iterdir())


def test_every_config_field_has_a_description():
    fields = config_lib.describe_fields()
    assert sorted(name for name, _, _ in fields) == sorted(
        config_lib.field_names(config_lib.base_config()))
    assert [name for name, _, description in fields if not description.strip()] == []
    described = {name: (default, text) for name, default, text in fields}
    assert described["wandb.project"] == ("rpg_jax", "W&B project")
    assert described["batch_size"][1] == "global, over all devices and hosts"  # trailing
    assert described["rpg.tables"][1].startswith("host: index tables")  # the lines above
    for name in ("tensorboard", "wandb.enabled", "wandb.project", "wandb.entity",
                 "wandb.name", "wandb.tags", "profile_steps"):
        assert name in config_lib.RESUME_FREE


def test_help_lists_every_config_field_without_importing_jax():
    done = subprocess.run([sys.executable, "-X", "importtime", "train.py", "--help"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Config fields" in done.stdout, done.stderr[-2000:]  # absl
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()
                if line.startswith("import time:")}
    assert not {m for m in imported if m == "jax" or m.startswith(("jax.", "rpg_jax."))}
    for name, default, description in config_lib.describe_fields():
        assert f"  {name}={default!r}\n" in done.stdout
        assert " ".join(description.split()[:4]) in " ".join(done.stdout.split())
    assert "--workdir" in done.stdout
