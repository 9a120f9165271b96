"""Host tables vs indices computed on the device: step memory, step time, first step.

    python benchmarks/device_tables.py memory [--cases cifar_resnet18:32:64,...] [--out F]
    python benchmarks/device_tables.py step [--cases resnet18:112:32,...] [--pairs 7]
    python benchmarks/device_tables.py large [--out F]
    python benchmarks/device_tables.py first_step [--model resnet50] [--out F]

Kinds (the same train step, SGD momentum 0.9 with coupled weight decay, ring 2,359,296):
``plain`` (no RPG); ``host`` (host tables, gather backward through the inverse table);
``host_scatter`` (forward table only); ``device_gather`` (indices computed in the step,
backward gathers through the inverse map computed in the step); ``device_scatter``
(scatter-adds through the forward indices recomputed in the backward pass).

* ``memory``: ``memory_analysis()`` of the compiled step (arguments + outputs + temporaries
  - aliases) and the saving over plain as a fraction of the ideal one: plain's float32
  generated weights and their momentum, minus the ring's own weights and momentum
  (8 bytes x (generated - ring)).
* ``step``: step times, the kinds alternating in rotating order in one process; each ratio
  is the median over rounds of (kind / plain).
* ``large``: a ViT whose blocks generate >= 100M weights from a 1M ring: compiled memory of
  plain and the device paths (and the size host tables would need), paired step times.
* ``first_step``: seconds from the spec to the end of the first train step (table
  derivation, transfer, compile, run), each kind in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rpg_jax
from _util import emit, machine, paired_times  # benchmarks/_util.py (script dir on sys.path)
from rpg_jax import steps

RING = 2_359_296
KINDS = {
    "plain": None,
    "host": dict(where="host", inverse=True),
    "host_scatter": dict(where="host", inverse=False),
    "device_gather": dict(where="device", inverse=True),
    "device_scatter": dict(where="device", inverse=False),
    "device_remat": dict(where="device", inverse=False, remat=True),
}
MEAN, STD = (0.5,) * 3, (0.25,) * 3


def _model(name: str, image_size: int, dtype=jnp.float32, **kwargs):
    model = rpg_jax.models.get_model(name, dtype=dtype, **kwargs)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, image_size, image_size, 3)),
                                             train=False))(jax.random.key(0, impl="rbg"))
    return model, variables


class Case:
    """A model, its batch, optimizer and spec; ``build(kind)`` compiles the step."""

    def __init__(self, name: str, image_size: int, batch_size: int, ring: int = RING,
                 **model_kwargs):
        self.name, self.image_size, self.batch_size = name, image_size, batch_size
        self.model, self.variables = _model(name, image_size, **model_kwargs)
        self.tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
        self.spec = rpg_jax.make_spec(self.variables["params"], ring)
        rng = np.random.default_rng(0)
        self.batch = {
            "image": jnp.asarray(rng.integers(0, 256, (batch_size, image_size, image_size, 3),
                                              dtype=np.uint8)),
            "label": jnp.asarray(rng.integers(0, self.model.num_classes, (batch_size,),
                                              dtype=np.int32))}

    def build(self, kind: str) -> dict:
        options = KINDS[kind]
        spec = None if options is None else self.spec
        trainable = (self.variables["params"] if spec is None else
                     rpg_jax.init_bank(jax.random.key(1), spec, self.variables["params"]))
        state = jax.tree.map(jnp.copy, steps.init_state(
            trainable, self.variables.get("batch_stats", {}), self.tx))
        tables = {} if spec is None else rpg_jax.make_tables(spec, **options)
        step = jax.jit(steps.make_train_step(self.model, self.tx, spec, MEAN, STD),
                       donate_argnums=0)
        jax.clear_caches()  # a repeated lower().compile() would otherwise be a cache hit
        start = time.perf_counter()
        compiled = step.lower(state, self.batch, tables).compile()
        return {"fn": compiled, "state": state, "tables": tables,
                "compile_s": time.perf_counter() - start, "memory": _memory(compiled)}


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    mb = {"argument_mb": m.argument_size_in_bytes / 2**20,
          "output_mb": m.output_size_in_bytes / 2**20,
          "temp_mb": m.temp_size_in_bytes / 2**20,
          "alias_mb": m.alias_size_in_bytes / 2**20}
    mb["total_mb"] = mb["argument_mb"] + mb["output_mb"] + mb["temp_mb"] - mb["alias_mb"]
    return mb


def _parse_cases(text: str) -> list[tuple[str, int, int]]:
    out = []
    for item in text.split(","):
        name, size, batch = item.split(":")
        out.append((name, int(size), int(batch)))
    return out


def memory(cases: str, kinds: list[str]) -> dict:
    result = {}
    for name, size, batch in _parse_cases(cases):
        case = Case(name, size, batch, num_classes=1000 if name != "cifar_resnet18" else 10)
        c = rpg_jax.count(case.spec)
        ideal = 8 * (c.generated - c.ring_dof) / 2**20
        mem, compile_s = {}, {}
        for kind in kinds:
            built = case.build(kind)
            mem[kind], compile_s[kind] = built["memory"], built["compile_s"]
            del built
        saving = {k: mem["plain"]["total_mb"] - mem[k]["total_mb"] for k in kinds[1:]}
        result[f"{name}_{size}px_b{batch}"] = {
            "memory": mem, "compile_s": compile_s, "saving_mb": saving,
            "ideal_saving_mb": ideal,
            "saving_fraction_of_ideal": {k: v / ideal for k, v in saving.items()},
            "generated": c.generated, "ring": c.ring_dof,
        }
        print(json.dumps({name: {k: round(v["total_mb"]) for k, v in mem.items()}}),
              file=sys.stderr, flush=True)
    return result


def _paired(case: Case, kinds: list[str], pairs: int) -> dict:
    runs = {kind: case.build(kind) for kind in kinds}

    def one(kind: str) -> float:
        r = runs[kind]
        start = time.perf_counter()
        r["state"], metrics = r["fn"](r["state"], case.batch, r["tables"])
        jax.block_until_ready((r["state"], metrics))
        return time.perf_counter() - start

    times = paired_times(one, kinds, pairs)
    ratios = {k: [a / b for a, b in zip(times[k], times["plain"], strict=True)]
              for k in kinds[1:]}
    return {"step_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
            "ratio_over_plain": {k: statistics.median(v) for k, v in ratios.items()},
            "ratios": ratios, "pairs": pairs,
            "memory_total_mb": {k: r["memory"]["total_mb"] for k, r in runs.items()},
            "compile_s": {k: r["compile_s"] for k, r in runs.items()},
            "loadavg_after": os.getloadavg()}


def step(cases: str, kinds: list[str], pairs: int) -> dict:
    result = {}
    for name, size, batch in _parse_cases(cases):
        case = Case(name, size, batch, num_classes=1000 if name != "cifar_resnet18" else 10)
        result[f"{name}_{size}px_b{batch}"] = _paired(case, kinds, pairs)
        print(json.dumps({name: result[f"{name}_{size}px_b{batch}"]["ratio_over_plain"]}),
              file=sys.stderr, flush=True)
    return result


def large(kinds: list[str], pairs: int) -> dict:
    """ViT-B-like blocks (width 768, depth 16) on 64 px images, batch 8, ring 1,048,576."""
    case = Case("vit", 64, 8, ring=1 << 20, width=768, depth=16, num_heads=12,
                patch_size=16, num_classes=1000)
    c = rpg_jax.count(case.spec)
    out = _paired(case, kinds, pairs)
    out.update({"model": "ViT width 768, depth 16, 12 heads, patch 16, 64 px, batch 8",
                "generated": c.generated, "ring": c.ring_dof, "free": c.free,
                "host_tables_would_need_mb": 8 * c.generated / 2**20,
                "ideal_saving_mb": 8 * (c.generated - c.ring_dof) / 2**20})
    return out


def _first_step_child(model: str, kind: str) -> None:
    start = time.perf_counter()
    case = Case(model, 224, 16, num_classes=1000)
    setup = time.perf_counter() - start
    t0 = time.perf_counter()
    built = case.build(kind)
    state, metrics = built["fn"](built["state"], case.batch, built["tables"])
    jax.block_until_ready((state, metrics))
    print(json.dumps({"model_setup_s": setup, "tables_compile_first_step_s":
                      time.perf_counter() - t0, "compile_s": built["compile_s"]}))


def first_step(model: str, kinds: list[str], repeats: int) -> dict:
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for i in range(repeats):
        for kind in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:
            out = subprocess.run([sys.executable, __file__, "first_step_child", "--model",
                                  model, "--kinds", kind], check=True, capture_output=True,
                                 text=True).stdout
            runs[kind].append(json.loads(out.strip().splitlines()[-1]))
    return {"model": model, "image_size": 224, "batch_size": 16, "repeats": repeats,
            "seconds_to_first_step": {k: statistics.median(
                r["tables_compile_first_step_s"] for r in v) for k, v in runs.items()},
            "compile_s": {k: statistics.median(r["compile_s"] for r in v)
                          for k, v in runs.items()},
            "runs": runs, "loadavg_after": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("memory", "step", "large", "first_step",
                                         "first_step_child"))
    parser.add_argument("--cases", default=None)
    parser.add_argument("--kinds", default=None, help="comma-separated; plain comes first")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    kinds = args.kinds.split(",") if args.kinds else list(KINDS)
    if args.what == "first_step_child":
        _first_step_child(args.model, kinds[0])
        return
    result = {"machine": machine(), "loadavg_before": os.getloadavg()}
    if args.what == "memory":
        result["memory"] = memory(
            args.cases or "cifar_resnet18:32:64,resnet18:224:16,resnet50:224:16", kinds)
    elif args.what == "step":
        result["step"] = step(args.cases or "resnet18:112:32,cifar_resnet18:32:64", kinds,
                              args.pairs)
    elif args.what == "large":
        result["large"] = large(args.kinds.split(",") if args.kinds else
                                ["plain", "device_gather", "device_scatter"], args.pairs)
    else:
        result["first_step"] = first_step(args.model, args.kinds.split(",") if args.kinds
                                          else ["host", "device_scatter"], args.repeats)
    emit(result, args.out)


if __name__ == "__main__":
    main()
