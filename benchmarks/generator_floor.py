"""What the generator costs on XLA:CPU next to the primitives it is made of (issue 14 item 5).

    python benchmarks/generator_floor.py [--repeats 9] [--out FILE]

At the ImageNet ResNet18 layout (11,157,504 generated weights, ring 2,359,296), each
compiled on its own and timed as the median of ``repeats`` calls:

* ``generator_forward`` / ``generator_vjp``: ``generate_params`` and its VJP (host tables,
  gather backward) and the VJP with the scatter backward (``inverse=False``);
* the primitives: an elementwise op over T floats (``scale_T``: the memory floor of writing
  the kernels), a gather of T from T with in-order indices (XLA's per-element gather cost),
  a gather of T from the ring at the forward table's (unsigned) indices, a gather of T from
  T at random indices (what the inverse-table backward reads), and a scatter-add of T into
  the ring through the forward table.

Each set is measured twice, in child processes: with glibc's default allocator settings
and with large blocks served from the heap instead of fresh ``mmap`` pages
(``MALLOC_MMAP_THRESHOLD_`` etc.), which shows how much of each op is page faults on its
freshly allocated output.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HEAP_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "2147483647", "MALLOC_TRIM_THRESHOLD_": "4294967295",
               "MALLOC_TOP_PAD_": "536870912"}
RING = 2_359_296


def _median_ms(fn, args, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def child(repeats: int) -> dict:
    """Median ms of the generator and of each primitive, in this process."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import rpg_jax

    model = rpg_jax.models.ResNet18(num_classes=1000)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 112, 112, 3)))["params"]
    spec = rpg_jax.make_spec(shapes, ring_size=RING)
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    bank = rpg_jax.init_bank(jax.random.key(1), spec, params)
    gather_tables = rpg_jax.make_tables(spec)
    scatter_tables = rpg_jax.make_tables(spec, inverse=False)
    cot = jax.tree.map(jnp.ones_like, rpg_jax.generate_params(bank, spec, gather_tables))
    forward = jax.jit(lambda b, t: rpg_jax.generate_params(b, spec, t))
    vjp = jax.jit(lambda b, t, c: jax.vjp(lambda x: rpg_jax.generate_params(x, spec, t), b)[1](c))

    (table,) = [t["forward"] for t in gather_tables.values()]
    total = table.size
    rng = np.random.default_rng(0)
    values = jnp.asarray(rng.standard_normal(total, np.float32))
    ring = jnp.asarray(rng.standard_normal(RING, np.float32))
    unsigned = table & 0x7FFFFFFF
    in_order = jnp.arange(total, dtype=jnp.int32)
    shuffled = jnp.asarray(rng.permutation(total).astype(np.int32))
    take = jax.jit(lambda x, i: x.at[i].get(mode="promise_in_bounds"))
    scatter = jax.jit(lambda g, i: jnp.zeros(RING, jnp.float32).at[i].add(
        g, mode="promise_in_bounds"))
    return {
        "generated_weights": int(total),
        "generator_forward_ms": _median_ms(forward, (bank, gather_tables), repeats),
        "generator_vjp_gather_ms": _median_ms(vjp, (bank, gather_tables, cot), repeats),
        "generator_vjp_scatter_ms": _median_ms(vjp, (bank, scatter_tables, cot), repeats),
        "scale_T_ms": _median_ms(jax.jit(lambda x: x * 2.0), (values,), repeats),
        "gather_T_in_order_ms": _median_ms(take, (values, in_order), repeats),
        "gather_T_from_ring_ms": _median_ms(take, (ring, unsigned), repeats),
        "gather_T_from_T_random_ms": _median_ms(take, (values, shuffled), repeats),
        "scatter_add_T_into_ring_ms": _median_ms(scatter, (values, unsigned), repeats),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--rounds", type=int, default=2, help="child processes per allocator")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.repeats)))
        return
    base = {k: v for k, v in os.environ.items() if k not in HEAP_MALLOC and k != "XLA_FLAGS"}
    envs = {"default_malloc": base, "heap_malloc": {**base, **HEAP_MALLOC}}
    runs: dict[str, list[dict]] = {name: [] for name in envs}
    for r in range(args.rounds):
        for name in (list(envs) if r % 2 == 0 else list(envs)[::-1]):
            proc = subprocess.run([sys.executable, __file__, "--child", "--repeats",
                                   str(args.repeats)], env=envs[name], capture_output=True,
                                  text=True, check=False)
            if proc.returncode:
                sys.exit(f"child ({name}) failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {r} {name}: {runs[name][-1]}", file=sys.stderr)
    sys.path.insert(0, os.path.dirname(__file__))
    from _util import emit, machine

    medians = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]}
               for name, rs in runs.items()}
    emit({"benchmark": "generator vs XLA:CPU primitives, ImageNet ResNet18 layout",
          "machine": machine(), "ring": RING, "repeats": args.repeats, "rounds": args.rounds,
          "median": medians, "per_round": runs, "heap_malloc_env": HEAP_MALLOC}, args.out)


if __name__ == "__main__":
    main()
