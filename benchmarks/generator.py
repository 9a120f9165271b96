"""Generator cost and the RPG/plain training-step ratio, measured as pairs in one process.

    python benchmarks/generator.py [--pairs 7] [--out benchmarks/results/generator_cpu.json]

Prints JSON:
* ``generator``: forward and forward+backward time of ``generate_params`` for the
  ImageNet ResNet18 layout with a 2,359,296 ring (median of repeats).
* ``train_step``: RPG step time / plain step time for the 32x32 ResNet18 (CifarResNet18)
  at batch 64 with the same ring, same model and optimizer; the steps alternate and the
  ratio is the median of per-pair ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rpg_jax
from _util import emit, machine  # benchmarks/_util.py (the script directory is on sys.path)
from rpg_jax import steps


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def bench_generator(repeats: int) -> dict:
    model = rpg_jax.models.ResNet18(num_classes=1000)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
    start = time.perf_counter()
    spec = rpg_jax.make_spec(shapes, ring_size=2_359_296)
    rpg_jax.host_tables(spec)
    derive_s = time.perf_counter() - start
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    bank = rpg_jax.init_bank(jax.random.key(1), spec, params)
    tables = rpg_jax.make_tables(spec)
    cot = jax.tree.map(lambda x: jnp.ones_like(x), rpg_jax.generate_params(bank, spec, tables))

    forward = jax.jit(lambda b, t: rpg_jax.generate_params(b, spec, t))
    vjp = jax.jit(lambda b, t, c: jax.vjp(lambda x: rpg_jax.generate_params(x, spec, t), b)[1](c))
    for _ in range(2):
        _timed(forward, bank, tables), _timed(vjp, bank, tables, cot)
    fwd = [_timed(forward, bank, tables) for _ in range(repeats)]
    both = [_timed(forward, bank, tables) + _timed(vjp, bank, tables, cot)
            for _ in range(repeats)]
    return {
        "layout": "ImageNet ResNet18, ring 2,359,296 (global)",
        "generated_weights": rpg_jax.count(spec).generated,
        "table_derivation_s": derive_s,
        "forward_ms": 1e3 * statistics.median(fwd),
        "forward_backward_ms": 1e3 * statistics.median(both),
    }


def bench_train_step(pairs: int, batch_size: int, ring_size: int) -> dict:
    model = rpg_jax.models.CifarResNet18(num_classes=10)
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8)),
        "label": jnp.asarray(rng.integers(0, 10, (batch_size,), dtype=np.int32)),
    }
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
    spec = rpg_jax.make_spec(variables["params"], ring_size=ring_size)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def build(rpg: bool):
        step = steps.make_train_step(model, tx, spec if rpg else None, mean, std)
        trainable = (rpg_jax.init_bank(jax.random.key(1), spec, variables["params"])
                     if rpg else variables["params"])
        # Private copies: the step donates its state, and both runs start from `variables`.
        state = jax.tree.map(jnp.copy, steps.init_state(trainable, variables["batch_stats"], tx))
        tables = rpg_jax.make_tables(spec) if rpg else {}
        jitted = jax.jit(step, donate_argnums=0)
        jax.clear_caches()
        start = time.perf_counter()
        compiled = jitted.lower(state, batch, tables).compile()
        return {"fn": compiled, "state": state, "tables": tables,
                "compile_s": time.perf_counter() - start}

    runs = {"plain": build(False), "rpg": build(True)}

    def one(name: str) -> float:
        r = runs[name]
        start = time.perf_counter()
        r["state"], metrics = r["fn"](r["state"], batch, r["tables"])
        jax.block_until_ready((r["state"], metrics))
        return time.perf_counter() - start

    for _ in range(2):  # warm-up
        one("plain"), one("rpg")
    times = {"plain": [], "rpg": []}
    for i in range(pairs):
        order = ("plain", "rpg") if i % 2 == 0 else ("rpg", "plain")
        for name in order:
            times[name].append(one(name))
    ratios = [r / p for r, p in zip(times["rpg"], times["plain"], strict=True)]
    return {
        "model": "CifarResNet18 (32x32), 10 classes",
        "batch_size": batch_size,
        "ring_size": ring_size,
        "pairs": pairs,
        "plain_step_ms": 1e3 * statistics.median(times["plain"]),
        "rpg_step_ms": 1e3 * statistics.median(times["rpg"]),
        "ratio_rpg_over_plain": statistics.median(ratios),
        "ratios": ratios,
        "compile_s": {k: v["compile_s"] for k, v in runs.items()},
        "trainable": {"plain": rpg_jax.count(spec).plain, "rpg": rpg_jax.count(spec).trainable},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--ring_size", type=int, default=2_359_296)
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    args = parser.parse_args()
    emit({
        "machine": machine(),
        "generator": bench_generator(args.repeats),
        "train_step": bench_train_step(args.pairs, args.batch_size, args.ring_size),
    }, args.out)


if __name__ == "__main__":
    main()
