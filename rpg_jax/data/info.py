"""``DatasetInfo``, the static description of a dataset that travels with a trained model
(checkpoints, exported files). Plain Python: importing it needs neither grain nor NumPy."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


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

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict, ready for JSON (which stores the tuples as lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> DatasetInfo:
        """The inverse of ``to_dict``, also after a JSON round trip (lists become tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
