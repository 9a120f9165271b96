"""Pruning, quantisation and export of trained models."""

import dataclasses
import json
import os

import jax
import numpy as np
import optax
import pytest

from rpg_jax import compress, optim
from rpg_jax.checkpoints import load_checkpoint
from rpg_jax.config import base_config
from rpg_jax.data import load_fashion_mnist
from rpg_jax.export import export, load_export
from rpg_jax.train import train_and_evaluate

# Compiling is most of the fixtures' time: share a persistent cache (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("compile_cache")

FMNIST = os.environ.get("RPG_JAX_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(FMNIST, "train-images-idx3-ubyte.gz")),
    reason="Fashion-MNIST files are not installed")


def tiny_run(workdir, rpg: bool):
    c = base_config()
    c.model, c.width, c.batch_size, c.num_train_steps = "resnet20", 0.25, 32, 30
    c.eval_every_steps, c.checkpoint_every_steps, c.eval_steps, c.log_every_steps = 0, 0, 2, 10
    c.rpg.enabled, c.rpg.ring_size = rpg, 0.2
    train_and_evaluate(c, str(workdir))
    return str(workdir)


@pytest.fixture(scope="module")
def rpg_workdir(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("rpg"), rpg=True)


@pytest.fixture
def rpg_ckpt(rpg_workdir):
    return load_checkpoint(rpg_workdir)  # fresh per test: fine-tuning updates batch_stats


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory):
    return load_checkpoint(tiny_run(tmp_path_factory.mktemp("plain"), rpg=False))


# ------------------------------------------------------------------------ arrays


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("chunk", [None, 7])
def test_quantisation_error_is_at_most_half_a_step(bits, chunk):
    x = np.random.default_rng(0).normal(size=101).astype(np.float32)
    c = compress.compress_array(x, bits=bits, chunk=chunk)
    qmax = 2 ** (bits - 1) - 1
    chunk = chunk or x.size
    scale = np.repeat([np.abs(x[i : i + chunk]).max() / qmax
                       for i in range(0, x.size, chunk)], chunk)[: x.size]
    assert np.all(np.abs(c.dequantize() - x) <= scale / 2 + 1e-7)
    assert c.nbytes == (101 if bits == 8 else 51) + 4 * len(c.scales)
    again = compress.CompressedArray.from_state(c.to_state())
    np.testing.assert_array_equal(again.dequantize(), c.dequantize())


def test_pruning_keeps_the_largest_entries_exactly():
    x = np.arange(1, 11, dtype=np.float32) * np.array([1, -1] * 5)
    t = compress.global_threshold([x[:4], x[4:]], 0.3)
    c = compress.compress_array(x, threshold=t)
    np.testing.assert_array_equal(c.dequantize(), np.where(np.abs(x) > 3, x, 0))
    assert c.nonzeros == 7 and c.nbytes == 2 + 7 * 4  # bitmap of 10 bits + float32 values
    with pytest.raises(ValueError, match="prune=1.0"):
        compress.global_threshold([x], 1.0)
    with pytest.raises(ValueError, match="bits=3"):
        compress.compress_array(x, bits=3)


# ------------------------------------------------------------------------ checkpoints


@needs_fmnist
def test_compress_rpg_checkpoint(rpg_ckpt):
    lossless, _ = compress.compress_checkpoint(rpg_ckpt, eval_batch_size=1000)
    assert lossless["after"]["top1"] == lossless["before"]["top1"]
    ring = sum(r.size for r in rpg_ckpt.spec.rings)
    report, packed = compress.compress_checkpoint(rpg_ckpt, prune=0.5, bits=4, chunk=256,
                                                  eval_batch_size=1000)
    assert report["kind"] == "rpg" and report["compressed_entries"] == ring
    kept = int(sum(p.keep().sum() for p in packed.values()))
    assert kept == ring - round(0.5 * ring) and report["nonzeros"] <= kept
    expected = (-(-ring // 8)) + (-(-kept // 2)) + 4 * (-(-ring // 256))  # bitmap, codes, scales
    other = compress.other_bytes(rpg_ckpt)
    assert report["after"]["stored_bytes"] == expected + other
    assert report["before"]["stored_bytes"] == 4 * ring + other
    assert 0.0 <= report["after"]["top1"] <= 1.0


@needs_fmnist
def test_finetuning_keeps_pruned_entries_at_zero(rpg_ckpt):
    ring = np.concatenate([np.asarray(r) for r in rpg_ckpt.trainable["rings"].values()])
    threshold = compress.global_threshold([ring], 0.6)
    report, packed = compress.compress_checkpoint(rpg_ckpt, prune=0.6, finetune_steps=3,
                                                  eval_batch_size=1000)
    kept = np.concatenate([p.keep() for p in packed.values()])
    assert not np.any(kept & (np.abs(ring) <= threshold))
    assert report["nonzeros"] == np.count_nonzero(
        np.concatenate([p.dequantize() for p in packed.values()]))


def _adam_states(opt_state):
    return [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(
        x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_finetune_optimizer_is_the_runs_at_a_constant_rate(kind):
    c = base_config()
    c.optimizer, c.momentum, c.nesterov, c.weight_decay = kind, 0.5, kind == "sgd", 0.1
    c.grad_clip_norm, c.ema_decay, c.grad_accum_steps = 1e-3, 0.9, 4  # not carried over
    c.weight_decay_exclude = "norm_and_bias"
    params = {"conv": {"kernel": np.full(3, 2.0, np.float32)},
              "bn": {"scale": np.full(3, 2.0, np.float32)}}
    grads = {"conv": {"kernel": np.array([1.0, -4.0, 0.5], np.float32)},
             "bn": {"scale": np.array([1.0, -4.0, 0.5], np.float32)}}
    tx = compress.finetune_optimizer(c, 0.01)
    state = tx.init(params)
    assert optim.ema_params(state, 0.9) is None  # no EMA, no MultiSteps: one update per step
    assert not isinstance(state, optax.MultiStepsState)
    assert bool(_adam_states(state)) == (kind == "adamw")
    updates, _ = tx.update(grads, state, params)
    g = grads["conv"]["kernel"]
    if kind == "adamw":  # first Adam step: -lr * (g / |g| + decay * p), decay masked off bn
        expected, bn = -0.01 * (np.sign(g) + 0.1 * 2.0), -0.01 * np.sign(g)
    else:  # first momentum step is the gradient; Nesterov adds momentum * it again
        expected, bn = -0.01 * 1.5 * (g + 0.1 * 2.0), -0.01 * 1.5 * g
    np.testing.assert_allclose(updates["conv"]["kernel"], expected, rtol=1e-4)  # not clipped
    np.testing.assert_allclose(updates["bn"]["scale"], bn, rtol=1e-4)


@needs_fmnist
def test_finetuning_an_adamw_run_takes_adamw_steps(rpg_ckpt):
    config = rpg_ckpt.config.copy_and_resolve_references()
    config.optimizer, config.weight_decay = "adamw", 0.0
    ckpt = dataclasses.replace(rpg_ckpt, config=config)
    keep = {k: np.ones(a.size, bool) for k, a in compress.compressible(ckpt).items()}
    lr = 1e-2
    tuned = compress.finetune(ckpt, ckpt.trainable, keep, 1, lr)
    delta = np.concatenate([np.asarray(tuned["rings"][k]) - np.asarray(r)
                            for k, r in ckpt.trainable["rings"].items()])
    step = np.abs(delta)
    # Adam's first step moves every entry with a gradient by lr * |g| / (|g| + eps), lr for
    # all but the tiniest gradients; SGD's would be lr * |g|, far below lr and different for
    # each entry.
    assert np.mean(step > lr / 10) > 0.5
    assert step.max() <= lr * (1 + 1e-4)
    assert np.median(step[step > lr / 10]) == pytest.approx(lr, rel=1e-4)


@needs_fmnist
def test_compress_plain_checkpoint_uses_the_weights_rpg_would_generate(plain_ckpt):
    arrays = compress.compressible(plain_ckpt)
    assert len(arrays) == 18 + 2  # 9 blocks x 2 convs + 2 projections in ResNet-20
    report, _ = compress.compress_checkpoint(plain_ckpt, prune=0.5, bits=8,
                                             eval_batch_size=1000)
    assert report["kind"] == "plain"
    assert report["compressed_entries"] == sum(a.size for a in arrays.values())


@needs_fmnist
def test_compress_cli_writes_a_loadable_model(rpg_workdir, tmp_path, capsys):
    out = tmp_path / "model.rpg"
    compress.main(["--workdir", rpg_workdir, "--prune", "0.5",
                   "--bits", "8", "--out", str(out)])
    report = json.loads(capsys.readouterr().out)
    assert report["file_bytes"] == os.path.getsize(out)
    images = load_fashion_mnist()["test"][0][:16]
    loaded = load_export(str(out))
    assert loaded.predict(images).shape == (16, 10)
    assert abs(report["after"]["top1"] - report["before"]["top1"]) < 0.5


# ------------------------------------------------------------------------ export


@needs_fmnist
@pytest.mark.parametrize("kind", ["rpg", "params"])
def test_export_round_trip_gives_identical_logits(rpg_ckpt, tmp_path, kind):
    images = load_fashion_mnist()["test"][0][:32]
    path = str(tmp_path / f"model.{kind}")
    size = export(rpg_ckpt, path, kind)
    assert size == os.path.getsize(path)
    loaded = load_export(path)
    np.testing.assert_array_equal(loaded.predict(images), rpg_ckpt.predict(images))
    assert (loaded.spec is None) == (kind == "params")


@needs_fmnist
def test_rpg_artifact_is_smaller_than_plain_params(rpg_ckpt, tmp_path):
    small = export(rpg_ckpt, str(tmp_path / "a.rpg"), "rpg")
    large = export(rpg_ckpt, str(tmp_path / "a.params"), "params")
    ring = sum(r.size for r in rpg_ckpt.spec.rings)
    generated = sum(r.length for r in rpg_ckpt.spec.rings)
    spec_json = len(json.dumps(rpg_ckpt.spec.to_dict()))
    # The artifact stores the ring instead of the generated weights, plus the spec as JSON.
    assert abs((large - small) - (4 * (generated - ring) - spec_json)) < 1024


def test_load_export_rejects_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no exported model"):
        load_export(str(tmp_path / "missing.rpg"))
    bogus = tmp_path / "bogus.rpg"
    bogus.write_bytes(b"not msgpack at all \x00\x01")
    with pytest.raises(ValueError, match="bogus.rpg"):
        load_export(str(bogus))


@needs_fmnist
def test_export_plain_checkpoint_as_rpg_is_an_error(plain_ckpt, tmp_path):
    with pytest.raises(ValueError, match="plain model"):
        export(plain_ckpt, str(tmp_path / "x.rpg"), "rpg")
