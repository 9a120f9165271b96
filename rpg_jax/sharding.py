"""The data-parallel device mesh and the two shardings the train loop uses.

``jax.make_mesh`` gives ``Explicit`` axes by default (sharding in the types: every op must have
a sharding rule that resolves unambiguously, and the rules change between JAX releases; e.g.
jax 0.12 rejects the scatter in the gradient of ``optax.softmax_cross_entropy_with_integer_labels``
on a batch-sharded input, which jax 0.10 accepted). The train loop runs models and losses that
users bring, so its ``('data',)`` axis is ``Auto``: the step is written as a single-device
program and XLA's sharding propagation partitions its batch dimension, as in the Flax ImageNet
example and big_vision.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None,
              axis_type: AxisType = AxisType.Auto) -> Mesh:
    """A 1-D ``('data',)`` mesh over ``devices`` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("data_mesh needs at least one device, got an empty list")
    if not isinstance(axis_type, AxisType):
        raise ValueError(f"axis_type must be a jax.sharding.AxisType, got {axis_type!r}")
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(axis_type,),
                         devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (the train state, the index tables)."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """The leading (batch) dimension split over the ``'data'`` axis."""
    return NamedSharding(mesh, P(DATA_AXIS))
