"""The array codec of compression: magnitude pruning and symmetric quantisation of 1-D
float arrays, and their stored form.

* ``global_threshold(arrays, sparsity)``: one magnitude threshold over all arrays, so that
  the smallest ``sparsity`` fraction of their entries lie at or below it.
* ``compress_array(x, threshold=, bits=, chunk=)``: prunes ``|x| <= threshold`` and
  quantises the kept entries, ``bits`` in {8, 4} (32: float32, pruning only), one scale per
  array or per ``chunk`` consecutive entries: q = round(x / s), s = max|x| / (2^(bits-1) - 1).
* ``CompressedArray``: the stored form (a bitmap of the kept entries when pruned, the packed
  integer codes, two 4-bit codes a byte for ``bits=4``, the float32 scales), its byte count,
  ``dequantize()`` and a plain-dict state for serialisation.

NumPy only: ``rpg_jax.compress`` (which chooses what to compress and evaluates it) and
``rpg_jax.export`` (which stores it) both build on this module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

QUANT_BITS = (32, 8, 4)


@dataclasses.dataclass
class CompressedArray:
    """A 1-D float array stored pruned and/or quantised."""

    size: int
    bits: int
    chunk: int  # entries per scale
    mask: np.ndarray | None  # np.packbits of the kept entries; None when nothing is pruned
    codes: np.ndarray  # float32 values (bits 32), int8 codes (8) or two 4-bit codes a byte (4)
    scales: np.ndarray  # float32, one per chunk (empty for bits 32)

    @property
    def nbytes(self) -> int:
        return (self.mask.nbytes if self.mask is not None else 0) + self.codes.nbytes \
            + self.scales.nbytes

    @property
    def nonzeros(self) -> int:
        return int(np.count_nonzero(self.dequantize()))

    def keep(self) -> np.ndarray:
        if self.mask is None:
            return np.ones(self.size, bool)
        return np.unpackbits(self.mask, count=self.size).astype(bool)

    def dequantize(self) -> np.ndarray:
        """The float32 array this stores."""
        keep = self.keep()
        if self.bits == 32:
            values = self.codes
        else:
            q = self.codes.astype(np.int8) if self.bits == 8 else _unpack4(self.codes, keep.sum())
            positions = np.flatnonzero(keep)
            values = q.astype(np.float32) * self.scales[positions // self.chunk]
        out = np.zeros(self.size, np.float32)
        out[keep] = values
        return out

    def to_state(self) -> dict[str, Any]:
        return {"size": self.size, "bits": self.bits, "chunk": self.chunk,
                "mask": self.mask if self.mask is not None else np.zeros(0, np.uint8),
                "has_mask": self.mask is not None, "codes": self.codes, "scales": self.scales}

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> CompressedArray:
        return cls(int(d["size"]), int(d["bits"]), int(d["chunk"]),
                   np.asarray(d["mask"]) if d["has_mask"] else None,
                   np.asarray(d["codes"]), np.asarray(d["scales"], np.float32))


def _pack4(q: np.ndarray) -> np.ndarray:
    nibbles = (q.astype(np.int16) + 8).astype(np.uint8)  # [-7, 7] -> [1, 15]
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(8))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)


def _unpack4(packed: np.ndarray, count: int) -> np.ndarray:
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=1).reshape(-1)[:count]
    return nibbles.astype(np.int16) - 8


def global_threshold(arrays: list[np.ndarray], sparsity: float) -> float:
    """The magnitude at or below which the smallest ``sparsity`` fraction of entries lie."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"prune={sparsity}: expected a fraction in [0, 1)")
    if sparsity == 0:
        return -1.0
    magnitudes = np.abs(np.concatenate([np.ravel(a) for a in arrays]))
    k = int(round(sparsity * magnitudes.size))
    return float(np.partition(magnitudes, k - 1)[k - 1]) if k else -1.0


def compress_array(x: np.ndarray, *, threshold: float = -1.0, bits: int = 32,
                   chunk: int | None = None) -> CompressedArray:
    """Prunes entries with ``|x| <= threshold`` and quantises the rest to ``bits``."""
    if bits not in QUANT_BITS:
        raise ValueError(f"bits={bits}: expected one of {QUANT_BITS}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk={chunk}: expected a positive number of entries")
    x = np.asarray(x, np.float32).ravel()
    keep = np.abs(x) > threshold
    mask = None if keep.all() else np.packbits(keep)
    chunk = min(chunk or x.size, x.size)
    if bits == 32:
        return CompressedArray(x.size, bits, chunk, mask, x[keep], np.zeros(0, np.float32))
    qmax = 2 ** (bits - 1) - 1
    kept = np.where(keep, np.abs(x), 0.0)
    pad = (-x.size) % chunk
    scales = np.pad(kept, (0, pad)).reshape(-1, chunk).max(axis=1) / qmax
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    positions = np.flatnonzero(keep)
    q = np.clip(np.round(x[keep] / scales[positions // chunk]), -qmax, qmax).astype(np.int8)
    codes = q if bits == 8 else _pack4(q)
    return CompressedArray(x.size, bits, chunk, mask, codes, scales)
