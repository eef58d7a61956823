"""Device meshes and array placement.

Every array kdjax puts on a device goes through a `jax.sharding.Mesh`, also on one device (the
trivial mesh), so one code path serves a laptop and a pod: the jitted step sees NamedShardings and
XLA's SPMD partitioner inserts the collectives. We use jit + shardings rather than `pmap`, which
is in maintenance mode.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D data-parallel mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices).reshape(-1), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axis, the rest replicated."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every leaf of `tree` on all devices of `mesh`."""
    return jax.device_put(tree, replicated(mesh))


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Place a host batch on `mesh`, split along its leading axis."""
    batch_size = jax.tree.leaves(tree)[0].shape[0]
    if batch_size % mesh.size:
        raise ValueError(
            f"the batch size must be divisible by the number of devices, got batch_size="
            f"{batch_size} on {mesh.size} devices; pick train.batch_size as a multiple of "
            f"{mesh.size}")
    return jax.device_put(tree, batch_sharded(mesh))


class DataSharded(nnx.Variable):
    """State with one row per training example (CRD's memory banks): its leading axis is split
    over the data axis, like the data it indexes, instead of being replicated."""


def state_shardings(tree: Any, mesh: Mesh) -> Any:
    """Shardings for a training state: DataSharded variables split on their leading axis (when it
    divides evenly over the devices), everything else replicated. A pytree prefix of `tree`."""

    def leaf(x):
        # On one device a split is a replication; P() there keeps the step one compiled program.
        if (isinstance(x, DataSharded) and mesh.size > 1
                and x.get_value().shape[0] % mesh.size == 0):
            return batch_sharded(mesh)
        return replicated(mesh)

    return jax.tree.map(leaf, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def place_state(tree: Any, mesh: Mesh) -> Any:
    """Put a training state on `mesh` as `state_shardings` says."""
    return jax.device_put(tree, state_shardings(tree, mesh))
