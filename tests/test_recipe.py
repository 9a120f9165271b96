"""The recipe knobs: label smoothing, EMA, gradient accumulation, clipping, weight-decay
masks, optax schedules by name, mixup/CutMix, random erasing; each against a closed form or a
reference."""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rpg_jax import config as config_lib
from rpg_jax import erasing, mixing, optim, steps
from rpg_jax.metrics import read_metrics
from rpg_jax.train import train_and_evaluate
from tiny_config import tiny_config

pytestmark = pytest.mark.usefixtures("compile_cache")

MEAN, STD = (0.5,) * 3, (0.25,) * 3


def recipe(**overrides):
    """base_config with SGD, no decay, no momentum, constant lr 0.1, then ``overrides``."""
    c = config_lib.base_config()
    c.momentum, c.weight_decay, c.lr_schedule, c.learning_rate = 0.0, 0.0, "constant", 0.1
    for k, v in overrides.items():
        c[k] = v
    config_lib.validate(c)
    return c


class Linear(nn.Module):
    """A BatchNorm-free classifier (batch statistics would break big-batch equivalence)."""

    num_classes: int = 5

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape(x.shape[0], -1)
        x = nn.tanh(nn.Dense(16)(x))
        return nn.Dense(self.num_classes)(x)


def batch_of(n, seed=0, classes=5, hw=4):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (n, hw, hw, 3), dtype=np.uint8),
            "label": rng.integers(0, classes, n).astype(np.int32)}


def linear_state(tx, seed=0):
    params = Linear().init(jax.random.key(seed), jnp.zeros((1, 4, 4, 3)))["params"]
    return steps.init_state(params, {}, tx)


def logits_of(state, batch):
    x = steps.normalize(jnp.asarray(batch["image"]), MEAN, STD)
    return Linear().apply({"params": state.trainable}, x)


# ------------------------------------------------------------------- label smoothing


def test_label_smoothing_changes_the_loss_by_the_known_amount():
    tx = optim.make_optimizer(recipe(), optax.constant_schedule(0.1))
    state, batch, s = linear_state(tx), batch_of(32), 0.2
    logits = logits_of(state, batch)
    logp = jax.nn.log_softmax(logits)
    ce = -jnp.take_along_axis(logp, batch["label"][:, None], 1)[:, 0]
    want = float(jnp.mean((1 - s) * ce + s * jnp.mean(-logp, axis=-1)))
    plain = jax.jit(steps.make_train_step(Linear(), tx, None, MEAN, STD))
    smoothed = jax.jit(steps.make_train_step(Linear(), tx, None, MEAN, STD, label_smoothing=s))
    _, m0 = plain(state, batch, {})
    _, m1 = smoothed(state, batch, {})
    assert float(m0["loss"]) == pytest.approx(float(jnp.mean(ce)), rel=1e-6)
    assert float(m1["loss"]) == pytest.approx(want, rel=1e-6)
    assert abs(float(m1["loss"]) - float(m0["loss"])) > 1e-3
    assert float(m1["accuracy"]) == float(m0["accuracy"])  # against the hard labels


# ------------------------------------------------------------------------------- EMA


def test_ema_after_n_steps_equals_the_closed_form():
    """Debiased: ema_n = (1 - d) sum_t d^(n-t) p_t / (1 - d^n) over the trajectory p_1..p_n
    (the initial parameters p_0 weigh nothing; after one update ema = p_1)."""
    d, lr, n = 0.9, 0.1, 7
    tx = optim.make_optimizer(recipe(ema_decay=d), optax.constant_schedule(lr))
    params = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array(0.5)}
    state = tx.init(params)
    # its own buffers: a donated train state must not hold one buffer twice
    assert (optim.ema_params(state, d)["w"].unsafe_buffer_pointer()
            != params["w"].unsafe_buffer_pointer())
    trajectory = [params]
    for _ in range(n):
        grads = jax.tree.map(lambda p: p ** 2, params)  # any gradient: SGD moves the params
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        trajectory.append(params)
        if len(trajectory) == 2:
            jax.tree.map(lambda e, p: np.testing.assert_allclose(e, p, rtol=1e-6),
                         optim.ema_params(state, d), params)
    for name in params:
        want = (1 - d) * sum(d ** (n - t) * trajectory[t][name]
                             for t in range(1, n + 1)) / (1 - d ** n)
        np.testing.assert_allclose(optim.ema_params(state, d)[name], want, rtol=1e-6)
        assert not np.allclose(want, params[name])  # the EMA lags the parameters
    assert optim.ema_params(optim.make_optimizer(recipe(), lr).init(params), d) is None


# ------------------------------------------------------------------- gradient accumulation


@pytest.mark.parametrize("optimizer, momentum", [("sgd", 0.9), ("adamw", 0.9)])
def test_k_micro_batches_give_the_update_of_one_k_times_batch(optimizer, momentum):
    k, micro = 4, 8
    big_cfg = recipe(optimizer=optimizer, momentum=momentum, weight_decay=1e-3)
    acc_cfg = recipe(optimizer=optimizer, momentum=momentum, weight_decay=1e-3,
                     grad_accum_steps=k)
    lr = lambda step: 0.1 * 0.5 ** (step / k)  # noqa: E731  (a decaying rate in train steps)
    big_lr = lambda count: lr(count * k)  # noqa: E731  (one big step = k train steps)
    big_tx, acc_tx = optim.make_optimizer(big_cfg, big_lr), optim.make_optimizer(acc_cfg, lr)
    big_step = jax.jit(steps.make_train_step(Linear(), big_tx, None, MEAN, STD))
    acc_step = jax.jit(steps.make_train_step(Linear(), acc_tx, None, MEAN, STD))
    big, acc = linear_state(big_tx), linear_state(acc_tx)
    for update in range(2):
        batch = batch_of(k * micro, seed=update)
        big, _ = big_step(big, batch, {})
        for i in range(k):
            before = acc.trainable
            acc, _ = acc_step(acc, {n: v[i * micro:(i + 1) * micro] for n, v in batch.items()},
                              {})
            if i < k - 1:  # no update until the k-th micro-batch
                jax.tree.map(np.testing.assert_array_equal, acc.trainable, before)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7),
                     acc.trainable, big.trainable)
    assert int(acc.step) == 2 * k and int(big.step) == 2


# ------------------------------------------------------------------------------ clipping


def test_global_norm_clipping_bounds_the_update():
    c, lr = 0.5, 1.0
    tx = optim.make_optimizer(recipe(grad_clip_norm=c), optax.constant_schedule(lr))
    params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    state = tx.init(params)
    big = {"a": jnp.array([30.0, -40.0, 0.0]), "b": jnp.full((2, 2), 10.0)}
    updates, state = tx.update(big, state, params)
    norm = float(optax.tree.norm(updates))
    assert norm == pytest.approx(c * lr, rel=1e-6)
    scale = jax.tree.map(lambda u, g: u / g, updates, big)  # the same factor everywhere
    factors = np.concatenate([np.ravel(f) for f in jax.tree.leaves(scale)])
    factors = factors[np.isfinite(factors)]
    np.testing.assert_allclose(factors, factors[0], rtol=1e-6)
    small = jax.tree.map(lambda g: g * 1e-3, big)  # norm 0.054 < c: untouched
    updates, _ = tx.update(small, state, params)
    jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -lr * g, rtol=1e-6), updates, small)
    unclipped = optim.make_optimizer(recipe(), optax.constant_schedule(lr))
    updates, _ = unclipped.update(big, unclipped.init(params), params)
    assert float(optax.tree.norm(updates)) > 10 * c


# --------------------------------------------------------------------- weight-decay masks


BANK = {"free": {"bn1": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
                 "fc": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)}},
        "rings": {"ring": jnp.ones(6)}}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("exclude, decayed", [
    ("", {"free/bn1/scale", "free/bn1/bias", "free/fc/kernel", "free/fc/bias", "rings/ring"}),
    ("norm_and_bias", {"free/fc/kernel", "rings/ring"}),
    (r"^rings/", {"free/bn1/scale", "free/bn1/bias", "free/fc/kernel", "free/fc/bias"}),
])
def test_weight_decay_mask_decays_exactly_the_named_leaves(optimizer, exclude, decayed):
    config = recipe(optimizer=optimizer, weight_decay=0.1, weight_decay_exclude=exclude)
    tx = optim.make_optimizer(config, optax.constant_schedule(1.0))
    zero = jax.tree.map(jnp.zeros_like, BANK)
    updates, _ = tx.update(zero, tx.init(BANK), BANK)
    got = {optim.path_name(p) for p, u in jax.tree_util.tree_flatten_with_path(updates)[0]
           if float(jnp.max(jnp.abs(u))) > 0}
    assert got == decayed
    for p, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        if optim.path_name(p) in decayed:  # coupled (SGD) and decoupled (AdamW): -lr*wd*p
            np.testing.assert_allclose(u, -0.1 * np.ones(u.shape), rtol=1e-6)


# ---------------------------------------------------------------------------- schedules


def test_builtin_schedules_keep_their_values():
    c = recipe(lr_schedule="cosine", warmup_epochs=1.0)
    lr = optim.learning_rate_fn(c, steps_per_epoch=10, num_steps=100)
    # The earlier hand-written schedule: warm-up factor times cosine over the steps after it.
    for step in range(0, 101):
        frac = min(max((step - 10) / 90, 0.0), 1.0)
        want = 0.1 * 0.5 * (1 + math.cos(math.pi * frac)) * min(1.0, (step + 1) / 10)
        assert float(lr(step)) == pytest.approx(want, rel=1e-5, abs=1e-8), step
    c = recipe(lr_schedule="exp_epoch", lr_decay_epochs=45.0)
    lr = optim.learning_rate_fn(c, steps_per_epoch=10, num_steps=900)
    for step in range(0, 900, 7):
        want = 0.1 * 0.1 ** ((step // 10) / 45)
        assert float(lr(step)) == pytest.approx(want, rel=1e-5), step


def test_an_optax_schedule_by_name_with_the_run_placeholders():
    c = recipe(lr_schedule="warmup_cosine_decay_schedule", learning_rate=0.4,
               lr_schedule_kwargs='{"init_value": 0.0, "peak_value": "learning_rate", '
                                  '"warmup_steps": "steps_per_epoch", "decay_steps": '
                                  '"num_steps", "end_value": 0.001}')
    lr = optim.learning_rate_fn(c, steps_per_epoch=12, num_steps=120)
    want = optax.warmup_cosine_decay_schedule(0.0, 0.4, 12, 120, 0.001)
    np.testing.assert_array_equal([lr(s) for s in range(121)], [want(s) for s in range(121)])


@pytest.mark.parametrize("overrides, pattern", [
    ({"lr_schedule": "cosine_decay"}, r"config\.lr_schedule='cosine_decay'.*optax schedule"),
    ({"lr_schedule": "cosine_decay_schedule", "lr_schedule_kwargs": "{bad"},
     r"config\.lr_schedule_kwargs='\{bad' is not valid JSON"),
    ({"lr_schedule": "cosine_decay_schedule", "lr_schedule_kwargs": '{"peak": 1}'},
     r"config\.lr_schedule_kwargs=.*does not fit optax\.cosine_decay_schedule"),
    ({"lr_schedule": "cosine", "lr_schedule_kwargs": '{"alpha": 0.1}'},
     r"only for an optax schedule"),
    ({"lr_schedule": "constant_schedule", "lr_schedule_kwargs": '{"value": 0.1}',
      "warmup_epochs": 1.0}, r"config\.warmup_epochs=1\.0: applies to the built-in"),
    ({"label_smoothing": 1.0}, r"config\.label_smoothing=1\.0: expected a number in \[0, 1\)"),
    ({"ema_decay": -0.1}, r"config\.ema_decay=-0\.1"),
    ({"ema_eval": True}, r"config\.ema_eval=True: expected False unless config\.ema_decay"),
    ({"ema_bn_batches": -1}, r"config\.ema_bn_batches=-1: expected a non-negative int"),
    ({"grad_accum_steps": 0}, r"config\.grad_accum_steps=0: expected a positive int"),
    ({"grad_clip_norm": -1.0}, r"config\.grad_clip_norm=-1\.0"),
    ({"mix_prob": 1.5}, r"config\.mix_prob=1\.5: expected a probability"),
    ({"cutmix_alpha": -1.0}, r"config\.cutmix_alpha=-1\.0"),
    ({"holdout_examples": -5}, r"config\.holdout_examples=-5: expected a non-negative int"),
    ({"random_erase_prob": 2.0}, r"config\.random_erase_prob=2\.0: expected a probability"),
    ({"random_erase_fill": "zeros"},
     r"config\.random_erase_fill='zeros': expected one of \('random', 'mean'\)"),
    ({"weight_decay_exclude": "(bias"}, r"config\.weight_decay_exclude='\(bias'"),
])
def test_bad_recipe_fields_are_named(overrides, pattern):
    c = config_lib.base_config()
    for k, v in overrides.items():
        c[k] = v
    with pytest.raises(ValueError, match=pattern):
        config_lib.validate(c)


# --------------------------------------------------------------------- mixup / CutMix


def soft_onehot(labels, classes=5):
    return jax.nn.one_hot(labels, classes)


def test_mixup_mixes_images_and_targets_with_the_same_coefficient():
    labels = jnp.arange(16) % 5  # labels[i] != labels[15 - i] for i = 0
    x = jax.random.uniform(jax.random.key(0), (16, 8, 8, 3))
    y = soft_onehot(labels)
    mixed, targets = mixing.mix_batch(jax.random.key(3), x, y, mixing.Mixing(mixup_alpha=0.4))
    lam = float(targets[1, labels[1]])  # labels[1] = 1, labels[14] = 4
    assert 0 < lam < 1
    np.testing.assert_allclose(mixed, lam * x + (1 - lam) * x[::-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(targets, lam * y + (1 - lam) * y[::-1], rtol=1e-6)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)


def test_cutmix_pastes_one_box_whose_area_is_one_minus_lambda():
    x = jax.random.uniform(jax.random.key(0), (8, 32, 32, 3)) + 1.0  # no two pixels equal
    y = soft_onehot(jnp.arange(8) % 5)
    for seed in range(5):
        mixed, targets = mixing.mix_batch(jax.random.key(seed), x, y,
                                          mixing.Mixing(cutmix_alpha=1.0))
        changed = np.asarray(jnp.any(mixed != x, axis=-1))  # (N, H, W)
        assert (changed == changed[0]).all()  # the same box for the whole batch
        rows, cols = np.nonzero(changed[0])
        area = changed[0].sum()
        if area:
            assert area == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
            np.testing.assert_array_equal(mixed[:, box[0], box[1]], x[::-1][:, box[0], box[1]])
        lam = 1 - area / (32 * 32)
        np.testing.assert_allclose(targets, lam * y + (1 - lam) * y[::-1], rtol=1e-5)


def test_mixing_off_or_not_drawn_leaves_the_batch_alone():
    x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))
    y = soft_onehot(jnp.arange(4))
    for m in (mixing.Mixing(), mixing.Mixing(mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.0)):
        mixed, targets = mixing.mix_batch(jax.random.key(1), x, y, m)
        np.testing.assert_array_equal(mixed, x)
        np.testing.assert_array_equal(targets, y)


def test_the_train_step_trains_on_the_mixed_batch_of_its_seed_and_step():
    """The step's loss is the soft cross entropy of the batch mixed with the key
    fold_in(key(seed), step): the mix happens on the device, reproducibly."""
    tx = optim.make_optimizer(recipe(), optax.constant_schedule(0.1))
    m = mixing.Mixing(mixup_alpha=1.0, cutmix_alpha=1.0)
    step = jax.jit(steps.make_train_step(Linear(), tx, None, MEAN, STD, label_smoothing=0.1,
                                         mixing=m, seed=7))
    state, batch = linear_state(tx), batch_of(16)
    state = state.replace(step=jnp.int32(5))
    x = steps.normalize(jnp.asarray(batch["image"]), MEAN, STD)
    targets = steps.smooth_targets(jnp.asarray(batch["label"]), 5, 0.1)
    key = jax.random.fold_in(jax.random.key(7), 5)
    mixed, mixed_targets = mixing.mix_batch(key, x, targets, m)
    logits = Linear().apply({"params": state.trainable}, mixed)
    want = float(jnp.mean(steps.soft_cross_entropy(logits, mixed_targets)))
    _, metrics = step(state, batch, {})
    assert float(metrics["loss"]) == pytest.approx(want, rel=1e-5)
    unmixed = float(jnp.mean(steps.soft_cross_entropy(
        Linear().apply({"params": state.trainable}, x), targets)))
    assert abs(want - unmixed) > 1e-3


# --------------------------------------------------------------------- random erasing


def zhong_boxes(rng, n, height, width, prob=0.5, sl=0.02, sh=0.4, r1=0.3, attempts=100):
    """The paper's Algorithm 1 (Zhong et al. 2017), one example at a time in Python: the
    slow reference for the distribution of the erased boxes; (h, w) or None per example."""
    boxes = []
    for _ in range(n):
        box = None
        if rng.uniform() < prob:
            for _ in range(attempts):
                area = rng.uniform(sl, sh) * height * width
                aspect = rng.uniform(r1, 1 / r1)
                h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
                if h < height and w < width:
                    box = (h, w)
                    break
        boxes.append(box)
    return boxes


def erased_boxes(original, erased):
    """(h, w) of the one erased rectangle of each example, or None; asserts that the
    changed pixels of each example form exactly one axis-aligned rectangle."""
    changed = np.asarray(jnp.any(erased != original, axis=-1))  # (N, H, W)
    boxes = []
    for mask in changed:
        rows, cols = np.nonzero(mask)
        if rows.size == 0:
            boxes.append(None)
            continue
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert mask.sum() == h * w, "the erased pixels are not one rectangle"
        boxes.append((int(h), int(w)))
    return boxes


def test_random_erasing_draws_the_boxes_of_the_papers_algorithm():
    """Per example: erased with probability 0.5, one rectangle whose area and aspect follow
    Algorithm 1 (compared in distribution with the per-example Python reference)."""
    n, hw = 4000, 28
    x = jax.random.uniform(jax.random.key(0), (n, hw, hw, 1)) + 10.0  # far from any fill
    out = erasing.erase_batch(jax.random.key(1), x, erasing.Erasing(prob=0.5), (0.3,), (0.4,))
    ours = erased_boxes(x, out)
    ref = zhong_boxes(np.random.default_rng(0), n, hw, hw)
    # a fill pixel equal to the original is impossible (x >= 10), so a None is not erased
    for boxes in (ours, ref):
        assert abs(sum(b is not None for b in boxes) / n - 0.5) < 0.03  # 4 sigma
    ours_hw = np.array([b for b in ours if b], float)
    ref_hw = np.array([b for b in ref if b], float)
    assert (ours_hw < hw).all() and (ours_hw >= 1).all()
    area = ours_hw.prod(1) / hw**2
    assert area.min() >= 0.015 and area.max() <= 0.45  # 2-40%, up to rounding
    for q in (0.1, 0.5, 0.9):  # the quantiles of area, height and width match the reference
        np.testing.assert_allclose(np.quantile(ours_hw.prod(1), q),
                                   np.quantile(ref_hw.prod(1), q), rtol=0.06)
        np.testing.assert_allclose(np.quantile(ours_hw, q, axis=0),
                                   np.quantile(ref_hw, q, axis=0), rtol=0.1, atol=1)
    # the boxes lie inside the image, touch every border, and their centres are unbiased
    top, left, h, w, done = map(np.asarray, erasing.erase_boxes(
        jax.random.key(3), n, hw, hw, erasing.Erasing(prob=0.5)))
    top, left, h, w = top[done], left[done], h[done], w[done]
    assert top.min() == left.min() == 0 and (top + h).max() == (left + w).max() == hw
    assert (top + h <= hw).all() and (left + w <= hw).all()
    for start, size in ((top, h), (left, w)):
        offset = start + size / 2 - hw / 2
        assert abs(offset.mean()) < 4 * offset.std() / math.sqrt(offset.size)


@pytest.mark.parametrize("fill", ["random", "mean"])
def test_random_erasing_fills_with_normalised_random_pixels_or_the_mean(fill):
    mean, std = (0.5, 0.25, 0.125), (0.2, 0.3, 0.4)
    x = jnp.full((64, 16, 16, 3), 100.0)
    out = np.asarray(erasing.erase_batch(jax.random.key(2), x,
                                         erasing.Erasing(prob=1.0, fill=fill), mean, std))
    erased = out[out != 100.0].reshape(-1)
    assert erased.size > 64 * 16 * 16 * 3 * 0.02
    values = out[np.any(out != 100.0, axis=-1)]  # (pixels, 3)
    if fill == "mean":
        np.testing.assert_array_equal(values, 0.0)
        return
    pixels = values * np.array(std) + np.array(mean)  # back to [0, 1]
    np.testing.assert_allclose(pixels * 255, np.round(pixels * 255), atol=2e-3)
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert pixels.mean() == pytest.approx(0.5, abs=0.01)  # uniform over 0..255
    assert abs(np.corrcoef(values[:, 0], values[:, 1])[0, 1]) < 0.05  # channels independent


def test_random_erasing_off_or_never_fitting_leaves_the_batch_alone():
    x = jax.random.uniform(jax.random.key(0), (8, 6, 6, 3))
    for e in (erasing.Erasing(), erasing.Erasing(prob=0.0, fill="mean")):
        np.testing.assert_array_equal(erasing.erase_batch(jax.random.key(1), x, e, MEAN, STD), x)
    # square boxes of 90-95% of a 4x4 image round to 4x4, which never fits (h < H fails):
    # Algorithm 1 then leaves the example whole
    e = erasing.Erasing(prob=1.0, min_area=0.9, max_area=0.95, min_aspect=1.0)
    small = jax.random.uniform(jax.random.key(0), (8, 4, 4, 3))
    np.testing.assert_array_equal(erasing.erase_batch(jax.random.key(1), small, e, MEAN, STD),
                                  small)
    *_, erased = erasing.erase_boxes(jax.random.key(1), 8, 4, 4, e)
    assert not np.asarray(erased).any()


@pytest.mark.parametrize("kwargs, pattern", [
    ({"prob": 1.5}, r"Erasing\.prob=1\.5"),
    ({"fill": "zero"}, r"Erasing\.fill='zero'"),
    ({"min_area": 0.5, "max_area": 0.4}, r"area range \(0\.5, 0\.4\)"),
    ({"min_aspect": 2.0}, r"Erasing\.min_aspect=2\.0"),
    ({"attempts": 0}, r"Erasing\.attempts=0"),
])
def test_bad_erasing_settings_are_named(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        erasing.Erasing(**kwargs)


def test_the_train_step_erases_then_mixes_with_the_keys_of_its_seed_and_step():
    """Erasing uses fold_in(fold_in(key(seed), step), 1), before mixup with the step's key;
    the mixing draws are those of a run without erasing."""
    tx = optim.make_optimizer(recipe(), optax.constant_schedule(0.1))
    m, e = mixing.Mixing(mixup_alpha=1.0), erasing.Erasing(prob=1.0)
    step = jax.jit(steps.make_train_step(Linear(), tx, None, MEAN, STD, mixing=m, erasing=e,
                                         seed=7))
    state, batch = linear_state(tx), batch_of(16)
    state = state.replace(step=jnp.int32(5))
    x = steps.normalize(jnp.asarray(batch["image"]), MEAN, STD)
    key = jax.random.fold_in(jax.random.key(7), 5)
    erased = erasing.erase_batch(jax.random.fold_in(key, 1), x, e, MEAN, STD)
    assert not np.array_equal(erased, x)
    mixed, targets = mixing.mix_batch(key, erased, soft_onehot(jnp.asarray(batch["label"])), m)
    logits = Linear().apply({"params": state.trainable}, mixed)
    want = float(jnp.mean(steps.soft_cross_entropy(logits, targets)))
    _, metrics = step(state, batch, {})
    assert float(metrics["loss"]) == pytest.approx(want, rel=1e-5)


class DenseBN(nn.Module):
    """Dense then BatchNorm with a chosen momentum: its statistics are easy to compute."""

    momentum: float = 0.9

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(3)(x.reshape((x.shape[0], -1)))
        return nn.BatchNorm(use_running_average=not train, momentum=self.momentum)(x)


def test_precise_batch_stats_average_each_batch_moments_whatever_the_momentum_or_start():
    batches = [batch_of(8, seed=i) for i in range(5)]
    params = DenseBN().init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))["params"]
    hidden = [np.asarray(steps.normalize(b["image"], MEAN, STD)).reshape(8, -1)
              @ np.asarray(params["Dense_0"]["kernel"]) + np.asarray(params["Dense_0"]["bias"])
              for b in batches]
    want_mean = np.mean([h.mean(0) for h in hidden], axis=0)
    want_var = np.mean([h.var(0) for h in hidden], axis=0)
    start = {"BatchNorm_0": {"mean": jnp.full(3, 7.0), "var": jnp.full(3, 5.0)}}
    for momentum in (0.9, 0.99):
        stats_step = jax.jit(steps.make_batch_stats_step(DenseBN(momentum), None, MEAN, STD))
        got = steps.precise_batch_stats(stats_step, params, start, None, iter(batches))
        np.testing.assert_allclose(got["BatchNorm_0"]["mean"], want_mean, rtol=2e-4, atol=1e-5)
        np.testing.assert_allclose(got["BatchNorm_0"]["var"], want_var, rtol=2e-4, atol=1e-5)
    # a running average over the same batches (what the train step keeps) is not that
    running = start
    for b in batches:
        running = stats_step(params, running, b, None)
    assert not np.allclose(running["BatchNorm_0"]["mean"], want_mean, rtol=1e-2)
    with pytest.raises(ValueError, match="no batches"):
        steps.precise_batch_stats(stats_step, params, start, None, iter([]))


def test_ema_eval_recomputes_batch_stats_without_touching_the_run(tmp_path):
    """ema_bn_batches changes only the eval_ema_* records: the trajectory, the live eval and
    the checkpoint are those of the run with the live statistics; the EMA records equal an
    evaluation by hand with statistics over the first batches of a fresh train stream."""
    from test_train import saved_state

    from rpg_jax import data, experiment
    from rpg_jax.generator import make_tables

    runs = {}
    for n in (0, 3):
        config = tiny_config(ema_decay=0.5, ema_eval=True, ema_bn_batches=n)
        train_and_evaluate(config, str(tmp_path / f"bn{n}"))
        runs[n] = [r for r in read_metrics(str(tmp_path / f"bn{n}"))]
    live = ("step", "eval_loss", "eval_top1", "eval_top5")
    assert [runs[3][-1][k] for k in live] == [runs[0][-1][k] for k in live]
    assert [r.get("train_loss") for r in runs[0]] == [r.get("train_loss") for r in runs[3]]
    assert runs[3][-1]["eval_ema_loss"] != runs[0][-1]["eval_ema_loss"]
    jax.tree.map(np.testing.assert_array_equal, saved_state(tmp_path / "bn0"),
                 saved_state(tmp_path / "bn3"))

    state = saved_state(tmp_path / "bn3")
    info = data.dataset_info("synthetic_cifar", synthetic_size=256)
    exp = experiment.build(config, info)
    tables = make_tables(exp.spec)
    stream = data.make_train_iterator("synthetic_cifar", global_batch_size=16, seed=0,
                                      synthetic_size=256)
    ema = state.replace(trainable=optim.ema_params(state.opt_state, 0.5))
    stats_step = jax.jit(steps.make_batch_stats_step(exp.model, exp.spec, info.mean, info.std))
    ema = ema.replace(batch_stats=steps.precise_batch_stats(
        stats_step, ema.trainable, ema.batch_stats, tables, [next(stream) for _ in range(3)]))
    eval_step = jax.jit(steps.make_eval_step(exp.model, exp.spec, info.mean, info.std))
    batches = data.make_eval_batches("synthetic_cifar", global_batch_size=16,
                                     synthetic_size=256)
    by_hand = steps.evaluate(eval_step, ema, tables, batches)
    np.testing.assert_allclose(runs[3][-1]["eval_ema_loss"], by_hand["eval_loss"], rtol=1e-5)
    assert runs[3][-1]["eval_ema_top1"] == by_hand["eval_top1"]


# ------------------------------------------------------- all knobs in the train loop


ALL_KNOBS = {"grad_accum_steps": 2, "ema_decay": 0.9, "ema_eval": True, "label_smoothing": 0.1,
             "mixup_alpha": 0.2, "cutmix_alpha": 1.0, "grad_clip_norm": 1.0,
             "random_erase_prob": 0.5,
             "weight_decay_exclude": "norm_and_bias",
             "lr_schedule": "warmup_cosine_decay_schedule",
             "lr_schedule_kwargs": '{"init_value": 0, "peak_value": "learning_rate", '
                                   '"warmup_steps": 2, "decay_steps": "num_steps"}'}


@pytest.mark.slow
def test_every_knob_on_a_preempted_run_resumes_exactly(tmp_path):
    """A SIGTERM between two accumulated micro-batches (step 3 of k=2) resumes to the
    uninterrupted run: accumulator, EMA, mixing draws and schedule are all in the state."""
    from test_train import saved_state, sigterm_at

    config = tiny_config(**ALL_KNOBS)
    a, b = tmp_path / "a", tmp_path / "b"
    full = train_and_evaluate(config, str(a))
    assert train_and_evaluate(config, str(b), on_step=sigterm_at(3))["preempted"]
    resumed = train_and_evaluate(config, str(b))
    assert resumed["eval_loss"] == full["eval_loss"]
    assert resumed["eval_ema_loss"] == full["eval_ema_loss"] != full["eval_loss"]
    sa, sb = saved_state(a), saved_state(b)
    jax.tree.map(np.testing.assert_array_equal, sa, sb)
    ema = optim.ema_params(sa.opt_state, 0.9)
    pairs = zip(jax.tree.leaves(ema), jax.tree.leaves(sa.trainable), strict=True)
    assert ema is not None and not all(np.array_equal(e, p) for e, p in pairs)
    evals = [r for r in read_metrics(str(a)) if "eval_top1" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert all({"eval_ema_top1", "eval_ema_loss", "eval_ema_top5"} <= set(r) for r in evals)


def test_default_optimizer_state_keeps_its_structure():
    """No knob on: the optimizer state is the one checkpoints of earlier runs hold."""
    params = {"w": jnp.ones(3)}
    sgd = optim.make_optimizer(recipe(momentum=0.9, weight_decay=1e-4), lambda s: 0.1)
    ref = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(lambda s: 0.1, momentum=0.9))
    assert jax.tree.structure(sgd.init(params)) == jax.tree.structure(ref.init(params))
    adamw = optim.make_optimizer(recipe(optimizer="adamw"), lambda s: 0.1)
    ref = optax.adamw(lambda s: 0.1, weight_decay=0.0)
    assert jax.tree.structure(adamw.init(params)) == jax.tree.structure(ref.init(params))
    assert re.search("MultiSteps", str(jax.tree.structure(
        optim.make_optimizer(recipe(grad_accum_steps=2), lambda s: 0.1).init(params))))


@pytest.mark.slow
def test_switching_ema_on_at_resume_is_a_clear_error_that_keeps_the_checkpoints(tmp_path):
    train_and_evaluate(tiny_config(), str(tmp_path))
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    config = tiny_config(ema_decay=0.9, num_train_steps=12, resume_overrides="ema_decay")
    with pytest.raises(ValueError, match=r"another structure than this config builds .*"
                                         r"ema_decay, grad_accum_steps"):
        train_and_evaluate(config, str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    assert not (tmp_path / "checkpoints_damaged").exists()
