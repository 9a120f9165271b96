"""The training loop: ``train_and_evaluate(config, workdir)``.

One ``jax.jit`` step over a 1-D ``('data',)`` mesh (an ``Auto`` axis, see ``rpg_jax.sharding``)
spanning every device of every process: the batch is sharded over the mesh, the state is
replicated and donated. Checkpoints resume automatically; SIGTERM (preemption) saves and
returns cleanly.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging as std_logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from rpg_jax import checkpoints, data, experiment, optim, preemption, profiling, sharding, steps
from rpg_jax import config as config_lib
from rpg_jax import workdir as workdir_lib
from rpg_jax.generator import make_tables
from rpg_jax.metrics import MetricWriter, read_metrics
from rpg_jax.progress import Progress, TrainClock, hms
from rpg_jax.sinks import MetricSinks
from rpg_jax.steps import evaluate  # the loop calls train.evaluate (tests patch it)

SUMMARY_FILE = "summary.json"

# on_step(step, state, metrics) -> a true value to stop the run after this step
StepCallback = Callable[[int, steps.TrainState, dict[str, jax.Array]], Any]


def quiet_library_logs(record: std_logging.LogRecord) -> bool:
    """A logging filter that keeps Orbax's and grain's per-save INFO chatter out of the
    training log (train.py and the study runner add it to absl's handler)."""
    noisy = "/orbax/" in record.pathname or "/grain/" in record.pathname
    return record.levelno >= std_logging.WARNING or not noisy


def _check_devices(config: ml_collections.ConfigDict) -> None:
    n = jax.device_count()
    for field in ("batch_size", "eval_batch_size"):
        value = config[field] or config.batch_size
        if value % n:
            raise ValueError(f"config.{field}={value} is not divisible by the {n} devices "
                             f"({jax.process_count()} processes); use a multiple of {n}")


def _log_eval(step: int, metrics: dict[str, float]) -> None:
    logging.info("eval at step %d: top-1 %.4f top-5 %.4f loss %.4f (%d examples)", step,
                 metrics["eval_top1"], metrics["eval_top5"], metrics["eval_loss"],
                 metrics["eval_count"])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop: threading.Event | None = None,
                       on_step: StepCallback | None = None) -> dict[str, Any]:
    """Trains and evaluates the model described by ``config``; resumes from ``workdir``.

    Returns the summary (also written to ``WORKDIR/summary.json``). A SIGTERM at any time,
    or ``stop`` being set (checked after every step, also if set before the call), saves a
    checkpoint after the current step and returns (``summary["preempted"]``).

    ``on_step(step, state, metrics)``, if given, is called after every train step, before
    the step is logged, with the step reached, the new state (donated to the next step:
    keep no reference) and the step's metrics (device scalars). A true return value sets
    the stop flag (``stop``, if given), so the run stops after this step as for a SIGTERM.

    The run holds an exclusive lock on ``workdir`` (``rpg_jax.workdir``): a second run on
    it raises ``WorkdirBusyError``. A damaged newest checkpoint is moved to
    ``WORKDIR/checkpoints_damaged`` and the previous one resumed. Non-finite state (checked
    at every log step and before every save) raises ``NonFiniteStateError`` and is never
    saved, so the finite checkpoints stay.
    """
    config_lib.validate(config)
    with _workdir_lock(workdir), preemption.stop_on_sigterm(stop) as stop, \
            contextlib.ExitStack() as cleanup:  # metric sinks, profiler: closed on any exit
        return _train_and_evaluate(config, workdir, stop, on_step, cleanup)


@contextlib.contextmanager
def _workdir_lock(workdir: str):
    """The workdir lock, taken by process 0; every process raises if it is held."""
    if jax.process_count() == 1:
        with workdir_lib.locked(workdir):
            yield
        return
    from jax.experimental import multihost_utils

    with contextlib.ExitStack() as stack:
        error = None
        if jax.process_index() == 0:
            try:
                stack.enter_context(workdir_lib.locked(workdir))
            except workdir_lib.WorkdirBusyError as e:
                error = e
        busy = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
        if error is not None:
            raise error
        if int(busy):
            raise workdir_lib.WorkdirBusyError(f"workdir {workdir!r} is in use by another run "
                                               "(see process 0's error)")
        yield


# One loop, read top to bottom as flax's examples' train loop (issue 17: not worth splitting).
def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,  # noqa: C901
                        stop: threading.Event, on_step: StepCallback | None,
                        cleanup: contextlib.ExitStack) -> dict[str, Any]:
    run_start = time.perf_counter()
    _check_devices(config)
    info = data.dataset_info(config.dataset, config.data_dir or None,
                             synthetic_size=config.synthetic_size or None,
                             holdout=config.holdout_examples)
    exp = experiment.build(config, info)
    os.makedirs(workdir, exist_ok=True)

    manager = checkpoints.make_manager(workdir, config.keep_checkpoints)

    def check(step, saved_config, saved_spec, saved_info):
        checkpoints.check_compatible(saved_config, saved_spec, config, exp.spec, step,
                                     exp.num_steps, saved_info, info)

    meta = checkpoints.latest_meta(manager, workdir)  # refuse a bad config before any work
    if meta is not None:
        check(*meta)

    mesh = sharding.data_mesh()
    replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharded(mesh)

    def to_global(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(batch_sharding, x), batch)

    pid, nproc = jax.process_index(), jax.process_count()
    data_dir = config.data_dir or None
    synthetic_size = config.synthetic_size or None

    def train_stream():
        """The run's train batches from the start of the stream (seeded by config.seed)."""
        return data.make_train_iterator(
            config.dataset, global_batch_size=config.batch_size, seed=config.seed,
            data_dir=data_dir, process_index=pid, process_count=nproc,
            worker_count=config.worker_count, synthetic_size=synthetic_size,
            decoder=config.image_decoder, on_corrupt=config.on_corrupt_image,
            holdout=config.holdout_examples)

    train_iter = train_stream()
    eval_batches = data.make_eval_batches(
        config.dataset, global_batch_size=config.eval_batch_size or config.batch_size,
        data_dir=data_dir, process_index=pid, process_count=nproc,
        synthetic_size=synthetic_size, decoder=config.image_decoder,
        on_corrupt=config.on_corrupt_image, holdout=config.holdout_examples)

    pending: list[dict[str, Any]] = []  # per-step train metrics since the last log record
    resumed = None
    if meta is not None:
        target = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
            experiment.abstract_state(exp))
        resumed = checkpoints.restore_latest(manager, workdir, target, train_iter,
                                             config.batch_size, check)
    if resumed is None:
        state = jax.device_put(experiment.initial_state(exp), replicated)
        examples_at_start = 0
    else:
        state, pending, examples_at_start = resumed.state, resumed.pending, resumed.examples
        logging.info("Resumed from the checkpoint at step %d (%d training examples seen)",
                     resumed.step, resumed.examples)
    tables = (make_tables(exp.spec, replicated, inverse=config.rpg.backward == "gather",
                          where=config.rpg.tables, remat=config.rpg.remat)
              if exp.spec is not None else {})

    train_step = jax.jit(experiment.make_train_step(exp), donate_argnums=0,
                         out_shardings=(replicated, replicated))
    eval_step = jax.jit(
        steps.make_eval_step(exp.model, exp.spec, info.mean, info.std, exp.compute_dtype),
        out_shardings=replicated)
    batch_shape = {
        "image": jax.ShapeDtypeStruct((config.batch_size, *info.image_shape), np.uint8,
                                      sharding=batch_sharding),
        "label": jax.ShapeDtypeStruct((config.batch_size,), np.int32, sharding=batch_sharding),
    }
    start = time.perf_counter()
    train_step = train_step.lower(state, batch_shape, tables).compile()
    compile_seconds = time.perf_counter() - start

    writer = MetricWriter(workdir)
    step = int(jax.device_get(state.step))
    step_at_start = step

    def examples() -> int:
        """The data stream's position: training examples consumed so far."""
        return examples_at_start + (step - step_at_start) * config.batch_size

    def save() -> None:
        try:
            checkpoints.save(manager, step, state, train_iter, exp, pending, examples())
        except checkpoints.NonFiniteStateError as e:
            raise _diverged(str(e), manager) from None

    writer.truncate_after(step)
    # TensorBoard / W&B mirror metrics.jsonl from here on, each first brought up to date with
    # it (the records up to the resumed step): a resumed run continues without duplicates.
    sinks = cleanup.enter_context(MetricSinks(config, workdir, jax.process_index()))
    sinks.start()

    def record(step: int, **values: Any) -> None:
        sinks.write(step, writer.write(step, **values))

    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=1))
    counts = exp.param_count()
    logging.info("Model %s on %s: %s", config.model, config.dataset,
                 counts if exp.spec is not None else "plain (no RPG)")

    num_steps = exp.num_steps
    log_every = config.log_every_steps
    eval_every, ckpt_every = exp.eval_every, exp.checkpoint_every
    bar = tqdm(total=num_steps, initial=step, unit="step", dynamic_ncols=True,
               disable=not (jax.process_index() == 0 and sys.stderr.isatty()))
    first_step, clock = step, TrainClock()  # the training time of each log window
    last_eval = _recorded_eval(workdir, step)  # a resumed run may have evaluated this step
    progress = Progress(step, num_steps, start_time=run_start)  # the log lines' elapsed, ETA
    profiler = profiling.StepProfiler(config_lib.profile_window(config), workdir, num_steps)
    cleanup.callback(profiler.stop)  # an error inside the window still ends the trace

    recalibrate = config.ema_eval and config.ema_bn_batches > 0 and bool(
        jax.tree.leaves(state.batch_stats))
    if recalibrate:
        stats_step = jax.jit(steps.make_batch_stats_step(
            exp.model, exp.spec, info.mean, info.std, exp.compute_dtype), out_shardings=replicated)

    def ema_state() -> steps.TrainState:
        """The EMA parameters, with BatchNorm statistics recomputed for them over the first
        ``ema_bn_batches`` batches of a fresh train stream (the same ones at every eval; the
        run's own stream is not touched), or else with the live statistics."""
        ema = state.replace(trainable=optim.ema_params(state.opt_state, config.ema_decay))
        if not recalibrate:
            return ema
        batches = itertools.islice(train_stream(), config.ema_bn_batches)
        return ema.replace(batch_stats=steps.precise_batch_stats(
            stats_step, ema.trainable, ema.batch_stats, tables, batches, to_global))

    def run_eval() -> dict[str, float]:
        result = evaluate(eval_step, state, tables, eval_batches, to_global, config.eval_steps)
        if config.ema_eval:
            ema = ema_state()
            ema_result = evaluate(eval_step, ema, tables, eval_batches, to_global,
                                  config.eval_steps)
            result.update({k.replace("eval_", "eval_ema_"): v for k, v in ema_result.items()})
        record(step, epoch=step / exp.steps_per_epoch, **result)
        _log_eval(step, result)
        return result

    if 0 < step < num_steps and eval_every and step % eval_every == 0 and not last_eval:
        last_eval = run_eval()  # due when the previous run stopped, but not yet done
    while step < num_steps:
        with profiler.step(step):
            state, metrics = train_step(state, to_global(next(train_iter)), tables)
        step += 1
        profiler.after_step(step, state)
        clock.steps += 1
        pending.append(metrics)
        bar.update(1)
        if on_step is not None and on_step(step, state, metrics):
            stop.set()
        if step % log_every == 0 or step == num_steps:
            host = jax.device_get(pending)  # float64 means, as for metrics restored from JSON
            means = {k: float(np.mean([float(m[k]) for m in host])) for k in host[0]}
            rate = clock.steps * config.batch_size / clock.stop()
            record(step, epoch=step / exp.steps_per_epoch, train_loss=means["loss"],
                   train_accuracy=means["accuracy"], train_grad_norm=means["grad_norm"],
                   learning_rate=means["learning_rate"], images_per_sec=rate)
            bar.set_postfix(loss=f"{means['loss']:.3f}", acc=f"{means['accuracy']:.3f}")
            if bar.disable:  # cluster jobs: the log line carries the progress
                wall, eta = progress.update(step)
                logging.info("step %d/%d loss %.4f acc %.4f lr %.4g %.0f img/s elapsed %s "
                             "ETA %s", step, num_steps, means["loss"], means["accuracy"],
                             means["learning_rate"], rate, hms(wall), hms(eta))
            pending = []
            clock.start()
            bad, _ = checkpoints.state_health(state)
            if bad or not np.isfinite(means["loss"]):
                raise _diverged(checkpoints.non_finite_message(step, bad, means["loss"]),
                                manager)
        if step == num_steps or stop.is_set() or (nproc > 1 and manager.reached_preemption(step)):
            break
        evaluating = eval_every and step % eval_every == 0
        saving = ckpt_every and step % ckpt_every == 0
        if evaluating or saving:
            # The queued train steps finish first: their time is training, not the pause's.
            jax.block_until_ready(state)
        with clock.paused():
            last_eval = run_eval() if evaluating else {}
            if saving:
                save()
    preempted = step < num_steps
    bar.close()
    profiler.stop(state)  # the run ended inside the window

    if preempted:
        logging.warning("Preempted at step %d: saving a checkpoint and exiting", step)
    elif step > first_step or not last_eval:
        last_eval = run_eval()
    if manager.latest_step() != step:
        save()
    manager.wait_until_finished()
    manager.close()
    summary_path = os.path.join(workdir, SUMMARY_FILE)
    if step == first_step and os.path.exists(summary_path):  # already finished: nothing ran
        with open(summary_path) as f:
            return json.load(f)

    summary = {
        "step": step,
        "num_steps": num_steps,
        "epochs": step / exp.steps_per_epoch,
        "preempted": preempted,
        "compile_seconds": compile_seconds,
        "train_seconds": clock.total,
        "images_per_sec": ((step - first_step) * config.batch_size / clock.total
                           if clock.total else None),
        **last_eval,
        "params": {"ring_dof": counts.ring_dof, "trainable": counts.trainable,
                   "generated": counts.generated, "plain_model": counts.plain},
    }
    if jax.process_index() == 0:  # write-then-rename: a kill never leaves half a summary
        with open(summary_path + ".tmp", "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(summary_path + ".tmp", summary_path)
    return summary


def _diverged(message: str, manager) -> checkpoints.NonFiniteStateError:
    """The divergence error, after the pending saves finish (none of them is non-finite)."""
    manager.wait_until_finished()
    kept = sorted(manager.all_steps())
    manager.close()
    where = (f"the finite checkpoints (steps {kept}) are kept in {str(manager.directory)!r}"
             if kept else "no checkpoint was saved")
    return checkpoints.NonFiniteStateError(
        f"{message}. Nothing non-finite was saved; {where}. Lower config.learning_rate, add "
        "warm-up (config.warmup_epochs) or check the data, then resume or use a new workdir")


def _recorded_eval(workdir: str, step: int) -> dict[str, Any]:
    """The eval record of ``step`` already in the metrics file, if any (a resumed run)."""
    records = [r for r in read_metrics(workdir) if r["step"] == step and "eval_top1" in r]
    if not records or step == 0:
        return {}
    return {k: v for k, v in records[-1].items() if k.startswith("eval_")}

