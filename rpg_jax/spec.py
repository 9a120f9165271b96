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

Path = tuple[str, ...]
REFERENCE_FAN = 4608  # 512 * 3 * 3: the reference ring std is sqrt(2 / 4608)
SELECT_PRESETS = ("blocks", "convs", "kernels")
GROUP_PRESETS = ("global", "stage", "block", "layer")


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """One parameter leaf. ``ring`` is None for free (ordinary, trainable) leaves."""

    path: Path
    shape: tuple[int, ...]
    dtype: str
    ring: str | None = None
    offset: int = 0  # first position of this leaf in its ring's virtual sequence
    scale: float = 1.0  # c_i = sqrt(ring_fan / fan_out)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def name(self) -> str:
        return "/".join(self.path)


@dataclasses.dataclass(frozen=True)
class RingSpec:
    """One ring: ``size`` trainable entries read by ``length`` generated weights."""

    name: str
    size: int
    length: int


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

    @property
    def generated(self) -> tuple[LeafSpec, ...]:
        return tuple(leaf for leaf in self.leaves if leaf.ring is not None)

    @property
    def free(self) -> tuple[LeafSpec, ...]:
        return tuple(leaf for leaf in self.leaves if leaf.ring is None)

    @property
    def ring_std(self) -> float:
        """Standard deviation of the reference ring initialisation, sqrt(2 / ring_fan)."""
        return math.sqrt(2.0 / self.ring_fan)

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
        leaves = tuple(
            LeafSpec(
                path=tuple(leaf["path"]),
                shape=tuple(int(s) for s in leaf["shape"]),
                dtype=str(leaf["dtype"]),
                ring=leaf["ring"],
                offset=int(leaf["offset"]),
                scale=float(leaf["scale"]),
            )
            for leaf in d["leaves"]
        )
        rings = tuple(RingSpec(r["name"], int(r["size"]), int(r["length"])) for r in d["rings"])
        explicit = tuple((r, base64.b64decode(b)) for r, b in d.get("explicit", {}).items())
        return cls(leaves, rings, int(d["seed"]), str(d["mode"]), int(d["ring_fan"]), version,
                   explicit)

    @classmethod
    def from_json(cls, text: str) -> RPGSpec:
        return cls.from_dict(json.loads(text))


# ----------------------------------------------------------------------------- tree helpers


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def flatten_params(tree: Any) -> list[tuple[Path, Any]]:
    """(path, leaf) pairs of a nested-dict params tree, in ``jax.tree_util`` order."""
    pairs, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(tuple(_key_name(k) for k in path), leaf) for path, leaf in pairs]


def unflatten_params(pairs: list[tuple[Path, Any]]) -> dict[str, Any]:
    """Nested dicts from (path, leaf) pairs."""
    root: dict[str, Any] = {}
    for path, leaf in pairs:
        node = root
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return root


# ----------------------------------------------------------------------------- make_spec


def _selector(select: None | str | Callable[[str, tuple[int, ...]], bool]):
    if select is None or select == "blocks":
        # Conv kernels nested inside a sub-module (residual blocks); top-level convs (the stem),
        # normalisation parameters and the classifier stay free.
        return lambda path, shape: path[-1] == "kernel" and len(shape) == 4 and len(path) >= 3
    if select == "convs":
        return lambda path, shape: path[-1] == "kernel" and len(shape) == 4
    if select == "kernels":
        return lambda path, shape: path[-1] == "kernel" and len(shape) >= 2
    if isinstance(select, str):
        try:
            pattern = re.compile(select)
        except re.error as e:
            raise ValueError(f"select={select!r} is not a valid regular expression: {e}") from e
        return lambda path, shape: pattern.search("/".join(path)) is not None
    if callable(select):
        return lambda path, shape: bool(select("/".join(path), shape))
    raise ValueError(
        f"select={select!r}: expected None, one of {SELECT_PRESETS}, a regex or a predicate"
    )


def _group_of(groups: str | Mapping[str, str], path: Path) -> str:
    if groups == "global":
        return "ring"
    if groups == "stage":
        return re.sub(r"_\d+$", "", path[0])
    if groups == "block":
        return path[0]
    if groups == "layer":
        return "/".join(path[:-1])
    if isinstance(groups, Mapping):
        for pattern, ring in groups.items():
            if re.search(pattern, "/".join(path)):
                return str(ring)
        raise ValueError(
            f"generated parameter {'/'.join(path)!r} matches none of the group patterns "
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


def fan_out(shape: tuple[int, ...]) -> int:
    """Kaiming fan-out of a Flax kernel: kh*kw*C_out for HWIO convs, C_out for Dense."""
    if len(shape) < 2:
        return max(1, math.prod(shape))
    return max(1, math.prod(shape) // shape[-2])


def make_spec(
    params_or_shapes: Any,
    ring_size: int | float | Mapping[str, int | float],
    *,
    seed: int = 0,
    groups: str | Mapping[str, str] = "global",
    select: None | str | Callable[[str, tuple[int, ...]], bool] = None,
    mode: str = "rpg",
    ring_fan: int = REFERENCE_FAN,
) -> RPGSpec:
    """Builds the static spec for a params tree (arrays or ``jax.eval_shape`` output).

    Args:
      params_or_shapes: the model's params (nested dicts), or their shapes.
      ring_size: ring DoF (int, split over rings in proportion to their generated weights),
        a fraction in (0, 1] of each ring's generated weights, or a mapping ring -> either.
      seed: seed of the index map (indices and signs).
      groups: "global" (one ring), "stage", "block", "layer", or {regex: ring name}.
      select: which leaves are generated: None/"blocks" (conv kernels inside blocks: the
        reference ResNet choice), "convs", "kernels" (Dense too), a regex on the
        "/"-joined path, or a predicate ``f(path, shape) -> bool``.
      mode: "rpg", "naive", "perm_only" or "sign_only" (see ``rpg_jax.index_map``).
      ring_fan: the ring is initialised with std sqrt(2 / ring_fan), and generated leaf i
        carries c_i = sqrt(ring_fan / fan_out_i).
    """
    if mode not in MODES:
        hint = " (for given tables use spec_from_tables)" if mode == "explicit" else ""
        raise ValueError(f"mode={mode!r}: expected one of {MODES}{hint}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed={seed!r}: expected a non-negative int")
    if isinstance(groups, str) and groups not in GROUP_PRESETS:
        raise ValueError(f"groups={groups!r}: expected one of {GROUP_PRESETS} or a mapping")
    chosen = _selector(select)
    pairs = flatten_params(params_or_shapes)
    if not pairs:
        raise ValueError("params_or_shapes has no leaves")

    entries = []  # (path, shape, dtype, ring or None)
    lengths: dict[str, int] = {}
    for path, leaf in pairs:
        shape = tuple(int(s) for s in np.shape(leaf))
        dtype = str(np.dtype(leaf.dtype))
        ring = None
        if chosen(path, shape):
            ring = _group_of(groups, path)
            lengths[ring] = lengths.get(ring, 0) + math.prod(shape)
        entries.append((path, shape, dtype, ring))
    if not lengths:
        raise ValueError(
            f"select={select!r} matches no parameter; parameter paths are e.g. "
            f"{['/'.join(p) for p, _ in pairs[:4]]}"
        )
    sizes = _ring_sizes(ring_size, lengths)
    for r, n in sizes.items():
        if n > lengths[r]:
            raise ValueError(
                f"ring {r!r}: size {n} is larger than its {lengths[r]} generated weights"
            )

    offsets = dict.fromkeys(lengths, 0)
    leaves = []
    for path, shape, dtype, ring in entries:
        if ring is None:
            leaves.append(LeafSpec(path, shape, dtype))
            continue
        scale = math.sqrt(ring_fan / fan_out(shape))
        leaves.append(LeafSpec(path, shape, dtype, ring, offsets[ring], scale))
        offsets[ring] += math.prod(shape)
    rings = tuple(RingSpec(r, sizes[r], lengths[r]) for r in lengths)
    return RPGSpec(tuple(leaves), rings, int(seed), mode, int(ring_fan))


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
    it names are generated, all others are free. Indices and signs are kept in the spec.
    """
    pairs = flatten_params(params_or_shapes)
    known = {"/".join(p) for p, _ in pairs}
    unknown = sorted(set(leaf_tables) - known)
    if unknown:
        raise ValueError(f"tables given for parameters the model does not have: {unknown}")
    leaves, pieces, offset = [], [], 0
    for path, leaf in pairs:
        name = "/".join(path)
        shape = tuple(int(s) for s in np.shape(leaf))
        dtype = str(np.dtype(leaf.dtype))
        if name not in leaf_tables:
            leaves.append(LeafSpec(path, shape, dtype))
            continue
        table = np.asarray(leaf_tables[name])
        if table.dtype != np.int32 or table.shape != (math.prod(shape),):
            raise ValueError(f"table of {name!r}: expected int32[{math.prod(shape)}] for shape "
                             f"{shape}, got {table.dtype}{list(table.shape)}")
        index, _ = decode(table)
        if index.max() >= ring_size:
            raise ValueError(f"table of {name!r} addresses ring entry {int(index.max())}, but "
                             f"the ring has {ring_size} entries")
        scale = math.sqrt(ring_fan / fan_out(shape))
        leaves.append(LeafSpec(path, shape, dtype, "ring", offset, scale))
        pieces.append(table)
        offset += table.size
    if not pieces:
        raise ValueError("leaf_tables is empty")
    forward = np.concatenate(pieces).astype("<i4").tobytes()
    return RPGSpec(tuple(leaves), (RingSpec("ring", int(ring_size), offset),), 0, "explicit",
                   int(ring_fan), INDEX_MAP_VERSION, (("ring", forward),))
