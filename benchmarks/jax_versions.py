"""The same train step on two Python/JAX stacks (e.g. the floor and the newest venvs of CI).

    python benchmarks/jax_versions.py --python .venv/bin/python \
        --python .venv-newest/bin/python [--pairs 7] [--steps 20] [--out FILE]

Each round starts one process per interpreter (in rotating order) that compiles the
Fashion-MNIST default's train step (ResNet-20, batch 128, 28x28x1, SGD momentum, cosine
schedule; RPG ring 10% and plain; one device-resident batch of random images) through
``rpg_jax.experiment``, runs 3 warm-up steps, then times ``--steps`` steps and reports their
median. Needs the Fashion-MNIST files (for the dataset's sizes and statistics). Ratios are
per round (the first interpreter's step time over each other's), medians over rounds. JSON
output.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("rpg", "plain")


def child(steps: int) -> dict:
    """Runs in the interpreter under test: median step time of each kind, in seconds."""
    sys.path.insert(0, str(REPO))
    import jax
    import numpy as np

    from configs import fashion_mnist
    from rpg_jax import data, experiment
    from rpg_jax import steps as steps_lib
    from rpg_jax.generator import make_tables

    out = {"python": sys.version.split()[0], "jax": jax.__version__, "step_s": {}}
    for kind in KINDS:
        config = fashion_mnist.get_config("" if kind == "rpg" else "plain")
        info = data.dataset_info(config.dataset)
        exp = experiment.build(config, info)
        state = experiment.initial_state(exp)
        tables = make_tables(exp.spec) if exp.spec is not None else {}
        step = jax.jit(steps_lib.make_train_step(exp.model, exp.tx, exp.spec, info.mean,
                                                 info.std, exp.lr_fn), donate_argnums=0)
        rng = np.random.default_rng(0)
        batch = jax.device_put({
            "image": rng.integers(0, 256, (config.batch_size, 28, 28, 1), dtype=np.uint8),
            "label": rng.integers(0, 10, config.batch_size).astype(np.int32)})
        times = []
        for i in range(3 + steps):
            start = time.perf_counter()
            state, metrics = step(state, batch, tables)
            jax.block_until_ready((state, metrics))
            if i >= 3:
                times.append(time.perf_counter() - start)
        out["step_s"][kind] = statistics.median(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", action="append", default=[],
                        help="an interpreter with rpg_jax installed (give two or more)")
    parser.add_argument("--pairs", type=int, default=7, help="rounds")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per process")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.steps)))
        return
    if len(args.python) < 2:
        parser.error(f"give at least two --python interpreters, got {args.python}")
    for exe in args.python:
        if not Path(exe).exists():
            parser.error(f"--python {exe}: no such file")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    rounds: dict[str, list[dict]] = {exe: [] for exe in args.python}
    for i in range(args.pairs):
        order = args.python[i % len(args.python):] + args.python[:i % len(args.python)]
        for exe in order:
            result = subprocess.run(
                [exe, __file__, "--child", f"--steps={args.steps}"], capture_output=True,
                text=True, check=False, env=env)
            if result.returncode != 0:
                sys.exit(f"{exe} failed:\n{result.stderr[-3000:]}")
            rounds[exe].append(json.loads(result.stdout.strip().splitlines()[-1]))
    first = args.python[0]
    stacks = {}
    for exe, results in rounds.items():
        stacks[exe] = {
            "python": results[0]["python"], "jax": results[0]["jax"],
            "step_ms": {k: 1e3 * statistics.median(r["step_s"][k] for r in results)
                        for k in KINDS},
            f"speedup_over_{Path(first).parent.parent.name}": {
                k: statistics.median(a["step_s"][k] / b["step_s"][k]
                                     for a, b in zip(rounds[first], results, strict=True))
                for k in KINDS},
        }
    from _util import emit, machine  # benchmarks/_util.py (imports jax: this interpreter's)
    emit({"machine": machine(), "rounds": args.pairs, "steps": args.steps,
          "stacks": stacks}, args.out)


if __name__ == "__main__":
    main()
