"""Learning-rate schedules and optimizers built from the config."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_fn(config: ml_collections.ConfigDict, steps_per_epoch: int,
                     num_steps: int) -> Callable[[jax.Array], jax.Array]:
    """Step -> learning rate, with an optional linear warm-up.

    * ``constant``: ``learning_rate``.
    * ``cosine``: cosine decay to 0 over the run.
    * ``exp_epoch``: the reference RPG recipe, ``lr0 * 0.1 ** (epoch / lr_decay_epochs)`` with
      the epoch counted in whole epochs (the rate is set once per epoch).
    """
    lr0 = config.learning_rate
    warmup = int(round(config.warmup_epochs * steps_per_epoch))

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        if config.lr_schedule == "constant":
            lr = jnp.full((), lr0, jnp.float32)
        elif config.lr_schedule == "cosine":
            frac = jnp.clip((step - warmup) / max(1, num_steps - warmup), 0.0, 1.0)
            lr = lr0 * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        else:  # exp_epoch
            epoch = jnp.floor(step / steps_per_epoch)
            lr = lr0 * 0.1 ** (epoch / config.lr_decay_epochs)
        if warmup > 0:
            lr = lr * jnp.minimum(1.0, (step + 1) / warmup)
        return lr

    return schedule


def make_optimizer(config: ml_collections.ConfigDict,
                   lr_fn: Callable[[jax.Array], jax.Array]) -> optax.GradientTransformation:
    """SGD with coupled weight decay (PyTorch's ``SGD(weight_decay=...)``, as the reference
    code trains), or AdamW with decoupled decay. Decay applies to every trainable leaf."""
    if config.optimizer == "sgd":
        return optax.chain(
            optax.add_decayed_weights(config.weight_decay),
            optax.sgd(lr_fn, momentum=config.momentum or None, nesterov=config.nesterov),
        )
    return optax.adamw(lr_fn, weight_decay=config.weight_decay)
