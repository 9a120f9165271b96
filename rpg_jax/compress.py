"""Post-training compression: magnitude pruning and symmetric quantisation of the ring.

    python -m rpg_jax.compress --workdir=W --prune=0.5 --bits=8 [--chunk=4096]
        [--finetune_steps=N] [--out=model.rpg]

evaluates the trained model before and after on the test split and prints JSON (accuracy,
ring DoF, non-zeros, stored bytes). The same is done for a plain (non-RPG) run on the
weights RPG would generate (the block conv kernels), so both compress alike.

* Pruning: one global magnitude threshold over all compressed arrays; ``prune`` is the
  fraction of entries set to zero.
* Quantisation: symmetric, ``bits`` in {8, 4} (or 32: float32, pruning only), one scale per
  array or per ``chunk`` consecutive entries: q = round(x / s), s = max|x| / (2^(bits-1) - 1).
* Fine-tuning (optional): ``finetune_steps`` steps of the run's optimizer (its kind,
  momentum, Nesterov, weight decay and decay mask; see ``finetune_optimizer``) at the
  constant rate ``finetune_lr`` on the training data with pruned entries held at zero,
  before quantising.
* Stored bytes: a bitmap of the kept entries (when pruned), the packed integer codes, the
  float32 scales, plus the float32 free parameters and batch statistics.

The array codec (threshold, quantisation, stored form) is ``rpg_jax.quantize``; this module
chooses the arrays, fine-tunes, evaluates and writes the artifact (``rpg_jax.export``).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # --help and flag errors answer before JAX is imported (seconds)
    from rpg_jax import cli

    cli.parse_compress_args(sys.argv[1:])

import dataclasses
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rpg_jax import checkpoints, cli, data, optim, steps
from rpg_jax.export import export
from rpg_jax.generator import make_tables
from rpg_jax.quantize import QUANT_BITS, CompressedArray, compress_array, global_threshold
from rpg_jax.spec import flatten_params, make_spec, unflatten_params

# The array codec (QUANT_BITS, CompressedArray, ...) lives in rpg_jax.quantize, shared with
# rpg_jax.export; re-exported here.
__all__ = [
    "QUANT_BITS", "CompressedArray", "check_finite", "compress_array", "compress_checkpoint",
    "compressible", "evaluate", "finetune", "finetune_optimizer", "global_threshold", "main",
    "other_bytes", "with_arrays",
]

# ------------------------------------------------------------------------------ checkpoints


def compressible(ckpt) -> dict[str, np.ndarray]:
    """The arrays that get compressed: the rings (RPG) or, for a plain model, the weights
    RPG would generate from a ring (the block conv kernels), flattened."""
    if ckpt.spec is not None:
        return {name: np.asarray(r) for name, r in ckpt.trainable["rings"].items()}
    spec = make_spec(ckpt.trainable, 1.0)  # only to select the same leaves as RPG would
    flat = dict(flatten_params(ckpt.trainable))
    return {leaf.name: np.asarray(flat[leaf.path]).ravel() for leaf in spec.generated}


def with_arrays(ckpt, arrays: dict[str, Any]) -> Any:
    """The trainable tree of ``ckpt`` with its compressible arrays replaced."""
    if ckpt.spec is not None:
        return {"rings": {k: jnp.asarray(v) for k, v in arrays.items()},
                "free": ckpt.trainable["free"]}
    pairs = [(path, jnp.asarray(arrays["/".join(path)]).reshape(np.shape(x))
              if "/".join(path) in arrays else x) for path, x in flatten_params(ckpt.trainable)]
    return unflatten_params(pairs)


def other_bytes(ckpt) -> int:
    """float32 bytes of everything that is not compressed (free params, batch stats)."""
    total = sum(np.asarray(x).nbytes for x in jax.tree.leaves(ckpt.trainable))
    total -= sum(a.nbytes for a in compressible(ckpt).values())
    return total + sum(np.asarray(x).nbytes for x in jax.tree.leaves(ckpt.batch_stats))


def check_finite(ckpt) -> None:
    """Raises ValueError naming the arrays of ``ckpt`` that hold NaN or inf."""
    bad = [jax.tree_util.keystr(path) for path, x in
           jax.tree_util.tree_flatten_with_path((ckpt.trainable, ckpt.batch_stats))[0]
           if not np.all(np.isfinite(np.asarray(x)))]
    if bad:
        raise ValueError(f"the checkpoint at step {ckpt.step} holds non-finite values (NaN/inf) "
                         f"in {', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''}: a diverged "
                         "model; compress a finite checkpoint (--step)")


def evaluate(ckpt, trainable: Any, batch_size: int = 500) -> dict[str, float]:
    """Top-1/top-5/loss of ``trainable`` (with the checkpoint's model) on the eval split:
    the train loop's :func:`rpg_jax.steps.evaluate` over the whole split."""
    eval_step = jax.jit(steps.make_eval_step(ckpt.model, ckpt.spec, ckpt.info.mean,
                                             ckpt.info.std))
    state = steps.TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                             opt_state=None, batch_stats=ckpt.batch_stats)
    tables = make_tables(ckpt.spec, inverse=False) if ckpt.spec is not None else {}
    batches = data.make_eval_batches(ckpt.info.name, global_batch_size=batch_size,
                                     data_dir=ckpt.config.get("data_dir") or None)
    result = steps.evaluate(eval_step, state, tables, batches)
    return {"top1": result["eval_top1"], "top5": result["eval_top5"],
            "loss": result["eval_loss"]}


def finetune_optimizer(config: ml_collections.ConfigDict,
                       learning_rate: float) -> optax.GradientTransformation:
    """The run's optimizer at the constant rate ``learning_rate``, for fine-tuning.

    Carried over from the run's config: the optimizer kind (SGD with coupled decay or AdamW),
    momentum, Nesterov, weight decay and its mask (``weight_decay_exclude``). Not carried
    over: the schedule and warm-up (the rate is constant), gradient clipping, the parameter
    EMA and gradient accumulation (each fine-tuning step is one update of one batch); the
    optimizer state starts fresh (zero moments), not from the checkpoint's.
    """
    tuned = ml_collections.ConfigDict(config.to_dict())
    tuned.grad_clip_norm, tuned.ema_decay, tuned.grad_accum_steps = 0.0, 0.0, 1
    return optim.make_optimizer(tuned, optax.constant_schedule(learning_rate))


def finetune(ckpt, trainable: Any, keep: dict[str, np.ndarray], steps_: int,
             learning_rate: float) -> Any:
    """``steps_`` training steps of :func:`finetune_optimizer` (the run's optimizer at the
    constant rate ``learning_rate``) with pruned entries held at zero; returns the trainable.

    The loss is the plain cross entropy in float32 (no label smoothing or mixing); the
    training batches come from the run's dataset and batch size, shuffled with seed + 1.
    """
    ones = jax.tree.map(jnp.ones_like, trainable)
    masks = with_arrays(dataclasses.replace(ckpt, trainable=ones),
                        {k: v.astype(np.float32) for k, v in keep.items()})
    c = ckpt.config
    tx = finetune_optimizer(c, learning_rate)
    step_fn = steps.make_train_step(ckpt.model, tx, ckpt.spec, ckpt.info.mean, ckpt.info.std)

    @jax.jit
    def masked_step(state, batch, tables):
        state, metrics = step_fn(state, batch, tables)
        return state.replace(trainable=jax.tree.map(jnp.multiply, state.trainable, masks)), \
            metrics

    state = steps.init_state(trainable, ckpt.batch_stats, tx)
    tables = make_tables(ckpt.spec) if ckpt.spec is not None else {}
    it = data.make_train_iterator(ckpt.info.name, global_batch_size=c.batch_size,
                                  seed=c.seed + 1, data_dir=c.get("data_dir") or None)
    for _ in range(steps_):
        state, _ = masked_step(state, next(it), tables)
    ckpt.batch_stats = state.batch_stats
    return state.trainable


def compress_checkpoint(ckpt, *, prune: float = 0.0, bits: int = 32, chunk: int | None = None,
                        finetune_steps: int = 0, finetune_lr: float = 0.01,
                        eval_batch_size: int = 500) -> tuple[dict[str, Any], dict]:
    """Compresses a loaded checkpoint; returns (report, {name: CompressedArray}).

    ``ckpt`` keeps its batch statistics updated by fine-tuning, if any.
    """
    if bits not in QUANT_BITS:
        raise ValueError(f"bits={bits}: expected one of {QUANT_BITS}")
    if finetune_steps < 0:
        raise ValueError(f"finetune_steps={finetune_steps}: expected >= 0")
    if finetune_steps and not (math.isfinite(finetune_lr) and finetune_lr > 0):
        raise ValueError(f"finetune_lr={finetune_lr}: expected a positive finite number")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int)
                              or chunk < 1):
        raise ValueError(f"chunk={chunk!r}: expected a positive number of entries")
    check_finite(ckpt)
    arrays = compressible(ckpt)
    threshold = global_threshold(list(arrays.values()), prune)
    before = evaluate(ckpt, ckpt.trainable, eval_batch_size)
    dense_bytes = sum(a.nbytes for a in arrays.values()) + other_bytes(ckpt)
    if finetune_steps:
        keep = {k: np.abs(a) > threshold for k, a in arrays.items()}
        pruned = {k: np.where(keep[k], a, 0.0) for k, a in arrays.items()}
        tuned = finetune(ckpt, with_arrays(ckpt, pruned), keep, finetune_steps, finetune_lr)
        arrays = {k: np.where(keep[k], np.asarray(v), 0.0) for k, v in
                  compressible(dataclasses.replace(ckpt, trainable=tuned)).items()}
    packed = {k: compress_array(a, threshold=threshold if not finetune_steps else 0.0,
                                bits=bits, chunk=chunk) for k, a in arrays.items()}
    trainable = with_arrays(ckpt, {k: p.dequantize() for k, p in packed.items()})
    after = evaluate(ckpt, trainable, eval_batch_size)
    entries = sum(p.size for p in packed.values())
    report = {
        "prune": prune, "bits": bits, "chunk": chunk, "finetune_steps": finetune_steps,
        "kind": "rpg" if ckpt.spec is not None else "plain",
        "compressed_entries": entries,
        "nonzeros": sum(p.nonzeros for p in packed.values()),
        "before": {**before, "stored_bytes": dense_bytes},
        "after": {**after, "stored_bytes": sum(p.nbytes for p in packed.values())
                  + other_bytes(ckpt)},
    }
    return report, packed


def main(argv: list[str] | None = None) -> None:
    """The command line (``argv`` without the program name; flags: ``rpg_jax.cli``)."""
    parser, args = cli.parse_compress_args(argv)
    ckpt = checkpoints.load_checkpoint(args.workdir, args.step)
    if args.out and ckpt.spec is None:
        parser.error("--out writes an RPG artifact; this checkpoint is a plain model")
    try:
        check_finite(ckpt)
    except ValueError as e:
        parser.error(str(e))
    report, packed = compress_checkpoint(ckpt, prune=args.prune, bits=args.bits,
                                         chunk=args.chunk, finetune_steps=args.finetune_steps,
                                         finetune_lr=args.finetune_lr)
    report["workdir"], report["step"] = args.workdir, ckpt.step
    if ckpt.spec is not None:
        report["ring_dof"] = sum(r.size for r in ckpt.spec.rings)
    if args.out:
        report["file_bytes"] = export(ckpt, args.out, "rpg", rings=packed)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
