"""Model zoo: plain Flax linen ResNets with torchvision-style parameter names."""

from rpg_jax.models.resnet import (
    MODEL_NAMES,
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
    get_model,
)

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
    "get_model",
]
