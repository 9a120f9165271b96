"""Random-access data sources yielding ``{"image": uint8 HxWxC, "label": int}``.

All sources follow grain's ``RandomAccessDataSource`` protocol (``__len__`` and
``__getitem__``), add ``read_batch(indices)`` returning stacked uint8 images and
int32 labels, and are picklable (for grain worker processes) and deterministic.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from typing import Any

import numpy as np
from PIL import Image

from rpg_jax.data import hashing

Example = dict[str, Any]
Batch = dict[str, np.ndarray]

TFDS_DATASETS = ("cifar10", "cifar100", "imagenet2012")

_TFDS_HOW_TO_PREPARE = {
    "cifar10": (
        "On a machine with network access and TensorFlow installed run "
        "`tfds build cifar10 --file_format=array_record --data_dir=<dir>` and copy "
        "<dir>/cifar10 into this data_dir."
    ),
    "cifar100": (
        "On a machine with network access and TensorFlow installed run "
        "`tfds build cifar100 --file_format=array_record --data_dir=<dir>` and copy "
        "<dir>/cifar100 into this data_dir."
    ),
    "imagenet2012": (
        "Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from image-net.org "
        "into a manual dir, then on a machine with TensorFlow installed run "
        "`tfds build imagenet2012 --file_format=array_record --manual_dir=<manual_dir> "
        "--data_dir=<dir>` and copy <dir>/imagenet2012 into this data_dir."
    ),
}


class ArraySource:
    """In-memory source over ``images`` uint8 [N, H, W, C] and integer ``labels`` [N]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"labels must be [N={len(images)}], got shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got {labels.dtype}")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Example:
        return {"image": self.images[index], "label": int(self.labels[index])}

    def read_batch(self, indices: np.ndarray) -> Batch:
        """Returns ``{"image": uint8 [n, H, W, C], "label": int32 [n]}`` for ``indices``."""
        indices = np.asarray(indices, dtype=np.intp)
        return {"image": self.images[indices], "label": self.labels[indices].astype(np.int32)}

    def __repr__(self) -> str:
        return f"ArraySource(n={len(self)}, image_shape={self.images.shape[1:]})"


class SyntheticSource:
    """Deterministic uniform-noise images and random labels, for throughput runs.

    To stay cheap at ImageNet scale the images come from a lazily generated pool
    of at most ~16 MB of distinct noise images; example ``i`` gets the pool image
    and label picked by a hash of ``(seed, i)``, so every index is deterministic.
    """

    _POOL_BYTES = 16 << 20

    def __init__(
        self,
        num_examples: int,
        image_shape: tuple[int, int, int],
        num_classes: int,
        seed: int = 0,
    ):
        if num_examples < 0 or num_classes < 1 or len(image_shape) != 3:
            raise ValueError(
                f"bad SyntheticSource({num_examples=}, {image_shape=}, {num_classes=})"
            )
        self.num_examples = int(num_examples)
        self.image_shape = tuple(int(d) for d in image_shape)
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self._key = hashing.seed_key(self.seed, stream=1)  # picks pool image and label
        image_bytes = int(np.prod(self.image_shape))
        self._pool_size = max(1, min(self.num_examples, self._POOL_BYTES // image_bytes))
        self._pool: np.ndarray | None = None

    def _make_pool(self) -> np.ndarray:
        nbytes = self._pool_size * int(np.prod(self.image_shape))
        counters = np.arange((nbytes + 7) // 8, dtype=np.uint64)
        words = hashing.example_bits(self.seed, counters, stream=2)
        return words.view(np.uint8)[:nbytes].reshape((self._pool_size, *self.image_shape))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pool": None}  # regenerated lazily, never pickled

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> Example:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range [0, {self.num_examples})")
        batch = self.read_batch(np.array([index]))
        return {"image": batch["image"][0], "label": int(batch["label"][0])}

    def read_batch(self, indices: np.ndarray) -> Batch:
        """Returns ``{"image": uint8 [n, H, W, C], "label": int32 [n]}`` for ``indices``."""
        if self._pool is None:
            self._pool = self._make_pool()
        h = hashing.splitmix64(np.uint64(self._key) + np.asarray(indices, dtype=np.uint64))
        return {
            "image": self._pool[(h % np.uint64(self._pool_size)).astype(np.intp)],
            "label": ((h >> np.uint64(32)) % np.uint64(self.num_classes)).astype(np.int32),
        }

    def __repr__(self) -> str:
        return (
            f"SyntheticSource(n={self.num_examples}, image_shape={self.image_shape}, "
            f"num_classes={self.num_classes}, seed={self.seed})"
        )


def to_uint8_image(image: Any) -> np.ndarray:
    """Returns an HxWxC uint8 array from a decoded array or encoded JPEG/PNG bytes (as RGB)."""
    if isinstance(image, bytes | bytearray | memoryview):
        with Image.open(io.BytesIO(image)) as pil:
            image = np.asarray(pil.convert("RGB"))
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"expected a uint8 HxWxC image, got {image.dtype} {image.shape}")
    return image


def _from_record(record: dict[str, Any]) -> Example:
    return {"image": to_uint8_image(record["image"]), "label": int(record["label"])}


class TfdsSource:
    """Wraps a ``tfds.data_source`` split, normalising records to image/label examples.

    With ``encoded=True`` the source was opened without image decoding:
    :meth:`read_encoded` returns the stored bytes for the fast JPEG path, and
    ``source[i]`` still decodes (with Pillow) for callers that want arrays.
    """

    def __init__(self, name: str, split: str, data_source: Any, encoded: bool = False):
        self.name = name
        self.split = split
        self.encoded = encoded
        self._source = data_source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Example:
        return _from_record(self._source[index])

    def read_encoded(self, index: int) -> tuple[bytes | np.ndarray, int, str]:
        """Returns ``(image, label, record name)``: the image as stored (bytes when encoded).

        The record name is ``"<name>/<split>[index]"`` plus the stored file name, if any.
        """
        record = self._source[index]
        image = record["image"]
        if isinstance(image, np.ndarray) and image.dtype == object:
            image = image.item()  # SkipDecoding yields a 0-d object array on some versions
        where = f"{self.name}/{self.split}[{index}]"
        file_name = record.get("file_name")
        if file_name is not None:
            if isinstance(file_name, np.ndarray):
                file_name = file_name.item()
            if isinstance(file_name, bytes):
                file_name = file_name.decode("utf-8", "replace")
            where += f" ({file_name})"
        return image, int(record["label"]), where

    def read_batch(self, indices: np.ndarray) -> Batch:
        """Reads and stacks ``indices``; images must all have the same shape.

        Reads one record at a time: ``tfds.testing.mock_data`` breaks ``__getitems__``.
        """
        examples = [self[int(i)] for i in indices]
        return {
            "image": np.stack([e["image"] for e in examples]),
            "label": np.array([e["label"] for e in examples], dtype=np.int32),
        }

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, n={len(self)})"


def _check_slice(source: Any, start: int, stop: int) -> None:
    if not 0 <= start <= stop <= len(source):
        raise ValueError(f"slice [{start}:{stop}] of a source of {len(source)} examples")


class SliceSource:
    """Examples ``start .. stop - 1`` of another source, renumbered from 0 (a held-out
    part of a train split, or the rest of it); picklable when the source is."""

    def __init__(self, source: Any, start: int, stop: int):
        _check_slice(source, start, stop)
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def _index(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        return self.start + index

    def __getitem__(self, index: int) -> Example:
        return self.source[self._index(int(index))]

    def read_batch(self, indices: np.ndarray) -> Batch:
        indices = np.asarray(indices, dtype=np.intp)
        if indices.size and not (0 <= indices.min() and indices.max() < len(self)):
            raise IndexError(f"indices out of range for {len(self)} examples")
        return self.source.read_batch(indices + self.start)

    def __repr__(self) -> str:
        return f"SliceSource({self.source!r}[{self.start}:{self.stop}])"


class EncodedSliceSource(SliceSource):
    """A :class:`SliceSource` of a source that reads stored bytes (``read_encoded``)."""

    def read_encoded(self, index: int) -> tuple[bytes | np.ndarray, int, str]:
        return self.source.read_encoded(self._index(int(index)))


def slice_source(source: Any, start: int, stop: int) -> Any:
    """Examples ``start .. stop - 1`` of ``source`` as a source of its own (an in-memory
    source is sliced without a copy)."""
    if isinstance(source, ArraySource):
        _check_slice(source, start, stop)
        return ArraySource(source.images[start:stop], source.labels[start:stop])
    if hasattr(source, "read_encoded"):
        return EncodedSliceSource(source, start, stop)
    return SliceSource(source, start, stop)


def check_tfds_name(name: str) -> None:
    """Raises ValueError listing the supported TFDS names when ``name`` is not one."""
    if name not in TFDS_DATASETS:
        raise ValueError(f"Unknown TFDS dataset {name!r}; valid names: {', '.join(TFDS_DATASETS)}")


def tfds_source(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    encoded: bool = False,
) -> TfdsSource:
    """Opens a prepared ``array_record`` TFDS split as a random-access source.

    ``encoded=True`` skips image decoding on read (see :meth:`TfdsSource.read_encoded`)
    where TFDS can (``tfds.testing.mock_data`` without TensorFlow cannot: the
    source then yields decoded arrays, which the pipelines accept as well).

    Never downloads or prepares anything: the dataset must already be built in
    ``data_dir`` (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). Raises
    ValueError for an unsupported name and FileNotFoundError, saying how to
    prepare the data, when the split is not there in ``array_record`` format.
    """
    check_tfds_name(name)
    import tensorflow_datasets as tfds  # lazy: costs ~0.3 s and is only needed here

    def open_split(skip_decoding: bool) -> Any:
        return tfds.data_source(
            name,
            split=split,
            data_dir=None if data_dir is None else os.fspath(data_dir),
            download=False,
            builder_kwargs={"file_format": "array_record"},
            decoders={"image": tfds.decode.SkipDecoding()} if skip_decoding else None,
        )

    try:
        source = open_split(encoded)
        if encoded and len(source):
            try:
                source[0]
            except ModuleNotFoundError:  # mock data re-encodes through TensorFlow
                source, encoded = open_split(False), False
    except (KeyError, FileNotFoundError, NotImplementedError, ValueError) as e:
        where = data_dir if data_dir is not None else tfds.core.constants.DATA_DIR
        raise FileNotFoundError(
            f"TFDS dataset {name!r} split {split!r} is not prepared in array_record format "
            f"under data_dir {os.fspath(where)!r} ({type(e).__name__}: {e}). "
            f"{_TFDS_HOW_TO_PREPARE[name]}"
        ) from e
    return TfdsSource(name, split, source, encoded=encoded)


def write_tfds_split(
    name: str,
    data_dir: str | os.PathLike,
    splits: dict[str, Iterable[dict[str, Any]]],
) -> str:
    """Writes examples as a prepared ``array_record`` TFDS dataset, without TensorFlow.

    ``splits`` maps a split name to its examples, each a dict of the dataset's
    features (for ``imagenet2012``: ``{"image": JPEG bytes, "label": int,
    "file_name": str}``; encoded bytes are stored as they are). The files land
    where ``tfds.data_source(name, data_dir=data_dir)`` reads them, one shard
    per split. Returns the dataset's version directory.
    """
    check_tfds_name(name)
    import tensorflow_datasets as tfds
    from array_record.python import array_record_module

    builder = tfds.builder(name, data_dir=os.fspath(data_dir), file_format="array_record")
    os.makedirs(builder.data_dir, exist_ok=True)
    infos = []
    for split, examples in splits.items():
        path = os.path.join(builder.data_dir, f"{name}-{split}.array_record-00000-of-00001")
        writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
        n = 0
        try:
            for example in examples:
                if isinstance(example.get("image"), bytes | bytearray):
                    example = {**example, "image": io.BytesIO(example["image"])}
                writer.write(builder.info.features.serialize_example(example))
                n += 1
        finally:
            writer.close()
        template = tfds.core.ShardedFileTemplate(
            data_dir=builder.data_dir,
            template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
            dataset_name=name,
            split=split,
            filetype_suffix="array_record",
        )
        infos.append(
            tfds.core.SplitInfo(
                name=split, shard_lengths=[n], num_bytes=os.path.getsize(path),
                filename_template=template,
            )
        )
    builder.info.set_splits(tfds.core.SplitDict(infos))
    builder.info.write_to_directory(builder.data_dir)
    return os.fspath(builder.data_dir)
