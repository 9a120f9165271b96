"""Orbax checkpoints of a run, resume checks, and the notebook API ``load_checkpoint``.

A checkpoint step holds six items: ``state`` (the TrainState arrays), ``data`` (the grain
iterator position, one file per process), ``metrics`` (train metrics of the steps since
the last log record), ``spec`` (the RPG spec as JSON: indices and signs
are derived from it, no index files), ``config`` (the run's config as JSON) and ``info``
(the dataset's static description, so a checkpoint loads without the dataset's files).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
import os
import re
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from rpg_jax import config as config_lib
from rpg_jax import data, experiment, steps
from rpg_jax.spec import RPGSpec
from rpg_jax.trained_model import Checkpoint as Checkpoint  # re-exported: the former name
from rpg_jax.trained_model import TrainedModel

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints_damaged"  # damaged steps are moved here, never deleted
ITEMS = ("state", "data", "metrics", "spec", "config", "info")
JSON_ITEMS = ("metrics", "spec", "config", "info")

# Kept for callers that list the fields a resumed run must share with its checkpoint.
RESUME_FIELDS = config_lib.RESUME_FIXED


def resume_fields(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The fields a run resuming with ``config`` must share with its checkpoint, always."""
    return tuple(f for f in config_lib.field_names(config) if config_lib.is_fixed_on_resume(f))


class DamagedCheckpointError(ValueError):
    """A checkpoint step that cannot be restored: names the step and the damaged file."""

    def __init__(self, step: int, where: str, reason: str):
        self.step, self.where, self.reason = step, where, reason
        super().__init__(f"checkpoint step {step} is damaged: {where}: {reason}")


class NonFiniteStateError(FloatingPointError):
    """The train state holds NaN or inf values (training diverged)."""


def make_manager(workdir: str, keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
    """The run's checkpoint manager in ``WORKDIR/checkpoints`` (keeps the latest ``keep``)."""
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        create=not read_only,
        read_only=read_only,
        **({"save_interval_steps": 0} if read_only else {}),
    )
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
                                 options=options)


# ------------------------------------------------------------------ finiteness and digests


def _words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as a flat uint32 array (narrower dtypes widened, wider ones split)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).ravel()
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).ravel()


@jax.jit
def _health(state: Any) -> tuple[Any, Any]:
    """Per leaf: all-finite (floats) and two uint32 sums of its bits, one position-weighted
    with odd weights (any flipped bit changes both; a moved value changes the weighted)."""
    def finite(x):
        return jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) \
            else jnp.bool_(True)

    def digest(x):
        w = _words(x)
        odd = jnp.arange(w.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
        return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * odd, dtype=jnp.uint32)])

    return jax.tree.map(finite, state), jax.tree.map(digest, state)


def _named(tree: Any) -> dict[str, Any]:
    return {jax.tree_util.keystr(path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def state_health(state: steps.TrainState) -> tuple[list[str], dict[str, list[int]]]:
    """(names of the leaves holding NaN/inf, {leaf name: digest}); one device reduction."""
    finite, digests = jax.device_get(_health(state))
    bad = [name for name, ok in _named(finite).items() if not bool(ok)]
    return bad, {name: [int(v) for v in d] for name, d in _named(digests).items()}


def non_finite_message(step: int, bad: list[str], loss: float | None = None) -> str:
    """One line naming the step and what went non-finite."""
    shown = ", ".join(bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
    what = f"non-finite values (NaN/inf) in {len(bad)} state leaves: {shown}" if bad \
        else f"a non-finite train loss ({loss})"
    return f"training diverged at step {step}: {what}"


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------ save


def save(manager: ocp.CheckpointManager, step: int, state: steps.TrainState, iterator: Any,
         exp: experiment.Experiment, pending: list[dict[str, Any]] = (),
         examples: int | None = None) -> None:
    """Starts an (async) save of the state, the data iterator, the spec, config and info.

    ``pending`` are the per-step train metrics not yet in a log record; a resumed run
    continues the log window with them, so its metrics equal an uninterrupted run's.
    ``examples``: the training examples consumed so far (the data stream's position;
    ``step * batch_size`` by default). Raises ``NonFiniteStateError`` (and saves nothing)
    when the state holds NaN or inf: a diverged state never replaces a finite checkpoint.
    """
    bad, digest = state_health(state)
    if bad:
        raise NonFiniteStateError(non_finite_message(step, bad) + "; not saved")
    pending_host = [{k: float(v) for k, v in m.items()} for m in jax.device_get(list(pending))]
    spec = exp.spec.to_dict() if exp.spec is not None else {}
    config, info = exp.config.to_dict(), exp.info.to_dict()
    record = {"pending": pending_host,
              "examples": int(step * exp.config.batch_size if examples is None else examples),
              "batch_size": int(exp.config.batch_size), "state_digest": digest,
              "meta_sha256": _sha([spec, config, info])}
    record["sha256"] = _sha(record)
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(iterator),
        metrics=ocp.args.JsonSave(record),
        spec=ocp.args.JsonSave(spec),
        config=ocp.args.JsonSave(config),
        info=ocp.args.JsonSave(info),
    ), force=True)


# --------------------------------------------------------------------- damage detection


def step_dir(manager: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(str(manager.directory), str(step))


def _check_files(manager: ocp.CheckpointManager, step: int) -> None:
    """Raises DamagedCheckpointError naming the first missing or unparsable file of ``step``."""
    root = step_dir(manager, step)
    for item in ITEMS:
        if not os.path.isdir(os.path.join(root, item)):
            raise DamagedCheckpointError(step, os.path.join(root, item), "missing")
    for item in (*JSON_ITEMS, "data"):
        names = [n for n in sorted(os.listdir(os.path.join(root, item)))
                 if n != "commit_success.txt"]
        if not names:
            raise DamagedCheckpointError(step, os.path.join(root, item), "no data file")
        for name in names:
            _parse_json(step, os.path.join(root, item, name))
    for name in ("_METADATA", os.path.join("array_metadatas", "process_0")):
        path = os.path.join(root, "state", name)
        if os.path.exists(path):
            _parse_json(step, path)


def _parse_json(step: int, path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedCheckpointError(step, path, f"not valid JSON ({e})") from None


def _damage(manager: ocp.CheckpointManager, step: int, item: str,
            error: BaseException) -> DamagedCheckpointError:
    """A DamagedCheckpointError for an exception raised while restoring ``item``."""
    root = step_dir(manager, step)
    text = " ".join(str(error).split())
    chain, cause = [], error
    while cause is not None and len(chain) < 8:  # the file is often named by a cause
        chain.append(" ".join(str(cause).split()))
        cause = cause.__cause__ or cause.__context__
    joined = " ".join(chain)
    paths = re.findall(re.escape(root) + r"/[^\s'\",\]\)]*", joined)
    where = max(paths, key=len).rstrip("/.:") if paths else os.path.join(root, item)
    key = re.search(r'[Ee]rror (?:reading|decoding) "([^"]+)" in OCDBT', joined)
    if key:
        where = f"{where} (array {key.group(1)})"
    status = [c for c in chain if re.match(r"[A-Z_]{4,}: ", c)]  # a TensorStore status
    reason = status[-1] if status else f"{type(error).__name__}: {text}"
    reason = re.sub(r" See full TensorStore details.*|\[source locations=.*?\]", "", reason)
    return DamagedCheckpointError(step, where, reason[:160])


def read_meta(manager: ocp.CheckpointManager,
              step: int) -> tuple[dict, RPGSpec | None, data.DatasetInfo]:
    """(config dict, spec, dataset info) stored with ``step``, without touching the arrays.

    Raises DamagedCheckpointError naming the file when the step's files are incomplete or
    unreadable.
    """
    _check_files(manager, step)
    try:
        meta = manager.restore(step, args=ocp.args.Composite(
            spec=ocp.args.JsonRestore(), config=ocp.args.JsonRestore(),
            info=ocp.args.JsonRestore()))
        spec = RPGSpec.from_dict(meta["spec"]) if meta["spec"] else None
        info = data.DatasetInfo.from_dict(meta["info"])
    except FileNotFoundError as e:
        raise DamagedCheckpointError(step, step_dir(manager, step), f"vanished ({e})") from e
    except Exception as e:  # what a damaged JSON item raises varies with its damage
        raise _damage(manager, step, "config", e) from e
    return dict(meta["config"]), spec, info


def _restore_extra(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The ``metrics`` item, verified against its own checksum when it has one."""
    try:
        extra = manager.restore(step, args=ocp.args.Composite(
            metrics=ocp.args.JsonRestore()))["metrics"]
    except Exception as e:
        raise _damage(manager, step, "metrics", e) from e
    if "sha256" in extra:
        stored = extra.pop("sha256")
        if _sha(extra) != stored:
            raise DamagedCheckpointError(step, os.path.join(step_dir(manager, step), "metrics"),
                                         "checksum mismatch")
    return extra


def _verify(manager: ocp.CheckpointManager, step: int, state: Any, extra: dict[str, Any],
            meta: tuple[dict, RPGSpec | None, data.DatasetInfo] | None = None) -> None:
    root = step_dir(manager, step)
    bad, digest = state_health(state)
    if bad:
        raise DamagedCheckpointError(step, os.path.join(root, "state"),
                                     non_finite_message(step, bad).split(": ", 1)[1])
    if "state_digest" in extra:
        stored = extra["state_digest"]
        for name, value in digest.items():
            if stored.get(name) != value:
                raise DamagedCheckpointError(step, os.path.join(root, "state"),
                                             f"the values of {name} do not match their "
                                             "checksum (a damaged array file)")
    if meta is not None and "meta_sha256" in extra:
        config, spec, info = meta
        if _sha([spec.to_dict() if spec is not None else {}, config,
                 info.to_dict()]) != extra["meta_sha256"]:
            raise DamagedCheckpointError(step, os.path.join(root, "config"),
                                         "spec/config/info do not match their checksum")


# ------------------------------------------------------------------------------ resume


@dataclasses.dataclass
class Resumed:
    """A restored checkpoint: its step, state, pending log metrics and stream position."""

    step: int
    state: steps.TrainState
    pending: list[dict[str, float]]
    examples: int


def set_aside(workdir: str, step: int) -> str:
    """Moves checkpoint ``step`` to ``WORKDIR/checkpoints_damaged/STEP`` (never deletes)."""
    src = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR, str(step))
    parent = os.path.join(os.path.abspath(workdir), DAMAGED_DIR)
    os.makedirs(parent, exist_ok=True)
    dest, n = os.path.join(parent, str(step)), 1
    while os.path.exists(dest):
        dest, n = os.path.join(parent, f"{step}.{n}"), n + 1
    if os.path.exists(src):
        os.replace(src, dest)
    return dest


def _anywhere(flag: bool) -> bool:
    """True if ``flag`` is set on any process (all processes must call it)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def _newest_intact(manager: ocp.CheckpointManager, workdir: str, attempt) -> Any:
    """Runs ``attempt(step)`` on the newest step; a step it finds damaged is logged in one
    line, moved aside and the next older step tried. None when there is no checkpoint."""
    damaged: list[str] = []
    while True:
        manager.reload()
        step = manager.latest_step()
        if step is None:
            if damaged:
                raise RuntimeError(
                    f"no checkpoint in {str(manager.directory)!r} restores: "
                    f"{'; '.join(damaged)}. They were moved to "
                    f"{os.path.join(os.path.abspath(workdir), DAMAGED_DIR)!r}; run again to "
                    "start afresh, or restore them by hand")
            return None
        error: DamagedCheckpointError | None = None
        try:
            result = attempt(step)
        except DamagedCheckpointError as e:
            error = e
        if not _anywhere(error is not None):
            return result
        if error is None:
            error = DamagedCheckpointError(step, step_dir(manager, step), "damaged on another "
                                           "process")
        dest = set_aside(workdir, step) if jax.process_index() == 0 else "(process 0)"
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"rpg_jax_set_aside_{step}")
        logging.warning("%s; moved it to %s, falling back to the previous checkpoint",
                        error, dest)
        damaged.append(str(error))


def latest_meta(manager: ocp.CheckpointManager,
                workdir: str) -> tuple[int, dict, RPGSpec | None, data.DatasetInfo] | None:
    """(step, config, spec, info) of the newest checkpoint whose files are intact (damaged
    newer ones are moved aside), or None."""
    return _newest_intact(manager, workdir, lambda step: (step, *read_meta(manager, step)))


def restore_latest(manager: ocp.CheckpointManager, workdir: str, target: steps.TrainState,
                   iterator: Any, batch_size: int,
                   check: Callable[[int, dict, RPGSpec | None, data.DatasetInfo], None]
                   ) -> Resumed | None:
    """Restores the newest checkpoint that restores intact (see ``restore``), falling back
    past damaged ones; ``check(step, config, spec, info)`` raises for an incompatible run."""
    def attempt(step):
        meta = read_meta(manager, step)
        check(step, *meta)
        return restore(manager, step, target, iterator, batch_size, meta)

    return _newest_intact(manager, workdir, attempt)


def restore(manager: ocp.CheckpointManager, step: int, target: steps.TrainState,
            iterator: Any, batch_size: int | None = None,
            meta: tuple[dict, RPGSpec | None, data.DatasetInfo] | None = None) -> Resumed:
    """Restores checkpoint ``step`` into the shardings of ``target`` and positions
    ``iterator`` at the next training example.

    With ``batch_size`` different from the checkpoint's, the iterator continues at the
    exact next example (the position is stored in examples); the position must then be a
    multiple of ``batch_size``. Raises DamagedCheckpointError for damaged files or values,
    ValueError when the state's structure differs from ``target``'s.
    """
    extra = _restore_extra(manager, step)
    saved_batch = int(extra.get("batch_size", batch_size or 0))
    examples = int(extra.get("examples", step * saved_batch))
    same_batch = batch_size is None or batch_size == saved_batch
    if not same_batch:
        _check_batch_change(step, examples, saved_batch, batch_size, iterator)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    items = {"state": ocp.args.StandardRestore(abstract)}
    if same_batch:
        items["data"] = grain.checkpoint.CheckpointRestore(iterator)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except ValueError as e:
        if "tree structure" in str(e).lower() or "do not match" in str(e).lower():
            raise ValueError(
                f"the train state saved at step {step} has another structure than this "
                "config builds (its optimizer state: config.optimizer, momentum 0 vs "
                "non-zero, or ema_decay, grad_accum_steps, weight_decay_exclude switched on "
                f"or off); {' '.join(str(e).split())[:300]}") from e
        raise _damage(manager, step, "state", e) from e
    except Exception as e:  # tensorstore/grain raise many types on damaged files
        raise _damage(manager, step, "state", e) from e
    _verify(manager, step, restored["state"], extra, meta)
    if not same_batch:
        iterator.set_state({"next_index": examples // batch_size})
    return Resumed(step, restored["state"], list(extra.get("pending", [])), examples)


def _check_batch_change(step: int, examples: int, old: int, new: int, iterator: Any) -> None:
    if examples % new:
        raise ValueError(
            f"the checkpoint at step {step} has consumed {examples} training examples "
            f"(config.batch_size={old}), which is not a multiple of config.batch_size={new}: "
            "resuming would skip or repeat examples; use a batch size that divides "
            f"{examples}")
    state = iterator.get_state() if hasattr(iterator, "get_state") else None
    if not (isinstance(state, dict) and set(state) == {"next_index"}):
        raise ValueError(
            f"config.batch_size changed ({old} -> {new}) on resume, which needs the "
            "in-process data iterator (config.worker_count=0 and the host decoders); this "
            f"run's iterator keeps its position as {state!r}")


def check_compatible(saved_config: dict, saved_spec: RPGSpec | None,
                     config: ml_collections.ConfigDict, spec: RPGSpec | None,
                     step: int, num_steps: int | None = None,
                     saved_info: data.DatasetInfo | None = None,
                     info: data.DatasetInfo | None = None) -> None:
    """Raises ValueError naming the field if ``config`` cannot resume checkpoint ``step``.

    Fields that define the saved state (``config_lib.RESUME_FIXED``, ``vit.*``, momentum
    0 <-> non-zero) are always refused; fields that change the data stream or the trained
    trajectory are refused unless named in ``config.resume_overrides``; bookkeeping fields
    (``config_lib.RESUME_FREE``) may change. ``num_steps`` below ``step`` is refused.
    """
    current = config.to_dict()
    overrides = config_lib.resume_overrides(config)
    names = sorted(set(config_lib.field_names(config)) | set(_dotted(saved_config)))
    fixed = [f for f in names if config_lib.is_fixed_on_resume(f)]
    old_m, new_m = saved_config.get("momentum"), current.get("momentum")
    if saved_config.get("optimizer", "sgd") == "sgd" and old_m is not None \
            and bool(old_m) != bool(new_m):
        raise ValueError(
            f"the checkpoint at step {step} was trained with config.momentum={old_m!r}, but "
            f"this run has config.momentum={new_m!r}: a momentum of 0 keeps no momentum "
            "state, so the optimizer state cannot carry over; use a non-zero momentum "
            "(or 0 as before) or a new workdir")
    for field in fixed + [f for f in names if f not in fixed]:
        old, new = config_lib.field_value(saved_config, field), config_lib.field_value(
            current, field)
        if old == new or field in config_lib.RESUME_FREE:
            continue
        if field.startswith("vit.") and not config_lib.is_vit(config):
            continue  # unused by this model
        if old is None and field not in config_lib.RESUME_FIXED and not field.startswith("vit"):
            continue  # a field added after the checkpoint was written
        fixed_field = config_lib.is_fixed_on_resume(field)
        if fixed_field or field not in overrides:
            how = ("use the original value or a new workdir" if fixed_field else
                   "use the original value, a new workdir, or allow the change with "
                   f"--config.resume_overrides={field} (see the README)")
            raise ValueError(
                f"the checkpoint at step {step} was trained with config.{field}={old!r}, but "
                f"this run has config.{field}={new!r}; {how}")
    if saved_spec != spec:
        raise ValueError(f"the RPG spec stored at step {step} differs from the one this config "
                         "builds (a different model, rpg_jax version or parameter layout)")
    if (saved_info is not None and info is not None and saved_info.num_train != info.num_train
            and "synthetic_size" not in overrides):
        raise ValueError(
            f"the checkpoint at step {step} was trained on {saved_info.num_train} examples of "
            f"{saved_info.name!r}, this run's train split has {info.num_train} "
            f"(config.data_dir={config.data_dir!r}); the data stream would not continue")
    if num_steps is not None and num_steps < step:
        raise ValueError(
            f"the checkpoint at step {step} is past this run's {num_steps} steps "
            f"(config.num_train_steps={config.num_train_steps}, num_epochs="
            f"{config.num_epochs}); ask for at least {step} steps, use a new workdir, or "
            f"load an earlier checkpoint with load_checkpoint(workdir, step=...)")


def _dotted(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    return out


def _as_step(step: Any) -> int | None:
    if step is None:
        return None
    hint = step.strip() if isinstance(step, str) and step.strip().isdigit() else "40"
    if isinstance(step, bool | str):
        raise TypeError(f"step={step!r}: expected an int step number such as {hint} (or "
                        "None for the latest)")
    try:
        return operator.index(step)
    except TypeError:
        raise TypeError(f"step={step!r}: expected an int step number (or None for the "
                        "latest)") from None


def _open_reader(workdir: str, retries: int) -> ocp.CheckpointManager:
    """A read-only manager; retried when a live run removes a step while Orbax lists the
    steps (the manager stats every step directory as it opens)."""
    for attempt in range(retries):
        try:
            return make_manager(workdir, read_only=True)
        except FileNotFoundError:
            time.sleep(0.05 * (attempt + 1))
    return make_manager(workdir, read_only=True)


def load_checkpoint(workdir: str, step: int | None = None, retries: int = 5) -> TrainedModel:
    """Loads a run's checkpoint (the latest by default) onto the default device.

    Works on a single CPU for checkpoints written on any number of devices or hosts. Needs
    no dataset files: the model and spec come from the config stored with the checkpoint.
    Safe beside a live run: only finished checkpoints are read, and a step rotated away
    while it is read is retried with the newest one (``retries`` times). With ``step=None``
    a damaged newest checkpoint is skipped with a warning (it is left in place).
    """
    step = _as_step(step)
    ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoints in {workdir!r} (expected {ckpt_dir!r})")
    skipped: set[int] = set()
    for attempt in range(retries + 1):
        manager = _open_reader(workdir, retries)
        try:
            available = [s for s in manager.all_steps() if s not in skipped]
            if not available:
                detail = f" (damaged: {sorted(skipped)})" if skipped else ""
                raise FileNotFoundError(f"{ckpt_dir!r} holds no complete checkpoint{detail}")
            if step is not None and step not in available:
                raise ValueError(f"step={step} has no checkpoint in {ckpt_dir!r}; available: "
                                 f"{sorted(available)}")
            chosen = step if step is not None else max(available)
            try:
                return _load(manager, chosen)
            except Exception as e:
                if not os.path.isdir(step_dir(manager, chosen)) and attempt < retries:
                    time.sleep(0.05 * (attempt + 1))  # rotated away under us: take the newest
                    continue
                if isinstance(e, DamagedCheckpointError) and step is None:
                    logging.warning("%s; loading the previous checkpoint", e)
                    skipped.add(chosen)
                    continue
                if not os.path.isdir(step_dir(manager, chosen)):
                    raise FileNotFoundError(f"checkpoint step {chosen} in {ckpt_dir!r} was "
                                            "removed while it was being read") from e
                raise
        finally:
            manager.close()
    raise RuntimeError(f"could not load a checkpoint from {ckpt_dir!r}: its steps kept "
                       f"changing over {retries + 1} attempts")


def _load(manager: ocp.CheckpointManager, step: int) -> TrainedModel:
    meta = read_meta(manager, step)
    saved_config, spec, info = meta
    config = ml_collections.ConfigDict(saved_config)
    exp = experiment.build(config, info)
    if exp.spec != spec:
        raise ValueError(f"the spec stored at step {step} differs from the one its config "
                         "builds with this rpg_jax version")
    extra = _restore_extra(manager, step)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                            experiment.abstract_state(exp))
    try:
        state = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:
        raise _damage(manager, step, "state", e) from e
    _verify(manager, step, state, extra, meta)
    return TrainedModel(trainable=state.trainable, spec=spec, batch_stats=state.batch_stats,
                        config=config, step=int(step), model=exp.model, info=info)
