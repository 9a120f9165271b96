"""RPG on models other than the ResNets, against the same model trained plain.

    python benchmarks/generic_models.py mlp [--steps 600] [--out FILE]
    python benchmarks/generic_models.py vit_step [--pairs 7] [--out FILE]

``mlp``: the README's 784-256-128-10 Linen MLP on Fashion-MNIST, SGD momentum 0.9 at lr 0.05
(the plain model's settings) for every variant: plain, RPG with make_spec's defaults,
``select="kernels"`` with the model's own init std, and with the paper's conv rule. Reports
trainable parameters, step-0 loss, last loss and test top-1 on the first 5,000 test images.

``vit_step``: the train step of configs/fashion_mnist_vit.py (RPG) and its ``plain`` variant,
alternating in one process on a device-resident uint8 batch; the ratio is the median of the
per-pair ratios.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import rpg_jax  # noqa: E402
from _util import emit, machine, paired_times  # noqa: E402
from rpg_jax import data, experiment, steps  # noqa: E402


class MLP(nn.Module):
    """784-256-128-10 with ReLU, as in the README."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(256)(x))
        x = nn.relu(nn.Dense(128)(x))
        return nn.Dense(10)(x)


def sgd_run(apply, trainable, arrays, num_steps: int, lr: float = 0.05, batch: int = 128):
    """SGD momentum 0.9 on (x, y, x_test, y_test); returns (per-step losses, test top-1)."""
    x, y, xt, yt = arrays
    tx = optax.sgd(lr, momentum=0.9)
    opt = tx.init(trainable)

    def loss_fn(t, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(apply(t, xb), yb).mean()

    @jax.jit
    def step(t, opt, xb, yb):
        loss, g = jax.value_and_grad(loss_fn)(t, xb, yb)
        updates, opt = tx.update(g, opt, t)
        return optax.apply_updates(t, updates), opt, loss

    rng = np.random.default_rng(0)
    losses = []
    for _ in range(num_steps):
        i = rng.integers(0, len(x), batch)
        trainable, opt, loss = step(trainable, opt, x[i], y[i])
        losses.append(float(loss))
    accuracy = float(np.mean(np.argmax(jax.jit(apply)(trainable, xt), -1) == yt))
    return losses, accuracy


def mlp_table(num_steps: int) -> list[dict]:
    """Plain vs RPG variants of the MLP under the plain model's SGD settings."""
    (x, y), (xt, yt) = (data.load_fashion_mnist()[s] for s in ("train", "test"))
    norm = lambda a: (a.astype(np.float32) / 255.0 - 0.2860) / 0.3530  # noqa: E731
    arrays = norm(x), y, norm(xt[:5000]), yt[:5000]
    model = MLP()
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28)))["params"]
    rows = []

    def record(name, trainable_count, losses, accuracy):
        finite = all(math.isfinite(v) for v in losses)
        rows.append({"variant": name, "trainable": trainable_count, "step0_loss": losses[0],
                     "last_loss": losses[-1] if finite else None,
                     "diverged": not finite, "test_top1": accuracy if finite else None})
        print(rows[-1], file=sys.stderr)

    plain = lambda p, xb: model.apply({"params": p}, xb)  # noqa: E731
    record("plain", sum(a.size for a in jax.tree.leaves(params)),
           *sgd_run(plain, params, arrays, num_steps))
    for name, kwargs in [("rpg defaults", {}),
                         ("rpg select=kernels init=model", {"select": "kernels", "init": "model"}),
                         ("rpg select=kernels init=paper", {"select": "kernels", "init": "paper"})]:
        spec = rpg_jax.make_spec(params, ring_size=0.1, **kwargs)
        bank = rpg_jax.init_bank(jax.random.key(1), spec, params)
        tables = rpg_jax.make_tables(spec)
        apply = lambda b, xb, spec=spec, tables=tables: model.apply(  # noqa: E731
            {"params": rpg_jax.generate_params(b, spec, tables)}, xb)
        record(name, rpg_jax.count(spec).trainable, *sgd_run(apply, bank, arrays, num_steps))
    return rows


def vit_step(pairs: int) -> dict:
    """Paired step time of the shipped RPG ViT config and its plain variant."""
    from configs import fashion_mnist_vit

    info = data.dataset_info("fashion_mnist")
    runs = {}
    for kind in ("plain", "rpg"):
        config = fashion_mnist_vit.get_config("plain" if kind == "plain" else "")
        exp = experiment.build(config, info)
        state = jax.tree.map(jnp.copy, experiment.initial_state(exp))
        tables = rpg_jax.make_tables(exp.spec) if exp.spec is not None else {}
        rng = np.random.default_rng(0)
        batch = jax.device_put({
            "image": rng.integers(0, 256, (config.batch_size, *info.image_shape), np.uint8),
            "label": rng.integers(0, info.num_classes, config.batch_size).astype(np.int32)})
        fn = jax.jit(steps.make_train_step(exp.model, exp.tx, exp.spec, info.mean, info.std,
                                           exp.lr_fn), donate_argnums=0)
        trainable = sum(a.size for a in jax.tree.leaves(state.trainable))
        runs[kind] = {"fn": fn, "state": state, "tables": tables, "batch": batch,
                      "trainable": trainable}

    def one(kind: str) -> float:
        r = runs[kind]
        start = time.perf_counter()
        r["state"], metrics = r["fn"](r["state"], r["batch"], r["tables"])
        jax.block_until_ready((r["state"], metrics))
        return time.perf_counter() - start

    times = paired_times(one, ("plain", "rpg"), pairs, warmup=3)  # compiles too
    ratios = [r / p for r, p in zip(times["rpg"], times["plain"], strict=True)]
    return {"config": "configs/fashion_mnist_vit.py", "pairs": pairs,
            "step_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
            "ratio_rpg_over_plain": statistics.median(ratios), "ratios": ratios,
            "trainable": {k: r["trainable"] for k, r in runs.items()},
            "loadavg": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["mlp", "vit_step"])
    parser.add_argument("--steps", type=int, default=600, help="mlp: SGD steps per variant")
    parser.add_argument("--pairs", type=int, default=7, help="vit_step: alternating pairs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = {"machine": machine()}
    if args.what == "mlp":
        result["mlp"] = {"steps": args.steps, "batch_size": 128, "rows": mlp_table(args.steps)}
    else:
        result["vit_step"] = vit_step(args.pairs)
    emit(result, args.out)


if __name__ == "__main__":
    main()
