"""Mixup and CutMix on the device, inside the jitted train step.

As timm's ``Mixup`` (batch mode): one mixing coefficient per batch, the batch mixed with its
reverse (``x[::-1]``); with both enabled each batch takes CutMix with probability
``switch_prob``, else mixup; ``prob`` is the chance that a batch is mixed at all. CutMix
pastes a box of area ``1 - lam`` (clipped at the borders; ``lam`` is then corrected to the
area actually kept). Targets become ``lam * onehot(y) + (1 - lam) * onehot(y[::-1])``.
The random draws are a function of the run's seed and the step, so a resumed run mixes
exactly as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections


@dataclasses.dataclass(frozen=True)
class Mixing:
    """Mixup/CutMix settings (static: part of the jitted step's definition)."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


def from_config(config: ml_collections.ConfigDict) -> Mixing:
    return Mixing(config.mixup_alpha, config.cutmix_alpha, config.mix_prob,
                  config.mix_switch_prob)


def cutmix_box(key: jax.Array, lam: jax.Array, height: int,
               width: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(top, bottom, left, right) of a box of area about ``(1 - lam) * H * W`` centred at a
    uniform random pixel and clipped at the borders (timm's ``rand_bbox``)."""
    cut = jnp.sqrt(1.0 - lam)
    cut_h, cut_w = (height * cut).astype(jnp.int32), (width * cut).astype(jnp.int32)
    ky, kx = jax.random.split(key)
    cy = jax.random.randint(ky, (), 0, height)
    cx = jax.random.randint(kx, (), 0, width)
    top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    return top, bottom, left, right


def mix_batch(key: jax.Array, images: jax.Array, targets: jax.Array,
              mixing: Mixing) -> tuple[jax.Array, jax.Array]:
    """Mixes float NHWC ``images`` and soft ``targets`` (N, classes) with their reverse.

    Returns the mixed images and targets; the batch is returned unchanged (with its
    targets) when it is not drawn to be mixed.
    """
    if not mixing.enabled:
        return images, targets
    k_apply, k_switch, k_mixup, k_cutmix, k_box = jax.random.split(key, 5)
    flipped_images, flipped_targets = images[::-1], targets[::-1]

    def beta(k, alpha):
        return jax.random.beta(k, alpha, alpha) if alpha > 0 else jnp.float32(1.0)

    if mixing.mixup_alpha > 0 and mixing.cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch) < mixing.switch_prob
    else:
        use_cutmix = jnp.bool_(mixing.cutmix_alpha > 0)
    lam_mixup = beta(k_mixup, mixing.mixup_alpha)
    lam_cutmix = beta(k_cutmix, mixing.cutmix_alpha)

    height, width = images.shape[1], images.shape[2]
    top, bottom, left, right = cutmix_box(k_box, lam_cutmix, height, width)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    kept = 1.0 - (bottom - top) * (right - left) / (height * width)  # lam of the clipped box

    mixed_up = lam_mixup * images + (1.0 - lam_mixup) * flipped_images
    cut = jnp.where(inside[None, :, :, None], flipped_images, images)
    lam = jnp.where(use_cutmix, kept, lam_mixup).astype(jnp.float32)
    mixed = jnp.where(use_cutmix, cut, mixed_up).astype(images.dtype)
    apply = jax.random.uniform(k_apply) < mixing.prob
    lam = jnp.where(apply, lam, 1.0)
    mixed = jnp.where(apply, mixed, images)
    return mixed, lam * targets + (1.0 - lam) * flipped_targets
