"""Tests for rpg_jax.checkpoints: resume compatibility checks and load_checkpoint.

Checkpoints are written by real runs of ``train_and_evaluate`` on the 8 simulated CPU
devices of conftest.py (a tiny ResNet-20 on synthetic CIFAR), with JAX's persistent
compilation cache on to compile each program once per session.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import rpg_jax
from rpg_jax import checkpoints, data, experiment, steps
from rpg_jax.spec import RPGSpec
from rpg_jax.train import train_and_evaluate
from tiny_config import tiny_config

# Compiling is most of these tests' time: share a persistent cache (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("compile_cache")


def synthetic_info(config) -> data.DatasetInfo:
    return data.dataset_info(config.dataset, synthetic_size=config.synthetic_size)


@pytest.fixture(scope="module")
def rpg_run(tmp_path_factory) -> tuple[Path, dict]:
    workdir = tmp_path_factory.mktemp("rpg_run")
    return workdir, train_and_evaluate(tiny_config(), str(workdir))


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> tuple[Path, dict]:
    workdir = tmp_path_factory.mktemp("plain_run")
    # The constant schedule makes this the run of test_train.py's plain stop/extend test.
    config = tiny_config(**{"rpg.enabled": False, "lr_schedule": "constant"})
    return workdir, train_and_evaluate(config, str(workdir))


def snapshot(directory: Path) -> dict[str, tuple[int, str]]:
    """Relative path -> (mtime_ns, sha256) of every file under ``directory``."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = Path(root, name)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[str(path.relative_to(directory))] = (path.stat().st_mtime_ns, digest)
    return out


def normalise(images: np.ndarray, info: data.DatasetInfo) -> np.ndarray:
    x = images.astype(np.float32) / 255.0
    return (x - np.asarray(info.mean, np.float32)) / np.asarray(info.std, np.float32)


def final_eval(workdir: Path) -> dict:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(ln) for ln in lines if "eval_top1" in ln]
    return evals[-1]


# ------------------------------------------------------------------- resume compatibility


@pytest.mark.parametrize("field, value", [
    ("rpg.ring_size", 0.2),
    ("rpg.seed", 1),
    ("rpg.groups", "stage"),
    ("model", "resnet32"),
    ("rpg.mode", "naive"),
    ("width", 0.5),
    ("rpg.enabled", False),
])
def test_resume_with_changed_field_raises_and_leaves_checkpoints(field, value, rpg_run,
                                                                 tmp_path):
    src, _ = rpg_run
    workdir = tmp_path / "copy"
    shutil.copytree(src, workdir)
    before = snapshot(workdir)
    old = tiny_config()
    for part in field.split("."):
        old = old[part]
    config = tiny_config(**{field: value, "num_train_steps": 12})
    with pytest.raises(ValueError, match=re.escape(f"config.{field}=")) as e:
        train_and_evaluate(config, str(workdir))
    message = str(e.value)
    assert "step 8" in message
    assert f"config.{field}={old!r}" in message and f"config.{field}={value!r}" in message
    assert snapshot(workdir) == before  # nothing written, nothing deleted


def test_resume_with_compatible_changes_is_accepted(rpg_run, tmp_path):
    """Fields that do not define the model may change on resume: bookkeeping freely, the
    learning rate when the run names it in ``resume_overrides``."""
    src, _ = rpg_run
    workdir = tmp_path / "copy"
    shutil.copytree(src, workdir)
    manager = checkpoints.make_manager(str(workdir), read_only=True)
    saved_config, saved_spec, info = checkpoints.read_meta(manager, 8)
    manager.close()
    config = tiny_config(learning_rate=0.05, num_train_steps=12, log_every_steps=3,
                         resume_overrides="learning_rate")
    exp = experiment.build(config, info)
    checkpoints.check_compatible(saved_config, saved_spec, config, exp.spec, 8)  # no raise
    config.resume_overrides = ""
    with pytest.raises(ValueError, match=r"config\.learning_rate=0\.1, but .*resume_overrides"):
        checkpoints.check_compatible(saved_config, saved_spec, config, exp.spec, 8)
    with pytest.raises(ValueError, match=r"config\.rpg\.seed=0.*config\.rpg\.seed=3"):
        checkpoints.check_compatible(saved_config, saved_spec,
                                     tiny_config(**{"rpg.seed": 3}), exp.spec, 8)


# ------------------------------------------------------------------- load_checkpoint


@pytest.mark.parametrize("rpg", [True, False], ids=["rpg", "plain"])
def test_load_checkpoint_predict_matches_manual_apply(rpg, rpg_run, plain_run):
    workdir, summary = rpg_run if rpg else plain_run
    ckpt = checkpoints.load_checkpoint(str(workdir))
    assert ckpt.step == 8
    assert ckpt.config.rpg.enabled == rpg
    assert type(ckpt) is rpg_jax.TrainedModel is rpg_jax.Checkpoint is checkpoints.Checkpoint
    assert ckpt.bank is ckpt.trainable  # the former name, read-only
    with pytest.raises(AttributeError):
        ckpt.bank = ckpt.trainable
    assert ckpt.config.to_dict() == json.loads((workdir / "config.json").read_text())
    config = tiny_config()
    info = synthetic_info(config)
    assert ckpt.info == info

    # Written on the 8-device mesh, loaded onto the default device.
    meta = ocp.StandardCheckpointer().metadata(workdir / "checkpoints" / "8" / "state")
    first = jax.tree.leaves(meta.item_metadata)[0]
    assert len(first.sharding.device_mesh.mesh) == 8
    for leaf in jax.tree.leaves((ckpt.trainable, ckpt.batch_stats)):
        assert leaf.sharding.device_set == {jax.devices()[0]}

    model = rpg_jax.models.get_model("resnet20", num_classes=10, width=0.25)
    if rpg:
        assert ckpt.spec is not None
        params = rpg_jax.generate_params(ckpt.trainable, ckpt.spec)
        assert "rings" in ckpt.trainable and "free" in ckpt.trainable
    else:
        assert ckpt.spec is None
        params = ckpt.trainable
        assert ckpt.params is ckpt.trainable
    want_shapes = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), ckpt.params) == jax.tree.map(
        lambda x: (x.shape, x.dtype), want_shapes["params"])
    assert jax.tree.map(np.shape, ckpt.batch_stats) == jax.tree.map(
        np.shape, want_shapes["batch_stats"])

    images = data.SyntheticSource(40, (32, 32, 3), 10, seed=7).read_batch(np.arange(40))["image"]
    assert images.dtype == np.uint8
    logits = ckpt.predict(images, batch_size=16)  # 16 + 16 + 8
    manual = np.asarray(model.apply({"params": params, "batch_stats": ckpt.batch_stats},
                                    jnp.asarray(normalise(images, info)), train=False))
    assert logits.shape == (40, 10) and logits.dtype == np.float32
    scale = float(np.abs(manual).max())
    np.testing.assert_allclose(logits, manual, rtol=1e-5, atol=1e-5 * scale)
    # Not all the same logits: the model did look at the images.
    assert float(np.std(manual, axis=0).max()) > 1e-6 * scale

    # The loaded model reproduces the run's own final evaluation on the eval split.
    correct = count = 0
    for batch in data.make_eval_batches(config.dataset, global_batch_size=64,
                                        synthetic_size=config.synthetic_size):
        n = int(batch["mask"].sum())
        pred = ckpt.predict(batch["image"][:n]).argmax(-1)
        correct += int((pred == batch["label"][:n]).sum())
        count += n
    top1 = correct / count
    recorded = final_eval(workdir)
    assert recorded["step"] == 8 and recorded["eval_count"] == count
    assert top1 == pytest.approx(recorded["eval_top1"], abs=1.5 / count)
    assert recorded["eval_top1"] == summary["eval_top1"]


def test_load_checkpoint_step_selection(rpg_run):
    workdir, _ = rpg_run
    assert sorted(checkpoints.make_manager(str(workdir), read_only=True).all_steps()) == [4, 8]
    at4 = checkpoints.load_checkpoint(str(workdir), step=4)
    at8 = checkpoints.load_checkpoint(str(workdir), step=8)
    latest = checkpoints.load_checkpoint(str(workdir))
    assert (at4.step, at8.step, latest.step) == (4, 8, 8)
    for a, b in zip(jax.tree.leaves(at8.trainable), jax.tree.leaves(latest.trainable), strict=True):
        np.testing.assert_array_equal(a, b)
    differs = [not np.array_equal(a, b)
               for a, b in zip(jax.tree.leaves(at4.trainable), jax.tree.leaves(at8.trainable),
                               strict=True)]
    assert any(differs)
    with pytest.raises(ValueError, match=r"step=3 .*available: \[4, 8\]"):
        checkpoints.load_checkpoint(str(workdir), step=3)
    with pytest.raises(ValueError, match=r"step=2 .*available: \[4, 8\]"):
        checkpoints.load_checkpoint(str(workdir), step=2)  # saved, then removed (keep=2)


def test_load_checkpoint_without_checkpoints_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        checkpoints.load_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        checkpoints.load_checkpoint(str(tmp_path / "does-not-exist"))
    (tmp_path / checkpoints.CHECKPOINT_DIR).mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoints.load_checkpoint(str(tmp_path))


# ------------------------------------------------------------------- what is stored


def test_spec_round_trips_and_no_index_tables_are_stored(rpg_run):
    workdir, summary = rpg_run
    config = tiny_config()
    exp = experiment.build(config, synthetic_info(config))
    ckpt = checkpoints.load_checkpoint(str(workdir))
    assert isinstance(ckpt.spec, RPGSpec) and ckpt.spec == exp.spec

    step_dir = workdir / "checkpoints" / "8"
    items = {p.name for p in step_dir.iterdir() if p.is_dir()}
    assert items == {"state", "data", "metrics", "spec", "config", "info"}
    spec_json = json.loads((step_dir / "spec" / "metadata").read_text())
    assert RPGSpec.from_dict(spec_json) == exp.spec

    def longest_list(x) -> int:
        if isinstance(x, dict):
            return max((longest_list(v) for v in x.values()), default=0)
        if isinstance(x, list):
            own = len(x) if all(isinstance(v, int | float) for v in x) else 0
            return max([own] + [longest_list(v) for v in x])
        return 0

    assert longest_list(spec_json) <= 4  # shapes only: no index or sign tables

    # The arrays of the state are the TrainState: bank + momentum + batch stats + step.
    meta = ocp.StandardCheckpointer().metadata(step_dir / "state").item_metadata
    saved = sorted((tuple(m.shape), str(m.dtype)) for m in jax.tree.leaves(meta))
    want = sorted((tuple(s.shape), str(s.dtype))
                  for s in jax.tree.leaves(experiment.abstract_state(exp)))
    assert saved == want
    counts = rpg_jax.count(exp.spec)
    assert counts.trainable == summary["params"]["trainable"]
    n_batch_stats = sum(x.size for x in jax.tree.leaves(ckpt.batch_stats))
    scalars = [dtype for shape, dtype in saved if shape == ()]
    assert scalars == ["int32", "int32"]  # TrainState.step and optax's schedule count
    n_saved = sum(math.prod(shape) for shape, _ in saved)
    assert n_saved == 2 * counts.trainable + n_batch_stats + 2  # bank, SGD momentum
    assert n_saved < counts.generated


def test_checkpoint_bytes_scale_with_the_bank_not_the_generated_weights(tmp_path):
    """A full-width ResNet-20 at 10%: the saved state is far smaller than its generated
    weights (an index table alone would take 4 bytes per generated weight)."""
    config = tiny_config(width=1.0)
    info = synthetic_info(config)
    exp = experiment.build(config, info)
    counts = rpg_jax.count(exp.spec)
    shapes = experiment.param_shapes(exp.model, info)
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes["params"])
    bank = rpg_jax.init_bank(jax.random.key(0), exp.spec, params)
    batch_stats = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes["batch_stats"])
    state = steps.init_state(bank, batch_stats, exp.tx)
    iterator = data.make_train_iterator(config.dataset, global_batch_size=config.batch_size,
                                        seed=0, synthetic_size=config.synthetic_size)
    manager = checkpoints.make_manager(str(tmp_path))
    checkpoints.save(manager, 0, state, iterator, exp)
    manager.wait_until_finished()
    manager.close()

    state_dir = tmp_path / "checkpoints" / "0" / "state"
    state_bytes = sum(p.stat().st_size for p in state_dir.rglob("*") if p.is_file())
    step_bytes = sum(p.stat().st_size for p in state_dir.parent.rglob("*") if p.is_file())
    ring_bytes = 4 * counts.ring_dof
    generated_bytes = 4 * counts.generated
    assert counts.generated > 250_000
    assert state_bytes >= ring_bytes  # the random ring does not compress
    # Measured: ~190 KB of state for 1.08 MB of generated float32 weights.
    assert step_bytes < 0.3 * generated_bytes, (step_bytes, generated_bytes, ring_bytes)

    loaded = checkpoints.load_checkpoint(str(tmp_path))
    assert loaded.step == 0 and loaded.spec == exp.spec
    for a, b in zip(jax.tree.leaves(loaded.trainable), jax.tree.leaves(bank), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_materialize_a_host_copy_of_a_loaded_bank(rpg_run):
    workdir, _ = rpg_run
    ckpt = checkpoints.load_checkpoint(str(workdir))
    want = rpg_jax.materialize(ckpt.trainable, ckpt.spec)  # device arrays: fine
    got = rpg_jax.materialize(jax.device_get(ckpt.trainable), ckpt.spec)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
