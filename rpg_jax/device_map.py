"""Version 1 of the index map (``rpg_jax.index_map``) computed by XLA from the spec alone.

The same keyed Feistel bijection with cycle walking, sign hash and ``pi(t) mod N``, written
in ``jax.numpy`` ``uint32`` arithmetic, so the indices and signs can be computed inside a
jitted step instead of being stored: bit-identical to ``index_map.ring_tables`` for every
mode, layout and seed (checkpoints move freely between the two paths). Keys are derived on
the host from the spec (Python integers baked into the program as constants); only the
positions are computed on the device.

Cycle walking is exact: ``while_loop``s re-apply the rounds to the positions still outside
``[0, T)`` until none is left (the ImageNet ResNet18 ring needs 17 passes in all, the last
ones for a handful of positions, so after 4 passes over everything the stragglers are
packed into a small buffer). The inverse permutation walks back through the same values,
so ``pi^-1`` is exact too.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from rpg_jax.index_map import _ROUNDS, _derive_key, ring_key

_SIGN_BIT = np.uint32(1 << 31)
_M1, _M2 = np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35)


def _fmix32(h: jax.Array) -> jax.Array:
    h = h ^ (h >> 16)
    h = h * _M1
    h = h ^ (h >> 13)
    h = h * _M2
    return h ^ (h >> 16)


@functools.lru_cache(maxsize=256)
def _feistel_params(length: int, key: int) -> tuple[int, tuple[int, ...]]:
    """Bit width and round keys of ``index_map._Feistel(length, key)``."""
    bits = max(2, (length - 1).bit_length())
    return bits, tuple(_derive_key(key, r) & 0xFFFFFFFF for r in range(_ROUNDS))


def _rounds(x: jax.Array, bits: int, keys: tuple[int, ...]) -> jax.Array:
    lo_bits, hi_bits = bits - bits // 2, bits // 2
    for k in keys:
        right = x & np.uint32((1 << lo_bits) - 1)
        left = x >> lo_bits
        left = left ^ (_fmix32(right ^ np.uint32(k)) & np.uint32((1 << hi_bits) - 1))
        x = (right << hi_bits) | left
        lo_bits, hi_bits = hi_bits, lo_bits
    return x


def _inverse_rounds(x: jax.Array, bits: int, keys: tuple[int, ...]) -> jax.Array:
    # Round r maps (left: hi bits | right: lo bits) to (right | left ^ f(right)); undo it
    # from the last round back, with the widths each round had.
    widths = []
    lo_bits, hi_bits = bits - bits // 2, bits // 2
    for _ in keys:
        widths.append((lo_bits, hi_bits))
        lo_bits, hi_bits = hi_bits, lo_bits
    for k, (lo_bits, hi_bits) in zip(reversed(keys), reversed(widths), strict=True):
        right = x >> hi_bits
        left = (x & np.uint32((1 << hi_bits) - 1)) ^ (
            _fmix32(right ^ np.uint32(k)) & np.uint32((1 << hi_bits) - 1))
        x = (left << lo_bits) | right
    return x


_SMALL = 1 << 15  # at most this many values: walk them with a plain while loop
_PASSES = 4  # masked passes over a buffer before its stragglers are packed into a smaller one


def _cap(size: int, fraction: float) -> int:
    """Room for the stragglers among ``size`` values that each remain with ``fraction``:
    the mean plus 8 standard deviations (more goes to the exact fallback)."""
    mean = size * fraction
    return min(size, int(mean + 8 * math.sqrt(mean) + 1024))


def _select_bit(mask: jax.Array, k: jax.Array) -> jax.Array:
    """Position of the ``k``-th (from 0) set bit of each ``uint32`` mask."""
    pos = jnp.zeros(mask.shape, jnp.int32)
    for width in (16, 8, 4, 2, 1):
        low = jax.lax.population_count(mask & np.uint32((1 << width) - 1)).astype(jnp.int32)
        up = k >= low
        k = jnp.where(up, k - low, k)
        mask = jnp.where(up, mask >> width, mask)
        pos = jnp.where(up, pos + width, pos)
    return pos


def _walk(y: jax.Array, step, bound: np.uint32, fraction: float, q: float) -> jax.Array:
    """Applies ``step`` to the values of ``y`` that are ``>= bound`` until none is left.

    ``fraction`` of the values are expected out of range now, and ``q`` of them again after
    each step. Large buffers take a few masked passes, then their stragglers are packed into
    a buffer sized for them (mean + 8 sd), walked there and written back; a last while loop
    over the whole buffer finishes any that did not fit, so the result is exact whatever
    the counts.
    """
    def masked(y):
        return jnp.where(y >= bound, step(y), y)

    def loop(y):
        return jax.lax.while_loop(lambda y: jnp.any(y >= bound), masked, y)

    n = y.shape[0]
    if n <= _SMALL or fraction * q**_PASSES * n < 1:
        return loop(y)
    y = jax.lax.fori_loop(0, _PASSES, lambda _, y: masked(y), y)  # one kernel, compiled once
    cap = _cap(n, fraction * q**_PASSES)
    # Each row of 32 values becomes a bit mask of its stragglers; a prefix sum over the
    # rows' counts numbers the stragglers, and slot i of the small buffer finds its row by
    # binary search and its bit by a popcount search.
    flags = jnp.pad(y >= bound, (0, -n % 32)).reshape(-1, 32).astype(jnp.uint32)
    masks = jnp.sum(flags << jax.lax.iota(jnp.uint32, 32), axis=1, dtype=jnp.uint32)
    counts = jax.lax.population_count(masks).astype(jnp.int32)
    ends = jnp.cumsum(counts)
    i = jax.lax.iota(jnp.int32, cap)
    row = jnp.minimum(jnp.searchsorted(ends, i, side="right"), masks.shape[0] - 1)
    bit = _select_bit(masks[row], i - (ends[row] - counts[row]))
    pos = jnp.where(i < ends[-1], row * 32 + bit, n)  # n: an unused slot
    z = y.at[pos].get(mode="fill", fill_value=0)  # 0 is in range: left alone
    y = y.at[pos].set(loop(z), mode="drop")
    # Stragglers beyond the buffer's room (unlikely) are finished here; usually the loop's
    # first test finds none and it ends at once.
    return loop(y)


def permute(t: jax.Array, length: int, key: int, *, inverse: bool = False) -> jax.Array:
    """``pi(t)`` (or ``pi^-1(t)``) of ``index_map._Feistel(length, key)`` for ``uint32``
    positions ``t`` in ``[0, length)``, with exact cycle walking."""
    bits, keys = _feistel_params(int(length), int(key))
    step = functools.partial(_inverse_rounds if inverse else _rounds, bits=bits, keys=keys)
    y = step(t.astype(jnp.uint32).reshape(-1))
    if length < 1 << bits:
        q = 1.0 - length / (1 << bits)  # a value leaves [0, length) with this probability
        y = _walk(y, step, np.uint32(length), q, q)
    return y.reshape(t.shape)


def sign_bits(t: jax.Array, key: int) -> jax.Array:
    """``uint32`` sign bits (bit 31) of positions ``t``, as ``index_map._sign_bits``."""
    h = _fmix32(t.astype(jnp.uint32) ^ np.uint32(key & 0xFFFFFFFF))
    return _fmix32(h ^ np.uint32((key >> 32) & 0xFFFFFFFF)) & _SIGN_BIT


def _to_int32(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, jnp.int32)


def _check(layer_sizes: tuple[int, ...], ring_size: int, mode: str) -> int:
    from rpg_jax.index_map import MODES

    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    total = int(sum(layer_sizes))
    if not 0 < ring_size <= total:
        raise ValueError(f"ring size {ring_size} must be in [1, {total}] (the ring's "
                         "generated weights)")
    if total >= 1 << 31:
        raise ValueError(f"a ring reads {total} weights; at most 2**31 - 1 are supported")
    return total


def forward_slice(layer_sizes: tuple[int, ...], ring_size: int, *, seed: int, ring_name: str,
                  mode: str = "rpg", layer: int | None = None,
                  shift: jax.Array | None = None) -> jax.Array:
    """The encoded forward table (``int32``) of one ring, or of its layer ``layer`` only,
    computed with ``jax.numpy``; equal to the matching slice of ``ring_tables(...)[0]``.

    ``shift``: a ``uint32`` scalar that is zero at run time (``zero_of(x)``), added to the
    positions. The table depends on nothing but constants, so without it XLA computes each
    copy of it as early as it likes and merges identical copies (XLA:CPU drops
    optimization barriers), which keeps it alive from the forward to the backward pass: a
    stored table after all. With it the computation waits for ``x``.
    """
    total = _check(layer_sizes, ring_size, mode)
    key = ring_key(seed, ring_name)
    starts = np.cumsum((0,) + tuple(layer_sizes))
    layers = range(len(layer_sizes)) if layer is None else (layer,)
    lo, hi = int(starts[layers[0]]), int(starts[layers[-1] + 1])
    t = jax.lax.iota(jnp.uint32, hi - lo) + np.uint32(lo)
    if shift is not None:
        t = jnp.minimum(t + shift, np.uint32(hi - 1))  # in range whatever shift holds
    n = np.uint32(ring_size)
    if mode in ("rpg", "perm_only"):
        index = permute(t, total, _derive_key(key, 1)) % n
    elif layer is not None:  # position inside its layer, mod N
        index = (t - np.uint32(lo)) % n
    else:
        index = jnp.concatenate([jax.lax.iota(jnp.uint32, layer_sizes[i]) % n
                                 for i in layers])
    if mode in ("rpg", "sign_only"):
        index = index | sign_bits(t, _derive_key(key, 2))
    return _to_int32(index)


def zero_of(tree) -> jax.Array:
    """A ``uint32`` zero that XLA cannot prove is zero, computed from ``tree``'s first
    floating-point element (``x * 0.0`` is not folded; NaN or inf give a nonzero value,
    which ``forward_slice`` clamps into range). A plain 0 if ``tree`` has no float leaf."""
    for leaf in jax.tree.leaves(tree):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.floating) and jnp.size(leaf):
            x = jnp.ravel(leaf)[0].astype(jnp.float32) * np.float32(0.0)
            return jax.lax.bitcast_convert_type(x, jnp.uint32) << np.uint32(1)
    return jnp.zeros((), jnp.uint32)


def inverse_rows(layer_sizes: tuple[int, ...], ring_size: int, *, seed: int, ring_name: str,
                 mode: str = "rpg", first: jax.Array | int = 0,
                 count: int | None = None) -> jax.Array:
    """Rows ``first .. first + count - 1`` (``first`` may be traced) of the encoded inverse
    table (``int32[N, M]``) of one ring, computed with ``jax.numpy``; together equal to
    ``ring_tables(...)[1]``: entry e lists the positions reading it in position order
    (``position | sign_bit``), padded with ``T`` (as are rows past the ring's end)."""
    total = _check(layer_sizes, ring_size, mode)
    key = ring_key(seed, ring_name)
    n = ring_size
    count = n if count is None else int(count)
    e = (jax.lax.iota(jnp.uint32, count) + jnp.asarray(first, jnp.uint32))[:, None]
    if mode in ("rpg", "perm_only"):
        rows = -(-total // n)
        # pi is a bijection: entry e is read at positions pi^-1(e + k*N), k = 0, 1, ...
        slot = e + np.uint32(n) * jax.lax.iota(jnp.uint32, rows)[None, :]
        valid = (slot < np.uint32(total)) & (e < np.uint32(n))
        pos = permute(jnp.where(valid, slot, 0), total, _derive_key(key, 1), inverse=True)
    else:
        # Layer L (start o, size s) reads e at o + e + k*N for e + k*N < s, in order.
        ei = e.astype(jnp.int32)
        rows = sum(-(-s // n) for s in layer_sizes)  # entry 0 is read the most
        r = jax.lax.iota(jnp.int32, rows)[None, :]
        pos = jnp.full((count, rows), total, jnp.int32)
        before = jnp.zeros((count, 1), jnp.int32)
        start = 0
        for size in layer_sizes:
            c = jnp.maximum((size - ei + n - 1) // n, 0)
            here = (r >= before) & (r < before + c)
            pos = jnp.where(here, start + ei + (r - before) * n, pos)
            before, start = before + c, start + size
        valid = (pos < total) & (ei < n)
        pos = pos.astype(jnp.uint32)
    if mode in ("rpg", "sign_only"):
        pos = pos | sign_bits(pos, _derive_key(key, 2))
    return _to_int32(jnp.where(valid, pos, np.uint32(total)))


def inverse_table(layer_sizes: tuple[int, ...], ring_size: int, *, seed: int,
                  ring_name: str, mode: str = "rpg") -> jax.Array:
    """The whole encoded inverse table (``int32[N, M]``) of one ring: ``inverse_rows`` of
    every entry, equal to ``ring_tables(...)[1]``."""
    return inverse_rows(layer_sizes, ring_size, seed=seed, ring_name=ring_name, mode=mode)
