"""The datasets rpg_jax knows by name: their classes, image shapes, normalisation, splits and
augmentation kind, and the eval preprocessing a trained model applies in ``predict``.

NumPy and Pillow only (no grain): a loaded model predicts without the input pipeline.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from rpg_jax.data import augment
from rpg_jax.data.sources import to_uint8_image

_UNIFORM_MEAN = (0.5, 0.5, 0.5)
_UNIFORM_STD = (0.2898, 0.2898, 0.2898)  # std of uniform bytes / 255


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    """The fixed facts of a named dataset (its sizes are read from the data)."""

    kind: str  # "fashion_mnist" | "tfds" | "synthetic"
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_split: str
    eval_split: str
    crop_pad: int | None  # pad of train crop+flip; None: inception crop + resize eval
    synthetic_sizes: tuple[int, int] = (0, 0)  # default (train, eval) sizes


_CIFAR = dict(image_shape=(32, 32, 3), train_split="train", eval_split="test", crop_pad=4)
_IMAGENET = dict(image_shape=(224, 224, 3), num_classes=1000, crop_pad=None)

ENTRIES: dict[str, DatasetEntry] = {
    # Computed from the 60k training images (see tests/test_data.py).
    "fashion_mnist": DatasetEntry(
        kind="fashion_mnist",
        num_classes=10,
        image_shape=(28, 28, 1),
        mean=(0.2860,),
        std=(0.3530,),
        train_split="train",
        eval_split="test",
        crop_pad=2,
    ),
    # CIFAR / ImageNet: the standard published training-set statistics.
    "cifar10": DatasetEntry(
        kind="tfds",
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        **_CIFAR,
    ),
    "cifar100": DatasetEntry(
        kind="tfds",
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        **_CIFAR,
    ),
    "imagenet2012": DatasetEntry(
        kind="tfds",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        train_split="train",
        eval_split="validation",
        **_IMAGENET,
    ),
    "synthetic_cifar": DatasetEntry(
        kind="synthetic",
        num_classes=10,
        mean=_UNIFORM_MEAN,
        std=_UNIFORM_STD,
        synthetic_sizes=(50_000, 10_000),
        **_CIFAR,
    ),
    "synthetic_imagenet": DatasetEntry(
        kind="synthetic",
        mean=_UNIFORM_MEAN,
        std=_UNIFORM_STD,
        train_split="train",
        eval_split="test",
        synthetic_sizes=(1_281_167, 50_000),
        **_IMAGENET,
    ),
}

DATASET_NAMES: tuple[str, ...] = tuple(ENTRIES)


def entry(name: str) -> DatasetEntry:
    """The catalog entry of ``name``; ValueError naming the valid names otherwise."""
    if name not in ENTRIES:
        raise ValueError(f"Unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    return ENTRIES[name]


def eval_transform(name: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """Per-image eval transform, or None when images are used as stored."""
    size = entry(name).image_shape[0]
    if entry(name).crop_pad is None:
        return functools.partial(augment.resize_center_crop, resize=256, size=size)
    return None


def preprocess_for_eval(name: str, images: np.ndarray | Sequence[Any]) -> np.ndarray:
    """Applies the host eval transform to raw images as the dataset stores them.

    ``images`` is a uint8 array [N, H, W, C] (or [N, H, W] for one channel) or
    a sequence of HxWxC uint8 arrays / encoded JPEG or PNG bytes (ImageNet images
    may differ in size). Returns uint8 [N, *image_shape] ready for normalisation.
    """
    spec = entry(name)
    if isinstance(images, np.ndarray):
        if images.ndim == 3 and spec.image_shape[-1] == 1:
            images = images[..., None]
        if images.ndim != 4:
            raise ValueError(f"expected a batch [N, H, W, C] of images, got shape {images.shape}")
    transform = eval_transform(name) or (lambda image: image)
    out = [transform(to_uint8_image(image)) for image in images]
    for image in out:
        if image.shape != spec.image_shape:
            raise ValueError(
                f"{name!r} expects images of shape {spec.image_shape} after preprocessing, "
                f"got {image.shape}"
            )
    return np.stack(out) if out else np.zeros((0, *spec.image_shape), np.uint8)
