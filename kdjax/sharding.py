"""Device meshes, sharding rules and array placement.

Every array kdjax puts on a device goes through a `jax.sharding.Mesh` over all devices of all
processes, also on one device (the trivial mesh), so one code path serves a laptop, one GPU, a
multi-GPU host and a pod: the jitted step declares NamedShardings for its inputs and outputs and
XLA's SPMD partitioner inserts the collectives. kdjax uses jit + shardings, not `pmap`: pmap is
in maintenance mode, replicates by construction (no parameter sharding) and needs its own
per-device code (axis names, psum), whereas a jitted program is the same program on 1 or 1000
devices.

The mesh has two axes (MaxText/big_vision names):
  data: pure data parallelism; parameters are replicated along it.
  fsdp: data parallelism whose parameters (and optimizer state) may also be split along it
        (ZeRO-3 / fully sharded data parallel); XLA gathers them when a layer needs them.
The batch is split over both axes, so every device computes on batch_size / num_devices examples.

A sharding rule decides each parameter's placement: "replicated" (every device holds it all) or
"fsdp" (the largest axis divisible by the fsdp axis size is split over it, as big_vision's fsdp
rule; arrays smaller than `min_bytes`, or with no divisible axis, stay replicated because
gathering them costs more than they save). The student (with its optimizer state) and the teacher
each have their own rule: a large teacher sharded, a small student replicated is the common case.
State with one row per training example (`DataSharded`, e.g. CRD's memory banks) is split over
the batch axes like the data it indexes, whatever the rule.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from kdjax import plan as plan_lib

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)
# FSDP is data parallelism with sharded parameters: the batch is split over both axes.
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
RULES = ("replicated", "fsdp")
DEFAULT_FSDP_MIN_BYTES = 4 * 2**20  # big_vision's default threshold (4 MiB)


def make_mesh(data: int = -1, fsdp: int = 1, *,
              devices: list[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: every device of every process).

    One axis may be -1: it takes all the devices the other leaves. Devices are laid out by
    `jax.make_mesh` (topology-aware on GPU/TPU), fsdp innermost so that the parameter gathers of
    FSDP run between neighbouring devices (within a host) and only gradients cross hosts.
    """
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    sizes = {"mesh.data": data, "mesh.fsdp": fsdp}
    for key, size in sizes.items():
        if size == 0 or size < -1:
            raise ValueError(f"{key}={size} is not a mesh axis size: use a positive size or -1 "
                             f"(all remaining devices)")
    if data == -1 and fsdp == -1:
        raise ValueError("mesh.data=-1 and mesh.fsdp=-1: at most one mesh axis may be -1; set "
                         "the other to a size, e.g. --config.mesh.data=1")
    known = math.prod(s for s in sizes.values() if s != -1)
    if -1 in (data, fsdp):
        if n % known:
            raise ValueError(f"mesh axes {_fmt(sizes)} cannot fill the {n} devices: {known} does "
                             f"not divide {n}; pick a size that divides the device count")
        data, fsdp = (n // known, fsdp) if data == -1 else (data, n // known)
    elif data * fsdp != n:
        raise ValueError(f"mesh axes {_fmt(sizes)} multiply to {data * fsdp}, but there are {n} "
                         f"devices; the axes must multiply to the device count (set one of them "
                         f"to -1 to use all remaining devices)")
    # Auto axes: the partitioner propagates shardings from the step's inputs and outputs (the
    # jit-with-shardings model), not sharding-in-types.
    return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto,) * 2,
                         devices=devices)


def _fmt(sizes: dict[str, int]) -> str:
    return " × ".join(f"{k}={v}" for k, v in sizes.items())


def mesh_from_config(mesh: plan_lib.Mesh, *, devices: list[jax.Device] | None = None) -> Mesh:
    """The mesh of the run's `mesh` section."""
    return make_mesh(mesh.data, mesh.fsdp, devices=devices)


def check_rule(rule: str, mesh: plan_lib.Mesh, key: str) -> None:
    """Refuse unknown rules, and "fsdp" with a configured fsdp axis of 1 (it would silently
    replicate). mesh.fsdp=-1 is accepted everywhere: on one device it is the trivial mesh."""
    if rule not in RULES:
        raise ValueError(f"{key}={rule!r} is not a sharding rule; valid: {list(RULES)}")
    if rule == "fsdp" and mesh.fsdp == 1:
        raise ValueError(f"{key}='fsdp' splits parameters over the mesh's fsdp axis, but "
                         f"mesh.fsdp=1; set --config.mesh.fsdp=-1 --config.mesh.data=1 (FSDP over "
                         f"all devices), or mesh.fsdp to the devices per host")


def serial_dispatch(mesh: Mesh) -> bool:
    """Whether a step on `mesh` must finish before the next is dispatched: with several CPU
    devices in one process. XLA:CPU runs their collectives on a shared thread pool, and
    overlapping executions were seen to deadlock in the gradient all-reduce (4 simulated devices
    on 2 cores: 3 runs in 4 with back-to-back steps, none with each step awaited). GPUs, TPUs and
    one CPU device per process keep asynchronous dispatch."""
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    return len(local) > 1 and local[0].platform == "cpu"


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh, *, stacked: bool = False) -> NamedSharding:
    """Batch axis split over every device (data × fsdp), the rest replicated. `stacked`: the
    batch axis is the second one ([steps_per_call, batch, ...] for a scanned step)."""
    # Axes of size 1 are left out, as XLA leaves them out of the shardings it outputs: a state
    # that goes through the step comes back with the same spec, so the step is not compiled again.
    axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    batch = axes if len(axes) > 1 else (axes[0] if axes else None)
    return NamedSharding(mesh, P(None, batch) if stacked else P(batch))


def leaf_spec(shape: tuple[int, ...], dtype: Any, mesh: Mesh, rule: str, *,
              min_bytes: int = DEFAULT_FSDP_MIN_BYTES) -> P:
    """The PartitionSpec of one array under `rule` (see the module docstring)."""
    if rule not in RULES:
        raise ValueError(f"sharding rule {rule!r} is not one of {list(RULES)}")
    n = mesh.shape[FSDP_AXIS]
    if rule == "replicated" or n == 1 or math.prod(shape) * np.dtype(dtype).itemsize < min_bytes:
        return P()
    divisible = [i for i, d in enumerate(shape) if d % n == 0]
    if not divisible:
        return P()
    # Largest axis; on a tie the later one (a kernel's output features).
    axis = max(divisible, key=lambda i: (shape[i], i))
    return P(*(FSDP_AXIS if i == axis else None for i in range(len(shape))))


class DataSharded(nnx.Variable):
    """State with one row per training example (CRD's memory banks): its leading axis is split
    over the batch axes, like the data it indexes, instead of being replicated."""


def tree_shardings(tree: Any, mesh: Mesh, rule: str = "replicated", *,
                   min_bytes: int = DEFAULT_FSDP_MIN_BYTES) -> Any:
    """A NamedSharding for every array leaf of `tree` (arrays or ShapeDtypeStructs) under `rule`;
    `DataSharded` variables split on their leading axis when it divides over the batch axes.

    Optimizer state gets the same rule as the parameters: a momentum buffer has its parameter's
    shape, so it lands on the same devices and the update stays local.
    """
    n = mesh.shape[DATA_AXIS] * mesh.shape[FSDP_AXIS]

    def by_rule(x):
        return NamedSharding(mesh, leaf_spec(x.shape, x.dtype, mesh, rule, min_bytes=min_bytes))

    def leaf(x):
        if not isinstance(x, nnx.Variable):
            return by_rule(x)
        # On one device a split is a replication; P() there keeps one compiled program.
        split = isinstance(x, DataSharded) and n > 1
        return jax.tree.map(
            lambda a: batch_sharded(mesh) if split and a.shape[0] % n == 0 else by_rule(a), x)

    return jax.tree.map(leaf, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: Any, mesh: Mesh, rule: str = "replicated", *,
                    min_bytes: int = DEFAULT_FSDP_MIN_BYTES) -> Any:
    """Shardings for a `kdjax.step.TrainState`: params, model state (BatchNorm statistics, memory
    banks) and optimizer state under `rule` (see `tree_shardings`); the step counter, PRNG key,
    epoch order and NaN/Inf bookkeeping replicated (every device needs them whole)."""
    rep = replicated(mesh)
    trees = ("params", "model_state", "opt_state")
    return state.replace(
        **{f.name: jax.tree.map(lambda _: rep, getattr(state, f.name))
           for f in dataclasses.fields(state) if f.name not in trees},
        **{k: tree_shardings(getattr(state, k), mesh, rule, min_bytes=min_bytes) for k in trees})


def put(tree: Any, shardings: Any) -> Any:
    """Place `tree` (numpy or jax arrays) on the devices of `shardings` (a matching tree or one
    sharding for all leaves), in one or many processes.

    Host values must be the same on every process (same seed, same files). Each process then
    writes only the shards of its own devices (`make_array_from_callback`), so nothing crosses
    hosts. Arrays that already span several processes are resharded on device.
    """
    if not isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(_put_leaf, tree, shardings)
    return jax.tree.map(lambda x: _put_leaf(x, shardings), tree)


def _put_leaf(x: Any, s: jax.sharding.Sharding) -> jax.Array:
    if isinstance(x, jax.ShapeDtypeStruct):  # abstract: planning a program (AOT), nothing placed
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    if isinstance(x, jax.Array) and (jax.process_count() == 1 or not x.is_fully_addressable):
        return jax.device_put(x, s)  # on-device copy or reshard; a no-op when already placed
    # Several processes, a host-local value: device_put would first check it is equal on every
    # process (one cross-host gather per array); build the global array from local shards.
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda index: host[index])


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every leaf of `tree` whole on all devices of `mesh`."""
    return put(tree, replicated(mesh))


def check_batch_size(batch_size: int, mesh: Mesh, key: str = "train.batch_size") -> None:
    """The batch is split evenly over data × fsdp."""
    n = mesh.shape[DATA_AXIS] * mesh.shape[FSDP_AXIS]
    if batch_size % n:
        raise ValueError(
            f"{key}={batch_size} is not divisible by the {n} devices of the batch axes (mesh "
            f"data={mesh.shape[DATA_AXIS]} × fsdp={mesh.shape[FSDP_AXIS]}); pick a multiple of "
            f"{n}, e.g. {key}={max(n, batch_size // n * n)}")


def shard_batch(tree: Any, mesh: Mesh, key: str = "the batch size") -> Any:
    """Place a global host batch (the same on every process) on `mesh`, split along its leading
    axis; each process transfers only its own devices' rows."""
    check_batch_size(jax.tree.leaves(tree)[0].shape[0], mesh, key)
    return put(tree, batch_sharded(mesh))


def abstract(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying `shardings` (a matching tree or one sharding for all leaves):
    restore targets (Orbax restores each array straight onto its devices, whatever device count
    wrote it)."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def bytes_per_device(tree: Any) -> int:
    """Bytes one device holds for the placed arrays of `tree` (the largest over devices)."""
    per_device: dict[int, int] = {}
    for x in jax.tree.leaves(tree):
        shard_bytes = math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
        for d in x.sharding.device_set:
            per_device[d.id] = per_device.get(d.id, 0) + shard_bytes
    return max(per_device.values(), default=0)
