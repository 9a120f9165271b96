"""A Flax linen Vision Transformer (Dosovitskiy et al. 2021) with pre-LayerNorm blocks.

Parameter paths: the patch embedding ``patch_embed`` (a conv with kernel = stride = patch),
``cls_token`` and ``pos_embedding``, blocks ``block_{i}`` holding ``norm1``, ``attention``
(``nn.MultiHeadDotProductAttention``: ``query``/``key``/``value`` kernels (dim, heads,
head_dim), ``out`` kernel (heads, head_dim, dim)), ``norm2`` and ``mlp`` (``fc1``, ``fc2``),
then the final ``norm`` and the classifier ``head``. Only the blocks' kernels are nested
below the top level, so "generate what is inside a block" selects exactly them.
No BatchNorm: the model has only a ``params`` collection.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any

#: pos_embedding ~ Normal(0, 0.02), as in Google's vit_jax (a raw param has no Flax default).
pos_embedding_init = nn.initializers.normal(stddev=0.02)


class MlpBlock(nn.Module):
    """Dense ``fc1`` (``mlp_dim``) -> GELU -> Dense ``fc2`` (back to the input width)."""

    mlp_dim: int
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        dim = x.shape[-1]
        x = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=jnp.float32, name="fc1")(x)
        x = nn.gelu(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(dim, dtype=self.dtype, param_dtype=jnp.float32, name="fc2")(x)
        return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


class EncoderBlock(nn.Module):
    """x + attention(norm1(x)), then x + mlp(norm2(x))."""

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        y = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name="norm1")(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, dtype=self.dtype, param_dtype=jnp.float32,
            dropout_rate=self.dropout_rate, deterministic=not train, name="attention")(y)
        x = x + nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name="norm2")(x)
        return x + MlpBlock(self.mlp_dim, self.dtype, self.dropout_rate, name="mlp")(y, train)


class ViT(nn.Module):
    """Vision Transformer; defaults give ViT-Ti/16 (width 192, depth 12, 3 heads).

    ``pool="cls"`` classifies from a learned class token prepended to the patches,
    ``pool="mean"`` from the mean of the patch tokens (no class token). The MLP hidden width
    is ``round(mlp_ratio * width)``. Initialisers are Flax's defaults (LeCun-normal fan-in
    kernels, attention's fan-in over the input features; zero biases; unit LayerNorm scale),
    but for the raw params: ``cls_token`` zeros and ``pos_embedding`` Normal(0, 0.02), as
    in vit_jax. Dropout (``dropout_rate`` > 0 while training) needs a ``"dropout"`` rng.
    Logits are float32 (float64 when ``dtype`` is float64).
    """

    num_classes: int = 1000
    width: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    patch_size: int = 16
    pool: str = "cls"
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"unknown pool {self.pool!r}; expected 'cls' or 'mean'")
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} is not divisible by num_heads="
                             f"{self.num_heads}")
        p = self.patch_size
        if x.shape[1] % p or x.shape[2] % p:
            raise ValueError(f"image size {x.shape[1]}x{x.shape[2]} is not divisible by "
                             f"patch_size={p}")
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    param_dtype=jnp.float32, name="patch_embed")(x)
        n, h, w, c = x.shape
        x = x.reshape(n, h * w, c)
        if self.pool == "cls":
            cls = self.param("cls_token", nn.initializers.zeros, (1, 1, c), jnp.float32)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (n, 1, c)), x], axis=1)
        pos = self.param("pos_embedding", pos_embedding_init, (1, x.shape[1], c), jnp.float32)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x + pos.astype(x.dtype))
        mlp_dim = max(1, int(round(self.mlp_ratio * self.width)))
        for i in range(self.depth):
            x = EncoderBlock(self.num_heads, mlp_dim, self.dtype, self.dropout_rate,
                             name=f"block_{i}")(x, train)
        x = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name="norm")(x)
        wide = jnp.promote_types(self.dtype, jnp.float32)  # bf16 -> f32, f64 stays
        x = x[:, 0] if self.pool == "cls" else jnp.mean(x.astype(wide), axis=1)
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                     name="head")(x)
        return x.astype(wide)
