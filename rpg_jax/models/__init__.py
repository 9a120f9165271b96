"""Model zoo: plain Flax linen ResNets with torchvision-style parameter names, and a ViT."""

from typing import Any

import flax.linen as nn

from rpg_jax.models import resnet
from rpg_jax.models.resnet import (
    BasicBlock,
    Bottleneck,
    CifarResNet18,
    ResNet,
    ResNet18,
    ResNet20,
    ResNet32,
    ResNet34,
    ResNet50,
    ResNet56,
    ResNet110,
)
from rpg_jax.models.vit import ViT

#: Valid names for :func:`get_model`: the ResNets, and ``"vit"`` (shape from its kwargs).
MODEL_NAMES: tuple[str, ...] = (*resnet.MODEL_NAMES, "vit")


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate a model by case-insensitive name, e.g. ``get_model("resnet20", width=2)``
    or ``get_model("vit", width=128, depth=6, num_heads=4, patch_size=4)``."""
    key = name.strip().lower()
    if key not in MODEL_NAMES:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    if key == "vit":
        return ViT(**kwargs)
    return resnet.get_model(key, **kwargs)


__all__ = [
    "MODEL_NAMES",
    "BasicBlock",
    "Bottleneck",
    "CifarResNet18",
    "ResNet",
    "ResNet18",
    "ResNet20",
    "ResNet32",
    "ResNet34",
    "ResNet50",
    "ResNet56",
    "ResNet110",
    "ViT",
    "get_model",
]
