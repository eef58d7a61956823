"""The Task interface: what one kind of run (image classification, language modelling) owns.

`kdjax.trainer` is the one run skeleton: it owns what every run shares (the checkpointer,
`--fresh`, the mesh and shardings, state creation and restore, the resume note, steps per call,
the run files, signals, the loop). A task owns only what differs: its data and batches, its
student's spec, how its teachers are loaded and checked, its step's parts (`kdjax.step.StepParts`)
and eval sums, its metrics' reduction, its summary extras and its export. A new kind of run is a
new `Task` subclass registered in `TASKS`; a run's kind is recorded in its config.json (its model)
and looked up with `task_kind` by everything that needs it (cli, export, report).

A task object lives for one command: it is built from the run's plan and keeps what its phases
hand each other (the opened data, the input normalisation).
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar, NamedTuple

import jax
import numpy as np
import optax
from flax import nnx

from kdjax import sharding
from kdjax import teacher as teacher_lib
from kdjax.models import ModelSpec
from kdjax.distillee import Distillee
from kdjax.step import DeviceData, FrozenModel, Step


class Teacher(NamedTuple):
    """A loaded teacher: `model` as the step runs it (kdjax.teacher.prepare), `reference` as it
    was trained, in float32, kept for the agreement check (None when preparing changed nothing
    or the task does not check it), and what its summary.json record says of it."""

    workdir: str
    model: FrozenModel
    reference: FrozenModel | None
    preparation: teacher_lib.Preparation
    record: dict[str, Any]


@dataclasses.dataclass
class RunData:
    """A task's data as the skeleton uses it.

    Attributes:
      student: the student's spec on this data (classes or vocabulary, input shape).
      num_train: training examples (rows).
      batch_size: examples (rows) per step.
      items_per_step: what one step trains on, for the throughput (images, token positions).
      device: the training set on the devices, sampled inside the step; None when streamed.
      stream: `(start_step, steps_per_call) -> iterator` of streamed batches (closed with
        `.close()` when it has one); None when the set is on the devices.
      eval_batches: a fresh pass over the eval split: padded, masked device batches.
    """

    student: ModelSpec
    num_train: int
    batch_size: int
    items_per_step: float
    device: DeviceData | None
    stream: Callable[[int, int], Iterator[Any]] | None
    eval_batches: Callable[[], Iterable[dict[str, jax.Array]]]

    @property
    def steps_per_epoch(self) -> int:
        return self.num_train // self.batch_size  # the last partial batch is dropped


class Task(abc.ABC):
    """One kind of run; subclasses implement the phases the skeleton calls, in this order:
    `check` (before any I/O), `open_data`, `load_teachers`, `check_teachers`, `build`,
    `optimizer`, `make_step` / `make_eval_step`, then per log `train_means`, per eval
    `eval_metrics`, and at the end `summary`."""

    #: The run kind recorded for this task ("image", "lm").
    kind: ClassVar[str]
    #: The throughput's unit: logged as train/<rate>_per_s and summary.json's <rate>_per_s.
    rate: ClassVar[str]
    #: Train metrics shown on the progress bar.
    postfix: ClassVar[tuple[str, ...]] = ("loss",)
    #: The eval metrics checkpoint.best_metric may name; the last one needs a teacher.
    best_metrics: ClassVar[tuple[str, ...]]

    def __init__(self, plan: Any):
        self.plan = plan

    def eval_metric_names(self, *, distill: bool) -> tuple[str, ...]:
        """The eval metrics checkpoint.best_metric may name in this run."""
        return self.best_metrics if distill else self.best_metrics[:-1]

    @abc.abstractmethod
    def check(self, *, distill: bool) -> None:
        """Refuse a config this task cannot run (ValueError naming key, value and fix); no I/O."""

    def teacher_workdirs(self, *, distill: bool) -> tuple[str, ...]:
        """The teachers' workdirs this run loads (none for supervised training)."""
        return configured_teachers(self.plan.teacher) if distill else ()

    @abc.abstractmethod
    def open_data(self, mesh: jax.sharding.Mesh, *, given: dict[str, np.ndarray] | None = None
                  ) -> RunData:
        """Open the training and eval data on `mesh` (`given`: training arrays in memory)."""

    @abc.abstractmethod
    def open_eval(self, mesh: jax.sharding.Mesh) -> Callable[[], Iterable[dict[str, jax.Array]]]:
        """The eval batches alone (`kdjax eval`)."""

    def check_student(self, student: ModelSpec) -> None:
        """Refuse a trained student `kdjax eval` cannot evaluate on this data."""

    def shardings_for(self, mesh: jax.sharding.Mesh, rule: str) -> Callable[[Any], Any]:
        """`tree -> shardings` of a variable tree under `rule` (model.sharding or
        teacher.sharding) on `mesh`."""
        return lambda tree: sharding.tree_shardings(tree, mesh, rule,
                                                    min_bytes=self.plan.mesh.fsdp_min_bytes)

    def read_teacher(self, workdir: str, mesh: jax.sharding.Mesh,
                     check: Callable[[ModelSpec, dict[str, Any]], None]
                     ) -> tuple[nnx.Module, ModelSpec, dict[str, Any]]:
        """`kdjax.teacher.read` of `workdir` with teacher.model and teacher.sharding: the model
        as trained, its spec and run record, `check` refusing it before its weights are read."""
        t = self.plan.teacher
        return teacher_lib.read(workdir, check=check, name=t.model.name, kwargs=t.model.kwargs,
                                shardings_for=self.shardings_for(mesh, t.sharding))

    @abc.abstractmethod
    def load_teacher(self, workdir: str, student: ModelSpec, mesh: jax.sharding.Mesh) -> Teacher:
        """One teacher, checked against the student before its weights are read."""

    def check_teachers(self, teachers: tuple[Teacher, ...], data: RunData) -> list[dict]:
        """Per-teacher records for summary.json, after any check the task makes of them."""
        return [t.record for t in teachers]

    @abc.abstractmethod
    def build(self, data: RunData, teachers: tuple[FrozenModel, ...]) -> tuple[Distillee,
                                                                                ModelSpec]:
        """The trainable model (student and its method's parts) and the student's final spec."""

    def optimizer(self, tx: optax.GradientTransformation, model: Distillee, student: ModelSpec
                  ) -> optax.GradientTransformation:
        """`tx` wrapped with whatever the task keeps in the optimizer state (pruning masks)."""
        return tx

    @abc.abstractmethod
    def make_step(self, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                  teachers: tuple[FrozenModel, ...], data: RunData, **compile_args: Any) -> Step:
        """The fused train step (`kdjax.step.make_step` with the task's parts)."""

    @abc.abstractmethod
    def make_eval_step(self, graphdef: nnx.GraphDef, teachers: tuple[FrozenModel, ...],
                       **compile_args: Any) -> Callable:
        """`eval_step(params, model_state, batch) -> sums` (`kdjax.step.compile_eval`)."""

    @abc.abstractmethod
    def eval_metrics(self, totals: dict[str, Any]) -> dict[str, float]:
        """The eval/ metrics from the eval sums of a whole split."""

    @abc.abstractmethod
    def train_means(self, pending: list) -> dict[str, float]:
        """The train/ metrics of the steps since the last log (one host sync)."""

    def record(self) -> dict[str, Any]:
        """What a checkpoint's run record carries for this task besides the config and model:
        at least "preprocess" (the input normalisation, readers of a run expect the field)."""
        return {"preprocess": {"mean": [], "std": []}}

    @abc.abstractmethod
    def summary(self, last_train: dict[str, float], model: nnx.Module, student: ModelSpec
                ) -> dict[str, Any]:
        """The task's fields of summary.json (its train metrics, sizes, samples) for the
        trained student `model` of spec `student`."""

    def eval_extras(self, model: nnx.Module, step: int) -> dict[str, Any]:
        """Fields `kdjax eval` adds to eval.json besides the eval metrics."""
        return {}


def configured_teachers(teacher: Any) -> tuple[str, ...]:
    """teacher.workdir, or the several teachers of teacher.workdirs (the task's check refuses
    both at once)."""
    return tuple(teacher.workdirs) or ((teacher.workdir,) if teacher.workdir else ())


TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Register a Task subclass under its `kind` (a class decorator)."""
    TASKS[cls.kind] = cls
    return cls


def task_kind(model_name: str) -> str:
    """The kind of run that trains `model_name`: "lm" for kdjax.lm.models', else "image"."""
    from kdjax.lm.models import is_lm  # noqa: PLC0415  (kdjax.lm imports this module's users)

    return "lm" if is_lm(model_name) else "image"


def run_kind(workdir: str) -> str | None:
    """The kind of run in `workdir` from its config.json's model (None: no config.json, so not
    a run's workdir: an imported teacher or an export is told apart by its own files)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return task_kind(json.load(f).get("model", {}).get("name", ""))


def for_plan(plan: Any) -> Task:
    """The task object of a run's plan."""
    kind = task_kind(plan.model.name)
    if kind not in TASKS:  # the task modules register themselves on import
        import kdjax.classification  # noqa: F401, PLC0415
        import kdjax.lm.task  # noqa: F401, PLC0415
    return TASKS[kind](plan)
