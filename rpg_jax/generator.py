"""Pure functions from a bank (rings + free params) and a spec to a full params tree.

``generate_params`` is jit-able and differentiable. Inside ``jit`` pass the tables from
``make_tables(spec)`` as an argument of the jitted function: captured as constants they
are baked into every executable and make compilation much slower. With
``make_tables(spec, where="device")`` nothing is stored: the indices and signs are
computed inside the step from the spec (``rpg_jax.device_map``), bit-identical to the
host tables.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rpg_jax import device_map
from rpg_jax.index_map import inverse_table, ring_tables
from rpg_jax.spec import RPGSpec
from rpg_jax.trees import flatten_params, path_name, unflatten_params

Bank = dict[str, Any]  # {"rings": {name: f32[N]}, "free": nested dict of free params}
_INDEX_MASK = 0x7FFFFFFF
WHERE = ("host", "device")
_INVERSE_SLOTS = 1 << 20  # inverse-map slots per block of the device gather backward


@dataclasses.dataclass(frozen=True)
class DeviceTables:
    """Tables computed on the device inside the step: a pytree without leaves.

    ``backward``: "gather" (through the inverse map, computed in the backward pass) or
    "scatter" (scatter-adds through the forward indices, recomputed in the backward pass).
    """

    backward: str = "gather"

    def __post_init__(self):
        if self.backward not in ("gather", "scatter"):
            raise ValueError(f"backward={self.backward!r}: expected 'gather' or 'scatter'")


jax.tree_util.register_pytree_node(DeviceTables, lambda t: ((), t), lambda t, _: t)

# {ring: {"forward": i32[T], ["inverse": i32[N, M]]}} (host tables) or DeviceTables
Tables = dict[str, dict[str, jax.Array]] | DeviceTables


def host_tables(spec: RPGSpec, inverse: bool = True
                ) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """NumPy (forward, inverse) tables of every ring (inverse None if not ``inverse``)."""
    if spec.mode == "explicit":
        return {ring.name: (spec.explicit_forward(ring.name),
                            inverse_table(spec.explicit_forward(ring.name), ring.size)
                            if inverse else None)
                for ring in spec.rings}
    return {
        ring.name: ring_tables(
            tuple(leaf.size for leaf in spec.ring_leaves(ring.name)),
            ring.size,
            seed=spec.seed,
            ring_name=ring.name,
            mode=spec.mode,
            version=spec.version,
            inverse=inverse,
        )
        for ring in spec.rings
    }


def make_tables(spec: RPGSpec, sharding: jax.sharding.Sharding | None = None, *,
                inverse: bool = True, where: str = "host") -> Tables:
    """The index tables; pass them into jitted code as an argument.

    ``where="host"``: device arrays derived on the host (ImageNet ResNet50: about 2 s;
    no host copy is kept). With ``inverse=False`` only the forward table (4 bytes per
    generated weight) goes to the device: enough for inference, and gradients then take a
    scatter-add instead of a gather through the inverse table (4 more bytes per generated
    weight; see ``generate_params``).

    ``where="device"``: a ``DeviceTables`` marker, no arrays: indices and signs are computed
    inside the jitted step from the spec, the backward gathers through the inverse map
    computed there (``inverse=True``) or scatter-adds through recomputed forward indices
    (``inverse=False``). Nothing table-sized is an argument or lives between the passes.

    On CPU the gather backward is the faster and the smaller of the two on both paths
    (``benchmarks/device_tables.py``).
    """
    if where not in WHERE:
        raise ValueError(f"where={where!r}: expected one of {WHERE}")
    if where == "device":
        if spec.mode == "explicit":
            raise ValueError("a spec with explicit tables (spec_from_tables) has no index "
                             "map to compute on the device: use where='host'")
        return DeviceTables("gather" if inverse else "scatter")
    put = (lambda x: jax.device_put(x, sharding)) if sharding is not None else jnp.asarray
    return {
        name: {"forward": put(fwd), **({"inverse": put(inv)} if inverse else {})}
        for name, (fwd, inv) in host_tables(spec, inverse).items()
    }


@functools.lru_cache(maxsize=16)
def _default_tables(spec: RPGSpec) -> Tables:
    return make_tables(spec)


# Static layout of one ring's leaves: ((size, shape, scale, dtype), ...).
_Layout = tuple[tuple[int, tuple[int, ...], float, str], ...]


def _signed_gather(values: jax.Array, table: jax.Array) -> jax.Array:
    picked = jnp.asarray(values).at[table & _INDEX_MASK].get(mode="promise_in_bounds")
    return jnp.where(table < 0, -picked, picked)


def _gather_leaves(layout: _Layout, ring, forward) -> tuple[jax.Array, ...]:
    # One gather per leaf straight into its kernel (the table slice and the scale fuse in).
    out, start = [], 0
    for size, shape, scale, dtype in layout:
        piece = _signed_gather(ring, forward[start : start + size]) * jnp.asarray(scale, ring.dtype)
        out.append(piece.reshape(shape).astype(dtype))
        start += size
    return tuple(out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _expand_ring(layout: _Layout, ring, forward, inverse):
    return _gather_leaves(layout, ring, forward)


def _expand_ring_fwd(layout, ring, forward, inverse):
    return _gather_leaves(layout, ring, forward), inverse


def _expand_ring_bwd(layout, residuals, cotangents):
    # One concatenation, one gather through the inverse map, one reshape-sum: the transpose
    # of the forward gather without a scatter-add over the T generated weights.
    inverse = residuals
    pieces = [
        g.astype(jnp.float32).reshape(-1) * jnp.float32(scale)
        for g, (_, _, scale, _) in zip(cotangents, layout, strict=True)
    ]
    flat = jnp.concatenate(pieces + [jnp.zeros((1,), jnp.float32)])
    ring_grad = _signed_gather(flat, inverse).sum(axis=1)
    return ring_grad, None, None


_expand_ring.defvjp(_expand_ring_fwd, _expand_ring_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _expand_ring_scatter(layout: _Layout, ring, forward):
    return _gather_leaves(layout, ring, forward)


def _expand_ring_scatter_fwd(layout, ring, forward):
    return _gather_leaves(layout, ring, forward), (ring, forward)  # inputs: no copies


def _expand_ring_scatter_bwd(layout, residuals, cotangents):
    # The forward-table-only transpose: the leaves' cotangents are scatter-added one after
    # another into a single ring-sized accumulator (updated in place).
    ring, forward = residuals
    grad, start = jnp.zeros_like(ring), 0
    for g, (size, _, scale, _) in zip(cotangents, layout, strict=True):
        table = forward[start : start + size]
        g = g.astype(ring.dtype).reshape(-1) * jnp.asarray(scale, ring.dtype)
        grad = grad.at[table & _INDEX_MASK].add(jnp.where(table < 0, -g, g),
                                                mode="promise_in_bounds")
        start += size
    return grad, None


_expand_ring_scatter.defvjp(_expand_ring_scatter_fwd, _expand_ring_scatter_bwd)


# ---------------------------------------------------------------- device-computed indices
# key: (layer sizes, ring size, seed, ring name, mode), static.


def _device_forward(key, layer=None) -> jax.Array:
    sizes, n, seed, name, mode = key
    return device_map.forward_slice(sizes, n, seed=seed, ring_name=name, mode=mode,
                                    layer=layer)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _device_expand_ring(key, layout: _Layout, backward: str, ring):
    return _gather_leaves(layout, ring, _device_forward(key))


def _device_expand_ring_fwd(key, layout, backward, ring):
    # Nothing is kept (the ring is an input): the backward recomputes what it needs.
    return _gather_leaves(layout, ring, _device_forward(key)), ring


def _device_expand_ring_bwd(key, layout, backward, ring, cotangents):
    if backward == "scatter":
        return _expand_ring_scatter_bwd(layout, (ring, _device_forward(key)), cotangents)[:1]
    # The inverse map block by block of ring entries: only one block's rows exist at a time.
    sizes, n, seed, name, mode = key
    pieces = [g.astype(jnp.float32).reshape(-1) * jnp.float32(scale)
              for g, (_, _, scale, _) in zip(cotangents, layout, strict=True)]
    flat = jnp.concatenate(pieces + [jnp.zeros((1,), jnp.float32)])
    block = min(n, max(1, _INVERSE_SLOTS // -(-sum(sizes) // n)))

    def rows(first):
        inverse = device_map.inverse_rows(sizes, n, seed=seed, ring_name=name, mode=mode,
                                          first=first, count=block)
        return _signed_gather(flat, inverse).sum(axis=1)

    grad = jax.lax.map(rows, jnp.arange(0, n, block, dtype=jnp.int32)).reshape(-1)[:n]
    return (grad.astype(ring.dtype),)


_device_expand_ring.defvjp(_device_expand_ring_fwd, _device_expand_ring_bwd)


def _check_bank(bank: Bank, spec: RPGSpec) -> None:
    if not isinstance(bank, dict) or set(bank) != {"rings", "free"}:
        keys = sorted(bank) if isinstance(bank, dict) else type(bank).__name__
        raise ValueError(f"bank must be a dict with keys 'rings' and 'free', got {keys}")
    names = {r.name for r in spec.rings}
    if set(bank["rings"]) != names:
        raise ValueError(f"bank rings {sorted(bank['rings'])} do not match spec rings "
                         f"{sorted(names)}")
    for ring in spec.rings:
        shape = tuple(np.shape(bank["rings"][ring.name]))
        if shape != (ring.size,):
            raise ValueError(f"ring {ring.name!r}: bank has shape {shape}, spec expects "
                             f"({ring.size},)")
    got = {path: tuple(np.shape(x)) for path, x in flatten_params(bank["free"])}
    want = {leaf.path: leaf.shape for leaf in spec.free}
    for path in sorted(set(got) | set(want)):
        name = path_name(path)
        if path not in got:
            raise ValueError(f"free parameter {name!r} is in the spec but not in the bank")
        if path not in want:
            raise ValueError(f"bank has free parameter {name!r} that the spec does not know")
        if got[path] != want[path]:
            raise ValueError(f"free parameter {name!r}: bank shape {got[path]}, spec shape "
                             f"{want[path]}")


def generate_params(bank: Bank, spec: RPGSpec, tables: Tables | None = None) -> dict[str, Any]:
    """The model's full params tree: generated kernels from the rings plus the free params.

    Returns exactly the structure, shapes and dtypes described by ``spec``. Pure,
    differentiable and jit-able; inside ``jit`` pass ``tables=make_tables(spec)`` as an
    argument. The gradient is a gather through the inverse tables when ``tables`` have them,
    else a scatter-add through the forward tables (same values up to summation order).
    With ``make_tables(spec, where="device")`` the same indices are computed in the step.
    """
    _check_bank(bank, spec)
    if tables is None:
        tables = _default_tables(spec)
    leaves: dict[tuple[str, ...], Any] = dict(flatten_params(bank["free"]))
    for ring in spec.rings:
        members = spec.ring_leaves(ring.name)
        layout = tuple((leaf.size, leaf.shape, leaf.scale, leaf.dtype) for leaf in members)
        values = bank["rings"][ring.name]
        if isinstance(tables, DeviceTables):
            key = (tuple(leaf.size for leaf in members), ring.size, spec.seed, ring.name,
                   spec.mode)
            kernels = _device_expand_ring(key, layout, tables.backward, values)
            leaves.update({leaf.path: k for leaf, k in zip(members, kernels, strict=True)})
            continue
        t = tables[ring.name]
        if "inverse" in t:
            kernels = _expand_ring(layout, values, t["forward"], t["inverse"])
        else:
            kernels = _expand_ring_scatter(layout, values, t["forward"])
        leaves.update({leaf.path: k for leaf, k in zip(members, kernels, strict=True)})
    return unflatten_params([(leaf.path, leaves[leaf.path]) for leaf in spec.leaves])


def init_bank(key: jax.Array, spec: RPGSpec, params: Any) -> Bank:
    """A fresh bank: ring r ~ Normal(0, r.std), free params taken from ``params`` (Linen
    dicts or NNX, as for ``make_spec``)."""
    flat = dict(flatten_params(params))
    for leaf in spec.leaves:
        if leaf.path not in flat:
            raise ValueError(f"parameter {leaf.name!r} of the spec is missing from params")
        if tuple(np.shape(flat[leaf.path])) != leaf.shape:
            raise ValueError(f"parameter {leaf.name!r}: params shape "
                             f"{tuple(np.shape(flat[leaf.path]))}, spec shape {leaf.shape}")
    rings = {
        ring.name: ring.std * jax.random.normal(jax.random.fold_in(key, i), (ring.size,))
        for i, ring in enumerate(spec.rings)
    }
    free = unflatten_params([(leaf.path, flat[leaf.path]) for leaf in spec.free])
    return {"rings": rings, "free": free}


def materialize(bank: Bank, spec: RPGSpec) -> dict[str, Any]:
    """Plain params as host NumPy arrays (for export or serving), computed outside jit."""
    return jax.device_get(generate_params(bank, spec, make_tables(spec, inverse=False)))


@dataclasses.dataclass(frozen=True)
class ParamCount:
    """Parameter counts of an RPG model. The paper's "DoF" is ``ring_dof``."""

    ring_dof: int
    free: int
    generated: int

    @property
    def trainable(self) -> int:
        return self.ring_dof + self.free

    @property
    def plain(self) -> int:
        """Trainable parameters of the same model without RPG."""
        return self.generated + self.free

    @property
    def compression(self) -> float:
        """Plain trainable parameters / RPG trainable parameters."""
        return self.plain / self.trainable

    def __str__(self) -> str:
        return (
            f"ring DoF {self.ring_dof:,} | free {self.free:,} | trainable {self.trainable:,} | "
            f"generated {self.generated:,} | plain model {self.plain:,} | "
            f"compression {self.compression:.2f}x"
        )


def count(spec: RPGSpec, bank: Bank | None = None) -> ParamCount:
    """Ring DoF, free, trainable and generated parameter counts (checks ``bank`` if given)."""
    if bank is not None:
        _check_bank(bank, spec)
    return ParamCount(
        ring_dof=sum(r.size for r in spec.rings),
        free=sum(leaf.size for leaf in spec.free),
        generated=sum(r.length for r in spec.rings),
    )
