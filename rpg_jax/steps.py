"""The train state and the pure train/eval step functions (jitted by the caller).

With RPG the trainable pytree is the bank (rings + free params) and the model's params
are generated inside the step; without RPG the trainable pytree is the params themselves.
Both paths share every line but the params function, so benchmarks compare like with like.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from rpg_jax.erasing import Erasing, erase_batch
from rpg_jax.generator import DeviceTables, generate_params
from rpg_jax.kernel_remat import remat_kernels
from rpg_jax.mixing import Mixing, mix_batch
from rpg_jax.spec import RPGSpec


class TrainState(struct.PyTreeNode):
    """Everything that changes during training (all arrays: jit/shard/checkpoint friendly)."""

    step: jax.Array
    trainable: Any  # the bank with RPG, the params without
    opt_state: Any
    batch_stats: Any  # BatchNorm statistics; {} for a model without BatchNorm


def params_fn(spec: RPGSpec | None) -> Callable[[Any, Any], Any]:
    """Maps (trainable, tables) to the model's params: the generator, or the identity."""
    if spec is None:
        return lambda trainable, tables: trainable
    return lambda trainable, tables: generate_params(trainable, spec, tables)


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float],
              dtype: Any = jnp.float32) -> jax.Array:
    """uint8 NHWC images -> (x/255 - mean) / std in ``dtype`` (done on the device)."""
    x = images.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x.astype(dtype)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross entropy, computed in at least float32 (bf16 logits upcast)."""
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(dtype), labels)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example cross entropy against target distributions (N, classes), in >= float32."""
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    return optax.softmax_cross_entropy(logits.astype(dtype), targets.astype(dtype))


def smooth_targets(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """One-hot targets with label smoothing: ``(1 - s) * onehot + s / num_classes``."""
    return optax.smooth_labels(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32),
                               smoothing)


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    spec: RPGSpec | None,
    mean: Sequence[float],
    std: Sequence[float],
    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
    input_dtype: Any = jnp.float32,
    *,
    label_smoothing: float = 0.0,
    mixing: Mixing | None = None,
    erasing: Erasing | None = None,
    seed: int = 0,
):
    """``train_step(state, batch, tables) -> (state, metrics)``; batch = uint8 images + labels.

    The loss is the cross entropy against one-hot targets, smoothed by ``label_smoothing``
    and mixed by ``mixing`` (mixup/CutMix), on images randomly erased by ``erasing`` first
    (per example, as in the paper); the random draws of both come from ``seed`` and the
    step (the key ``fold_in(key(seed), step)`` mixes, its ``fold_in(..., 1)`` erases). The
    logged accuracy is against the unmixed labels.
    """
    to_params = params_fn(spec)
    mixing = mixing or Mixing()
    erasing = erasing or Erasing()
    soft = label_smoothing > 0 or mixing.enabled

    def train_step(state: TrainState, batch: dict[str, jax.Array], tables: Any):
        images = normalize(batch["image"], mean, std, input_dtype)
        labels = batch["label"]
        step_key = jax.random.fold_in(jax.random.key(seed), state.step)
        if erasing.enabled:
            images = erase_batch(jax.random.fold_in(step_key, 1), images, erasing, mean, std)
        targets = None
        if soft:
            num_classes = getattr(model, "num_classes", None) or jax.eval_shape(
                lambda: model.apply({"params": to_params(state.trainable, tables),
                                     "batch_stats": state.batch_stats}, images[:1],
                                    train=False)).shape[-1]
            targets = smooth_targets(labels, num_classes, label_smoothing)
            images, targets = mix_batch(step_key, images, targets, mixing)

        def loss_fn(trainable):
            variables = {"params": to_params(trainable, tables), "batch_stats": state.batch_stats}
            logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
            per_example = (soft_cross_entropy(logits, targets) if soft
                           else cross_entropy(logits, labels))
            return per_example.mean(), (logits, updates.get("batch_stats", {}))

        if isinstance(tables, DeviceTables) and tables.remat:
            loss_fn = remat_kernels(loss_fn)
        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.trainable)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
            # L2 norm of the whole gradient before clipping (of the micro-batch when
            # accumulating), as big_vision's ``l2_grads``
            "grad_norm": optax.global_norm(grads),
        }
        if learning_rate_fn is not None:
            metrics["learning_rate"] = learning_rate_fn(state.step)
        new_state = state.replace(step=state.step + 1, trainable=trainable,
                                  opt_state=opt_state, batch_stats=batch_stats)
        return new_state, metrics

    return train_step


def make_eval_step(
    model: nn.Module,
    spec: RPGSpec | None,
    mean: Sequence[float],
    std: Sequence[float],
    input_dtype: Any = jnp.float32,
):
    """``eval_step(state, batch, tables) -> sums`` of loss, top-1 and top-5 hits and count.

    Padded examples (``batch["mask"] == 0``) are left out of every sum.
    """
    to_params = params_fn(spec)

    def eval_step(state: TrainState, batch: dict[str, jax.Array], tables: Any):
        images = normalize(batch["image"], mean, std, input_dtype)
        variables = {"params": to_params(state.trainable, tables),
                     "batch_stats": state.batch_stats}
        logits = model.apply(variables, images, train=False).astype(jnp.float32)
        labels = batch["label"]
        mask = batch.get("mask", jnp.ones(labels.shape, jnp.float32))
        top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        return {
            "loss": jnp.sum(cross_entropy(logits, labels) * mask),
            "top1": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
            "top5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
            "count": jnp.sum(mask),
        }

    return eval_step


def evaluate(eval_step: Callable, state: TrainState, tables: Any, batches: Iterable[Any],
             to_global: Callable[[Any], Any] = lambda batch: batch,
             max_batches: int = -1) -> dict[str, float]:
    """Top-1, top-5 and loss over one pass of ``batches`` (or its first ``max_batches``).

    ``eval_step`` is the (jitted) step of :func:`make_eval_step`; ``to_global`` places each
    host batch on the devices (the identity on one device). Returns ``eval_loss``,
    ``eval_top1``, ``eval_top5`` (means over the unpadded examples) and ``eval_count``.
    """
    # Sums are fetched to the host one batch behind (the next eval step is already queued)
    # and added there: eager adds of multi-process arrays are computations of their own, and
    # on jaxlib 0.10.2 two processes have deadlocked in them (gloo), both waiting in the add.
    totals, pending = None, None
    for batch in itertools.islice(batches, None if max_batches < 0 else max_batches):
        sums = eval_step(state, to_global(batch), tables)
        if pending is not None:
            totals = _add_sums(totals, jax.device_get(pending))
        pending = sums
    if pending is None:
        raise ValueError("evaluate: no eval batches")
    totals = _add_sums(totals, jax.device_get(pending))
    n = max(float(totals["count"]), 1.0)
    return {"eval_loss": float(totals["loss"]) / n, "eval_top1": float(totals["top1"]) / n,
            "eval_top5": float(totals["top5"]) / n, "eval_count": int(totals["count"])}


def _add_sums(totals: dict | None, sums: dict) -> dict:
    """Adds one batch's host sums to the running totals (float64, so a long eval loses no
    counts to float32 rounding)."""
    sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
    return sums if totals is None else {k: totals[k] + sums[k] for k in totals}


def make_batch_stats_step(
    model: nn.Module,
    spec: RPGSpec | None,
    mean: Sequence[float],
    std: Sequence[float],
    input_dtype: Any = jnp.float32,
):
    """``stats_step(trainable, batch_stats, batch, tables) -> batch_stats``: the BatchNorm
    statistics after one train-mode forward pass of ``batch`` (nothing else changes)."""
    to_params = params_fn(spec)

    def stats_step(trainable: Any, batch_stats: Any, batch: dict[str, jax.Array], tables: Any):
        images = normalize(batch["image"], mean, std, input_dtype)
        variables = {"params": to_params(trainable, tables), "batch_stats": batch_stats}
        _, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
        return updates["batch_stats"]

    return stats_step


def precise_batch_stats(stats_step: Callable, trainable: Any, batch_stats: Any, tables: Any,
                        batches: Iterable[Any],
                        to_global: Callable[[Any], Any] = lambda batch: batch) -> Any:
    """BatchNorm statistics that belong to ``trainable``: each batch's mean and variance
    averaged over ``batches`` with equal weights, as SWA's ``update_bn`` (PyTorch's
    ``momentum=None``), for evaluating weights other than the live ones (the EMA).

    ``stats_step`` is the (jitted) step of :func:`make_batch_stats_step`; ``batch_stats``
    gives the tree's structure (its values are not used). Flax's running update
    ``s' = m * s + (1 - m) * batch_stat`` is affine in ``s``: a pass from zeros gives
    ``(1 - m) * batch_stat``, and the first batch's pass from ones gives ``m``, so the result
    depends neither on the modules' momentum nor on the statistics it starts from.
    """
    zeros = jax.tree.map(jnp.zeros_like, batch_stats)
    total, count, momentum = None, 0, None
    for batch in batches:
        batch = to_global(batch)
        scaled = stats_step(trainable, zeros, batch, tables)
        if momentum is None:
            ones = jax.tree.map(jnp.ones_like, batch_stats)
            momentum = jax.tree.map(lambda a, b: a - b,
                                    stats_step(trainable, ones, batch, tables), scaled)
        total = scaled if total is None else jax.tree.map(lambda a, b: a + b, total, scaled)
        count += 1
    if total is None:
        raise ValueError("precise_batch_stats: no batches")
    return jax.tree.map(lambda t, m: t / (count * (1.0 - m)), total, momentum)


def init_state(trainable: Any, batch_stats: Any, tx: optax.GradientTransformation) -> TrainState:
    """A step-0 train state."""
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                      opt_state=tx.init(trainable), batch_stats=batch_stats)
