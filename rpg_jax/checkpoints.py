"""Orbax checkpoints of a run, resume checks, and the notebook API ``load_checkpoint``.

A checkpoint step holds six items: ``state`` (the TrainState arrays), ``data`` (the grain
iterator position, one file per process), ``metrics`` (train metrics of the steps since
the last log record), ``spec`` (the RPG spec as JSON: indices and signs
are derived from it, no index files), ``config`` (the run's config as JSON) and ``info``
(the dataset's static description, so a checkpoint loads without the dataset's files).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from rpg_jax import config as config_lib
from rpg_jax import data, experiment, steps
from rpg_jax.generator import generate_params, make_tables
from rpg_jax.spec import RPGSpec

CHECKPOINT_DIR = "checkpoints"

# Config fields that define the model or the trained quantity: a resumed run must keep them
# (a ViT's ``vit.*`` fields too, see ``resume_fields``).
RESUME_FIELDS = (
    "dataset", "model", "width", "zero_init_residual", "seed", "optimizer",
    "rpg.enabled", "rpg.ring_size", "rpg.groups", "rpg.select", "rpg.mode", "rpg.seed",
)


def resume_fields(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The fields a run resuming with ``config`` must share with its checkpoint."""
    if config_lib.is_vit(config):
        return RESUME_FIELDS + tuple(f"vit.{k}" for k in config.vit)
    return RESUME_FIELDS


def make_manager(workdir: str, keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
    """The run's checkpoint manager in ``WORKDIR/checkpoints`` (keeps the latest ``keep``)."""
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
                                 options=options)


def save(manager: ocp.CheckpointManager, step: int, state: steps.TrainState, iterator: Any,
         exp: experiment.Experiment, pending: list[dict[str, Any]] = ()) -> None:
    """Starts an (async) save of the state, the data iterator, the spec, config and info.

    ``pending`` are the per-step train metrics not yet in a log record; a resumed run
    continues the log window with them, so its metrics equal an uninterrupted run's.
    """
    pending_host = [{k: float(v) for k, v in m.items()} for m in jax.device_get(list(pending))]
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(iterator),
        metrics=ocp.args.JsonSave({"pending": pending_host}),
        spec=ocp.args.JsonSave(exp.spec.to_dict() if exp.spec is not None else {}),
        config=ocp.args.JsonSave(exp.config.to_dict()),
        info=ocp.args.JsonSave(dataclasses.asdict(exp.info)),
    ), force=True)


def read_meta(manager: ocp.CheckpointManager,
              step: int) -> tuple[dict, RPGSpec | None, data.DatasetInfo]:
    """(config dict, spec, dataset info) stored with ``step``, without touching the arrays."""
    meta = manager.restore(step, args=ocp.args.Composite(
        spec=ocp.args.JsonRestore(), config=ocp.args.JsonRestore(),
        info=ocp.args.JsonRestore()))
    spec = RPGSpec.from_dict(meta["spec"]) if meta["spec"] else None
    info = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["info"].items()}
    return dict(meta["config"]), spec, data.DatasetInfo(**info)


def _lookup(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d[part] if isinstance(d, dict) and part in d else None
    return d


def check_compatible(saved_config: dict, saved_spec: RPGSpec | None,
                     config: ml_collections.ConfigDict, spec: RPGSpec | None,
                     step: int) -> None:
    """Raises ValueError naming the field if ``config`` cannot resume checkpoint ``step``."""
    current = config.to_dict()
    for field in resume_fields(config):
        old, new = _lookup(saved_config, field), _lookup(current, field)
        if old != new:
            raise ValueError(
                f"the checkpoint at step {step} was trained with config.{field}={old!r}, but "
                f"this run has config.{field}={new!r}; use the original value or a new workdir"
            )
    if saved_spec != spec:
        raise ValueError(f"the RPG spec stored at step {step} differs from the one this config "
                         "builds (a different model, rpg_jax version or parameter layout)")


def restore(manager: ocp.CheckpointManager, step: int, target: steps.TrainState,
            iterator: Any) -> tuple[steps.TrainState, list[dict[str, float]]]:
    """Restores checkpoint ``step`` into the shardings of ``target`` and sets ``iterator``;
    returns the state and the pending train metrics saved with it."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        data=grain.checkpoint.CheckpointRestore(iterator),
        metrics=ocp.args.JsonRestore(),
    ))
    return restored["state"], list(restored["metrics"]["pending"])


@dataclasses.dataclass
class Checkpoint:
    """A trained model restored from a workdir (see ``load_checkpoint``)."""

    bank: Any  # rings + free params (RPG), or the params themselves (plain)
    spec: RPGSpec | None
    batch_stats: Any
    config: ml_collections.ConfigDict
    step: int
    model: Any
    info: data.DatasetInfo

    @functools.cached_property
    def params(self) -> Any:
        """The model's full params (generated from the bank for RPG)."""
        if self.spec is None:
            return self.bank
        return generate_params(self.bank, self.spec, make_tables(self.spec, inverse=False))

    @functools.cached_property
    def _apply(self):
        return jax.jit(lambda params, batch_stats, x: self.model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=False))

    def predict(self, images: Any, batch_size: int = 256) -> np.ndarray:
        """Logits for raw images as the dataset stores them (e.g. uint8 HxWxC).

        Applies the config's eval preprocessing (resize/crop where the dataset has one, then
        normalisation) and returns float32 logits [N, num_classes].
        """
        x = data.preprocess_for_eval(self.info.name, images)
        out = []
        for start in range(0, len(x), batch_size):
            chunk = steps.normalize(jnp.asarray(x[start : start + batch_size]),
                                    self.info.mean, self.info.std)
            out.append(np.asarray(self._apply(self.params, self.batch_stats, chunk)))
        return np.concatenate(out).astype(np.float32)


def load_checkpoint(workdir: str, step: int | None = None) -> Checkpoint:
    """Loads a run's checkpoint (the latest by default) onto the default device.

    Works on a single CPU for checkpoints written on any number of devices or hosts. Needs
    no dataset files: the model and spec come from the config stored with the checkpoint.
    """
    ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoints in {workdir!r} (expected {ckpt_dir!r})")
    manager = make_manager(workdir, read_only=True)
    available = manager.all_steps()
    if not available:
        raise FileNotFoundError(f"{ckpt_dir!r} holds no complete checkpoint")
    if step is None:
        step = max(available)
    elif step not in available:
        raise ValueError(f"step={step} has no checkpoint in {ckpt_dir!r}; available: "
                         f"{sorted(available)}")
    saved_config, spec, info = read_meta(manager, step)
    config = ml_collections.ConfigDict(saved_config)
    exp = experiment.build(config, info)
    if exp.spec != spec:
        raise ValueError(f"the spec stored at step {step} differs from the one its config "
                         "builds with this rpg_jax version")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                            experiment.abstract_state(exp))
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
    manager.close()
    return Checkpoint(bank=state.trainable, spec=spec, batch_stats=state.batch_stats,
                      config=config, step=int(step), model=exp.model, info=info)
