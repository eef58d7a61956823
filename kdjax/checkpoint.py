"""Orbax checkpoints of a TrainState, and read-only loading of a finished run's model (a teacher).

A checkpoint has two items so that a teacher or an export reads only what it needs:
  "model": {"params", "model_state"}        the student (parameters, BatchNorm statistics)
  "train": {"step", "opt_state", "rng", "perm", "extras"}   everything else needed to resume
                                            exactly; "extras" holds what trains with the student
                                            but is not exported (connectors, memory banks, peers)
Saving is asynchronous and atomic (Orbax writes to a temporary directory and renames it).
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from kdjax.step import TrainState, join_student, split_student

CHECKPOINT_DIR = "checkpoints"


def _items(state: TrainState) -> dict:
    params, extra_params = split_student(state.params)
    model_state, extra_state = split_student(state.model_state)
    return {"model": {"params": params, "model_state": model_state},
            "train": {"step": state.step, "opt_state": state.opt_state, "rng": state.rng,
                      "perm": state.perm,
                      "extras": {"params": extra_params, "model_state": extra_state}}}


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
        train = dict(restored["train"])
        extras, model = train.pop("extras"), restored["model"]
        if "student" not in abstract_state.params:  # a plain model's state, not a Distillee's
            return TrainState(params=model["params"], model_state=model["model_state"], **train)
        return TrainState(params=join_student(model["params"], extras["params"]),
                          model_state=join_student(model["model_state"], extras["model_state"]),
                          **train)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def load_model(workdir: str, model: nnx.Module) -> nnx.Module:
    """Fill `model` (built with the right architecture) with the latest weights of a run, read-only.

    Only the "model" item is read; the run's optimizer state is never loaded.
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
    restored = manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(abstract)))["model"]
    manager.close()
    return nnx.merge(graphdef, restored["params"], restored["model_state"])
