"""The default job's train step on two installed stacks (e.g. jax 0.10.2 vs the newest).

    python benchmarks/jax_versions.py --python .venv/bin/python \
        --python .venv-newest/bin/python [--rounds 3] [--steps 20] [--loop_steps 120] \
        [--out FILE]

Versions cannot share a process, so each round runs one child process per interpreter, in
alternating order, on the same machine. A child times the Fashion-MNIST default's step
(configs/fashion_mnist.py: RPG ResNet-20, batch 128, SGD momentum; and its ``plain``
variant) on one CPU device with a device-resident uint8 batch and reports the median step
time. Each ratio is the median over rounds of (this stack's median / the first stack's).
The dataset is opened for its shape, size and normalisation only (batches are random).
With ``--loop_steps K`` a child also trains the default (RPG) for K steps through the whole
loop (``train_and_evaluate``: input pipeline, step, logging; the set-up of
benchmarks/train_throughput.py) and reports the summary's images/s (compile excluded); its
ratio is this stack's images/s over the first stack's (higher is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def child(steps: int) -> dict:
    """Median step time (ms) of the default config and its plain variant, this interpreter."""
    import jax
    import numpy as np

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from configs.fashion_mnist import get_config
    from rpg_jax import data, experiment
    from rpg_jax import steps as steps_lib
    from rpg_jax.generator import make_tables

    info = data.dataset_info("fashion_mnist")
    out = {"python": sys.version.split()[0], "jax": jax.__version__}
    for variant in ("", "plain"):
        config = get_config(variant)
        exp = experiment.build(config, info)
        state = experiment.initial_state(exp)
        tables = make_tables(exp.spec) if exp.spec is not None else {}
        rng = np.random.default_rng(0)
        batch = jax.device_put({
            "image": rng.integers(0, 256, (config.batch_size, *info.image_shape), np.uint8),
            "label": rng.integers(0, info.num_classes, config.batch_size).astype(np.int32)})
        step = jax.jit(steps_lib.make_train_step(exp.model, exp.tx, exp.spec, info.mean,
                                                 info.std, exp.lr_fn), donate_argnums=0)
        t0 = time.perf_counter()
        state, metrics = step(state, batch, tables)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - t0
        for _ in range(2):
            state, metrics = step(state, batch, tables)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, metrics = step(state, batch, tables)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
        out["rpg" if exp.spec is not None else "plain"] = {
            "median_step_ms": 1e3 * statistics.median(times), "first_call_s": compile_s}
    return out


def loop_child(steps: int) -> dict:
    """images/s of the default (RPG) config through ``train_and_evaluate``, ``steps`` steps."""
    import tempfile

    sys.path.insert(0, os.path.dirname(__file__))
    from train_throughput import _config

    from rpg_jax.train import train_and_evaluate

    with tempfile.TemporaryDirectory() as workdir:
        summary = train_and_evaluate(_config("fashion_mnist_resnet20", True, steps), workdir)
    return {"images_per_sec": summary["images_per_sec"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--python", action="append", default=[],
                    help="an interpreter of one stack (give two or more)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--loop_steps", type=int, default=0,
                    help="also time the whole training loop for this many steps (0: no)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = child(args.steps)
        if args.loop_steps:
            result["loop_rpg"] = loop_child(args.loop_steps)
        print(json.dumps(result))
        return
    if len(args.python) < 2:
        ap.error(f"give at least two --python interpreters, got {args.python}")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    runs: dict[str, list[dict]] = {py: [] for py in args.python}
    for r in range(args.rounds):
        order = args.python if r % 2 == 0 else args.python[::-1]
        for py in order:
            proc = subprocess.run([py, __file__, "--child", "--steps", str(args.steps),
                                   "--loop_steps", str(args.loop_steps)],
                                  env=env, capture_output=True, text=True, check=False)
            if proc.returncode:
                sys.exit(f"{py} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            runs[py].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {r}: {py}: {runs[py][-1]}", file=sys.stderr)
    base = args.python[0]
    stacks = []
    for py in args.python:
        first = runs[py][0]
        entry = {"python": first["python"], "jax": first["jax"], "per_round": runs[py]}
        for kind in ("rpg", "plain"):
            entry[f"{kind}_median_step_ms"] = statistics.median(
                x[kind]["median_step_ms"] for x in runs[py])
            entry[f"{kind}_step_time_vs_first"] = statistics.median(
                x[kind]["median_step_ms"] / b[kind]["median_step_ms"]
                for x, b in zip(runs[py], runs[base], strict=True))
        if args.loop_steps:
            entry["loop_rpg_images_per_sec"] = statistics.median(
                x["loop_rpg"]["images_per_sec"] for x in runs[py])
            entry["loop_rpg_images_per_sec_vs_first"] = statistics.median(
                x["loop_rpg"]["images_per_sec"] / b["loop_rpg"]["images_per_sec"]
                for x, b in zip(runs[py], runs[base], strict=True))
        stacks.append(entry)
    sys.path.insert(0, os.path.dirname(__file__))
    from _util import emit, machine
    m = machine()
    m.pop("jax", None)
    emit({"benchmark": "fashion_mnist default train step across stacks", "machine": m,
          "rounds": args.rounds, "steps": args.steps, "loop_steps": args.loop_steps,
          "stacks": stacks}, args.out)


if __name__ == "__main__":
    main()
