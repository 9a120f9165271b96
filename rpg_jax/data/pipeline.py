"""Input pipelines: dataset metadata, train iterators, eval batches, predict preprocessing.

The host produces ``{"image": uint8 [b, H, W, C], "label": int32 [b]}`` batches;
normalisation ``(x / 255 - mean) / std`` is left to the device, using the
per-channel ``mean``/``std`` (0..1 units) of :class:`DatasetInfo`.

Train batches never carry a ``"mask"``: they are cut from an infinite,
reshuffled-every-epoch stream with ``drop_remainder``, so they are always full.
Eval batches always carry a float32 ``"mask"`` (1 real, 0 padding).

Multi-host: global batch ``k`` is stream positions ``[k * G, (k + 1) * G)``;
process ``p`` of ``P`` gets the contiguous ``p``-th ``G / P`` slice of it.

Augmentation (train only; eval is identity except ImageNet's resize/center crop):

* ``fashion_mnist``: zero-pad 2 px, random 28x28 crop, random horizontal flip.
  The garments fill the 28x28 frame with only a thin margin, so shifts of up to
  +-2 px (7 %) keep the object in view while the usual CIFAR pad of 4 px would
  cut off sleeves/soles. Mirroring does not change any of the 10 classes
  (clothes, shoes and bags have no left/right-specific class), whereas vertical
  flips or rotations would produce images unlike the test set.
* ``cifar10``, ``cifar100``, ``synthetic_cifar``: zero-pad 4 px, random 32x32
  crop, random horizontal flip (the standard ResNet-on-CIFAR recipe).
* ``imagenet2012``, ``synthetic_imagenet``: inception crop to 224 + flip; eval
  resizes the short side to 256 and center-crops 224.

All train randomness after grain's shuffle comes from 64 random bits hashed
from ``(seed, stream position)`` per example: crop+flip uses them directly on a
whole batch, the inception crop seeds a Philox generator with them. So a
batch's content does not depend on ``worker_count`` or ``process_count``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from rpg_jax.data import augment, hashing
from rpg_jax.data.fashion_mnist import load_fashion_mnist
from rpg_jax.data.sources import (
    ArraySource,
    SyntheticSource,
    tfds_source,
    to_uint8_image,
)

Batch = dict[str, np.ndarray]
PathLike = str | os.PathLike

_UNIFORM_MEAN = (0.5, 0.5, 0.5)
_UNIFORM_STD = (0.2898, 0.2898, 0.2898)  # std of uniform bytes / 255


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset as fed to the model.

    ``image_shape`` is (H, W, C) after host preprocessing; ``mean``/``std`` are
    per channel in 0..1 units; sizes come from ``len(source)`` of each split.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_train: int
    num_eval: int
    train_split: str
    eval_split: str


@dataclasses.dataclass(frozen=True)
class _Spec:
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

_SPECS: dict[str, _Spec] = {
    # Computed from the 60k training images (see tests/test_data.py).
    "fashion_mnist": _Spec(
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
    "cifar10": _Spec(
        kind="tfds",
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        **_CIFAR,
    ),
    "cifar100": _Spec(
        kind="tfds",
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        **_CIFAR,
    ),
    "imagenet2012": _Spec(
        kind="tfds",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        train_split="train",
        eval_split="validation",
        **_IMAGENET,
    ),
    "synthetic_cifar": _Spec(
        kind="synthetic",
        num_classes=10,
        mean=_UNIFORM_MEAN,
        std=_UNIFORM_STD,
        synthetic_sizes=(50_000, 10_000),
        **_CIFAR,
    ),
    "synthetic_imagenet": _Spec(
        kind="synthetic",
        mean=_UNIFORM_MEAN,
        std=_UNIFORM_STD,
        train_split="train",
        eval_split="test",
        synthetic_sizes=(1_281_167, 50_000),
        **_IMAGENET,
    ),
}

DATASET_NAMES: tuple[str, ...] = tuple(_SPECS)


def _spec(name: str) -> _Spec:
    if name not in _SPECS:
        raise ValueError(f"Unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    return _SPECS[name]


def _open_sources(
    name: str, data_dir: PathLike | None, synthetic_size: int | None
) -> tuple[Any, Any]:
    """Returns (train, eval) random-access sources; fails fast on missing data."""
    spec = _spec(name)
    if synthetic_size is not None and spec.kind != "synthetic":
        raise ValueError(f"synthetic_size only applies to synthetic_* datasets, not {name!r}")
    if spec.kind == "fashion_mnist":
        splits = load_fashion_mnist(data_dir)
        return ArraySource(*splits[spec.train_split]), ArraySource(*splits[spec.eval_split])
    if spec.kind == "tfds":
        return (
            tfds_source(name, spec.train_split, data_dir),
            tfds_source(name, spec.eval_split, data_dir),
        )
    n_train, n_eval = spec.synthetic_sizes
    if synthetic_size is not None:
        if synthetic_size < 1:
            raise ValueError(f"synthetic_size must be positive, got {synthetic_size}")
        n_train, n_eval = synthetic_size, min(synthetic_size, n_eval)
    return (
        SyntheticSource(n_train, spec.image_shape, spec.num_classes, seed=0),
        SyntheticSource(n_eval, spec.image_shape, spec.num_classes, seed=1),
    )


def dataset_info(
    name: str, data_dir: PathLike | None = None, *, synthetic_size: int | None = None
) -> DatasetInfo:
    """Returns :class:`DatasetInfo` for ``name``; raises early on a bad name or missing data."""
    spec = _spec(name)
    train, evaluation = _open_sources(name, data_dir, synthetic_size)
    return DatasetInfo(
        name=name,
        num_classes=spec.num_classes,
        image_shape=spec.image_shape,
        mean=spec.mean,
        std=spec.std,
        num_train=len(train),
        num_eval=len(evaluation),
        train_split=spec.train_split,
        eval_split=spec.eval_split,
    )


@dataclasses.dataclass(frozen=True, eq=False)
class _TrainBatch:
    """Reads and augments sub-batch ``index``: stream positions ``index * size + [0, size)``."""

    source: Any
    seed: int
    batch_size: int
    crop_pad: int | None  # None: per-example inception crop to ``image_size``
    image_size: int

    def __call__(self, index: int, indices: np.ndarray) -> Batch:
        start = index * self.batch_size
        positions = np.arange(start, start + self.batch_size, dtype=np.uint64)
        bits = hashing.example_bits(self.seed, positions)
        if self.crop_pad is not None:
            batch = self.source.read_batch(indices)
            image = augment.random_crop_flip_batch(batch["image"], bits, self.crop_pad)
            return {"image": image, "label": batch["label"]}
        images, labels = [], []
        for i, key in zip(indices.tolist(), bits.tolist(), strict=True):
            example = self.source[i]
            rng = np.random.Generator(np.random.Philox(key=key))
            images.append(augment.inception_crop(example["image"], rng, self.image_size))
            labels.append(example["label"])
        return {"image": np.stack(images), "label": np.array(labels, dtype=np.int32)}


def _check_sharding(global_batch_size: int, process_index: int, process_count: int) -> int:
    """Validates the multi-host layout and returns the per-host batch size."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index ({process_index}) < process_count ({process_count})"
        )
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size ({global_batch_size}) must be divisible by "
            f"process_count ({process_count})"
        )
    return global_batch_size // process_count


def _train_dataset(
    name: str,
    *,
    global_batch_size: int,
    seed: int,
    data_dir: PathLike | None,
    process_index: int,
    process_count: int,
    synthetic_size: int | None,
) -> grain.MapDataset:
    """Infinite map-style dataset of this host's train batches (index = host step)."""
    per_host = _check_sharding(global_batch_size, process_index, process_count)
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    spec = _spec(name)
    source, _ = _open_sources(name, data_dir, synthetic_size)
    if len(source) == 0:
        raise ValueError(f"{name!r} train split is empty")
    # Shuffle example indices rather than `MapDataset.source(source)`: grain's
    # source wrapper records metrics per element (~25 us), batch reads are vectorised.
    indices = grain.MapDataset.range(len(source)).seed(seed).shuffle().repeat(None)
    ds = indices.batch(per_host, drop_remainder=True, batch_fn=np.asarray)
    ds = ds.map_with_index(_TrainBatch(source, seed, per_host, spec.crop_pad, spec.image_shape[0]))
    # Sub-batch j (size G/P) is slice j % P of global batch j // P.
    return ds[process_index::process_count]


def make_train_iterator(
    name: str,
    *,
    global_batch_size: int,
    seed: int,
    data_dir: PathLike | None = None,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
    synthetic_size: int | None = None,
) -> grain.DatasetIterator:
    """Returns an infinite, checkpointable iterator of this host's train batches.

    Each batch is ``{"image": uint8 [G/P, H, W, C], "label": int32 [G/P]}`` (no
    mask). The order is reshuffled each epoch and fully determined by ``seed``.
    ``worker_count > 0`` uses that many grain worker processes (same batches).
    Save/restore with ``get_state()``/``set_state()`` or orbax via
    ``grain.checkpoint.CheckpointSave``/``CheckpointRestore``.
    """
    if worker_count < 0:
        raise ValueError(f"worker_count must be >= 0, got {worker_count}")
    ds = _train_dataset(
        name,
        global_batch_size=global_batch_size,
        seed=seed,
        data_dir=data_dir,
        process_index=process_index,
        process_count=process_count,
        synthetic_size=synthetic_size,
    )
    # Small images: numpy-bound, little to gain from threads beyond overlap with
    # the train step. ImageNet: JPEG decoding and resizing release the GIL.
    threads, buffered = (16, 16) if _spec(name).crop_pad is None else (2, 8)
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffered)
    it_ds = ds.to_iter_dataset(options)
    if worker_count > 0:
        # grain's worker start-up reads an absl flag; outside absl.app.run the
        # flags are unparsed, so adopt their defaults rather than crash.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(it_ds)


class EvalBatches:
    """One deterministic pass over an eval split per ``iter()``, sharded per host.

    Global batch ``k`` covers eval examples ``[k * G, (k + 1) * G)``; this host
    gets its ``G / P`` slice. Positions past the end are zero images with label 0
    and ``mask`` 0, so every host yields ``len(self)`` batches of the same shape
    and every example is counted exactly once across hosts.
    """

    def __init__(
        self,
        source: Any,
        transform: Callable[[np.ndarray], np.ndarray] | None,
        image_shape: tuple[int, int, int],
        per_host_batch: int,
        process_index: int,
        process_count: int,
    ):
        self.source = source
        self.num_examples = len(source)
        self._transform = transform
        self._image_shape = image_shape
        self._per_host = per_host_batch
        self._global = per_host_batch * process_count
        self._offset = process_index * per_host_batch
        self._num_batches = math.ceil(self.num_examples / self._global)

    def __len__(self) -> int:
        return self._num_batches

    def _batch(self, k: int) -> Batch:
        start = k * self._global + self._offset
        n = max(0, min(self._per_host, self.num_examples - start))
        images = np.zeros((self._per_host, *self._image_shape), np.uint8)
        labels = np.zeros(self._per_host, np.int32)
        mask = np.zeros(self._per_host, np.float32)
        mask[:n] = 1.0
        if self._transform is None:
            if n:
                batch = self.source.read_batch(np.arange(start, start + n))
                images[:n], labels[:n] = batch["image"], batch["label"]
        else:
            for j in range(n):
                example = self.source[start + j]
                images[j] = self._transform(example["image"])
                labels[j] = example["label"]
        return {"image": images, "label": labels, "mask": mask}

    def __iter__(self) -> Iterator[Batch]:
        ds = grain.MapDataset.range(self._num_batches).map(self._batch)
        options = grain.ReadOptions(num_threads=8, prefetch_buffer_size=8)
        return iter(ds.to_iter_dataset(options))


def _eval_transform(name: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """Per-image eval transform, or None when images are used as stored."""
    size = _spec(name).image_shape[0]
    if _spec(name).crop_pad is None:
        return lambda image: augment.resize_center_crop(image, 256, size)
    return None


def make_eval_batches(
    name: str,
    *,
    global_batch_size: int,
    data_dir: PathLike | None = None,
    process_index: int = 0,
    process_count: int = 1,
    synthetic_size: int | None = None,
) -> EvalBatches:
    """Returns an :class:`EvalBatches` iterable (one full pass per ``iter()``).

    Batches are ``{"image": uint8, "label": int32, "mask": float32}`` of size
    ``global_batch_size / process_count``; the last ones are padded (mask 0).
    ``synthetic_size`` caps the synthetic eval split (as in make_train_iterator).
    """
    per_host = _check_sharding(global_batch_size, process_index, process_count)
    spec = _spec(name)
    _, source = _open_sources(name, data_dir, synthetic_size)
    return EvalBatches(
        source, _eval_transform(name), spec.image_shape, per_host, process_index, process_count
    )


def preprocess_for_eval(name: str, images: np.ndarray | Sequence[Any]) -> np.ndarray:
    """Applies the host eval transform to raw images as the dataset stores them.

    ``images`` is a uint8 array [N, H, W, C] (or [N, H, W] for one channel) or
    a sequence of HxWxC uint8 arrays / encoded JPEG or PNG bytes (ImageNet images
    may differ in size). Returns uint8 [N, *image_shape] ready for normalisation.
    """
    spec = _spec(name)
    if isinstance(images, np.ndarray):
        if images.ndim == 3 and spec.image_shape[-1] == 1:
            images = images[..., None]
        if images.ndim != 4:
            raise ValueError(f"expected a batch [N, H, W, C] of images, got shape {images.shape}")
    transform = _eval_transform(name) or (lambda image: image)
    out = [transform(to_uint8_image(image)) for image in images]
    for image in out:
        if image.shape != spec.image_shape:
            raise ValueError(
                f"{name!r} expects images of shape {spec.image_shape} after preprocessing, "
                f"got {image.shape}"
            )
    return np.stack(out) if out else np.zeros((0, *spec.image_shape), np.uint8)
