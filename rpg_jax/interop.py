"""Import of the authors' PyTorch RPG ResNet checkpoints (see ``load_reference_checkpoint``).

Their ``main.py`` saves ``<savename>.pth.tar``: a dict ``{epoch, arch, state_dict,
best_acc1, optimizer}`` whose state_dict (keys prefixed ``module.``, DataParallel) holds the
ring ``mem.w`` and every free parameter. The ring module is an attribute of every generated
conv too, so the ring appears again as ``<conv>.mem.w`` (e.g. ``layer1.0.conv1.mem.w``)
once per generated conv. Two pickled NumPy object arrays ``<savename>p_idxs.npy`` /
``<savename>b_masks.npy`` hold the index and +1/-1 mask vector of each generated block conv,
in registration order (per block: the projection's 1x1 conv, then ``conv1``, then
``conv2``). Index vectors address the kernel flattened in PyTorch OIHW order; they are
re-ordered to the Flax HWIO layout here and kept, encoded, in an "explicit" spec
(``rpg_jax.spec.spec_from_tables``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rpg_jax import config as config_lib
from rpg_jax import data
from rpg_jax.index_map import encode
from rpg_jax.models import get_model
from rpg_jax.spec import REFERENCE_FAN, flatten_params, spec_from_tables, unflatten_params
from rpg_jax.trained_model import TrainedModel

Path = tuple[str, ...]

#: Architectures of the reference RPG checkpoints this importer reads.
REFERENCE_ARCHS: tuple[str, ...] = ("resnet18", "resnet34")

_RING_KEY = "mem.w"
_PTH_NAME = re.compile(r"(.*?)\.pth\.tar(?:best\.pth\.tar)?", re.DOTALL)
_IGNORED_SUFFIXES = (".num_batches_tracked",)
_BLOCK = re.compile(r"layer(\d+)_(\d+)")
_SUBMODULE = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
_LEAF = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def _torch_module(path: Path) -> str:
    """The PyTorch module name of a Flax module path, e.g. layer2_0/downsample_conv."""
    match = _BLOCK.fullmatch(path[0])
    if match is None:
        return ".".join(path)
    return ".".join((f"layer{match[1]}.{match[2]}",
                     *(_SUBMODULE.get(p, p) for p in path[1:])))


def _torch_key(collection: str, path: Path) -> str:
    """The state_dict key of a Flax variable (``collection`` "params" or "batch_stats")."""
    return f"{_torch_module(path[:-1])}.{_LEAF[(collection, path[-1])]}"


def _is_generated(path: Path, shape: tuple[int, ...]) -> bool:
    """Block conv kernels are generated (the reference choice); all else is free."""
    return path[-1] == "kernel" and len(shape) == 4 and _BLOCK.fullmatch(path[0]) is not None


def _registration_order(param_shapes: Any) -> list[tuple[Path, tuple[int, ...]]]:
    """The generated convs in the reference registration order, with their HWIO shapes."""
    shapes = {path: tuple(int(s) for s in leaf.shape)
              for path, leaf in flatten_params(param_shapes)}
    blocks = sorted({path[0] for path, shape in shapes.items() if _is_generated(path, shape)},
                    key=lambda name: tuple(int(g) for g in _BLOCK.fullmatch(name).groups()))
    order = []
    for block in blocks:
        for conv in ("downsample_conv", "conv1", "conv2"):
            path = (block, conv, "kernel")
            if path in shapes:
                order.append((path, shapes[path]))
    unordered = {p for p, s in shapes.items() if _is_generated(p, s)} - {p for p, _ in order}
    if unordered:  # e.g. a conv3 of a bottleneck: not part of the reference format
        raise ValueError(f"no reference registration order for {sorted(unordered)}")
    return order


def _to_numpy(x: Any) -> np.ndarray:
    """A NumPy array from a torch tensor, NumPy array or sequence."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _entries(array: Any) -> list[Any]:
    """The per-conv entries of a loaded object array (or a list, or a 2-D numeric array)."""
    if isinstance(array, np.ndarray) and array.ndim == 0:
        array = array.item()
    return list(array)


def _table(name: str, pos: int, index: Any, mask: Any, shape: tuple[int, ...],
           ring_size: int, count_note: str) -> np.ndarray:
    """Checks one conv's index/mask vectors and returns its encoded table in HWIO order."""
    kh, kw, cin, cout = shape
    where = f"{name} (p_idxs[{pos}])"
    want = cout * cin * kh * kw
    index, mask = _to_numpy(index).ravel(), _to_numpy(mask).ravel()
    for what, vec in (("index", index), ("mask", mask)):
        if vec.size != want:
            raise ValueError(f"{where}: expected {want} {what} entries (O x I x kh x kw = "
                             f"{cout}x{cin}x{kh}x{kw}), got {vec.size}{count_note}")
    if not np.issubdtype(index.dtype, np.integer):
        if not (np.issubdtype(index.dtype, np.floating) and np.all(index == np.round(index))):
            raise ValueError(f"{where}: expected integer ring indices, got dtype {index.dtype}")
    index = index.astype(np.int64)
    if index.min() < 0 or index.max() >= ring_size:
        bad = int(index.min()) if index.min() < 0 else int(index.max())
        raise ValueError(f"{where}: index {bad} is outside the ring [0, {ring_size})")
    if not np.all((mask == 1) | (mask == -1)):
        bad = mask[(mask != 1) & (mask != -1)][0]
        raise ValueError(f"{where}: mask values must be +1 or -1, found {bad!r}")
    index = index.reshape(cout, cin, kh, kw).transpose(2, 3, 1, 0).ravel()
    mask = mask.reshape(cout, cin, kh, kw).transpose(2, 3, 1, 0).ravel()
    return encode(index, mask)


def _copy(key: str, value: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A state_dict tensor in Flax layout (OIHW->HWIO, (out, in)->(in, out)), shape-checked."""
    x = _to_numpy(value).astype(np.float32)
    if x.ndim == 4:
        x = x.transpose(2, 3, 1, 0)
    elif x.ndim == 2:
        x = x.T
    if x.shape != shape:
        raise ValueError(f"state_dict[{key!r}]: expected shape {shape} in Flax layout, got "
                         f"{tuple(x.shape)} (PyTorch shape {tuple(_to_numpy(value).shape)})")
    return x


def _check_alias(key: str, value: Any, ring: np.ndarray) -> None:
    """A ring copy under a generated conv (``<conv>.mem.w``) must equal ``mem.w``."""
    alias = np.asarray(_to_numpy(value), np.float32).ravel()
    if alias.shape != ring.shape:
        detail = f"{alias.size} entries, the ring has {ring.size}"
    elif not np.array_equal(alias, ring, equal_nan=True):
        detail = f"max |difference| {float(np.nanmax(np.abs(alias - ring))):.3g}"
    else:
        return
    raise ValueError(f"state_dict[{key!r}] differs from the ring {_RING_KEY!r} ({detail}); "
                     "the reference code saves the one shared ring under every generated conv")


def _read_pth(pth_path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state_dict without ``module.``, {epoch, arch, best_acc1} as far as the file has them)."""
    try:
        import torch
    except ImportError as e:
        raise ImportError("load_reference_checkpoint needs PyTorch to read the .pth.tar "
                          "file: pip install torch") from e
    loaded = torch.load(pth_path, map_location="cpu", weights_only=False)
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{pth_path}: expected a dict or a state_dict, got "
                         f"{type(loaded).__name__}")
    meta: dict[str, Any] = {}
    state = loaded
    if "state_dict" in loaded:
        state = loaded["state_dict"]
        if "epoch" in loaded:
            meta["epoch"] = int(loaded["epoch"])
        if "arch" in loaded:
            meta["arch"] = str(loaded["arch"])
        if "best_acc1" in loaded:
            meta["best_acc1"] = float(_to_numpy(loaded["best_acc1"]).item())
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    return state, meta


def reference_paths(pth_path: str | os.PathLike) -> tuple[str, str]:
    """The side files (``<savename>p_idxs.npy``, ``<savename>b_masks.npy``) of a checkpoint
    ``<savename>.pth.tar`` or of its best copy ``<savename>.pth.tarbest.pth.tar``."""
    match = _PTH_NAME.fullmatch(os.fspath(pth_path))
    if match is None:
        raise ValueError(f"{os.fspath(pth_path)!r} is not named <savename>.pth.tar: pass "
                         "p_idxs_path and b_masks_path")
    return f"{match[1]}p_idxs.npy", f"{match[1]}b_masks.npy"


def _reference_arch(arch: str | None, meta: dict[str, Any]) -> str:
    """The architecture to build: ``arch``, else the file's, else resnet18."""
    name = arch if arch is not None else meta.get("arch", "resnet18")
    key = name.strip().lower()
    if key not in REFERENCE_ARCHS:
        where = f"arch={arch!r}" if arch is not None else f"the checkpoint's arch {name!r}"
        raise ValueError(f"{where} is not supported; valid: {', '.join(REFERENCE_ARCHS)}")
    return key


def _imported_tables(arch: str, order: list, indices: list, masks: list,
                     ring_size: int) -> dict[str, np.ndarray]:
    """One checked table per generated conv, keyed by its Flax path, in registration order."""
    count_note = ("" if len(indices) == len(order) else
                  f" (the files hold {len(indices)} tables, {arch} has {len(order)} generated "
                  "convs)")
    tables = {}
    for pos, (path, shape) in enumerate(order):
        name = _torch_module(path[:-1])
        if pos >= len(indices):
            raise ValueError(f"{name} (p_idxs[{pos}]): no table{count_note}")
        tables["/".join(path)] = _table(name, pos, indices[pos], masks[pos], shape, ring_size,
                                        count_note)
    if len(indices) > len(order):
        raise ValueError(f"p_idxs[{len(order)}:] are unexpected after the last generated conv "
                         f"{_torch_module(order[-1][0][:-1])}{count_note}")
    return tables


def _copied_tree(shapes: Any, collection: str, state: dict[str, Any], used: set[str]) -> Any:
    """The free params (or BN statistics) of ``collection`` copied from the state_dict; adds
    each key it reads to ``used``."""
    pairs = []
    for path, leaf in flatten_params(shapes):
        shape = tuple(int(s) for s in leaf.shape)
        if collection == "params" and _is_generated(path, shape):
            continue
        torch_key = _torch_key(collection, path)
        if torch_key not in state:
            raise ValueError(f"state_dict has no {torch_key!r} (for Flax {collection} "
                             f"{'/'.join(path)}, shape {shape})")
        pairs.append((path, jnp.asarray(_copy(torch_key, state[torch_key], shape))))
        used.add(torch_key)
    return unflatten_params(pairs)


@dataclasses.dataclass
class ReferenceCheckpoint(TrainedModel):
    """A ``TrainedModel`` imported from the reference code, with the file's training record."""

    epoch: int | None = None  # the file's epoch count (None for a bare state_dict)
    best_acc1: float | None = None  # the file's best top-1 accuracy, percent


def load_reference_checkpoint(pth_path: str | os.PathLike,
                              p_idxs_path: str | os.PathLike | None = None,
                              b_masks_path: str | os.PathLike | None = None,
                              arch: str | None = None,
                              num_classes: int | None = None) -> ReferenceCheckpoint:
    """Loads the authors' PyTorch RPG ResNet18/34 checkpoint as a ``ReferenceCheckpoint``.

    Args:
      pth_path: the ``<savename>.pth.tar`` file (their dict with ``state_dict``, or a bare
        state_dict).
      p_idxs_path: ``<savename>p_idxs.npy``, the index vector of every generated conv;
        derived from ``pth_path`` when None.
      b_masks_path: ``<savename>b_masks.npy``, the +1/-1 mask vector (int or float) of every
        generated conv; derived from ``pth_path`` when None.
      arch: "resnet18" or "resnet34"; None takes the file's ``arch`` (resnet18 if it has none).
      num_classes: classifier size; read from ``fc.weight`` when None.

    The ring copies under the generated convs (``<conv>.mem.w``) must equal ``mem.w``; the
    ring may be larger than the generated weights (entries no conv reads stay unused).
    Returns one ring "ring" (``mem.w``), an explicit spec holding the imported tables, the BN
    running statistics and ImageNet dataset info. ``epoch`` is the file's ``epoch``, a count
    of epochs, not of steps, and ``best_acc1`` its best top-1; ``step`` is 0, as the file
    records no optimizer steps. Raises ValueError, naming the layer or key, when the files
    disagree with the architecture or with each other.
    """
    state, meta = _read_pth(os.fspath(pth_path))
    key = _reference_arch(arch, meta)
    if p_idxs_path is None or b_masks_path is None:
        derived = reference_paths(pth_path)
        p_idxs_path = derived[0] if p_idxs_path is None else p_idxs_path
        b_masks_path = derived[1] if b_masks_path is None else b_masks_path
    if _RING_KEY not in state:
        raise ValueError(f"state_dict has no ring {_RING_KEY!r} (keys: {sorted(state)[:8]}...)")
    ring = _to_numpy(state[_RING_KEY]).astype(np.float32).ravel()
    if "fc.weight" not in state:
        raise ValueError("state_dict has no 'fc.weight' (the classifier)")
    if num_classes is None:
        num_classes = int(_to_numpy(state["fc.weight"]).shape[0])

    model = get_model(key, num_classes=num_classes)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, 224, 224, 3)), train=False))

    # Generated convs: one (index, mask) pair each, in registration order.
    indices = _entries(np.load(p_idxs_path, allow_pickle=True))
    masks = _entries(np.load(b_masks_path, allow_pickle=True))
    order = _registration_order(shapes["params"])
    if len(indices) != len(masks):
        raise ValueError(f"{os.fspath(p_idxs_path)} holds {len(indices)} index vectors but "
                         f"{os.fspath(b_masks_path)} holds {len(masks)} mask vectors")
    tables = _imported_tables(key, order, indices, masks, ring.size)
    spec = spec_from_tables(shapes["params"], ring_size=int(ring.size), leaf_tables=tables,
                            ring_fan=REFERENCE_FAN)

    # The ring's copies under the generated convs; any other key ending in mem.w is unexpected.
    used = {_RING_KEY}
    for path, _ in order:
        alias = f"{_torch_module(path[:-1])}.{_RING_KEY}"
        if alias in state:
            _check_alias(alias, state[alias], ring)
            used.add(alias)

    # Free params and BN statistics, copied from the state_dict.
    trees = {collection: _copied_tree(shapes[collection], collection, state, used)
             for collection in ("params", "batch_stats")}
    unexpected = sorted(k for k in set(state) - used if not k.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise ValueError(f"state_dict has keys that {key} does not use: {unexpected}")

    config = config_lib.base_config()
    config.dataset = "imagenet2012"
    config.model = key
    config.rpg.enabled = True
    config.rpg.ring_size = float(ring.size)
    info = data.DatasetInfo(
        name="imagenet2012", num_classes=int(num_classes), image_shape=(224, 224, 3),
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_train=1281167,
        num_eval=50000, train_split="train", eval_split="validation")
    trainable = {"rings": {"ring": jnp.asarray(ring)}, "free": trees["params"]}
    return ReferenceCheckpoint(trainable=trainable, spec=spec, batch_stats=trees["batch_stats"],
                               config=config, step=0, model=model, info=info,
                               epoch=meta.get("epoch"), best_acc1=meta.get("best_acc1"))
