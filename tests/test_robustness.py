"""Never lose a good result: divergence, shared workdirs, damaged checkpoints, changed configs
on resume, loading beside a live run, and the small edges of predict/export/compress/data.

Runs are the tiny ResNet-20 of tests/tiny_config.py (8 steps, checkpoints at 4 and 8).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import serialization
from test_train import (
    REPO,
    _popen,
    _wait_for,
    assert_trees_equal,
    records,
    saved_state,
    subprocess_env,
)

from rpg_jax import checkpoints, compress, data, experiment, steps
from rpg_jax import config as config_lib
from rpg_jax import workdir as workdir_lib
from rpg_jax.data import fashion_mnist as fm
from rpg_jax.export import export, load_export
from rpg_jax.metrics import read_metrics
from rpg_jax.train import train_and_evaluate
from tiny_config import tiny_config

pytestmark = pytest.mark.usefixtures("compile_cache")

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
                                  reason="dataset-fashion-mnist not installed")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, dict]:
    """The finished 8-step run of ``tiny_config()`` (checkpoints 4 and 8)."""
    workdir = tmp_path_factory.mktemp("finished")
    return workdir, train_and_evaluate(tiny_config(), str(workdir))


@pytest.fixture
def copy(finished, tmp_path) -> Path:
    workdir = tmp_path / "copy"
    shutil.copytree(finished[0], workdir)
    return workdir


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def target_state(config) -> steps.TrainState:
    info = data.dataset_info(config.dataset, synthetic_size=config.synthetic_size)
    exp = experiment.build(config, info)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                        experiment.abstract_state(exp))


# ------------------------------------------------------------------------ 1. config values


@pytest.mark.parametrize("field", ["learning_rate", "weight_decay", "momentum", "width",
                                   "warmup_epochs", "num_epochs", "rpg.ring_size",
                                   "vit.mlp_ratio", "lr_decay_epochs"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_float_field_rejects_nan_and_inf_by_name(field, value):
    with pytest.raises(ValueError, match=re.escape(f"config.{field}={value!r}: expected a "
                                                   "finite number")):
        config_lib.validate(tiny_config(**{field: value}))


@pytest.mark.parametrize("field, value, expected", [
    ("rpg.groups", '{"(conv": "a"}', "valid regular expressions ('(conv'"),
    ("rpg.groups", '["global"]', "a JSON object"),
    ("rpg.select", "conv[", "valid regular expressions ('conv['"),
    ("resume_overrides", "model", "'model' is always refused"),
    ("resume_overrides", "lerning_rate", "'lerning_rate' is not a config field"),
    ("resume_overrides", "keep_checkpoints", "'keep_checkpoints' is always accepted"),
])
def test_bad_regexes_and_overrides_are_named(field, value, expected):
    with pytest.raises(ValueError, match=re.escape(f"config.{field}=")) as e:
        config_lib.validate(tiny_config(**{field: value}))
    assert expected in str(e.value)


# ------------------------------------------------------------------------ 1. divergence


def test_state_digest_equals_a_numpy_reference_and_sees_one_flipped_bit():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(7, 5)), jnp.float32)
    tree = {"a": x, "b": jnp.arange(3, dtype=jnp.int32), "h": x.astype(jnp.bfloat16)}
    bad, digest = checkpoints.state_health(tree)
    assert bad == []

    def reference(a):
        w = np.asarray(a).view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])
        w = w.ravel().astype(np.uint64)
        odd = np.arange(w.size, dtype=np.uint64) * 2 + 1
        return [int(w.sum() % 2**32), int((w * odd).sum() % 2**32)]

    assert digest == {"['a']": reference(x), "['b']": reference(tree["b"]),
                      "['h']": reference(tree["h"])}
    flipped = np.asarray(x).copy()
    flipped.view(np.uint32)[3, 2] ^= 1 << 7
    assert checkpoints.state_health({**tree, "a": jnp.asarray(flipped)})[1]["['a']"] \
        != digest["['a']"]
    bad, _ = checkpoints.state_health({**tree, "h": tree["h"].at[0, 0].set(jnp.nan)})
    assert bad == ["['h']"]


def test_save_refuses_non_finite_state_and_writes_nothing(tmp_path):
    config = tiny_config()
    info = data.dataset_info(config.dataset, synthetic_size=config.synthetic_size)
    exp = experiment.build(config, info)
    state = experiment.initial_state(exp)
    # Finite params, a NaN BatchNorm statistic only: the loss could stay finite.
    stats = jax.tree.map(lambda x: x, state.batch_stats)
    stats["bn1"]["var"] = stats["bn1"]["var"].at[0].set(jnp.inf)
    iterator = data.make_train_iterator(config.dataset, global_batch_size=16, seed=0,
                                        synthetic_size=config.synthetic_size)
    manager = checkpoints.make_manager(str(tmp_path))
    with pytest.raises(checkpoints.NonFiniteStateError,
                       match=r"diverged at step 3: non-finite values .* 1 state leaves: "
                             r"\.batch_stats\['bn1'\]\['var'\]; not saved"):
        checkpoints.save(manager, 3, state.replace(batch_stats=stats), iterator, exp)
    manager.wait_until_finished()
    assert manager.all_steps() == []
    manager.close()


def test_resume_with_a_huge_learning_rate_stops_and_keeps_the_finite_checkpoints(copy):
    before = snapshot(copy / "checkpoints")
    config = tiny_config(learning_rate=1e4, num_train_steps=16,
                         resume_overrides="learning_rate")
    with pytest.raises(checkpoints.NonFiniteStateError) as e:
        train_and_evaluate(config, str(copy))
    message = str(e.value)
    assert re.search(r"training diverged at step (10|12|14|16): non-finite values", message)
    assert "steps [4, 8]" in message and "Nothing non-finite was saved" in message
    assert snapshot(copy / "checkpoints") == before  # the good checkpoints are all still there
    ckpt = checkpoints.load_checkpoint(str(copy))
    assert ckpt.step == 8
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(ckpt.trainable))
    assert not (copy / workdir_lib.LOCK_FILE).exists()  # the lock went with the run


# ------------------------------------------------------------------------ 2. workdir lock

HOLDER = """
import sys, time
from rpg_jax import workdir
with workdir.locked(sys.argv[1], lease=sys.argv[2] == "lease", heartbeat_s=0.2):
    print("locked", flush=True)
    time.sleep(600)
"""


def start_holder(workdir: Path, mode: str = "flock") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir), mode], cwd=REPO,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_on_a_held_workdir_is_refused_and_changes_nothing(copy, no_training):
    before = snapshot(copy)
    holder = start_holder(copy)
    try:
        with pytest.raises(workdir_lib.WorkdirBusyError,
                           match=f"in use by the run of pid {holder.pid} on host"):
            train_and_evaluate(tiny_config(learning_rate=0.5), str(copy))
    finally:
        holder.kill()
        holder.wait()
    after = snapshot(copy)
    after.pop(workdir_lib.LOCK_FILE)  # the dead holder's lock file stays
    assert after == before
    with workdir_lib.locked(str(copy)):  # SIGKILLed holder: its flock is gone
        pass
    assert not (copy / workdir_lib.LOCK_FILE).exists()


def test_lease_of_a_live_holder_refuses_and_a_dead_or_stale_one_is_taken_over(tmp_path):
    holder = start_holder(tmp_path, "lease")
    try:
        lease = json.loads((tmp_path / workdir_lib.LEASE_FILE).read_text())
        assert lease["pid"] == holder.pid
        with pytest.raises(workdir_lib.WorkdirBusyError, match=f"leased by the run of pid "
                                                                f"{holder.pid}"):
            with workdir_lib.locked(str(tmp_path), lease=True, stale_s=5):
                pass
        time.sleep(0.5)  # the heartbeat keeps it fresh
        assert json.loads((tmp_path / workdir_lib.LEASE_FILE).read_text())["heartbeat"] \
            > lease["heartbeat"]
    finally:
        holder.kill()
        holder.wait()
    with workdir_lib.locked(str(tmp_path), lease=True):  # same host, dead pid: stale
        assert json.loads((tmp_path / workdir_lib.LEASE_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / workdir_lib.LEASE_FILE).exists()

    other = {"host": "another-host", "pid": 1, "started": "x", "token": "t"}
    path = tmp_path / workdir_lib.LEASE_FILE
    path.write_text(json.dumps({**other, "heartbeat": time.time()}))
    with pytest.raises(workdir_lib.WorkdirBusyError, match="'another-host'"):
        with workdir_lib.locked(str(tmp_path), lease=True, stale_s=60):
            pass
    path.write_text(json.dumps({**other, "heartbeat": time.time() - 61}))
    with workdir_lib.locked(str(tmp_path), lease=True, stale_s=60, heartbeat_s=0.1):
        assert json.loads(path.read_text())["host"] != "another-host"


def test_object_store_paths_get_a_lease():
    assert workdir_lib.is_object_store("gs://bucket/run")
    assert not workdir_lib.is_object_store("/tmp/run")


@pytest.mark.slow
def test_a_second_train_py_beside_a_live_run_is_refused_and_the_first_finishes(
        tmp_path, compile_cache):
    workdir = tmp_path / "run"
    n = 60
    overrides = dict(dataset="synthetic_cifar", synthetic_size=256, width=0.25, batch_size=16,
                     num_train_steps=n, log_every_steps=1, eval_every_steps=0,
                     checkpoint_every_steps=20)
    cmd = [sys.executable, "train.py", "--config=configs/fashion_mnist.py",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
    env = subprocess_env(compile_cache)
    metrics_file = workdir / "metrics.jsonl"
    with _popen(cmd, env, tmp_path, "first") as proc:
        _wait_for(lambda: metrics_file.exists() and metrics_file.stat().st_size > 0, proc, 300,
                  "the first train record", tmp_path / "first.err")
        second = subprocess.run(cmd[:-1] + ["--config.learning_rate=0.5"], env=env, cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        assert proc.poll() is None, "the first run should still be training"
        rc = proc.wait(timeout=300)
    assert second.returncode != 0
    assert f"in use by the run of pid {proc.pid}" in second.stderr
    assert rc == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["step"] == n and not summary["preempted"]
    assert json.loads((workdir / "config.json").read_text())["learning_rate"] != 0.5
    assert [r["step"] for r in read_metrics(str(workdir)) if "train_loss" in r] == \
        list(range(1, n + 1))


# ------------------------------------------------------------------------ 3. damage


def _array_files(step_dir: Path) -> list[Path]:
    return sorted((step_dir / "state").rglob("d/*"), key=lambda p: -p.stat().st_size)


def truncate_arrays(step_dir: Path) -> None:
    # Every data file: which of them the OCDBT tree still references (and which are stale
    # nodes of an earlier commit of the same save) depends on how the async writes batched.
    for path in _array_files(step_dir):
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)


def flip_bits(step_dir: Path) -> None:
    for path in _array_files(step_dir):
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x04
        path.write_bytes(bytes(raw))


def garbage_metadata(step_dir: Path) -> None:
    (step_dir / "config" / "metadata").write_text("{not json")


def empty_step(step_dir: Path) -> None:
    shutil.rmtree(step_dir)
    step_dir.mkdir()


DAMAGE = {"truncated": truncate_arrays, "bit_flipped": flip_bits, "garbage": garbage_metadata,
          "empty": empty_step}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_load_checkpoint_skips_a_damaged_newest_step(damage, copy, caplog):
    DAMAGE[damage](copy / "checkpoints" / "8")
    with pytest.raises(checkpoints.DamagedCheckpointError,
                       match=re.escape(f"checkpoint step 8 is damaged: {copy}/checkpoints/8/")):
        checkpoints.load_checkpoint(str(copy), step=8)
    with caplog.at_level(logging.WARNING):
        assert checkpoints.load_checkpoint(str(copy)).step == 4
    lines = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and "checkpoint step 8" in lines[0]
    assert (copy / "checkpoints" / "8").exists()  # a reader moves nothing


@pytest.mark.parametrize("damage", [
    "truncated",
    pytest.param("bit_flipped", marks=pytest.mark.slow),
    pytest.param("garbage", marks=pytest.mark.slow),
    pytest.param("empty", marks=pytest.mark.slow),
])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(damage, copy, finished, caplog):
    damaged = copy / "checkpoints" / "8"
    DAMAGE[damage](damaged)
    damaged_files = snapshot(damaged)
    with caplog.at_level(logging.WARNING):
        summary = train_and_evaluate(tiny_config(), str(copy))
    lines = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert re.match(rf"checkpoint step 8 is damaged: {re.escape(str(damaged))}/\S+", lines[0])
    assert "falling back to the previous checkpoint" in lines[0]
    assert snapshot(copy / "checkpoints_damaged" / "8") == damaged_files  # kept, not deleted
    assert summary["step"] == 8 and summary["eval_loss"] == finished[1]["eval_loss"]
    assert_trees_equal(saved_state(copy), saved_state(finished[0]))  # retrained 5..8 exactly
    assert records(copy) == records(finished[0])


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train_loss": 2.5}\n{"step": 2, "train_lo')
    with caplog.at_level(logging.WARNING):
        assert read_metrics(str(tmp_path)) == [{"step": 1, "train_loss": 2.5}]
    assert "torn last line 2" in caplog.text
    path.write_text('{"step": 1\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl: line 1 is not a JSON record"):
        read_metrics(str(tmp_path))


# ------------------------------------------------------------------------ 4. changed configs


@pytest.mark.parametrize("overrides, expected", [
    ({"learning_rate": 0.5}, r"config\.learning_rate=0\.1, but this run has "
                             r"config\.learning_rate=0\.5; .*resume_overrides=learning_rate"),
    ({"batch_size": 32}, r"config\.batch_size=16, but .*config\.batch_size=32"),
    ({"seed": 1}, r"config\.seed=0, but .*config\.seed=1"),
    ({"momentum": 0.0, "resume_overrides": "momentum"},
     r"config\.momentum=0\.9, but this run has config\.momentum=0\.0: a momentum of 0 keeps "
     r"no momentum state"),
    ({"num_train_steps": 6}, r"the checkpoint at step 8 is past this run's 6 steps "
                             r"\(config\.num_train_steps=6"),
])
def test_resume_refuses_changes_by_name(overrides, expected, copy, no_training):
    before = snapshot(copy)
    with pytest.raises(ValueError, match=expected):
        train_and_evaluate(tiny_config(**overrides), str(copy))
    assert snapshot(copy) == before


def test_bookkeeping_changes_and_overridden_fields_are_accepted(finished):
    manager = checkpoints.make_manager(str(finished[0]), read_only=True)
    saved_config, spec, info = checkpoints.read_meta(manager, 8)
    manager.close()
    config = tiny_config(log_every_steps=3, keep_checkpoints=5, eval_steps=2,
                         num_train_steps=20, learning_rate=0.05, nesterov=True,
                         resume_overrides="learning_rate,nesterov",
                         **{"vit.depth": 3, "rpg.backward": "scatter"})  # vit.*: unused
    checkpoints.check_compatible(saved_config, spec, config, spec, 8, 20, info, info)


def test_a_batch_size_change_continues_at_the_exact_next_example(finished):
    """8 steps of 16 consumed examples [0, 128): batch 32 continues with [128, 160)."""
    workdir, _ = finished
    config = tiny_config(batch_size=32)
    manager = checkpoints.make_manager(str(workdir), read_only=True)
    kw = dict(seed=config.seed, synthetic_size=config.synthetic_size)
    it32 = data.make_train_iterator(config.dataset, global_batch_size=32, **kw)
    resumed = checkpoints.restore(manager, 8, target_state(config), it32, batch_size=32)
    assert resumed.step == 8 and resumed.examples == 128
    it16 = data.make_train_iterator(config.dataset, global_batch_size=16, **kw)
    stream = [next(it16) for _ in range(12)]
    for k in (8, 10):  # two batches of 32 = stream batches 8+9 and 10+11 of 16
        got = next(it32)
        for key in ("image", "label"):
            np.testing.assert_array_equal(
                got[key], np.concatenate([stream[k][key], stream[k + 1][key]]))
    it48 = data.make_train_iterator(config.dataset, global_batch_size=48, **kw)
    with pytest.raises(ValueError, match=r"consumed 128 training examples .* not a multiple "
                                         r"of config\.batch_size=48"):
        checkpoints.restore(manager, 8, target_state(config), it48, batch_size=48)
    manager.close()


@pytest.mark.slow
def test_resume_with_an_overridden_batch_size_records_the_stream_position(copy):
    config = tiny_config(batch_size=32, num_train_steps=10, resume_overrides="batch_size")
    summary = train_and_evaluate(config, str(copy))
    assert summary["step"] == 10
    manager = checkpoints.make_manager(str(copy), read_only=True)
    extra = checkpoints._restore_extra(manager, 10)
    manager.close()
    assert extra["examples"] == 8 * 16 + 2 * 32 and extra["batch_size"] == 32


# ------------------------------------------------------------------------ 5. live loading


def test_load_checkpoint_retries_when_its_step_is_rotated_away(copy):
    real_restore = checkpoints.ocp.CheckpointManager.restore
    calls = []

    def rotating_restore(self, step, *args, **kwargs):
        calls.append(step)
        if len(calls) == 1:  # the live run rotates step 8 away while it is being read
            shutil.rmtree(copy / "checkpoints" / str(step))
        return real_restore(self, step, *args, **kwargs)

    with mock.patch.object(checkpoints.ocp.CheckpointManager, "restore", rotating_restore):
        ckpt = checkpoints.load_checkpoint(str(copy))
    assert ckpt.step == 4 and calls[0] == 8 and set(calls[1:]) == {4}


@pytest.mark.slow
def test_load_checkpoint_in_a_loop_beside_a_rotating_run_never_fails(tmp_path, compile_cache):
    workdir = tmp_path / "run"
    overrides = dict(dataset="synthetic_cifar", synthetic_size=256, width=0.25, batch_size=16,
                     num_train_steps=120, log_every_steps=1, eval_every_steps=0,
                     checkpoint_every_steps=2, keep_checkpoints=2)
    cmd = [sys.executable, "train.py", "--config=configs/fashion_mnist.py",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
    loaded = []
    with _popen(cmd, subprocess_env(compile_cache), tmp_path, "live") as proc:
        _wait_for(lambda: (workdir / "checkpoints" / "2").exists(), proc, 300,
                  "the first checkpoint", tmp_path / "live.err")
        while proc.poll() is None:
            loaded.append(checkpoints.load_checkpoint(str(workdir)).step)
        assert proc.wait() == 0
    assert len(loaded) >= 10 and len(set(loaded)) >= 3, loaded
    assert loaded == sorted(loaded)


def test_load_checkpoint_retries_when_a_step_vanishes_while_orbax_lists_them(finished):
    # What CI saw beside a rotating run: Orbax's CheckpointManager stats every step directory
    # as it opens, and a step removed between its listing and its stat raised out of
    # load_checkpoint (FileNotFoundError: .../checkpoints/104).
    opened = []
    real = checkpoints.make_manager

    def flaky(workdir, **kwargs):
        opened.append(workdir)
        if len(opened) == 1:
            raise FileNotFoundError(2, "No such file or directory", f"{workdir}/checkpoints/6")
        return real(workdir, **kwargs)

    with mock.patch.object(checkpoints, "make_manager", flaky):
        assert checkpoints.load_checkpoint(str(finished[0])).step == 8
    assert len(opened) == 2
    with mock.patch.object(checkpoints, "make_manager",
                           mock.Mock(side_effect=FileNotFoundError("gone"))):
        with pytest.raises(FileNotFoundError, match="gone"):
            checkpoints.load_checkpoint(str(finished[0]), retries=2)


# ------------------------------------------------------------------------ 6. small edges


@pytest.fixture(scope="module")
def ckpt(finished):
    return checkpoints.load_checkpoint(str(finished[0]))


def test_predict_edges(ckpt):
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    empty = ckpt.predict(images[:0])
    assert empty.shape == (0, 10) and empty.dtype == np.float32
    np.testing.assert_allclose(ckpt.predict(images, batch_size=2), ckpt.predict(images),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"one image of shape \(32, 32, 3\): pass images\[None\]"):
        ckpt.predict(images[0])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=re.escape(f"batch_size={bad!r}: expected a positive")):
            ckpt.predict(images, batch_size=bad)


def test_load_checkpoint_step_must_be_an_int(finished):
    with pytest.raises(TypeError, match=r"step='8': expected an int step number such as 8"):
        checkpoints.load_checkpoint(str(finished[0]), step="8")
    assert checkpoints.load_checkpoint(str(finished[0]), step=np.int64(4)).step == 4


def test_export_checksum_catches_a_flipped_bit(ckpt, tmp_path):
    path = tmp_path / "model.rpg"
    export(ckpt, str(path))
    x = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(load_export(str(path)).predict(x), ckpt.predict(x))
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"model\.rpg' is damaged: its content's SHA-256"):
        load_export(str(path))


def test_load_export_names_missing_fields(tmp_path):
    path = tmp_path / "old.rpg"
    path.write_bytes(serialization.msgpack_serialize(
        {"format": 1, "kind": "rpg", "weights": {}, "batch_stats": {}}))
    with pytest.raises(ValueError, match=r"missing: \['meta'\]"):
        load_export(str(path))
    body = serialization.msgpack_serialize({"kind": "rpg", "weights": {}, "batch_stats": {},
                                            "meta": "{}"})
    path.write_bytes(serialization.msgpack_serialize(
        {"format": 2, "sha256": hashlib.sha256(body).hexdigest(), "body": body}))
    with pytest.raises(ValueError, match="unreadable meta field"):
        load_export(str(path))


def test_a_format_1_export_still_loads(ckpt, tmp_path):
    path = tmp_path / "v1.rpg"
    export(ckpt, str(path))
    blob = serialization.msgpack_restore(path.read_bytes())
    v1 = {"format": 1, **serialization.msgpack_restore(blob["body"])}
    path.write_bytes(serialization.msgpack_serialize(v1))
    x = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(load_export(str(path)).predict(x), ckpt.predict(x))


@pytest.mark.parametrize("argv, expected", [
    (["--chunk=0"], "--chunk=0: expected a positive number"),
    (["--finetune_lr=nan", "--finetune_steps=1"], "--finetune_lr=nan: expected a positive"),
    (["--prune=nan"], "--prune=nan: expected a fraction"),
])
def test_compress_cli_checks_flags_before_any_work(argv, expected, capsys):
    with mock.patch.object(compress, "evaluate", side_effect=AssertionError("evaluated")), \
            mock.patch.object(checkpoints, "load_checkpoint",
                              side_effect=AssertionError("loaded")), pytest.raises(SystemExit):
        compress.main(["--workdir=unused", *argv])
    assert expected in capsys.readouterr().err


def test_compress_cli_refuses_out_for_plain_and_non_finite_before_evaluating(ckpt, capsys,
                                                                             tmp_path):
    plain = dataclasses.replace(ckpt, spec=None)
    nan = jax.tree.map(lambda x: x * jnp.nan, ckpt.trainable)
    cases = [(plain, [f"--out={tmp_path / 'm.rpg'}"], "this checkpoint is a plain model"),
             (dataclasses.replace(ckpt, trainable=nan), [], "holds non-finite values (NaN/inf)"),
             (ckpt, [f"--out={tmp_path}"], "is a directory")]
    for loaded, argv, expected in cases:
        with mock.patch.object(compress, "evaluate", side_effect=AssertionError("evaluated")), \
                mock.patch.object(checkpoints, "load_checkpoint", return_value=loaded), \
                pytest.raises(SystemExit):
            compress.main(["--workdir=unused", *argv])
        assert expected in capsys.readouterr().err


@needs_fmnist
def test_fashion_mnist_with_scrambled_pixels_is_refused(tmp_path, monkeypatch, caplog):
    for name in os.listdir(FMNIST_DIR):
        shutil.copy(FMNIST_DIR / name, tmp_path / name)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[16:16 + 2 * 784] = raw[16 + 784:16 + 2 * 784] + raw[16:16 + 784]  # two images swapped
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz: content SHA-256 \w+ "
                                         r"differs from the published"):
        fm.load_fashion_mnist(tmp_path)
    monkeypatch.setenv(fm.VERIFY_ENV_VAR, "warn")
    fm._load_cached.cache_clear()
    with caplog.at_level(logging.WARNING):
        images = fm.load_fashion_mnist(tmp_path)["test"][0]
    assert images.shape == (10_000, 28, 28, 1) and "differs from the published" in caplog.text


@needs_fmnist
def test_the_installed_fashion_mnist_matches_the_published_checksums():
    for stem, (sha256, size) in fm.PUBLISHED.items():
        raw = gzip.decompress((FMNIST_DIR / f"{stem}.gz").read_bytes())
        assert (hashlib.sha256(raw).hexdigest(), len(raw)) == (sha256, size)


def test_saved_config_round_trips_through_the_field_helpers():
    config = tiny_config()
    names = config_lib.field_names(config)
    assert "rpg.ring_size" in names and "vit.depth" in names
    as_dict = json.loads(config.to_json())
    for name in names:
        assert config_lib.field_value(as_dict, name) == config_lib.field_value(config, name)
    assert config_lib.field_value(ml_collections.ConfigDict(as_dict), "no.such") is None
