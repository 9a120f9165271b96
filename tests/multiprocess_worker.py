"""Subprocess entry point for the kill/preemption and multi-process tests of test_train.py.

    python tests/multiprocess_worker.py --workdir=DIR --config-json=JSON [--devices=N]
        [--coordinator=localhost:PORT --num-processes=P --process-id=I]
        [--pause-at-step=S --after-checkpoint=K --marker=FILE]

Runs ``rpg_jax.train.train_and_evaluate`` on the config given as JSON (``config.to_json()``)
with ``N`` simulated CPU devices, optionally as process ``I`` of a ``jax.distributed`` job.
``--pause-at-step`` makes the run block inside the loop iteration of train step ``S``, after
the step ran and before its metrics are logged (once checkpoint step ``K`` is finalized on
disk), write ``FILE`` and sleep, so the parent can kill it at a known point.
Prints the summary as one JSON line prefixed with ``SUMMARY``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ["JAX_PLATFORMS"] = "cpu"


def _pause(workdir: str, after_checkpoint: int | None, marker: str):
    """An action for step_hooks.at_step: waits until checkpoint ``after_checkpoint`` is on
    disk, writes ``marker`` and sleeps until the parent kills this process."""
    ckpt = os.path.join(workdir, "checkpoints", str(after_checkpoint))

    def pause(step: int) -> None:
        deadline = time.monotonic() + 120
        # Orbax saves asynchronously and renames the step folder when complete.
        while after_checkpoint is not None and not os.path.isdir(ckpt):
            if time.monotonic() > deadline:
                sys.exit(f"checkpoint {ckpt} never appeared")
            time.sleep(0.02)
        with open(marker, "w") as f:
            f.write(str(step))
        time.sleep(300)  # the parent kills us here
        sys.exit("paused worker was not killed")

    return pause


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--config-json", required=True)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--pause-at-step", type=int)
    parser.add_argument("--after-checkpoint", type=int)
    parser.add_argument("--marker")
    args = parser.parse_args()

    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)
    if args.coordinator:
        jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    import ml_collections

    from rpg_jax import train

    on_step = None
    if args.pause_at_step is not None:
        from step_hooks import at_step

        on_step = at_step(args.pause_at_step,
                          _pause(args.workdir, args.after_checkpoint, args.marker))
    config = ml_collections.ConfigDict(json.loads(args.config_json))
    summary = train.train_and_evaluate(config, args.workdir, on_step=on_step)
    print("SUMMARY " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
