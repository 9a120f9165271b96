"""rpg_jax: Recurrent Parameter Generators in JAX/Flax.

    spec = rpg_jax.make_spec(params, ring_size=2_359_296, seed=0)
    bank = rpg_jax.init_bank(jax.random.key(1), spec, params)
    params = rpg_jax.generate_params(bank, spec)

Trained models: ``load_checkpoint(workdir)``, ``export(ckpt, path, kind)``,
``load_export(path)``.
"""

from rpg_jax import models
from rpg_jax.checkpoints import Checkpoint, load_checkpoint
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
from rpg_jax.spec import LeafSpec, RingSpec, RPGSpec, make_spec, spec_from_tables

__all__ = [
    "Checkpoint",
    "DeviceTables",
    "INDEX_MAP_VERSION",
    "MODES",
    "LeafSpec",
    "ParamCount",
    "RPGSpec",
    "RingSpec",
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
    "spec_from_tables",
]
