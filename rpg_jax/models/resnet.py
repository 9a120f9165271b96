"""Flax linen ResNets with torchvision-compatible structure and parameter names.

Parameter paths mirror torchvision's ``state_dict`` keys: the stem is ``conv1``/``bn1``,
blocks are ``layer{stage}_{block}`` (stage 1-based, block 0-based) containing
``conv1``/``bn1``/``conv2``/``bn2`` (+ ``conv3``/``bn3`` for bottlenecks) and the projection
shortcut ``downsample_conv``/``downsample_bn``; the classifier is ``fc``. Conv kernels are HWIO.
All padding is explicit and symmetric (as in PyTorch), never Flax ``"SAME"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any

#: Kaiming-normal, fan_out, as torchvision initialises conv kernels.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def scaled_channels(base: int, width: float) -> int:
    """Channel count ``base * width`` rounded to an int, at least 1."""
    return max(1, int(round(base * width)))


def _conv(features: int, kernel: int, strides: int, name: str, dtype: Dtype) -> nn.Conv:
    pad = (kernel - 1) // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=conv_kernel_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _norm(train: bool, name: str, dtype: Dtype, zero: bool = False) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        # E[(x - mean)^2], not E[x^2] - mean^2: the fast formula cancels badly, and with the
        # batch split over devices the gradients then differ from one device's by ~1e-3.
        use_fast_variance=False,
        scale_init=nn.initializers.zeros if zero else nn.initializers.ones,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class _Block(nn.Module):
    """Shared fields and shortcut logic of residual blocks."""

    planes: int
    strides: int = 1
    dtype: Dtype = jnp.float32
    zero_init_residual: bool = False
    expansion: ClassVar[int] = 1

    def _shortcut(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        out = self.planes * self.expansion
        if self.strides != 1 or x.shape[-1] != out:
            x = _conv(out, 1, self.strides, "downsample_conv", self.dtype)(x)
            x = _norm(train, "downsample_bn", self.dtype)(x)
        return x


class BasicBlock(_Block):
    """Two 3x3 convs (torchvision ``BasicBlock``)."""

    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        y = _conv(self.planes, 3, self.strides, "conv1", self.dtype)(x)
        y = nn.relu(_norm(train, "bn1", self.dtype)(y))
        y = _conv(self.planes, 3, 1, "conv2", self.dtype)(y)
        y = _norm(train, "bn2", self.dtype, self.zero_init_residual)(y)
        return nn.relu(y + self._shortcut(x, train))


class Bottleneck(_Block):
    """1x1 -> 3x3 (strided, v1.5) -> 1x1 x4 expansion (torchvision ``Bottleneck``)."""

    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        y = _conv(self.planes, 1, 1, "conv1", self.dtype)(x)
        y = nn.relu(_norm(train, "bn1", self.dtype)(y))
        y = _conv(self.planes, 3, self.strides, "conv2", self.dtype)(y)
        y = nn.relu(_norm(train, "bn2", self.dtype)(y))
        y = _conv(self.planes * self.expansion, 1, 1, "conv3", self.dtype)(y)
        y = _norm(train, "bn3", self.dtype, self.zero_init_residual)(y)
        return nn.relu(y + self._shortcut(x, train))


class ResNet(nn.Module):
    """Generic ResNet; defaults give ImageNet ResNet-18.

    ``stem="imagenet"``: 7x7/2 conv + BN + ReLU + 3x3/2 max-pool.
    ``stem="cifar"``: 3x3/1 conv + BN + ReLU, no pooling.
    Stage ``i`` has ``stage_sizes[i]`` blocks of ``stage_widths[i] * width`` planes; the first
    stage has stride 1, the others stride 2. Pooling and logits are float32 (float64 when
    ``dtype`` is float64).
    """

    block_cls: type[_Block] = BasicBlock
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    stage_widths: Sequence[int] = (64, 128, 256, 512)
    stem: str = "imagenet"
    stem_width: int = 64
    num_classes: int = 1000
    width: float | int = 1
    dtype: Dtype = jnp.float32
    zero_init_residual: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        stem_ch = scaled_channels(self.stem_width, self.width)
        if self.stem == "imagenet":
            x = _conv(stem_ch, 7, 2, "conv1", self.dtype)(x)
        elif self.stem == "cifar":
            x = _conv(stem_ch, 3, 1, "conv1", self.dtype)(x)
        else:
            raise ValueError(f"unknown stem {self.stem!r}; expected 'imagenet' or 'cifar'")
        x = nn.relu(_norm(train, "bn1", self.dtype)(x))
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, (n_blocks, base) in enumerate(zip(self.stage_sizes, self.stage_widths, strict=True)):
            for j in range(n_blocks):
                x = self.block_cls(
                    planes=scaled_channels(base, self.width),
                    strides=2 if (i > 0 and j == 0) else 1,
                    dtype=self.dtype,
                    zero_init_residual=self.zero_init_residual,
                    name=f"layer{i + 1}_{j}",
                )(x, train)
        wide = jnp.promote_types(self.dtype, jnp.float32)  # bf16 -> f32, f64 stays
        x = jnp.mean(x.astype(wide), axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="fc")(x)
        return x.astype(wide)


class ResNet18(ResNet):
    """ImageNet ResNet-18 (torchvision layout)."""

    stage_sizes: Sequence[int] = (2, 2, 2, 2)


class ResNet34(ResNet):
    """ImageNet ResNet-34 (torchvision layout)."""

    stage_sizes: Sequence[int] = (3, 4, 6, 3)


class ResNet50(ResNet):
    """ImageNet ResNet-50 v1.5 (stride on the 3x3 conv; torchvision layout)."""

    block_cls: type[_Block] = Bottleneck
    stage_sizes: Sequence[int] = (3, 4, 6, 3)


class _CifarResNet(ResNet):
    """CIFAR ResNet (He et al. 2016): 3 stages of 16/32/64 channels, option-B shortcuts."""

    stage_sizes: Sequence[int] = (3, 3, 3)
    stage_widths: Sequence[int] = (16, 32, 64)
    stem: str = "cifar"
    stem_width: int = 16
    num_classes: int = 10


class ResNet20(_CifarResNet):
    """CIFAR ResNet-20 (3 basic blocks per stage)."""

    stage_sizes: Sequence[int] = (3, 3, 3)


class ResNet32(_CifarResNet):
    """CIFAR ResNet-32 (5 basic blocks per stage)."""

    stage_sizes: Sequence[int] = (5, 5, 5)


class ResNet56(_CifarResNet):
    """CIFAR ResNet-56 (9 basic blocks per stage)."""

    stage_sizes: Sequence[int] = (9, 9, 9)


class ResNet110(_CifarResNet):
    """CIFAR ResNet-110 (18 basic blocks per stage)."""

    stage_sizes: Sequence[int] = (18, 18, 18)


class CifarResNet18(ResNet):
    """ResNet-18 for 32x32 inputs: 3x3/1 stem with 64 channels, no max-pool."""

    stem: str = "cifar"
    num_classes: int = 10


_MODELS: dict[str, type[ResNet]] = {
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "resnet20": ResNet20,
    "resnet32": ResNet32,
    "resnet56": ResNet56,
    "resnet110": ResNet110,
    "cifar_resnet18": CifarResNet18,
}

#: Valid names for :func:`get_model`.
MODEL_NAMES: tuple[str, ...] = tuple(_MODELS)


def get_model(name: str, **kwargs: Any) -> ResNet:
    """Instantiate a model by case-insensitive name, e.g. ``get_model("resnet20", width=2)``."""
    key = name.strip().lower()
    if key not in _MODELS:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    return _MODELS[key](**kwargs)
