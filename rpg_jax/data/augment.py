"""Host-side numpy/pillow image transforms on uint8 HxWxC images (no TensorFlow).

Per-example transforms take an ``np.random.Generator``; the batched crop+flip
takes per-example random words (see :func:`rpg_jax.data.hashing.example_bits`)
so a whole batch is augmented without a Generator per example.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


def crop_flip_batch(
    images: np.ndarray, pad: int, dy: np.ndarray, dx: np.ndarray, flips: np.ndarray
) -> np.ndarray:
    """Zero-pads ``images`` [N, H, W, C] by ``pad`` px, crops HxW at (dy, dx), flips where set.

    ``dy``/``dx`` are per-example offsets in ``[0, 2 * pad]`` into the padded image
    and ``flips`` per-example booleans (horizontal flip of the crop).
    """
    n, h, w, c = images.shape
    padded = np.zeros((n, h + 2 * pad, w + 2 * pad, c), dtype=images.dtype)
    padded[:, pad : pad + h, pad : pad + w] = images
    out = np.empty_like(images)
    # A per-example loop over slices beats one fancy-indexing gather by 2-3x here.
    params = zip(
        np.asarray(dy).tolist(), np.asarray(dx).tolist(), np.asarray(flips).tolist(), strict=True
    )
    for i, (y, x, f) in enumerate(params):
        crop = padded[i, y : y + h, x : x + w]
        out[i] = crop[:, ::-1] if f else crop
    return out


def random_crop_flip_batch(
    images: np.ndarray, bits: np.ndarray, pad: int, flip: bool = True
) -> np.ndarray:
    """Random pad-crop (+ horizontal flip) of a batch from per-example uint64 ``bits``."""
    bits = np.asarray(bits, dtype=np.uint64)
    k = np.uint64(2 * pad + 1)
    dy = bits % k
    dx = (bits >> np.uint64(16)) % k
    flips = flip & ((bits >> np.uint64(40)) & np.uint64(1)).astype(bool)
    return crop_flip_batch(images, pad, dy, dx, flips)


def random_crop_flip(
    image: np.ndarray, rng: np.random.Generator, pad: int, flip: bool = True
) -> np.ndarray:
    """CIFAR-style augmentation of one HxWxC image: zero-pad, random crop, random h-flip.

    Draws ``dy, dx = rng.integers(0, 2 * pad + 1, size=2)`` then, if ``flip``,
    ``rng.random() < 0.5`` for the flip.
    """
    dy, dx = rng.integers(0, 2 * pad + 1, size=2)
    do_flip = bool(flip and rng.random() < 0.5)
    return crop_flip_batch(image[None], pad, dy[None], dx[None], np.array([do_flip]))[0]


def _resize(image: np.ndarray, size: tuple[int, int], box: tuple[float, ...]) -> np.ndarray:
    """Bilinear resize of the ``box`` (x0, y0, x1, y1) region of ``image`` to (width, height)."""
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    out = np.asarray(pil.resize(size, Image.Resampling.BILINEAR, box=box))
    return out.reshape(size[1], size[0], image.shape[-1])


def inception_box(
    h: int,
    w: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box ``(x, y, crop_w, crop_h)`` in an ``h`` x ``w`` image.

    Samples area fraction in ``scale`` and log-uniform aspect ratio in ``ratio``
    up to 10 times; if no crop fits, falls back to the largest central crop with
    an aspect ratio inside ``ratio`` (as torchvision does).
    """
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            y = int(rng.integers(0, h - ch + 1))
            x = int(rng.integers(0, w - cw + 1))
            return x, y, cw, ch
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        cw, ch = round(h * ratio[1]), h
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def inception_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
) -> np.ndarray:
    """RandomResizedCrop to ``size`` x ``size`` (bilinear), then a random horizontal flip.

    The box is :func:`inception_box`; the flip is drawn after it (``rng.random() < 0.5``).
    """
    x, y, cw, ch = inception_box(image.shape[0], image.shape[1], rng, scale, ratio)
    out = _resize(image, (size, size), (x, y, x + cw, y + ch))
    if flip and rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def center_box(h: int, w: int, resize: int = 256, size: int = 224) -> tuple[float, ...]:
    """The eval box (x0, y0, x1, y1): short side resized to ``resize``, centre ``size`` crop."""
    if not 0 < size <= resize:
        raise ValueError(f"need 0 < size <= resize, got {size=} {resize=}")
    side = size * min(h, w) / resize  # crop side in original pixels
    y0, x0 = (h - side) / 2, (w - side) / 2
    return (x0, y0, x0 + side, y0 + side)


def resize_center_crop(image: np.ndarray, resize: int = 256, size: int = 224) -> np.ndarray:
    """ImageNet eval transform: resize the short side to ``resize``, center-crop ``size``.

    Done as one bilinear resize of the :func:`center_box` of the original image.
    """
    box = center_box(image.shape[0], image.shape[1], resize, size)
    return _resize(image, (size, size), box)
