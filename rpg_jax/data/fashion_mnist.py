"""Fashion-MNIST from the original (optionally gzipped) IDX files, without TensorFlow."""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import zlib
from pathlib import Path

import numpy as np
from absl import logging

ENV_VAR = "RPG_JAX_FASHION_MNIST_DIR"
VERIFY_ENV_VAR = "RPG_JAX_FASHION_MNIST_VERIFY"  # error (default) | warn
DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
NUM_CLASSES = 10
IMAGE_SIZE = 28

# split -> (images file, labels file), without the optional ".gz" suffix.
FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# SHA-256 and size of the decompressed IDX files as published by Zalando Research (the .gz
# files of github.com/zalandoresearch/fashion-mnist with the MD5s of its README decompress
# to these; the .gz bytes themselves differ between mirrors, the content does not).
PUBLISHED: dict[str, tuple[str, int]] = {
    "train-images-idx3-ubyte":
        ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47040016),
    "train-labels-idx1-ubyte":
        ("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60008),
    "t10k-images-idx3-ubyte":
        ("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7840016),
    "t10k-labels-idx1-ubyte":
        ("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10008),
}

_HOW_TO_GET = (
    "To get Fashion-MNIST: `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; "
    f"installs the files into {DEFAULT_DIR}), or download the four IDX files "
    "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
    "t10k-labels-idx1-ubyte.gz) from https://github.com/zalandoresearch/fashion-mnist "
    "(folder data/fashion), or export TFDS `fashion_mnist` on a machine with network. "
    f"Point data_dir or ${ENV_VAR} at the directory holding them."
)


def default_dir() -> Path:
    """Returns ``$RPG_JAX_FASHION_MNIST_DIR`` if set, else ``/usr/share/datasets/fashion-mnist``."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)


def _read_raw(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt gzip data ({e})") from e
    return raw


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an unsigned-byte IDX file (gzipped or plain) into a uint8 array.

    Raises ValueError naming the file when it is not valid gzip, has a bad magic
    number, or its payload size does not match the header.
    """
    path = Path(path)
    return _parse_idx(path, _read_raw(path))


def verify_published(path: Path, stem: str, raw: bytes, policy: str | None = None) -> None:
    """Checks a file's decompressed content against the published SHA-256.

    A file of the published size with other content (scrambled pixels, a flipped label)
    raises ValueError naming it, or only warns with ``policy="warn"`` (default: the
    ``$RPG_JAX_FASHION_MNIST_VERIFY`` variable, else ``"error"``). A file of another size
    is not the published dataset (a subset, a test fixture): a warning.
    """
    policy = policy or os.environ.get(VERIFY_ENV_VAR) or "error"
    if policy not in ("error", "warn"):
        raise ValueError(f"${VERIFY_ENV_VAR}={policy!r}: expected 'error' or 'warn'")
    expected, size = PUBLISHED[stem]
    if len(raw) != size:
        logging.warning("%s: %d bytes, not the published Fashion-MNIST file (%d bytes); its "
                        "content is not verified", path, len(raw), size)
        return
    digest = hashlib.sha256(raw).hexdigest()
    if digest == expected:
        return
    message = (f"{path}: content SHA-256 {digest} differs from the published Fashion-MNIST "
               f"file's {expected} (damaged or altered data; re-download it, or set "
               f"{VERIFY_ENV_VAR}=warn to use it anyway)")
    if policy == "error":
        raise ValueError(message)
    logging.warning("%s", message)


def _parse_idx(path: Path, raw: bytes) -> np.ndarray:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] == 0:
        raise ValueError(
            f"{path}: not an unsigned-byte IDX file (magic bytes {raw[:4].hex() or 'missing'}, "
            "expected 000008NN with NN the number of dimensions)"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX payload has {len(raw) - header} bytes but header shape {shape} "
            f"needs {expected} (file truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _resolve_files(directory: Path) -> dict[str, tuple[Path, Path]]:
    """Locates all four files, raising FileNotFoundError listing every missing one."""
    if not directory.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST directory {str(directory)!r} does not exist. {_HOW_TO_GET}"
        )
    found: dict[str, tuple[Path, Path]] = {}
    missing: list[str] = []
    for split, stems in FILES.items():
        paths = [_find(directory, stem) for stem in stems]
        missing += [stem + ".gz" for stem, p in zip(stems, paths, strict=True) if p is None]
        if None not in paths:
            found[split] = (paths[0], paths[1])
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST file(s) {', '.join(missing)} missing in directory "
            f"{str(directory)!r}. {_HOW_TO_GET}"
        )
    return found


def check_files(data_dir: str | os.PathLike | None = None) -> Path:
    """Cheaply checks that all four IDX files exist; returns the resolved directory."""
    directory = Path(data_dir) if data_dir is not None else default_dir()
    _resolve_files(directory)
    return directory.resolve()


@functools.lru_cache(maxsize=4)
def _load_cached(directory: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for split, (images_path, labels_path) in _resolve_files(directory).items():
        arrays = []
        for path, stem in zip((images_path, labels_path), FILES[split], strict=True):
            raw = _read_raw(path)
            arrays.append(_parse_idx(path, raw))
            verify_published(path, stem, raw)
        images, labels = arrays
        if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"{images_path}: expected [N, 28, 28] images, got {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(
                f"{labels_path}: expected {len(images)} labels to match {images_path}, "
                f"got shape {labels.shape}"
            )
        if len(labels) and labels.max() >= NUM_CLASSES:
            raise ValueError(f"{labels_path}: label {labels.max()} out of range 0..9")
        images = images[..., None]
        labels = labels.astype(np.int32)
        images.setflags(write=False)
        labels.setflags(write=False)
        out[split] = (images, labels)
    return out


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Loads Fashion-MNIST as ``{split: (uint8 [N, 28, 28, 1], int32 [N])}``.

    Splits are ``"train"`` (60k) and ``"test"`` (10k). ``data_dir`` defaults to
    ``$RPG_JAX_FASHION_MNIST_DIR`` or ``/usr/share/datasets/fashion-mnist``; each
    file may be gzipped (``*.gz``) or plain. The decoded arrays are cached per
    process and read-only. Raises FileNotFoundError (saying how to get the data)
    when files are missing and ValueError naming the file when one is corrupt or
    differs from the published file (see ``verify_published``).
    """
    return _load_cached(check_files(data_dir))
