"""What a config describes: the model, the RPG spec, the optimizer and the initial state.

Shared by the trainer and by ``load_checkpoint`` so both build exactly the same trees.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from rpg_jax import config as config_lib
from rpg_jax import erasing, mixing, models, optim, steps
from rpg_jax.data import DatasetInfo
from rpg_jax.generator import ParamCount, count, init_bank
from rpg_jax.spec import RPGSpec, make_spec


@dataclasses.dataclass
class Experiment:
    """The static pieces of a run (no arrays but the initial variables)."""

    config: ml_collections.ConfigDict
    info: DatasetInfo
    model: nn.Module
    spec: RPGSpec | None
    steps_per_epoch: int
    num_steps: int
    lr_fn: Any
    tx: optax.GradientTransformation

    @property
    def compute_dtype(self) -> Any:
        return jnp.bfloat16 if self.config.half_precision else jnp.float32

    def _interval(self, value: int) -> int:
        """-1 -> once per epoch, 0 -> never (only at the end), n -> every n steps."""
        return self.steps_per_epoch if value == -1 else value

    @property
    def eval_every(self) -> int:
        """Steps between evaluations (0: only the final one); the run also evaluates at its
        last step."""
        return self._interval(self.config.eval_every_steps)

    @property
    def checkpoint_every(self) -> int:
        """Steps between checkpoints (0: only the final one)."""
        return self._interval(self.config.checkpoint_every_steps)

    @property
    def num_evals(self) -> int:
        """Evaluations of an uninterrupted run: every ``eval_every`` steps and the final one."""
        every = self.eval_every
        return -(-self.num_steps // every) if every else 1  # ceil(num_steps / every)

    def param_count(self) -> ParamCount:
        """The model's parameter counts (shapes only, no init). A plain model (RPG disabled)
        has all its parameters free: no ring, nothing generated."""
        if self.spec is not None:
            return count(self.spec)
        shapes = param_shapes(self.model, self.info)["params"]
        free = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
        return ParamCount(ring_dof=0, free=int(free), generated=0)


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    dtype = jnp.bfloat16 if config.half_precision else jnp.float32
    if config_lib.is_vit(config):
        v = config.vit
        return models.get_model(config.model, num_classes=num_classes,
                                width=config_lib.vit_width(config), depth=v.depth,
                                num_heads=v.num_heads, mlp_ratio=v.mlp_ratio,
                                patch_size=v.patch_size, pool=v.pool, dtype=dtype)
    return models.get_model(config.model, num_classes=num_classes, width=config.width,
                            dtype=dtype, zero_init_residual=config.zero_init_residual)


def param_shapes(model: nn.Module, info: DatasetInfo) -> Any:
    """The model's variables (params, and batch_stats if any) as ShapeDtypeStructs."""
    init = functools.partial(model.init, train=False)
    return jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, *info.image_shape)))


def build_spec(config: ml_collections.ConfigDict, params_or_shapes: Any) -> RPGSpec | None:
    if not config.rpg.enabled:
        return None
    try:
        return make_spec(params_or_shapes, config_lib.ring_size(config), seed=config.rpg.seed,
                         groups=config_lib.groups(config), select=config.rpg.select,
                         mode=config.rpg.mode)
    except ValueError as e:
        raise ValueError(f"config.rpg (model {config.model!r}): {e}") from e


def build(config: ml_collections.ConfigDict, info: DatasetInfo) -> Experiment:
    """Model, spec, schedule and optimizer for ``config``; cheap (no parameter init)."""
    if config_lib.is_vit(config):
        p = config.vit.patch_size
        if any(size % p for size in info.image_shape[:2]):
            raise ValueError(f"config.vit.patch_size={p} does not divide the "
                             f"{info.image_shape[0]}x{info.image_shape[1]} images of "
                             f"{info.name!r}")
    model = build_model(config, info.num_classes)
    spec = build_spec(config, param_shapes(model, info)["params"])
    steps_per_epoch = info.num_train // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"config.batch_size={config.batch_size} is larger than the "
                         f"{info.num_train} training examples of {info.name!r}")
    num_steps = (config.num_train_steps if config.num_train_steps > 0
                 else max(1, math.ceil(config.num_epochs * steps_per_epoch)))
    lr_fn = optim.learning_rate_fn(config, steps_per_epoch, num_steps)
    tx = optim.make_optimizer(config, lr_fn)
    return Experiment(config, info, model, spec, steps_per_epoch, num_steps, lr_fn, tx)


def make_train_step(exp: Experiment):
    """The run's (unjitted) ``train_step(state, batch, tables)``, with its config's loss
    options (label smoothing, mixup/CutMix, random erasing)."""
    return steps.make_train_step(exp.model, exp.tx, exp.spec, exp.info.mean, exp.info.std,
                                 exp.lr_fn, exp.compute_dtype,
                                 label_smoothing=exp.config.label_smoothing,
                                 mixing=mixing.from_config(exp.config),
                                 erasing=erasing.from_config(exp.config), seed=exp.config.seed)


def initial_state(exp: Experiment) -> steps.TrainState:
    """A fresh step-0 state: Flax init for the model, then the bank for RPG. A model without
    BatchNorm (a ViT) gets empty ``batch_stats``.

    Uses the "rbg" PRNG: its init compiles about 3x faster than threefry's on CPU (8 s -> 3 s
    for ResNet-20); the values depend on the backend, and checkpoints store them anyway.
    """
    key = jax.random.key(exp.config.seed, impl="rbg")
    init_key, bank_key = jax.random.split(key)
    init = jax.jit(functools.partial(exp.model.init, train=False))
    variables = init(init_key, jnp.zeros((1, *exp.info.image_shape)))
    trainable = variables["params"]
    if exp.spec is not None:
        trainable = init_bank(bank_key, exp.spec, variables["params"])
    return steps.init_state(trainable, variables.get("batch_stats", {}), exp.tx)


def abstract_state(exp: Experiment) -> steps.TrainState:
    """ShapeDtypeStructs of the train state (for restoring checkpoints)."""
    return jax.eval_shape(lambda: initial_state(exp))
