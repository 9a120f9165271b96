"""The versioned map from (seed, ring layout) to ring indices and signs.

Everything here is our own integer arithmetic on NumPy ``uint32`` arrays (a keyed Feistel
bijection with cycle walking, and a keyed hash for signs), never a NumPy or JAX random
stream, so the same spec yields bit-identical tables on every platform and library version.
A golden checksum test pins version 1; any change to this file that alters the tables must
bump ``INDEX_MAP_VERSION`` and keep the old version readable.

Definitions for one ring of ``N`` entries read by ``T`` generated weights (positions
``t = 0 .. T-1``, the ring's layers laid end to end in spec order):

* ``pi``: a keyed pseudo-random bijection of ``[0, T)``.
* ``rpg``:       index ``pi(t) mod N``, sign ``s(t)`` (+1/-1 with probability 1/2).
* ``perm_only``: index ``pi(t) mod N``, sign +1.
* ``sign_only``: index ``j mod N`` (``j`` = position inside the layer), sign ``s(t)``.
* ``naive``:     index ``j mod N``, sign +1 (plain recurrent sharing, the paper's ablation).

Because ``pi`` is a bijection, ``rpg`` and ``perm_only`` use every ring entry
``floor(T/N)`` or ``floor(T/N) + 1`` times (even sampling).

Tables are ``int32`` with the sign in the top bit (a negative entry means "negate"):
``forward[t] = index(t) | sign_bit(t)`` (length ``T``), and the inverse table of shape
``(N, M)`` lists, for every ring entry, the positions that read it
(``position | sign_bit``; unused slots hold ``T``, which points at an appended zero).
"""

from __future__ import annotations

import numpy as np

INDEX_MAP_VERSION = 1
MODES = ("rpg", "naive", "perm_only", "sign_only")

_M64 = (1 << 64) - 1
_SIGN_BIT = np.uint32(1 << 31)
_CHUNK = 1 << 18  # elements per vectorised block: keeps the Feistel working set in cache
_ROUNDS = 6


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _fnv1a64(text: str) -> int:
    h = 0xCBF29CE484222325
    for byte in text.encode("utf-8"):
        h = ((h ^ byte) * 0x100000001B3) & _M64
    return h


def _derive_key(*words: int) -> int:
    """Folds integers into one 64-bit key with splitmix64."""
    h = 0
    for w in words:
        h = _splitmix64(h ^ (w & _M64))
    return h


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser (a bijection of uint32), in place."""
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


class _Feistel:
    """Keyed bijection of ``[0, length)`` (unbalanced Feistel on n bits + cycle walking)."""

    def __init__(self, length: int, key: int):
        self.length = length
        self.bits = max(2, (length - 1).bit_length())
        self.keys = [np.uint32(_derive_key(key, r) & 0xFFFFFFFF) for r in range(_ROUNDS)]

    def _rounds(self, x: np.ndarray) -> np.ndarray:
        lo_bits = self.bits - self.bits // 2  # width of the right half
        hi_bits = self.bits // 2
        for k in self.keys:
            right = x & np.uint32((1 << lo_bits) - 1)
            left = x >> np.uint32(lo_bits)
            f = _fmix32(right ^ k)
            f &= np.uint32((1 << hi_bits) - 1)
            left ^= f
            x = (right << np.uint32(hi_bits)) | left
            lo_bits, hi_bits = hi_bits, lo_bits
        return x

    def __call__(self, t: np.ndarray) -> np.ndarray:
        y = self._rounds(t.astype(np.uint32))
        out = np.flatnonzero(y >= self.length)
        while out.size:  # cycle walking: re-apply until the value falls inside [0, length)
            y[out] = self._rounds(y[out])
            out = out[y[out] >= self.length]
        return y


def _sign_bits(t: np.ndarray, key: int) -> np.ndarray:
    """``uint32`` array holding the sign bit (bit 31) of each position: 1 means negative."""
    k1 = np.uint32(key & 0xFFFFFFFF)
    k2 = np.uint32((key >> 32) & 0xFFFFFFFF)
    h = _fmix32(t.astype(np.uint32) ^ k1)
    h ^= k2
    return _fmix32(h) & _SIGN_BIT


def ring_key(seed: int, ring_name: str, version: int = INDEX_MAP_VERSION) -> int:
    """The 64-bit key of one ring, derived from the spec seed and the ring's name."""
    return _derive_key(version, seed, _fnv1a64(ring_name))


def ring_tables(
    layer_sizes: tuple[int, ...],
    ring_size: int,
    *,
    seed: int,
    ring_name: str,
    mode: str = "rpg",
    version: int = INDEX_MAP_VERSION,
    inverse: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Forward (``int32[T]``) and inverse (``int32[N, M]``, or None if not ``inverse``)
    tables of one ring.

    ``layer_sizes`` are the numbers of generated weights of the ring's layers, in order.
    """
    total = int(sum(layer_sizes))
    n = int(ring_size)
    _check_ring(version, mode, total, n)
    key = ring_key(seed, ring_name, version)
    permute = _Feistel(total, _derive_key(key, 1)) if mode in ("rpg", "perm_only") else None
    signed = mode in ("rpg", "sign_only")

    forward = np.empty(total, np.uint32)
    slot = None  # pi(t): where t lands in the inverse table
    if permute is None:
        starts = np.cumsum((0,) + tuple(layer_sizes))[:-1]
        forward[:] = (np.arange(total, dtype=np.int64) - np.repeat(starts, layer_sizes)) % n
    elif inverse:
        slot = np.empty(total, np.int64)
    for lo in range(0, total, _CHUNK):
        t = np.arange(lo, min(lo + _CHUNK, total), dtype=np.uint32)
        if permute is not None:
            v = permute(t)
            forward[lo : lo + t.size] = v % np.uint32(n)
            if slot is not None:
                slot[lo : lo + t.size] = v
        if signed:
            forward[lo : lo + t.size] |= _sign_bits(t, _derive_key(key, 2))
    if not inverse:
        return forward.view(np.int32), None
    if permute is None:
        return forward.view(np.int32), inverse_table(forward.view(np.int32), n)
    # pi is a bijection, so entry e is read at positions pi^-1(e + k*N), k = 0, 1, ...
    return forward.view(np.int32), _pack_inverse(forward, slot, n, -(-total // n))


def _check_ring(version: int, mode: str, total: int, n: int) -> None:
    if version != INDEX_MAP_VERSION:
        raise ValueError(
            f"index map version {version} is not supported by this rpg_jax "
            f"(it implements version {INDEX_MAP_VERSION})"
        )
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    if not 0 < n <= total:
        raise ValueError(f"ring size {n} must be in [1, {total}] (the ring's generated weights)")
    if total >= 1 << 31:
        raise ValueError(f"a ring reads {total} weights; at most 2**31 - 1 are supported")


def _pack_inverse(forward: np.ndarray, slot: np.ndarray, n: int, rows: int) -> np.ndarray:
    """Inverse table from each position's slot ``rank * N + index`` (rank < rows)."""
    total = forward.size
    inverse = np.full(rows * n, total, np.uint32)
    inverse[slot] = np.arange(total, dtype=np.uint32) | (forward.view(np.uint32) & _SIGN_BIT)
    # Stored entry-major, (N, M): the backward gather then reduces over the fast axis, which
    # XLA fuses into the gather (about 2x faster than an (M, N) table on CPU).
    return np.ascontiguousarray(inverse.view(np.int32).reshape(rows, n).T)


def inverse_table(forward: np.ndarray, ring_size: int) -> np.ndarray:
    """The inverse (``int32[N, M]``) of any encoded forward table (uneven use is padded)."""
    forward = np.asarray(forward, np.int32)
    index, _ = decode(forward)
    if forward.size == 0 or index.max() >= ring_size:
        raise ValueError(f"a forward table addresses entry {index.max()} of a ring of "
                         f"{ring_size}")
    # Rank of each position among the positions that read the same entry, in position order.
    order = np.argsort(index, kind="stable")
    counts = np.bincount(index, minlength=ring_size)
    first = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.empty(forward.size, np.int64)
    rank[order] = np.arange(forward.size) - first[index[order]]
    return _pack_inverse(forward, rank * ring_size + index, ring_size, int(counts.max()))


def encode(index: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """An encoded ``int32`` table from indices and +1/-1 signs (sign in the top bit)."""
    index = np.asarray(index, np.int64)
    if index.size and (index.min() < 0 or index.max() >= 1 << 31):
        raise ValueError("indices must be in [0, 2**31)")
    table = index.astype(np.uint32) | np.where(np.asarray(sign) < 0, _SIGN_BIT, np.uint32(0))
    return table.view(np.int32)


def decode(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Splits an encoded table into (index ``int64``, sign ``int8`` of +1/-1)."""
    table = np.asarray(table)
    index = (table.view(np.uint32) & np.uint32(0x7FFFFFFF)).astype(np.int64)
    sign = np.where(table < 0, -1, 1).astype(np.int8)
    return index, sign
