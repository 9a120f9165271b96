"""Parameter trees as the generator sees them: (path, leaf) pairs of nested dicts.

Linen params are nested dicts already. Flax NNX parameters arrive as an ``nnx.Module``, an
``nnx.State`` (``nnx.state(model, nnx.Param)``, a full ``nnx.state(model)``, the states of
``nnx.split``) or a ``(graphdef, state, ...)`` tuple; they are reduced to the pure dict of
their ``nnx.Param`` values (``nnx.to_pure_dict``), whose keys keep their types (``0`` for
an ``nnx.List`` entry), so the dicts built here go straight into ``nnx.update`` and
``nnx.merge``.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

Path = tuple[str | int, ...]


def _holds_variables(tree: Any) -> bool:
    return any(isinstance(v, nnx.Variable) for v in jax.tree.leaves(
        tree, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def as_params(tree: Any) -> Any:
    """Linen params unchanged; NNX models/states -> the pure dict of their ``nnx.Param``s."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Param)
    elif isinstance(tree, tuple) and tree and isinstance(tree[0], nnx.GraphDef):
        states = [s for s in tree[1:] if isinstance(s, nnx.State)]
        if not states:
            raise ValueError("an nnx.split tuple without any nnx.State after the graphdef")
        tree = nnx.merge_state(*states) if len(states) > 1 else states[0]
    if isinstance(tree, nnx.State) or _holds_variables(tree):
        return nnx.to_pure_dict(nnx.filter_state(tree, nnx.Param))
    return tree


def _key(key: Any) -> str | int:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            value = getattr(key, attr)
            return value if isinstance(value, int) else str(value)
    return str(key)


def flatten_params(tree: Any) -> list[tuple[Path, Any]]:
    """(path, leaf) pairs of a params tree (Linen dicts or NNX, see ``as_params``)."""
    pairs, _ = jax.tree_util.tree_flatten_with_path(as_params(tree))
    return [(tuple(_key(k) for k in path), leaf) for path, leaf in pairs]


def unflatten_params(pairs: list[tuple[Path, Any]]) -> dict[Any, Any]:
    """Nested dicts from (path, leaf) pairs."""
    root: dict[Any, Any] = {}
    for path, leaf in pairs:
        node = root
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return root


def path_name(path: Path) -> str:
    """The "/"-joined path, e.g. ``layer1_0/conv1/kernel`` or ``layers/0/kernel``."""
    return "/".join(str(p) for p in path)
