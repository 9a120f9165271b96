"""Whole-loop training throughput, RPG on vs off, through ``train_and_evaluate``.

    python benchmarks/train_throughput.py [--pairs 3] [--out FILE]

Each case runs the real training program (input pipeline, jitted step, logging, a
checkpoint) for a fixed number of steps with RPG enabled and disabled, alternating, in one
process; images/s is the summary's figure (compile and evaluation time excluded). The ratio
is the median of per-pair ratios (target: >= 0.95 on CPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from _util import emit, machine  # benchmarks/_util.py (the script directory is on sys.path)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: configs/

from configs import fashion_mnist  # noqa: E402
from rpg_jax.train import train_and_evaluate  # noqa: E402


def _config(case: str, rpg: bool, steps: int):
    c = fashion_mnist.get_config()
    if case == "synthetic_cifar_resnet18":
        c.dataset, c.model, c.batch_size, c.rpg.ring_size = (
            "synthetic_cifar", "cifar_resnet18", 64, 2_359_296.0)
    c.num_train_steps = steps
    c.log_every_steps = max(1, steps // 4)
    c.eval_every_steps = 0
    c.eval_steps = 1
    c.checkpoint_every_steps = 0
    c.rpg.enabled = rpg
    return c


def run_case(case: str, steps: int, pairs: int) -> dict:
    rates: dict[str, list[float]] = {"plain": [], "rpg": []}
    for i in range(pairs):
        for kind in (("plain", "rpg") if i % 2 == 0 else ("rpg", "plain")):
            with tempfile.TemporaryDirectory() as workdir:
                summary = train_and_evaluate(_config(case, kind == "rpg", steps), workdir)
            rates[kind].append(summary["images_per_sec"])
    ratios = [r / p for r, p in zip(rates["rpg"], rates["plain"], strict=True)]
    return {"steps": steps, "pairs": pairs,
            "images_per_sec": {k: statistics.median(v) for k, v in rates.items()},
            "ratio_rpg_over_plain": statistics.median(ratios), "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    emit({
        "machine": machine(),
        "fashion_mnist_resnet20": run_case("fashion_mnist_resnet20", 120, args.pairs),
        "synthetic_cifar_resnet18": run_case("synthetic_cifar_resnet18", 16, args.pairs),
    }, args.out)


if __name__ == "__main__":
    main()
