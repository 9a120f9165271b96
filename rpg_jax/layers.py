"""What a parameter leaf is: its kind and its fan-in / fan-out, from its path and shape.

Flax kernel layouts (Linen and NNX alike):

=================  ===================================  ======================  ===============
kind               shape                                fan_in                  fan_out
=================  ===================================  ======================  ===============
``conv``           (*spatial, in, out) (1-d, 2-d, 3-d)  prod(spatial) * in      prod(spatial) * out
``dense``          (in, out)                            in                      out
``attention_in``   query/key/value (in, heads, head)    in                      heads * head
``attention_out``  out (heads, head, out)               heads * head            out
``dense_general``  (*in_axes, *out_axes), see in_axes   prod(in_axes)           prod(out_axes)
``embedding``      (vocab, features)                    features                vocab
``vector``         bias, scale, any 0-d / 1-d leaf      size                    size
``other``          any other >= 2-d leaf (pos. embed.)  shape[-2]               shape[-1]
=================  ===================================  ======================  ===============

Attention kernels are recognised by name: a 3-d ``kernel`` under ``query``/``key``/``value``,
or under ``out`` beside them (``nn.MultiHeadDotProductAttention``, ``nnx.MultiHeadAttention``).
Other ``DenseGeneral`` / ``LinearGeneral`` kernels cannot be told from convolutions by their
shape: name them in ``in_axes`` (regex on the kernel's path -> number of leading input
axes).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

from rpg_jax.trees import Path, path_name

KINDS = ("conv", "dense", "attention_in", "attention_out", "dense_general", "embedding",
         "vector", "other")
_ATTENTION_IN = ("query", "key", "value")


@dataclasses.dataclass(frozen=True)
class Fans:
    kind: str
    fan_in: int
    fan_out: int

    @property
    def lecun_std(self) -> float:
        """Std of Flax's default kernel init (``lecun_normal``): 1 / sqrt(fan_in)."""
        return 1.0 / math.sqrt(self.fan_in)

    @property
    def kaiming_fan_out_std(self) -> float:
        """Std of the paper's init (Kaiming normal, fan-out mode): sqrt(2 / fan_out)."""
        return math.sqrt(2.0 / self.fan_out)


def _split(shape: tuple[int, ...], n_in: int) -> Fans:
    return Fans("dense_general", max(1, math.prod(shape[:n_in])),
                max(1, math.prod(shape[n_in:])))


def leaf_fans(path: Path, shape: tuple[int, ...], siblings: frozenset[str] = frozenset(),
              in_axes: Mapping[str, int] | None = None) -> Fans:
    """Kind and fans of one leaf; ``siblings``: names of the modules beside its parent."""
    leaf = str(path[-1])
    parent = str(path[-2]) if len(path) >= 2 else ""
    if len(shape) <= 1 or leaf in ("bias", "scale"):
        n = max(1, math.prod(shape))
        return Fans("vector", n, n)
    name = path_name(path)
    for pattern, n_in in (in_axes or {}).items():
        if leaf == "kernel" and re.search(pattern, name):
            if not 1 <= n_in < len(shape):
                raise ValueError(f"in_axes[{pattern!r}]={n_in} for {name!r} of shape {shape}: "
                                 f"expected 1 to {len(shape) - 1} input axes")
            return _split(shape, n_in)
    if leaf == "embedding" and len(shape) == 2:
        return Fans("embedding", shape[1], shape[0])
    if leaf != "kernel":
        return Fans("other", shape[-2], shape[-1])
    if len(shape) == 3 and parent in _ATTENTION_IN:
        return Fans("attention_in", shape[0], shape[1] * shape[2])
    if len(shape) == 3 and parent == "out" and siblings & set(_ATTENTION_IN):
        return Fans("attention_out", shape[0] * shape[1], shape[2])
    if len(shape) == 2:
        return Fans("dense", shape[0], shape[1])
    receptive = math.prod(shape[:-2])
    return Fans("conv", receptive * shape[-2], receptive * shape[-1])


def all_fans(paths_shapes: Sequence[tuple[Path, tuple[int, ...]]],
             in_axes: Mapping[str, int] | None = None) -> list[Fans]:
    """``leaf_fans`` of every leaf of a tree, each seeing its parent's sibling modules."""
    children: dict[Path, set[str]] = {}
    for path, _ in paths_shapes:
        if len(path) >= 2:
            children.setdefault(path[:-2], set()).add(str(path[-2]))
    return [leaf_fans(path, shape, frozenset(children.get(path[:-2], ())), in_axes)
            for path, shape in paths_shapes]
