"""Orbax checkpoints of a TrainState, and read-only loading of a finished run's model (a teacher).

A checkpoint has two items so that a teacher or an export reads only what it needs:
  "model": {"params", "model_state"}        the network (parameters, BatchNorm statistics)
  "train": {"step", "opt_state", "rng", "perm"}   everything else needed to resume exactly
Saving is asynchronous and atomic (Orbax writes to a temporary directory and renames it).
In a multi-process run every process saves and restores collectively: each writes the shards of
its own devices (the workdir must be on a filesystem all hosts share), and a restore reads each
array onto the shardings of its target, so a checkpoint written on 8 devices restores on 1 and
vice versa.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from kdjax import sharding
from kdjax.step import TrainState

CHECKPOINT_DIR = "checkpoints"


def _items(state: TrainState) -> dict:
    return {"model": {"params": state.params, "model_state": state.model_state},
            "train": {"step": state.step, "opt_state": state.opt_state, "rng": state.rng,
                      "perm": state.perm}}


class Checkpointer:
    """Saves every `every_steps` (and on demand), keeps the latest `max_to_keep`."""

    def __init__(self, workdir: str, *, every_steps: int, max_to_keep: int):
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
        self.every_steps = every_steps
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, *, force: bool = False) -> bool:
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return False
        items = _items(state)
        return self.manager.save(
            step, args=ocp.args.Composite(**{k: ocp.args.StandardSave(v) for k, v in items.items()}),
            force=force)

    def restore(self, abstract_state: TrainState, step: int | None = None) -> TrainState:
        """Restore onto the shardings and shapes of `abstract_state` (e.g. from jax.eval_shape)."""
        step = self.latest_step() if step is None else step
        target = _items(abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            **{k: ocp.args.StandardRestore(v) for k, v in target.items()}))
        return TrainState(params=restored["model"]["params"],
                          model_state=restored["model"]["model_state"], **restored["train"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def load_model(workdir: str, model: nnx.Module, *,
               shardings_for: Callable[[Any], Any] | None = None) -> nnx.Module:
    """Fill `model` (built with the right architecture) with the latest weights of a run, read-only.

    Only the "model" item is read; the run's optimizer state is never loaded. `model` may be
    abstract (`nnx.eval_shape`). `shardings_for` maps {"params", "model_state"} to their
    NamedShardings (e.g. `kdjax.sharding.tree_shardings` with a mesh and rule): each array is
    then read straight onto its devices, whatever mesh wrote it, and a large teacher is never
    whole on one device.
    """
    directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        read_only=True, create=False))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(
            f"no checkpoint in {directory}: teacher.workdir={workdir!r} must be the workdir of a "
            f"finished `kdjax train` run (train the teacher first)")
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    target = {"params": params, "model_state": model_state}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    if shardings_for is not None:
        abstract = sharding.abstract(abstract, shardings_for(abstract))
    restored = manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(abstract)))["model"]
    manager.close()
    return nnx.merge(graphdef, restored["params"], restored["model_state"])
