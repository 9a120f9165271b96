"""The RPG spec: a static, hashable, JSON-serialisable description of what is generated.

A spec lists every parameter leaf of a model (path, shape, dtype), says which leaves are
generated and from which ring (and where in that ring's virtual sequence they sit), and
holds the seed, mode and version of the index map. It holds no index arrays: tables are
derived from it (see ``rpg_jax.index_map``), so a checkpoint needs only the spec.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from rpg_jax.index_map import INDEX_MAP_VERSION, MODES, decode
from rpg_jax.layers import Fans, all_fans
from rpg_jax.trees import Path, flatten_params, path_name, unflatten_params

REFERENCE_FAN = 4608  # 512 * 3 * 3: the reference ring std is sqrt(2 / 4608)
SELECT_PRESETS = ("auto", "blocks", "convs", "kernels")
GROUP_PRESETS = ("global", "stage", "block", "layer")
INIT_RULES = ("auto", "paper", "model")

__all__ = ["INIT_RULES", "REFERENCE_FAN", "LeafSpec", "RPGSpec", "RingSpec", "flatten_params",
           "make_spec", "spec_from_tables", "unflatten_params"]


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """One parameter leaf. ``ring`` is None for free (ordinary, trainable) leaves.

    ``kind``, ``fan_in`` and ``fan_out`` are from ``rpg_jax.layers``; a generated leaf is
    ``scale * sign * ring[index]`` and starts with standard deviation ``std``.
    """

    path: Path
    shape: tuple[int, ...]
    dtype: str
    ring: str | None = None
    offset: int = 0  # first position of this leaf in its ring's virtual sequence
    scale: float = 1.0  # c_i: sqrt(ring_fan / fan_out) (paper rule) or std / ring std
    kind: str = ""
    fan_in: int = 0
    fan_out: int = 0
    std: float | None = None  # generated leaves: scale * their ring's init std

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def name(self) -> str:
        return path_name(self.path)


@dataclasses.dataclass(frozen=True)
class RingSpec:
    """One ring: ``size`` trainable entries, initialised ~ Normal(0, ``std``), read by
    ``length`` generated weights."""

    name: str
    size: int
    length: int
    std: float = math.sqrt(2.0 / REFERENCE_FAN)


@dataclasses.dataclass(frozen=True)
class RPGSpec:
    """Static description of a generated model (usable as a ``jit`` static argument)."""

    leaves: tuple[LeafSpec, ...]
    rings: tuple[RingSpec, ...]
    seed: int = 0
    mode: str = "rpg"  # one of MODES, or "explicit" (tables given, see spec_from_tables)
    ring_fan: int = REFERENCE_FAN
    version: int = INDEX_MAP_VERSION
    explicit: tuple[tuple[str, bytes], ...] = ()  # mode "explicit": (ring, int32 LE forward)
    init: str = "paper"  # the rule that set scales and ring stds: "paper" or "model"

    @property
    def generated(self) -> tuple[LeafSpec, ...]:
        return tuple(leaf for leaf in self.leaves if leaf.ring is not None)

    @property
    def free(self) -> tuple[LeafSpec, ...]:
        return tuple(leaf for leaf in self.leaves if leaf.ring is None)

    def ring_leaves(self, ring: str) -> tuple[LeafSpec, ...]:
        return tuple(leaf for leaf in self.leaves if leaf.ring == ring)

    def explicit_forward(self, ring: str) -> np.ndarray:
        """The given forward table of ``ring`` (mode "explicit" only)."""
        return np.frombuffer(dict(self.explicit)[ring], "<i4").astype(np.int32)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "seed": self.seed,
            "mode": self.mode,
            "ring_fan": self.ring_fan,
            "init": self.init,
            "rings": [dataclasses.asdict(r) for r in self.rings],
            "explicit": {r: base64.b64encode(b).decode("ascii") for r, b in self.explicit},
            "leaves": [
                {**dataclasses.asdict(leaf), "path": list(leaf.path), "shape": list(leaf.shape)}
                for leaf in self.leaves
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RPGSpec:
        version = int(d.get("version", -1))
        if version != INDEX_MAP_VERSION:
            raise ValueError(
                f"spec version {version} cannot be read by this rpg_jax "
                f"(index map version {INDEX_MAP_VERSION})"
            )
        # Specs written before kinds, fans and stds were recorded used the paper's rule.
        ring_fan = int(d["ring_fan"])
        paper_std = _paper_ring_std(ring_fan)
        rings = tuple(RingSpec(r["name"], int(r["size"]), int(r["length"]),
                               float(r.get("std", paper_std))) for r in d["rings"])
        ring_std = {r.name: r.std for r in rings}
        raw = [(tuple(leaf["path"]), tuple(int(s) for s in leaf["shape"])) for leaf in d["leaves"]]
        derived = all_fans(raw)
        leaves = []
        for leaf, (path, shape), fans in zip(d["leaves"], raw, derived, strict=True):
            ring, scale = leaf["ring"], float(leaf["scale"])
            std = leaf.get("std", _leaf_std(scale, ring_std[ring]) if ring else None)
            leaves.append(LeafSpec(
                path=path, shape=shape, dtype=str(leaf["dtype"]), ring=ring,
                offset=int(leaf["offset"]), scale=scale,
                kind=str(leaf.get("kind", fans.kind)),
                fan_in=int(leaf.get("fan_in", fans.fan_in)),
                fan_out=int(leaf.get("fan_out", fans.fan_out)),
                std=None if std is None else float(std)))
        explicit = tuple((r, base64.b64decode(b)) for r, b in d.get("explicit", {}).items())
        return cls(tuple(leaves), rings, int(d["seed"]), str(d["mode"]), ring_fan, version,
                   explicit, str(d.get("init", "paper")))

    @classmethod
    def from_json(cls, text: str) -> RPGSpec:
        return cls.from_dict(json.loads(text))


# ----------------------------------------------------------------------------- make_spec


def _natural_key(path: Path) -> tuple:
    """Sort key that orders Dense_2 before Dense_10 and layers/2 before layers/10."""
    return tuple(part for p in path
                 for part in ((0, p, "") if isinstance(p, int) else
                              tuple((0, int(t), "") if t.isdigit() else (1, 0, t)
                                    for t in re.split(r"(\d+)", str(p)) if t)))


def _common_prefix(paths: list[Path]) -> int:
    """Length of the module path all leaves share (a model wrapped in one module)."""
    n = min(len(p) for p in paths) - 2  # keep at least one module and the leaf name
    for i in range(max(0, n)):
        if len({p[i] for p in paths}) > 1:
            return i
    return max(0, n)


def _auto_selection(paths_shapes: list[tuple[Path, tuple[int, ...]]]) -> list[bool]:
    """The paper's choice generalised: the kernels of the body are generated.

    Kernels (>= 2-d ``kernel`` leaves) inside sub-modules (residual blocks, transformer
    blocks, ``nnx.List`` entries) are the body; top-level layers (stem, embedding, head) and
    every non-kernel leaf stay free. A model with no sub-modules (an MLP, a plain CNN) has
    its kernels in creation order: all but the first and the last are generated.
    """
    paths = [p for p, _ in paths_shapes]
    skip = _common_prefix(paths)
    kernels = [i for i, (p, shape) in enumerate(paths_shapes)
               if str(p[-1]) == "kernel" and len(shape) >= 2]
    nested = {i for i in kernels if len(paths[i]) - skip >= 3}
    if not nested:
        ordered = sorted(kernels, key=lambda i: _natural_key(paths[i]))
        nested = set(ordered[1:-1])
    return [i in nested for i in range(len(paths))]


def _selection(select: None | str | Callable[[str, tuple[int, ...]], bool],
               paths_shapes: list[tuple[Path, tuple[int, ...]]]) -> list[bool]:
    if select is None or select == "auto":
        return _auto_selection(paths_shapes)
    if select == "blocks":
        # Conv kernels nested inside a sub-module (residual blocks); top-level convs (the stem),
        # normalisation parameters and the classifier stay free.
        rule = lambda path, shape: path[-1] == "kernel" and len(shape) == 4 and len(path) >= 3
    elif select == "convs":
        rule = lambda path, shape: path[-1] == "kernel" and len(shape) == 4
    elif select == "kernels":
        rule = lambda path, shape: path[-1] == "kernel" and len(shape) >= 2
    elif isinstance(select, str):
        try:
            pattern = re.compile(select)
        except re.error as e:
            raise ValueError(f"select={select!r} is not a valid regular expression: {e}") from e
        rule = lambda path, shape: pattern.search(path_name(path)) is not None
    elif callable(select):
        rule = lambda path, shape: bool(select(path_name(path), shape))
    else:
        raise ValueError(
            f"select={select!r}: expected None, one of {SELECT_PRESETS}, a regex or a predicate")
    return [rule(path, shape) for path, shape in paths_shapes]


def _group_of(groups: str | Mapping[str, str], path: Path) -> str:
    if groups == "global":
        return "ring"
    if groups == "stage":
        return re.sub(r"_\d+$", "", str(path[0]))
    if groups == "block":
        return str(path[0])
    if groups == "layer":
        return path_name(path[:-1])
    if isinstance(groups, Mapping):
        for pattern, ring in groups.items():
            if re.search(pattern, path_name(path)):
                return str(ring)
        raise ValueError(
            f"generated parameter {path_name(path)!r} matches none of the group patterns "
            f"{list(groups)}"
        )
    raise ValueError(f"groups={groups!r}: expected one of {GROUP_PRESETS} or a mapping")


def _check_size(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{what}={value!r}: expected an int (ring DoF) or a float in (0, 1]")
    if value <= 0:
        raise ValueError(f"{what}={value!r} must be positive")
    if isinstance(value, float | np.floating) and value > 1:
        raise ValueError(
            f"{what}={value!r}: a float is a fraction of the generated weights and must be "
            "in (0, 1]; pass an int for an absolute number of ring entries"
        )


def _split_total(total: int, lengths: dict[str, int]) -> dict[str, int]:
    """Splits ``total`` ring entries over rings in proportion to their lengths (>= 1 each)."""
    all_len = sum(lengths.values())
    exact = {r: total * n / all_len for r, n in lengths.items()}
    sizes = {r: max(1, math.floor(x)) for r, x in exact.items()}
    by_remainder = sorted(lengths, key=lambda r: exact[r] - math.floor(exact[r]), reverse=True)
    for r in by_remainder[: max(0, total - sum(sizes.values()))]:
        sizes[r] += 1
    return sizes


def _ring_sizes(ring_size: Any, lengths: dict[str, int]) -> dict[str, int]:
    if isinstance(ring_size, Mapping):
        unknown = sorted(set(ring_size) - set(lengths))
        missing = sorted(set(lengths) - set(ring_size))
        if unknown or missing:
            raise ValueError(
                f"ring_size mapping names rings {sorted(ring_size)}, but the groups produce "
                f"rings {sorted(lengths)} (unknown: {unknown}, missing: {missing})"
            )
        sizes = {}
        for r, v in ring_size.items():
            _check_size(v, f"ring_size[{r!r}]")
            sizes[r] = _ring_sizes(v, {r: lengths[r]})[r]
        return sizes
    _check_size(ring_size, "ring_size")
    if isinstance(ring_size, float | np.floating):
        return {r: max(1, round(float(ring_size) * n)) for r, n in lengths.items()}
    total = int(ring_size)
    all_len = sum(lengths.values())
    if total > all_len:
        raise ValueError(
            f"ring_size={total} is larger than the {all_len} generated weights it would produce"
        )
    if total < len(lengths):
        raise ValueError(f"ring_size={total} is smaller than the number of rings {len(lengths)}")
    return _split_total(total, lengths)


def _paper_ring_std(ring_fan: int) -> float:
    return math.sqrt(2.0 / ring_fan)


def _leaf_std(scale: float, ring_std: float) -> float:
    return scale * ring_std


def _measured_std(leaf: Any) -> float | None:
    """Std of a concrete array leaf; None for shapes, tracers, and constant arrays."""
    if isinstance(leaf, jax.ShapeDtypeStruct | jax.core.Tracer) or not hasattr(leaf, "dtype"):
        return None
    x = np.asarray(leaf)
    if not np.issubdtype(x.dtype, np.floating) or x.size < 2:
        return None
    std = float(np.std(x, dtype=np.float64))
    return std if math.isfinite(std) and std > 0 else None


def _fits_paper_rule(fans: Fans, size: int, measured: float | None) -> bool:
    """A conv kernel initialised as the paper does (Kaiming normal, fan-out mode)."""
    if fans.kind != "conv":
        return False
    if measured is None:
        return True
    tolerance = max(0.1, 4.0 / math.sqrt(2.0 * size))  # 4 sampling std errors of a std
    return abs(measured / fans.kaiming_fan_out_std - 1.0) <= tolerance


def _check_spec_args(mode: str, init: str, seed: Any, groups: Any) -> None:
    if mode not in MODES:
        hint = " (for given tables use spec_from_tables)" if mode == "explicit" else ""
        raise ValueError(f"mode={mode!r}: expected one of {MODES}{hint}")
    if init not in INIT_RULES:
        raise ValueError(f"init={init!r}: expected one of {INIT_RULES}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed={seed!r}: expected a non-negative int")
    if isinstance(groups, str) and groups not in GROUP_PRESETS:
        raise ValueError(f"groups={groups!r}: expected one of {GROUP_PRESETS} or a mapping")


def _assign_rings(paths_shapes: list[tuple[tuple[str, ...], tuple[int, ...]]],
                  chosen: list[bool], groups: str | Mapping[str, str],
                  select: Any) -> tuple[list[str | None], dict[str, int]]:
    """Each leaf's ring (None if not generated) and each ring's generated weights, in the
    order of first use."""
    rings_of: list[str | None] = []
    lengths: dict[str, int] = {}
    for (path, shape), pick in zip(paths_shapes, chosen, strict=True):
        ring = _group_of(groups, path) if pick else None
        if ring is not None:
            lengths[ring] = lengths.get(ring, 0) + math.prod(shape)
        rings_of.append(ring)
    if not lengths:
        raise ValueError(
            f"select={select!r} matches no parameter. Presets: {SELECT_PRESETS} ('auto' "
            "generates kernels inside sub-modules, or all kernels but the first and last), "
            "or pass a regex on the paths or a predicate f(path, shape). Parameter paths: "
            f"{[path_name(p) for p, _ in paths_shapes[:12]]}"
            f"{' ...' if len(paths_shapes) > 12 else ''}"
        )
    return rings_of, lengths


def _init_scales(init: str, pairs: list, fans: list, rings_of: list[str | None],
                 lengths: dict[str, int], ring_fan: int
                 ) -> tuple[str, dict[str, float], list[float]]:
    """The resolved init rule, each ring's std and each leaf's scale c_i (see make_spec)."""
    sizes = [math.prod(np.shape(leaf)) for _, leaf in pairs]
    measured = [_measured_std(leaf) if ring else None
                for (_, leaf), ring in zip(pairs, rings_of, strict=True)]
    if init == "auto":
        init = "paper" if all(
            _fits_paper_rule(f, size, m)
            for size, f, m, ring in zip(sizes, fans, measured, rings_of, strict=True) if ring
        ) else "model"
    if init == "paper":
        ring_std = dict.fromkeys(lengths, _paper_ring_std(ring_fan))
        return init, ring_std, [math.sqrt(ring_fan / f.fan_out) for f in fans]
    target = [m if m is not None else f.lecun_std for m, f in zip(measured, fans, strict=True)]
    power = dict.fromkeys(lengths, 0.0)
    for size, t, ring in zip(sizes, target, rings_of, strict=True):
        if ring:
            power[ring] += size * t * t
    ring_std = {r: math.sqrt(power[r] / lengths[r]) for r in lengths}
    scales = [t / ring_std[ring] if ring else 1.0 for t, ring in zip(target, rings_of, strict=True)]
    return init, ring_std, scales


def make_spec(
    params_or_shapes: Any,
    ring_size: int | float | Mapping[str, int | float],
    *,
    seed: int = 0,
    groups: str | Mapping[str, str] = "global",
    select: None | str | Callable[[str, tuple[int, ...]], bool] = "auto",
    mode: str = "rpg",
    init: str = "auto",
    ring_fan: int = REFERENCE_FAN,
    in_axes: Mapping[str, int] | None = None,
) -> RPGSpec:
    """Builds the static spec for a params tree.

    Args:
      params_or_shapes: the model's params: Linen nested dicts (arrays or ``jax.eval_shape``
        output), or Flax NNX (an ``nnx.Module``, ``nnx.state(model, nnx.Param)``, the
        output of ``nnx.split`` or ``nnx.eval_shape``; see ``rpg_jax.trees``).
      ring_size: ring DoF (int, split over rings in proportion to their generated weights),
        a fraction in (0, 1] of each ring's generated weights, or a mapping ring -> either.
      seed: seed of the index map (indices and signs).
      groups: "global" (one ring), "stage", "block", "layer", or {regex: ring name}.
      select: which leaves are generated: "auto" (default: kernels inside sub-modules, or
        all kernels but the first and last of a model without sub-modules; for the ResNets
        this is the paper's choice), "blocks" (4-d conv kernels inside sub-modules), "convs",
        "kernels" (every >= 2-d kernel), a regex on the "/"-joined path, or a predicate
        ``f(path, shape) -> bool``.
      mode: "rpg", "naive", "perm_only" or "sign_only" (see ``rpg_jax.index_map``).
      init: how generated leaves are scaled. Leaf i is ``c_i * sign * ring[index]``.
        "paper": rings ~ Normal(0, sqrt(2 / ring_fan)), c_i = sqrt(ring_fan / fan_out_i),
        so every leaf starts as Kaiming normal (fan-out). "model": each leaf starts with the
        std of the given array (the model's own initializer; with shapes only, Flax's
        default lecun_normal, 1 / sqrt(fan_in)); a ring's std is the size-weighted RMS of
        its leaves' stds, so c_i = std_i / ring std averages c_i^2 = 1 over its weights.
        "auto" (default): "paper" when every generated leaf is a conv kernel initialised
        that way (or only shapes are given), else "model". Under SGD a generated weight
        moves by c_i^2 times its own gradient step (c_i under Adam), before the ring's
        sharing: the "model" rule keeps that near the plain model's learning rate.
      ring_fan: the fan of the paper rule's ring std.
      in_axes: {regex on the path: number of leading input axes} for ``DenseGeneral`` /
        ``LinearGeneral`` kernels, whose fans cannot be told from their shape.

    Returns:
      An ``RPGSpec``: frozen and hashable, so it can be a static argument of ``jax.jit``.
      It holds no arrays; the index map is derived from it (``make_tables``).

    Examples:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> import rpg_jax
      >>> class MLP(nn.Module):
      ...   @nn.compact
      ...   def __call__(self, x):
      ...     for width in (64, 64, 64):
      ...       x = nn.relu(nn.Dense(width)(x))
      ...     return nn.Dense(10)(x)
      >>> params = MLP().init(jax.random.key(0), jnp.zeros((1, 784)))["params"]
      >>> spec = rpg_jax.make_spec(params, ring_size=500)
      >>> [leaf.name for leaf in spec.generated]  # "auto": all kernels but the first and last
      ['Dense_1/kernel', 'Dense_2/kernel']
      >>> spec.rings, spec.init
      ((RingSpec(name='ring', size=500, length=8192, std=0.12...),), 'model')
      >>> rpg_jax.count(spec)  # trainable = ring_dof + free
      ParamCount(ring_dof=500, free=51018, generated=8192)
    """
    _check_spec_args(mode, init, seed, groups)
    pairs = flatten_params(params_or_shapes)
    if not pairs:
        raise ValueError("params_or_shapes has no leaves")
    paths_shapes = [(path, tuple(int(s) for s in np.shape(leaf))) for path, leaf in pairs]
    fans = all_fans(paths_shapes, in_axes)
    rings_of, lengths = _assign_rings(paths_shapes, _selection(select, paths_shapes), groups,
                                      select)
    sizes = _ring_sizes(ring_size, lengths)
    for r, n in sizes.items():
        if n > lengths[r]:
            raise ValueError(
                f"ring {r!r}: size {n} is larger than its {lengths[r]} generated weights"
            )
    init, ring_std, scales = _init_scales(init, pairs, fans, rings_of, lengths, ring_fan)

    offsets = dict.fromkeys(lengths, 0)
    leaves = []
    for (path, leaf), (_, shape), f, ring, scale in zip(pairs, paths_shapes, fans, rings_of,
                                                         scales, strict=True):
        dtype = str(np.dtype(leaf.dtype))
        if ring is None:
            leaves.append(LeafSpec(path, shape, dtype, kind=f.kind, fan_in=f.fan_in,
                                   fan_out=f.fan_out))
            continue
        leaves.append(LeafSpec(path, shape, dtype, ring, offsets[ring], scale, f.kind,
                               f.fan_in, f.fan_out, _leaf_std(scale, ring_std[ring])))
        offsets[ring] += math.prod(shape)
    rings = tuple(RingSpec(r, sizes[r], lengths[r], ring_std[r]) for r in lengths)
    return RPGSpec(tuple(leaves), rings, int(seed), mode, int(ring_fan), init=init)


def spec_from_tables(
    params_or_shapes: Any,
    ring_size: int,
    leaf_tables: Mapping[str, np.ndarray],
    *,
    ring_fan: int = REFERENCE_FAN,
) -> RPGSpec:
    """A spec with one ring ("ring") read through given tables (e.g. imported ones).

    ``leaf_tables`` maps "/"-joined parameter paths to encoded ``int32`` forward tables
    (``rpg_jax.index_map.encode(index, sign)``) in the leaf's own row-major order; the leaves
    it names are generated, all others are free. Indices and signs are kept in the spec;
    scales follow the paper's rule (``make_spec(init="paper")``).
    """
    pairs = flatten_params(params_or_shapes)
    known = {path_name(p) for p, _ in pairs}
    unknown = sorted(set(leaf_tables) - known)
    if unknown:
        raise ValueError(f"tables given for parameters the model does not have: {unknown}")
    paths_shapes = [(path, tuple(int(s) for s in np.shape(leaf))) for path, leaf in pairs]
    ring_std = _paper_ring_std(ring_fan)
    leaves, pieces, offset = [], [], 0
    for (path, leaf), (_, shape), f in zip(pairs, paths_shapes, all_fans(paths_shapes),
                                           strict=True):
        name = path_name(path)
        dtype = str(np.dtype(leaf.dtype))
        if name not in leaf_tables:
            leaves.append(LeafSpec(path, shape, dtype, kind=f.kind, fan_in=f.fan_in,
                                   fan_out=f.fan_out))
            continue
        table = np.asarray(leaf_tables[name])
        if table.dtype != np.int32 or table.shape != (math.prod(shape),):
            raise ValueError(f"table of {name!r}: expected int32[{math.prod(shape)}] for shape "
                             f"{shape}, got {table.dtype}{list(table.shape)}")
        index, _ = decode(table)
        if index.max() >= ring_size:
            raise ValueError(f"table of {name!r} addresses ring entry {int(index.max())}, but "
                             f"the ring has {ring_size} entries")
        scale = math.sqrt(ring_fan / f.fan_out)
        leaves.append(LeafSpec(path, shape, dtype, "ring", offset, scale, f.kind, f.fan_in,
                               f.fan_out, _leaf_std(scale, ring_std)))
        pieces.append(table)
        offset += table.size
    if not pieces:
        raise ValueError("leaf_tables is empty")
    forward = np.concatenate(pieces).astype("<i4").tobytes()
    return RPGSpec(tuple(leaves), (RingSpec("ring", int(ring_size), offset, ring_std),), 0,
                   "explicit", int(ring_fan), INDEX_MAP_VERSION, (("ring", forward),))
