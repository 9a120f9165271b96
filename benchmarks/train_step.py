"""The bare train step, RPG vs plain: paired timings, compile time and compiled memory.

    python benchmarks/train_step.py --model resnet18 --image_size 224 --batch_size 256 \
        --half_precision --ring_size 2359296 [--pairs 7] [--out FILE]

Same model, optimizer (SGD momentum 0.9, coupled weight decay) and device-resident uint8
batch for all; the steps alternate (in rotating order) and each ratio is the median of
per-round ratios. Kinds (``--kinds``): ``plain``; ``rpg``, the default gather backward
(host-derived inverse tables); ``rpg_scatter``, the forward-table-only scatter backward
(config rpg.backward); ``rpg_device`` and ``rpg_device_scatter``, indices computed inside
the step (``make_tables(spec, where="device")``, no tables stored) with the gather backward
through the inverse map computed on the device, or the scatter backward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rpg_jax
from _util import emit, machine, paired_times  # benchmarks/_util.py (script dir on sys.path)
from rpg_jax import steps


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    mb = {
        "argument_mb": m.argument_size_in_bytes / 2**20,
        "output_mb": m.output_size_in_bytes / 2**20,
        "temp_mb": m.temp_size_in_bytes / 2**20,
        "alias_mb": m.alias_size_in_bytes / 2**20,
    }
    mb["total_mb"] = mb["argument_mb"] + mb["output_mb"] + mb["temp_mb"] - mb["alias_mb"]
    return mb


KINDS = {"plain": None, "rpg": dict(inverse=True), "rpg_scatter": dict(inverse=False),
         "rpg_device": dict(where="device", inverse=True),
         "rpg_device_scatter": dict(where="device", inverse=False)}


def paired_step_benchmark(model_name: str, batch_size: int, image_size: int, ring_size: int,
                          half_precision: bool = False, pairs: int = 7,
                          num_classes: int | None = None,
                          kinds: tuple[str, ...] = ("plain", "rpg", "rpg_scatter")) -> dict:
    """Times the RPG and plain train steps alternately; returns medians and the ratio."""
    dtype = jnp.bfloat16 if half_precision else jnp.float32
    kwargs = {"num_classes": num_classes} if num_classes else {}
    model = rpg_jax.models.get_model(model_name, dtype=dtype, **kwargs)
    classes = model.num_classes
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.integers(0, 256, (batch_size, image_size, image_size, 3),
                                          dtype=np.uint8)),
        "label": jnp.asarray(rng.integers(0, classes, (batch_size,), dtype=np.int32)),
    }
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, image_size, image_size, 3)),
                                             train=False))(jax.random.key(0, impl="rbg"))
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
    spec = rpg_jax.make_spec(variables["params"], ring_size=ring_size)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def build(kind: str) -> dict:
        rpg = kind != "plain"
        step = steps.make_train_step(model, tx, spec if rpg else None, mean, std,
                                     input_dtype=dtype)
        trainable = (rpg_jax.init_bank(jax.random.key(1), spec, variables["params"])
                     if rpg else variables["params"])
        # Private copies: the step donates its state, and both runs start from `variables`.
        state = jax.tree.map(jnp.copy, steps.init_state(trainable, variables["batch_stats"], tx))
        tables = rpg_jax.make_tables(spec, **KINDS[kind]) if rpg else {}
        jax.clear_caches()  # a repeated lower().compile() would otherwise be a cache hit
        start = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=0).lower(state, batch, tables).compile()
        return {"fn": compiled, "state": state, "tables": tables,
                "compile_s": time.perf_counter() - start, "memory": _memory(compiled)}

    unknown = [k for k in kinds if k not in KINDS]
    if unknown or kinds[0] != "plain":
        raise ValueError(f"kinds={kinds}: expected 'plain' first, then some of {list(KINDS)[1:]}")
    runs = {kind: build(kind) for kind in kinds}

    def one(kind: str) -> float:
        r = runs[kind]
        start = time.perf_counter()
        r["state"], metrics = r["fn"](r["state"], batch, r["tables"])
        jax.block_until_ready((r["state"], metrics))
        return time.perf_counter() - start

    times = paired_times(one, kinds, pairs)
    ratios = {kind: [r / p for r, p in zip(times[kind], times["plain"], strict=True)]
              for kind in kinds[1:]}
    c = rpg_jax.count(spec)
    return {
        "model": model_name, "image_size": image_size, "batch_size": batch_size,
        "half_precision": half_precision, "ring_size": ring_size, "pairs": pairs,
        "step_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "images_per_sec": {k: batch_size / statistics.median(v) for k, v in times.items()},
        **{f"ratio_{k}_over_plain": statistics.median(v) for k, v in ratios.items()},
        "ratios": ratios,
        "loadavg": os.getloadavg(),
        "compile_s": {k: v["compile_s"] for k, v in runs.items()},
        "memory": {k: v["memory"] for k, v in runs.items()},
        "trainable": {"plain": c.plain, "rpg": c.trainable},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cifar_resnet18")
    parser.add_argument("--num_classes", type=int, default=0, help="0: the model's default")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--ring_size", type=int, default=2_359_296)
    parser.add_argument("--half_precision", action="store_true")
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--kinds", default="plain,rpg,rpg_scatter",
                        help=f"comma-separated, plain first; of {list(KINDS)}")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    emit({"machine": machine(),
          "train_step": paired_step_benchmark(args.model, args.batch_size, args.image_size,
                                              args.ring_size, args.half_precision, args.pairs,
                                              args.num_classes or None,
                                              tuple(args.kinds.split(",")))}, args.out)


if __name__ == "__main__":
    main()
