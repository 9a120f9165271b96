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

import rpg_jax
from _util import emit, machine  # benchmarks/_util.py (the script directory is on sys.path)
from train_step import paired_step_benchmark


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
        "train_step": paired_step_benchmark("cifar_resnet18", args.batch_size, 32,
                                            args.ring_size, pairs=args.pairs),
    }, args.out)


if __name__ == "__main__":
    main()
