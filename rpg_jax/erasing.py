"""Random erasing (Zhong et al., "Random Erasing Data Augmentation", AAAI 2020,
arXiv:1708.04896) on the device, inside the jitted train step.

As the paper's Algorithm 1, independently for each example: with probability ``prob``, draw
an area ``S_e ~ U(min_area, max_area) * H * W`` and an aspect ratio ``r_e ~ U(min_aspect,
1 / min_aspect)``, take ``h = round(sqrt(S_e * r_e))``, ``w = round(sqrt(S_e / r_e))``; if
``h < H`` and ``w < W``, erase the ``h`` x ``w`` box at a uniform random top-left corner that
keeps it inside the image, else draw again (up to ``attempts`` times; an example without a
fitting draw stays whole). The paper's defaults: ``p = 0.5``, ``s_l = 0.02``, ``s_h = 0.4``,
``r_1 = 0.3``. The box is filled with uniform random pixel values (``fill="random"``, the
paper's RE-R, each pixel and channel an integer in [0, 255] normalised as the images are) or
with the dataset mean (``fill="mean"``, RE-M: zero after normalisation). The draws are a
function of the run's seed and the step, so a resumed run erases exactly as an uninterrupted
one. The attempts are drawn all at once and the first fitting one is kept, which is the
distribution of the paper's loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections

FILLS = ("random", "mean")


@dataclasses.dataclass(frozen=True)
class Erasing:
    """Random-erasing settings (static: part of the jitted step's definition)."""

    prob: float = 0.0
    fill: str = "random"
    min_area: float = 0.02
    max_area: float = 0.4
    min_aspect: float = 0.3
    attempts: int = 100

    def __post_init__(self):
        if not 0 <= self.prob <= 1:
            raise ValueError(f"Erasing.prob={self.prob!r}: expected a probability in [0, 1]")
        if self.fill not in FILLS:
            raise ValueError(f"Erasing.fill={self.fill!r}: expected one of {FILLS}")
        if not 0 < self.min_area <= self.max_area < 1:
            raise ValueError(f"Erasing area range ({self.min_area!r}, {self.max_area!r}): "
                             "expected 0 < min_area <= max_area < 1")
        if not 0 < self.min_aspect <= 1:
            raise ValueError(f"Erasing.min_aspect={self.min_aspect!r}: expected a number in "
                             "(0, 1]")
        if self.attempts < 1:
            raise ValueError(f"Erasing.attempts={self.attempts!r}: expected a positive int")

    @property
    def enabled(self) -> bool:
        return self.prob > 0


def from_config(config: ml_collections.ConfigDict) -> Erasing:
    return Erasing(prob=config.random_erase_prob, fill=config.random_erase_fill)


def erase_boxes(key: jax.Array, n: int, height: int, width: int,
                erasing: Erasing) -> tuple[jax.Array, ...]:
    """Per-example boxes ``(top, left, h, w, erased)``, each of shape (n,), drawn as the
    paper's Algorithm 1 (``erased`` is False where the example is left whole)."""
    k_apply, k_area, k_aspect, k_top, k_left = jax.random.split(key, 5)
    shape = (n, erasing.attempts)
    area = jax.random.uniform(k_area, shape, minval=erasing.min_area,
                              maxval=erasing.max_area) * (height * width)
    aspect = jax.random.uniform(k_aspect, shape, minval=erasing.min_aspect,
                                maxval=1.0 / erasing.min_aspect)
    hs = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    ws = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (hs < height) & (ws < width)
    first = jnp.argmax(fits, axis=1)  # the first fitting attempt (0 when none fits)
    h = jnp.take_along_axis(hs, first[:, None], axis=1)[:, 0]
    w = jnp.take_along_axis(ws, first[:, None], axis=1)[:, 0]
    erased = (jax.random.uniform(k_apply, (n,)) < erasing.prob) & jnp.any(fits, axis=1)
    h, w = jnp.where(erased, h, 0), jnp.where(erased, w, 0)
    top = jax.random.randint(k_top, (n,), 0, height - h + 1)
    left = jax.random.randint(k_left, (n,), 0, width - w + 1)
    return top, left, h, w, erased


def erase_batch(key: jax.Array, images: jax.Array, erasing: Erasing,
                mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """Random erasing of normalised NHWC ``images`` (``mean``/``std`` as in
    :func:`rpg_jax.steps.normalize`, used by the random fill); unchanged when off."""
    if not erasing.enabled:
        return images
    n, height, width, channels = images.shape
    k_boxes, k_fill = jax.random.split(key)
    top, left, h, w, _ = erase_boxes(k_boxes, n, height, width, erasing)
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < (top + h)[:, None, None])
              & (cols >= left[:, None, None]) & (cols < (left + w)[:, None, None]))
    if erasing.fill == "mean":
        fill = jnp.zeros((), images.dtype)
    else:
        pixels = jax.random.randint(k_fill, images.shape, 0, 256).astype(jnp.float32) / 255.0
        fill = ((pixels - jnp.asarray(mean, jnp.float32))
                / jnp.asarray(std, jnp.float32)).astype(images.dtype)
    return jnp.where(inside[..., None], fill, images)
