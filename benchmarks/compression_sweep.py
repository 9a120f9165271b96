"""Accuracy vs stored bytes: an RPG run and a plain run, pruned and quantised alike.

    python benchmarks/compression_sweep.py --rpg_workdir=W1 --plain_workdir=W2 \
        [--out_dir=results/fashion_mnist] [--finetune_steps=0]

Sweeps sparsity x bits with ``rpg_jax.compress.compress_checkpoint`` on both checkpoints and
writes ``compression.json``, ``compression.png`` (test top-1 vs stored bytes, log x) and
``compression.md`` (the table) to ``out_dir``. Every number is read from the evaluations
this script runs.
"""

from __future__ import annotations

import argparse
import json
import os

from rpg_jax import compress
from rpg_jax.checkpoints import load_checkpoint

SPARSITIES = (0.0, 0.5, 0.8, 0.9)
BITS = (32, 8, 4)


def sweep(workdir: str, finetune_steps: int) -> list[dict]:
    rows = []
    for bits in BITS:
        for prune in SPARSITIES:
            ckpt = load_checkpoint(workdir)  # fresh: fine-tuning changes batch statistics
            report, _ = compress.compress_checkpoint(
                ckpt, prune=prune, bits=bits, chunk=None if bits == 32 else 4096,
                finetune_steps=finetune_steps if prune else 0)
            rows.append({"prune": prune, "bits": bits, "top1": report["after"]["top1"],
                         "stored_bytes": report["after"]["stored_bytes"],
                         "nonzeros": report["nonzeros"],
                         "compressed_entries": report["compressed_entries"],
                         "uncompressed_top1": report["before"]["top1"],
                         "uncompressed_bytes": report["before"]["stored_bytes"]})
            print(json.dumps({"workdir": workdir, **rows[-1]}), flush=True)
    return rows


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for kind, marker in (("rpg", "o"), ("plain", "s")):
        for bits, color in zip(BITS, ("C0", "C1", "C2"), strict=True):
            rows = [r for r in results[kind] if r["bits"] == bits]
            ax.plot([r["stored_bytes"] / 1024 for r in rows], [100 * r["top1"] for r in rows],
                    marker=marker, color=color, linestyle="-" if kind == "rpg" else "--",
                    label=f"{kind} {bits}-bit")
    ax.set_xscale("log")
    ax.set_xlabel("stored model (KiB)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("ResNet-20 on Fashion-MNIST: pruning x quantisation")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(results: dict) -> str:
    lines = ["| model | bits | pruned | non-zeros | stored KiB | test top-1 |",
             "| --- | --- | --- | --- | --- | --- |"]
    for kind in ("rpg", "plain"):
        for r in sorted(results[kind], key=lambda r: -r["stored_bytes"]):
            lines.append(f"| {kind} | {r['bits']} | {r['prune']:.0%} | {r['nonzeros']:,} | "
                         f"{r['stored_bytes'] / 1024:.1f} | {100 * r['top1']:.2f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rpg_workdir", required=True)
    parser.add_argument("--plain_workdir", required=True)
    parser.add_argument("--out_dir", default="results/fashion_mnist")
    parser.add_argument("--finetune_steps", type=int, default=0)
    args = parser.parse_args()
    results = {"finetune_steps": args.finetune_steps,
               "rpg": sweep(args.rpg_workdir, args.finetune_steps),
               "plain": sweep(args.plain_workdir, args.finetune_steps)}
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "compression.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out_dir, "compression.md"), "w") as f:
        f.write(table(results))
    plot(results, os.path.join(args.out_dir, "compression.png"))
    print(table(results))


if __name__ == "__main__":
    main()
