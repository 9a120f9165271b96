"""Fast host JPEG path: crop window from the header, DCT-domain downscale, uint8 warp.

The train transform is the inception crop of :func:`rpg_jax.data.augment.inception_crop`
with the same random draws (:func:`rpg_jax.data.augment.inception_box`, then the flip),
so a given ``(seed, stream position)`` gets the same crop box and flip on either path.
What differs is how the pixels are made:

1. the image size comes from the JPEG header (``simplejpeg.decode_jpeg_header``), so
   the crop box is known before any pixel is decoded;
2. libjpeg-turbo decodes at the largest DCT-domain reduction 1/k (k in 1, 2, 4, 8) that
   keeps the crop at least ``size`` px on both sides (``simplejpeg``);
3. where the crop still shrinks, a Gaussian prefilter (sigma 0.4 x the remaining scale)
   of the crop region stands in for antialiasing; then one ``cv2.warpAffine``
   (bilinear, uint8, half-pixel centres, the flip folded in) maps the crop box to
   ``size`` x ``size``, written straight into the batch.

Against the reference (full decode, then Pillow's antialiased bilinear resize of the
box) the images differ by a mean absolute error of about 1 grey level on fine texture
(tests/test_imagenet_pipeline.py bounds it). Eval (short side to 256, centre crop 224)
is done the same way.

Images that libjpeg-turbo cannot decode as RGB (CMYK/YCCK JPEGs, PNG or other formats
stored as "JPEG") are decoded fully with Pillow and cropped the same way. Corrupt or
truncated data raises :class:`CorruptImageError`.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

try:
    import cv2
    import simplejpeg
except ImportError as e:  # pragma: no cover - both are declared dependencies
    raise ImportError(
        f"rpg_jax's fast JPEG path needs simplejpeg and opencv-python-headless ({e}); "
        "install them with `pip install simplejpeg opencv-python-headless`, or use "
        "decoder='pil'"
    ) from e

cv2.setNumThreads(1)  # one image per call; parallelism comes from grain threads/workers

_DCT_FACTORS = (8, 4, 2, 1)
_PIL_ONLY_COLORSPACES = ("CMYK", "YCCK")


class CorruptImageError(ValueError):
    """Raised for encoded image data that cannot be decoded (corrupt or truncated)."""


def image_size(data: bytes) -> tuple[int, int, bool]:
    """Returns ``(height, width, fast)`` of encoded image ``data`` from its header.

    ``fast`` says whether libjpeg-turbo decodes it to RGB (a baseline or
    progressive YCbCr/grayscale JPEG); other images go through Pillow.
    """
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        return int(h), int(w), colorspace not in _PIL_ONLY_COLORSPACES
    except ValueError:
        pass
    try:
        with Image.open(io.BytesIO(data)) as pil:
            w, h = pil.size
    except Exception as e:  # PIL raises many types for bad data
        raise CorruptImageError(f"unreadable image header ({type(e).__name__}: {e})") from e
    return int(h), int(w), False


def _decode(data: bytes, h: int, w: int, fast: bool, k: int) -> np.ndarray:
    """Decodes ``data`` to RGB uint8 at 1/k scale (k = 1 unless ``fast``)."""
    if fast:
        try:
            return simplejpeg.decode_jpeg(
                data, "RGB", min_height=-(-h // k), min_width=-(-w // k), strict=True
            )
        except ValueError as e:
            raise CorruptImageError(f"corrupt or truncated JPEG ({e})") from e
    try:
        with Image.open(io.BytesIO(data)) as pil:
            image = np.asarray(pil.convert("RGB"))
    except Exception as e:
        raise CorruptImageError(f"corrupt or truncated image ({type(e).__name__}: {e})") from e
    if image.shape[:2] != (h, w):
        raise CorruptImageError(f"decoded size {image.shape[:2]} differs from header {(h, w)}")
    return image


def _factor(crop_h: float, crop_w: float, size: int, fast: bool) -> int:
    """Largest DCT reduction k that keeps the crop at least ``size`` px on both sides."""
    if not fast:
        return 1
    return next(k for k in _DCT_FACTORS if min(crop_h, crop_w) / k >= size or k == 1)


def _antialias(
    image: np.ndarray, box: tuple[float, ...], sx: float, sy: float
) -> tuple[np.ndarray, int, int]:
    """Gaussian prefilter (sigma 0.4 x scale) of the box's region along downscaled axes.

    Returns the filtered region and its (x, y) offset in ``image``. Bilinear sampling
    alone aliases when shrinking; this brings the result within ~1 grey level (mean
    absolute error, fine texture) of Pillow's antialiased bilinear resize.
    """
    if sx <= 1 and sy <= 1:
        return image, 0, 0
    h, w = image.shape[:2]
    sig_x, sig_y = (0.4 * s if s > 1 else 0.0 for s in (sx, sy))
    kx, ky = (2 * math.ceil(3 * sig) + 1 if sig else 1 for sig in (sig_x, sig_y))
    x0, y0 = max(0, int(box[0]) - kx), max(0, int(box[1]) - ky)
    x1, y1 = min(w, math.ceil(box[2]) + kx), min(h, math.ceil(box[3]) + ky)
    region = cv2.GaussianBlur(image[y0:y1, x0:x1], (kx, ky), sigmaX=sig_x or 1.0,
                              sigmaY=sig_y or 1.0, borderType=cv2.BORDER_REPLICATE)
    return region, x0, y0


def decode_box(
    data: bytes,
    box: tuple[float, float, float, float],
    size: int,
    flip: bool = False,
    out: np.ndarray | None = None,
    header: tuple[int, int, bool] | None = None,
) -> np.ndarray:
    """Decodes the ``box`` (x0, y0, x1, y1; original pixels) of ``data`` to ``size`` x ``size``.

    Bilinear, uint8 RGB, mirrored horizontally if ``flip``; written into ``out``
    (a C-contiguous uint8 [size, size, 3] array) when given. ``header`` is
    :func:`image_size`'s result if the caller already has it.
    """
    h, w, fast = image_size(data) if header is None else header
    x0, y0, x1, y1 = box
    k = _factor(y1 - y0, x1 - x0, size, fast)
    image = _decode(data, h, w, fast, k)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    # Destination pixel centre d + 0.5 maps to source x0 / k + (d + 0.5) * sx (half-pixel
    # centres on both sides); the flip mirrors d.
    sx, sy = (x1 - x0) / (k * size), (y1 - y0) / (k * size)
    image, ox, oy = _antialias(image, (x0 / k, y0 / k, x1 / k, y1 / k), sx, sy)
    if flip:
        row0 = (-sx, 0.0, x1 / k - ox - 0.5 * sx - 0.5)
    else:
        row0 = (sx, 0.0, x0 / k - ox + 0.5 * sx - 0.5)
    matrix = np.array([row0, (0.0, sy, y0 / k - oy + 0.5 * sy - 0.5)], np.float64)
    if out is None:
        out = np.empty((size, size, 3), np.uint8)
    cv2.warpAffine(
        image,
        matrix,
        (size, size),
        dst=out,
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return out
