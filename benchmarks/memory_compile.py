"""Memory, compile time and table start-up of the RPG train step vs the plain one.

    python benchmarks/memory_compile.py [--models resnet18,resnet50] [--batch_size 16]
        [--image_size 224] [--out FILE]

For each model (ImageNet ResNets, 1000 classes, ring 2,359,296):
* ``compiled``: ``jit(step).lower(...).compile().memory_analysis()`` (arguments, outputs,
  temporaries) for plain, RPG (gather backward, forward + inverse tables) and rpg_scatter
  (scatter backward, forward tables only), and their compile times (median of rounds in
  rotating order; the RPG tables are arguments, not constants);
* ``peak_rss_mb``: the peak resident memory of a fresh process that builds the state and
  runs 2 steps (each kind in its own subprocess);
* ``table_derivation_s``: deriving the index tables from the spec (no cache).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rpg_jax
from _util import emit, machine  # benchmarks/_util.py (the script directory is on sys.path)
from rpg_jax import steps
from rpg_jax.index_map import ring_tables

RING = 2_359_296


KINDS = ("plain", "rpg", "rpg_scatter")


def _setup(model_name: str, kind: str, batch_size: int, image_size: int):
    rpg = kind != "plain"
    model = rpg_jax.models.get_model(model_name, num_classes=1000)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, image_size, image_size, 3)),
                                             train=False))(jax.random.key(0, impl="rbg"))
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
    spec = rpg_jax.make_spec(variables["params"], RING) if rpg else None
    trainable = (rpg_jax.init_bank(jax.random.key(1), spec, variables["params"]) if rpg
                 else variables["params"])
    state = steps.init_state(trainable, variables["batch_stats"], tx)
    tables = rpg_jax.make_tables(spec, inverse=kind == "rpg") if rpg else {}
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (batch_size, image_size, image_size, 3),
                                               dtype=np.uint8)),
             "label": jnp.asarray(rng.integers(0, 1000, batch_size).astype(np.int32))}
    step = jax.jit(steps.make_train_step(model, tx, spec, (0.5,) * 3, (0.25,) * 3),
                   donate_argnums=0)
    return step, state, batch, tables, spec


def _compiled(model_name: str, batch_size: int, image_size: int, pairs: int) -> dict:
    setups = {kind: _setup(model_name, kind, batch_size, image_size) for kind in KINDS}
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    memory = {}
    for i in range(pairs):
        for kind in KINDS[i % 3:] + KINDS[:i % 3]:
            step, state, batch, tables, _ = setups[kind]
            jax.clear_caches()  # otherwise a repeated lower().compile() is a cache hit
            start = time.perf_counter()
            compiled = step.lower(state, batch, tables).compile()
            times[kind].append(time.perf_counter() - start)
            m = compiled.memory_analysis()
            memory[kind] = {
                "argument_mb": m.argument_size_in_bytes / 2**20,
                "output_mb": m.output_size_in_bytes / 2**20,
                "temp_mb": m.temp_size_in_bytes / 2**20,
                "alias_mb": m.alias_size_in_bytes / 2**20,
                "total_mb": (m.argument_size_in_bytes + m.output_size_in_bytes
                             + m.temp_size_in_bytes - m.alias_size_in_bytes) / 2**20,
            }
    spec = setups["rpg"][4]
    tables_mb = sum(np.asarray(t).nbytes for r in setups["rpg"][3].values()
                    for t in r.values()) / 2**20
    return {
        "compile_s": {k: statistics.median(v) for k, v in times.items()},
        "compile_ratio_rpg_over_plain": statistics.median(
            [r / p for r, p in zip(times["rpg"], times["plain"], strict=True)]),
        "memory": memory,
        "compile_ratio_rpg_scatter_over_plain": statistics.median(
            [r / p for r, p in zip(times["rpg_scatter"], times["plain"], strict=True)]),
        "memory_saving_mb": {kind: memory["plain"]["total_mb"] - memory[kind]["total_mb"]
                             for kind in KINDS[1:]},
        "tables_mb": tables_mb,
        "params": {"plain": rpg_jax.count(spec).plain,
                   "rpg_trainable": rpg_jax.count(spec).trainable},
    }


def _table_derivation(model_name: str) -> dict:
    model = rpg_jax.models.get_model(model_name, num_classes=1000)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                               train=False))["params"]
    spec = rpg_jax.make_spec(shapes, RING)
    ring = spec.rings[0]
    sizes = tuple(leaf.size for leaf in spec.ring_leaves(ring.name))
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        ring_tables(sizes, ring.size, seed=spec.seed, ring_name=ring.name, mode=spec.mode)
        runs.append(time.perf_counter() - start)
    return {"generated_weights": ring.length, "seconds": statistics.median(runs)}


def _rss_child(model_name: str, kind: str, batch_size: int, image_size: int) -> None:
    step, state, batch, tables, _ = _setup(model_name, kind, batch_size, image_size)
    for _ in range(2):
        state, metrics = step(state, batch, tables)
    jax.block_until_ready((state, metrics))
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _peak_rss(model_name: str, kind: str, batch_size: int, image_size: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", f"{model_name},{kind}",
         "--batch_size", str(batch_size), "--image_size", str(image_size)],
        check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.child:
        name, kind = args.child.split(",")
        _rss_child(name, kind, args.batch_size, args.image_size)
        return
    result = {"machine": machine(), "batch_size": args.batch_size,
              "image_size": args.image_size, "ring_size": RING, "models": {}}
    for name in args.models.split(","):
        entry = _compiled(name, args.batch_size, args.image_size, args.pairs)
        entry["peak_rss_mb"] = {kind: _peak_rss(name, kind, args.batch_size, args.image_size)
                                for kind in KINDS}
        entry["peak_rss_saving_mb"] = {kind: entry["peak_rss_mb"]["plain"]
                                       - entry["peak_rss_mb"][kind] for kind in KINDS[1:]}
        entry["table_derivation"] = _table_derivation(name)
        result["models"][name] = entry
    emit(result, args.out)


if __name__ == "__main__":
    main()
