"""``TrainedModel``: a trained model as any of its three sources loads it, a run's checkpoint
(``rpg_jax.checkpoints.load_checkpoint``), an exported file (``rpg_jax.export.load_export``)
or the authors' PyTorch checkpoint (``rpg_jax.interop.load_reference_checkpoint``).

Importing it, building one and ``predict`` need neither Orbax nor grain: ``predict`` takes the
dataset's eval preprocessing from ``rpg_jax.data.catalog``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rpg_jax import data, steps
from rpg_jax.generator import generate_params, make_tables
from rpg_jax.spec import RPGSpec


@dataclasses.dataclass
class TrainedModel:
    """A trained model: its trainable tree, spec, BatchNorm statistics, config and model."""

    trainable: Any  # as TrainState.trainable: rings + free params (RPG), or the params (plain)
    spec: RPGSpec | None
    batch_stats: Any
    config: ml_collections.ConfigDict
    step: int
    model: Any
    info: data.DatasetInfo

    @property
    def bank(self) -> Any:
        """``trainable`` under its former name (read-only)."""
        return self.trainable

    @functools.cached_property
    def params(self) -> Any:
        """The model's full params (generated from the bank for RPG)."""
        if self.spec is None:
            return self.trainable
        return generate_params(self.trainable, self.spec,
                               make_tables(self.spec, inverse=False))

    @functools.cached_property
    def _apply(self):
        return jax.jit(lambda params, batch_stats, x: self.model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=False))

    def predict(self, images: Any, batch_size: int = 256) -> np.ndarray:
        """Logits for a batch of raw images as the dataset stores them (uint8 [N, H, W, C]).

        Applies the config's eval preprocessing (resize/crop where the dataset has one, then
        normalisation) and returns float32 logits [N, num_classes]; N may be 0.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) \
                or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected a positive int")
        shape = np.shape(images) if isinstance(images, np.ndarray | jax.Array) else None
        if shape is not None and tuple(shape) == tuple(self.info.image_shape):
            raise ValueError(f"predict takes a batch [N, H, W, C]; got one image of shape "
                             f"{tuple(shape)}: pass images[None] for a batch of one")
        x = data.preprocess_for_eval(self.info.name, images)
        out = [np.zeros((0, self.info.num_classes), np.float32)]
        for start in range(0, len(x), batch_size):
            chunk = steps.normalize(jnp.asarray(x[start : start + batch_size]),
                                    self.info.mean, self.info.std)
            out.append(np.asarray(self._apply(self.params, self.batch_stats, chunk)))
        return np.concatenate(out).astype(np.float32)


#: The name ``TrainedModel`` had while only checkpoints loaded it; kept for user code.
Checkpoint = TrainedModel
