"""rpg_jax: Recurrent Parameter Generators in JAX/Flax.

    spec = rpg_jax.make_spec(params, ring_size=2_359_296, seed=0)
    bank = rpg_jax.init_bank(jax.random.key(1), spec, params)
    params = rpg_jax.generate_params(bank, spec)

Trained models (``TrainedModel``): ``load_checkpoint(workdir)``, ``export(ckpt, path, kind)``,
``load_export(path)``.

The names are imported on first use (PEP 562), so ``import rpg_jax`` and the command lines
(``python -m rpg_jax.compress --help``) do not wait for JAX to import; every submodule is
also reachable as an attribute (``rpg_jax.data``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

# public name -> the submodule that defines it
_PUBLIC = {
    "load_checkpoint": "checkpoints",
    "export": "export",
    "load_export": "export",
    "DeviceTables": "generator",
    "ParamCount": "generator",
    "count": "generator",
    "generate_params": "generator",
    "host_tables": "generator",
    "init_bank": "generator",
    "make_tables": "generator",
    "materialize": "generator",
    "INDEX_MAP_VERSION": "index_map",
    "MODES": "index_map",
    "remat_kernels": "kernel_remat",
    "LeafSpec": "spec",
    "RPGSpec": "spec",
    "RingSpec": "spec",
    "make_spec": "spec",
    "spec_from_tables": "spec",
    "Checkpoint": "trained_model",
    "TrainedModel": "trained_model",
}

__all__ = [  # _PUBLIC's names and the models subpackage
    "Checkpoint",
    "DeviceTables",
    "INDEX_MAP_VERSION",
    "MODES",
    "LeafSpec",
    "ParamCount",
    "RPGSpec",
    "RingSpec",
    "TrainedModel",
    "count",
    "export",
    "generate_params",
    "host_tables",
    "init_bank",
    "load_checkpoint",
    "load_export",
    "make_spec",
    "make_tables",
    "materialize",
    "models",
    "remat_kernels",
    "spec_from_tables",
]

if TYPE_CHECKING:  # what static tools see; at run time __getattr__ imports on first use
    from rpg_jax import models
    from rpg_jax.checkpoints import load_checkpoint
    from rpg_jax.export import export, load_export
    from rpg_jax.generator import (
        DeviceTables,
        ParamCount,
        count,
        generate_params,
        host_tables,
        init_bank,
        make_tables,
        materialize,
    )
    from rpg_jax.index_map import INDEX_MAP_VERSION, MODES
    from rpg_jax.kernel_remat import remat_kernels
    from rpg_jax.spec import LeafSpec, RingSpec, RPGSpec, make_spec, spec_from_tables
    from rpg_jax.trained_model import Checkpoint, TrainedModel


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}"):
        value = importlib.import_module(f"{__name__}.{name}")  # a submodule: rpg_jax.data
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names, the submodules imported so far and the module's dunders."""
    loaded = {n for n, v in globals().items() if isinstance(v, types.ModuleType)
              and v.__name__.startswith(f"{__name__}.")}
    return sorted({*__all__, *loaded, *(n for n in globals() if n.startswith("__"))})


class _Package(types.ModuleType):
    """Keeps a public name that is also a submodule's name (``export``) bound to the name.

    Importing ``rpg_jax.export`` binds the submodule as the package's ``export`` attribute;
    ``rpg_jax.export`` stays the function (as an eager ``from rpg_jax.export import export``
    in this file made it), and the submodule stays importable by its full name.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if (name in _PUBLIC and isinstance(value, types.ModuleType)
                and value.__name__ == f"{__name__}.{name}"):
            value = value.__dict__.get(name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
