"""Counter-based random bits for reproducible, order-independent host randomness.

Every random decision of the input pipeline (synthetic images, per-example
augmentation parameters) is a pure function of ``(seed, example position)``
through the SplitMix64 finaliser, so results never depend on batch size,
worker count or the order in which elements are produced.
"""

from __future__ import annotations

import numpy as np

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser applied elementwise to a uint64 array (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(_C1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(_C2)
    return x ^ (x >> np.uint64(31))


def splitmix64_int(x: int) -> int:
    """SplitMix64 finaliser for one Python int (same values as :func:`splitmix64`)."""
    x &= _MASK
    x = ((x ^ (x >> 30)) * _C1) & _MASK
    x = ((x ^ (x >> 27)) * _C2) & _MASK
    return x ^ (x >> 31)


def seed_key(seed: int, stream: int = 0) -> int:
    """Mixes a user seed and a stream id into a 64-bit key."""
    return splitmix64_int(splitmix64_int(seed * _GOLDEN + 1) + stream * _GOLDEN)


def example_bits(seed: int, positions: np.ndarray, stream: int = 0) -> np.ndarray:
    """Returns 64 random bits (uint64, shape of ``positions`` as 1-D at least) per position."""
    key = np.uint64(seed_key(seed, stream))
    pos = np.atleast_1d(np.asarray(positions, dtype=np.uint64))
    return splitmix64(splitmix64(key ^ (pos * np.uint64(_GOLDEN))))
