"""Host input pipelines (grain + numpy; TensorFlow-free) for RPG training and evaluation.

The pipeline's names (``make_train_iterator``, ``dataset_info``, ...) import
``rpg_jax.data.pipeline``, and with it grain and Orbax, on first use (PEP 562), so a loaded
model needs neither: ``DatasetInfo``, the dataset catalog (names, eval preprocessing) and the
readers import without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rpg_jax.data.augment import (
    center_box,
    crop_flip_batch,
    inception_box,
    inception_crop,
    random_crop_flip,
    random_crop_flip_batch,
    resize_center_crop,
)
from rpg_jax.data.catalog import DATASET_NAMES, preprocess_for_eval
from rpg_jax.data.fashion_mnist import load_fashion_mnist, read_idx
from rpg_jax.data.info import DatasetInfo
from rpg_jax.data.jpeg import CorruptImageError
from rpg_jax.data.sources import (
    ArraySource,
    SyntheticSource,
    TfdsSource,
    tfds_source,
    write_tfds_split,
)

# the names rpg_jax.data.pipeline defines, bound on first use
_PIPELINE = (
    "DECODERS",
    "ON_CORRUPT",
    "EvalBatches",
    "dataset_info",
    "make_eval_batches",
    "make_train_iterator",
    "train_index_batches",
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

if TYPE_CHECKING:  # what static tools see; at run time __getattr__ imports on first use
    from rpg_jax.data.pipeline import (
        DECODERS,
        ON_CORRUPT,
        EvalBatches,
        dataset_info,
        make_eval_batches,
        make_train_iterator,
        train_index_batches,
    )


def __getattr__(name: str) -> Any:
    """A name of the pipeline (or the submodule itself), imported on first use."""
    if name not in (*_PIPELINE, "pipeline"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import rpg_jax.data.pipeline as pipeline  # binds the submodule "pipeline" here too

    globals().update({n: getattr(pipeline, n) for n in _PIPELINE})
    return globals()[name]


def __dir__() -> list[str]:
    """The public names (imported or not yet) and everything bound so far."""
    return sorted({*globals(), *__all__})
