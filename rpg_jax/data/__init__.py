"""Host input pipelines (grain + numpy; TensorFlow-free) for RPG training and evaluation."""

from rpg_jax.data.augment import (
    center_box,
    crop_flip_batch,
    inception_box,
    inception_crop,
    random_crop_flip,
    random_crop_flip_batch,
    resize_center_crop,
)
from rpg_jax.data.fashion_mnist import load_fashion_mnist, read_idx
from rpg_jax.data.jpeg import CorruptImageError
from rpg_jax.data.pipeline import (
    DATASET_NAMES,
    DECODERS,
    ON_CORRUPT,
    DatasetInfo,
    EvalBatches,
    dataset_info,
    make_eval_batches,
    make_train_iterator,
    preprocess_for_eval,
    train_index_batches,
)
from rpg_jax.data.sources import (
    ArraySource,
    SyntheticSource,
    TfdsSource,
    tfds_source,
    write_tfds_split,
)

__all__ = [
    "DATASET_NAMES",
    "DECODERS",
    "ON_CORRUPT",
    "CorruptImageError",
    "ArraySource",
    "DatasetInfo",
    "EvalBatches",
    "SyntheticSource",
    "TfdsSource",
    "center_box",
    "crop_flip_batch",
    "dataset_info",
    "inception_box",
    "inception_crop",
    "load_fashion_mnist",
    "make_eval_batches",
    "make_train_iterator",
    "preprocess_for_eval",
    "random_crop_flip",
    "random_crop_flip_batch",
    "read_idx",
    "resize_center_crop",
    "tfds_source",
    "train_index_batches",
    "write_tfds_split",
]
