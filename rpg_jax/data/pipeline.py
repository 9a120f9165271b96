"""Input pipelines: dataset metadata, train iterators and eval batches.

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
  resizes the short side to 256 and center-crops 224. ``decoder`` says how JPEGs
  become pixels: ``"turbo"`` (default: crop window from the header, DCT-domain
  downscale, uint8 bilinear warp; see :mod:`rpg_jax.data.jpeg`), ``"pil"`` (full
  Pillow decode, then Pillow's antialiased resize of the box) or, for training on an
  NVIDIA GPU, ``"dali"`` (:mod:`rpg_jax.data.dali`; eval then uses ``"turbo"``).
  Every decoder draws the same crop box and flip for a stream position.
  ``on_corrupt``: ``"error"`` raises :class:`~rpg_jax.data.jpeg.CorruptImageError`
  naming the record; ``"skip"`` logs a warning naming it and, in training, uses the
  next readable record in index order instead (deterministic), in eval masks it out.

All train randomness after grain's shuffle comes from 64 random bits hashed
from ``(seed, stream position)`` per example: crop+flip uses them directly on a
whole batch, the inception crop seeds a Philox generator with them. So a
batch's content does not depend on ``worker_count`` or ``process_count``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grain
import numpy as np
from absl import flags

from rpg_jax.data import augment, catalog, hashing, jpeg
from rpg_jax.data.fashion_mnist import load_fashion_mnist
from rpg_jax.data.info import DatasetInfo
from rpg_jax.data.sources import (
    ArraySource,
    SyntheticSource,
    slice_source,
    tfds_source,
    to_uint8_image,
)

Batch = dict[str, np.ndarray]
PathLike = str | os.PathLike

DECODERS = ("turbo", "pil", "dali")
ON_CORRUPT = ("error", "skip")
_log = logging.getLogger(__name__)

def _check_decoding(decoder: str, on_corrupt: str) -> None:
    if decoder not in DECODERS:
        raise ValueError(f"decoder={decoder!r}: expected one of {DECODERS}")
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"on_corrupt={on_corrupt!r}: expected one of {ON_CORRUPT}")


def _open_sources(
    name: str, data_dir: PathLike | None, synthetic_size: int | None, encoded: bool = False,
    holdout: int = 0,
) -> tuple[Any, Any]:
    """Returns (train, eval) random-access sources; fails fast on missing data.

    ``encoded``: TFDS image splits are read without decoding (for the JPEG path).
    ``holdout > 0``: the eval source is the last ``holdout`` examples of the train split and
    the train source the ones before them (the eval split is not opened).
    """
    spec = catalog.entry(name)
    if synthetic_size is not None and spec.kind != "synthetic":
        raise ValueError(f"synthetic_size only applies to synthetic_* datasets, not {name!r}")
    if isinstance(holdout, bool) or not isinstance(holdout, int) or holdout < 0:
        raise ValueError(f"holdout={holdout!r}: expected a non-negative int (0 = none)")
    train, evaluation = _open_splits(spec, name, data_dir, synthetic_size, encoded,
                                     with_eval=holdout == 0)
    if holdout == 0:
        return train, evaluation
    n = len(train)
    if holdout >= n:
        raise ValueError(f"holdout={holdout}: expected fewer than the {n} examples of "
                         f"{name!r}'s train split")
    return slice_source(train, 0, n - holdout), slice_source(train, n - holdout, n)


def _open_splits(spec: catalog.DatasetEntry, name: str, data_dir: PathLike | None,
                 synthetic_size: int | None, encoded: bool, with_eval: bool) -> tuple[Any, Any]:
    """The catalog's (train, eval) splits of ``name``; eval is None unless ``with_eval``."""
    if spec.kind == "fashion_mnist":
        splits = load_fashion_mnist(data_dir)
        return (ArraySource(*splits[spec.train_split]),
                ArraySource(*splits[spec.eval_split]) if with_eval else None)
    if spec.kind == "tfds":
        encoded = encoded and spec.crop_pad is None  # image datasets read their bytes
        return (
            tfds_source(name, spec.train_split, data_dir, encoded=encoded),
            tfds_source(name, spec.eval_split, data_dir, encoded=encoded) if with_eval else None,
        )
    n_train, n_eval = spec.synthetic_sizes
    if synthetic_size is not None:
        if synthetic_size < 1:
            raise ValueError(f"synthetic_size must be positive, got {synthetic_size}")
        n_train, n_eval = synthetic_size, min(synthetic_size, n_eval)
    return (
        SyntheticSource(n_train, spec.image_shape, spec.num_classes, seed=0),
        SyntheticSource(n_eval, spec.image_shape, spec.num_classes, seed=1) if with_eval else None,
    )


def dataset_info(
    name: str, data_dir: PathLike | None = None, *, synthetic_size: int | None = None,
    holdout: int = 0,
) -> DatasetInfo:
    """Returns :class:`DatasetInfo` for ``name``; raises early on a bad name or missing data.

    With ``holdout`` the splits are named as TFDS slices: ``train[:-N]`` and ``train[-N:]``.
    """
    spec = catalog.entry(name)
    train, evaluation = _open_sources(name, data_dir, synthetic_size, holdout=holdout)
    train_split, eval_split = spec.train_split, spec.eval_split
    if holdout:
        train_split, eval_split = f"{train_split}[:-{holdout}]", f"{train_split}[-{holdout}:]"
    return DatasetInfo(
        name=name,
        num_classes=spec.num_classes,
        image_shape=spec.image_shape,
        mean=spec.mean,
        std=spec.std,
        num_train=len(train),
        num_eval=len(evaluation),
        train_split=train_split,
        eval_split=eval_split,
    )


def _decode_reference(image: Any) -> np.ndarray:
    """Pillow decode (encoded bytes) or the array itself, as RGB uint8 HxWx3."""
    try:
        image = to_uint8_image(image)
    except (OSError, SyntaxError) as e:  # what Pillow raises for unreadable data
        raise jpeg.CorruptImageError(f"undecodable image ({type(e).__name__}: {e})") from e
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


class _ImageReader:
    """Reads, decodes and crops one ImageNet-style example into a preallocated slot.

    Sources with ``read_encoded`` (TFDS opened with ``encoded=True``) give the stored
    bytes: ``decoder="turbo"`` takes the fast path, ``"pil"`` decodes them fully with
    Pillow and applies the reference transforms, as arrays from other sources get.
    Picklable (grain workers); counts skipped records.
    """

    def __init__(self, source: Any, size: int, decoder: str, on_corrupt: str):
        self.source = source
        self.size = size
        self.fast = decoder != "pil"
        self.on_corrupt = on_corrupt
        self.skipped = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _read(self, index: int) -> tuple[Any, int, str]:
        if hasattr(self.source, "read_encoded"):
            return self.source.read_encoded(index)
        example = self.source[index]
        return example["image"], example["label"], f"example {index}"

    def _transform(self, index: int, key: int | None, out: np.ndarray) -> int:
        """Writes example ``index`` (train crop from Philox ``key``, eval if None) to ``out``."""
        image, label, where = self._read(index)
        try:
            if self.fast and isinstance(image, bytes | bytearray | memoryview):
                image = bytes(image)
                header = jpeg.image_size(image)
                h, w = header[:2]
                if key is None:
                    box, flip = augment.center_box(h, w, 256, self.size), False
                else:
                    rng = np.random.Generator(np.random.Philox(key=key))
                    x, y, cw, ch = augment.inception_box(h, w, rng)
                    box, flip = (x, y, x + cw, y + ch), bool(rng.random() < 0.5)
                jpeg.decode_box(image, box, self.size, flip, out=out, header=header)
            else:
                image = _decode_reference(image)
                if key is None:
                    out[...] = augment.resize_center_crop(image, 256, self.size)
                else:
                    rng = np.random.Generator(np.random.Philox(key=key))
                    out[...] = augment.inception_crop(image, rng, self.size)
        except jpeg.CorruptImageError as e:
            raise jpeg.CorruptImageError(f"{where}: {e}") from e
        return int(label)

    def _skip(self, error: jpeg.CorruptImageError) -> None:
        with self._lock:
            self.skipped += 1
            count = self.skipped
        _log.warning("Skipping a corrupt image (%d skipped in this process): %s", count, error)

    def train(self, index: int, key: int, out: np.ndarray) -> int:
        """Train crop of ``index``; when skipping, the next readable record stands in."""
        n = len(self.source)
        for offset in range(n):
            try:
                return self._transform((index + offset) % n, key, out)
            except jpeg.CorruptImageError as e:
                if self.on_corrupt == "error":
                    raise
                self._skip(e)
        raise jpeg.CorruptImageError(f"no readable image in the {n} records of {self.source!r}")

    def eval(self, index: int, out: np.ndarray) -> int | None:
        """Eval crop of ``index``; None (and a zero image) when it was skipped."""
        try:
            return self._transform(index, None, out)
        except jpeg.CorruptImageError as e:
            if self.on_corrupt == "error":
                raise
            self._skip(e)
            out[...] = 0
            return None


@dataclasses.dataclass(frozen=True, eq=False)
class _TrainBatch:
    """Reads and augments sub-batch ``index``: stream positions ``index * size + [0, size)``."""

    source: Any
    seed: int
    batch_size: int
    crop_pad: int | None  # None: per-example inception crop to ``image_size``
    image_size: int
    reader: _ImageReader | None = None  # set when crop_pad is None

    def __call__(self, index: int, indices: np.ndarray) -> Batch:
        start = index * self.batch_size
        positions = np.arange(start, start + self.batch_size, dtype=np.uint64)
        bits = hashing.example_bits(self.seed, positions)
        if self.crop_pad is not None:
            batch = self.source.read_batch(indices)
            image = augment.random_crop_flip_batch(batch["image"], bits, self.crop_pad)
            return {"image": image, "label": batch["label"]}
        images = np.empty((self.batch_size, self.image_size, self.image_size, 3), np.uint8)
        labels = np.empty(self.batch_size, np.int32)
        for j, (i, key) in enumerate(zip(indices.tolist(), bits.tolist(), strict=True)):
            labels[j] = self.reader.train(i, key, images[j])
        return {"image": images, "label": labels}


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


def train_index_batches(num_examples: int, batch_size: int, seed: int) -> grain.MapDataset:
    """Infinite dataset of shuffled example-index batches (int64 [batch_size]) per host step.

    Reshuffled every epoch from ``seed``; shared by the host and DALI train paths.
    """
    # Shuffle example indices rather than `MapDataset.source(source)`: grain's
    # source wrapper records metrics per element (~25 us), batch reads are vectorised.
    indices = grain.MapDataset.range(num_examples).seed(seed).shuffle().repeat(None)
    return indices.batch(batch_size, drop_remainder=True, batch_fn=np.asarray)


def _train_dataset(
    name: str,
    *,
    global_batch_size: int,
    seed: int,
    data_dir: PathLike | None,
    process_index: int,
    process_count: int,
    synthetic_size: int | None,
    decoder: str = "turbo",
    on_corrupt: str = "error",
    holdout: int = 0,
) -> grain.MapDataset:
    """Infinite map-style dataset of this host's train batches (index = host step)."""
    per_host = _check_sharding(global_batch_size, process_index, process_count)
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    _check_decoding(decoder, on_corrupt)
    spec = catalog.entry(name)
    source, _ = _open_sources(name, data_dir, synthetic_size, encoded=True, holdout=holdout)
    if len(source) == 0:
        raise ValueError(f"{name!r} train split is empty")
    ds = train_index_batches(len(source), per_host, seed)
    size = spec.image_shape[0]
    reader = None if spec.crop_pad is not None else _ImageReader(source, size, decoder, on_corrupt)
    ds = ds.map_with_index(_TrainBatch(source, seed, per_host, spec.crop_pad, size, reader))
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
    decoder: str = "turbo",
    on_corrupt: str = "error",
    holdout: int = 0,
) -> grain.DatasetIterator:
    """Returns an infinite, checkpointable iterator of this host's train batches.

    Each batch is ``{"image": uint8 [G/P, H, W, C], "label": int32 [G/P]}`` (no
    mask). The order is reshuffled each epoch and fully determined by ``seed``.
    ``worker_count > 0`` uses that many grain worker processes (same batches).
    ``decoder``/``on_corrupt``: see the module docstring (``"dali"`` returns the
    iterator of :func:`rpg_jax.data.dali.make_dali_train_iterator`, with batches
    on the GPU). Save/restore with ``get_state()``/``set_state()`` or orbax via
    ``grain.checkpoint.CheckpointSave``/``CheckpointRestore``. ``holdout > 0`` trains on
    all but the last ``holdout`` examples of the train split (see :func:`make_eval_batches`).
    """
    if worker_count < 0:
        raise ValueError(f"worker_count must be >= 0, got {worker_count}")
    _check_decoding(decoder, on_corrupt)
    if decoder == "dali":
        from rpg_jax.data import dali

        return dali.make_dali_train_iterator(
            name, global_batch_size=global_batch_size, seed=seed, data_dir=data_dir,
            process_index=process_index, process_count=process_count,
            on_corrupt=on_corrupt, holdout=holdout)
    ds = _train_dataset(
        name,
        global_batch_size=global_batch_size,
        seed=seed,
        data_dir=data_dir,
        process_index=process_index,
        process_count=process_count,
        synthetic_size=synthetic_size,
        decoder=decoder,
        on_corrupt=on_corrupt,
        holdout=holdout,
    )
    # Small images: numpy-bound, little to gain from threads beyond overlap with
    # the train step. ImageNet: JPEG decoding and resizing release the GIL.
    threads, buffered = (16, 16) if catalog.entry(name).crop_pad is None else (2, 8)
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffered)
    return iter(_with_workers(ds.to_iter_dataset(options), worker_count))


def _with_workers(ds: grain.IterDataset, worker_count: int) -> grain.IterDataset:
    """``ds`` produced by ``worker_count`` grain processes (0: in this process)."""
    if worker_count == 0:
        return ds
    # grain's worker start-up reads an absl flag; outside absl.app.run the
    # flags are unparsed, so adopt their defaults rather than crash.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))


class EvalBatches:
    """One deterministic pass over an eval split per ``iter()``, sharded per host.

    Global batch ``k`` covers eval examples ``[k * G, (k + 1) * G)``; this host
    gets its ``G / P`` slice. Positions past the end are zero images with label 0
    and ``mask`` 0, so every host yields ``len(self)`` batches of the same shape
    and every example is counted exactly once across hosts. With a ``reader``
    (ImageNet-style data) a skipped corrupt image also gets ``mask`` 0; ``skipped``
    counts them.
    """

    def __init__(
        self,
        source: Any,
        transform: Callable[[np.ndarray], np.ndarray] | None,
        image_shape: tuple[int, int, int],
        per_host_batch: int,
        process_index: int,
        process_count: int,
        reader: _ImageReader | None = None,
        worker_count: int = 0,
    ):
        if worker_count < 0:
            raise ValueError(f"worker_count must be >= 0, got {worker_count}")
        self.worker_count = worker_count
        self.source = source
        self._reader = reader
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
        if self._reader is not None:
            for j in range(n):
                label = self._reader.eval(start + j, images[j])
                labels[j], mask[j] = (0, 0.0) if label is None else (label, 1.0)
        elif self._transform is None:
            if n:
                batch = self.source.read_batch(np.arange(start, start + n))
                images[:n], labels[:n] = batch["image"], batch["label"]
        else:
            for j in range(n):
                example = self.source[start + j]
                images[j] = self._transform(example["image"])
                labels[j] = example["label"]
        return {"image": images, "label": labels, "mask": mask}

    @property
    def skipped(self) -> int:
        """Corrupt images skipped (masked out) so far by this process's passes."""
        return 0 if self._reader is None else self._reader.skipped

    def __iter__(self) -> Iterator[Batch]:
        ds = grain.MapDataset.range(self._num_batches).map(self._batch)
        options = grain.ReadOptions(num_threads=8, prefetch_buffer_size=8)
        return iter(_with_workers(ds.to_iter_dataset(options), self.worker_count))


def make_eval_batches(
    name: str,
    *,
    global_batch_size: int,
    data_dir: PathLike | None = None,
    process_index: int = 0,
    process_count: int = 1,
    synthetic_size: int | None = None,
    decoder: str = "turbo",
    on_corrupt: str = "error",
    worker_count: int = 0,
    holdout: int = 0,
) -> EvalBatches:
    """Returns an :class:`EvalBatches` iterable (one full pass per ``iter()``).

    Batches are ``{"image": uint8, "label": int32, "mask": float32}`` of size
    ``global_batch_size / process_count``; the last ones are padded (mask 0).
    ``synthetic_size`` caps the synthetic eval split (as in make_train_iterator).
    ``decoder``/``on_corrupt``/``worker_count`` as there (``"dali"`` evaluates with
    ``"turbo"``). ``holdout > 0`` evaluates the last ``holdout`` examples of the train
    split (with the eval preprocessing) instead of the eval split: a validation set for
    tuning that leaves the test set unseen.
    """
    per_host = _check_sharding(global_batch_size, process_index, process_count)
    _check_decoding(decoder, on_corrupt)
    spec = catalog.entry(name)
    _, source = _open_sources(name, data_dir, synthetic_size, encoded=True, holdout=holdout)
    reader = None
    if spec.crop_pad is None:
        reader = _ImageReader(source, spec.image_shape[0], decoder, on_corrupt)
    return EvalBatches(
        source, catalog.eval_transform(name), spec.image_shape, per_host, process_index,
        process_count, reader, worker_count,
    )
