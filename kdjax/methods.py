"""The method registry: each distillation method (a config's `loss.name`) as one record.

A `Method` says whether the method loads teachers, which trainable parts it adds to the student
(kdjax.distillee: connectors, peers, exits, a learned temperature), how its config is checked and
how its objective is built. The step and the trainers ask the registry and name no method;
`register` adds one. Methods belong to a task ("image": kdjax.objectives, "lm": kdjax.lm.objective,
which register theirs when imported; `get` imports them), so one registry answers whether a
loss.name is valid for a task.

Objectives are composed from weighted terms with `combine` (optax's `chain` is the model): each
term's value is a metric, so the loss mix is written once.

Config sections are the typed sections of kdjax.plan (`loss.name`, `loss.kwargs`), read by
attribute.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.distillee import PARTS, Distillee, Part, Peers

if TYPE_CHECKING:
    from flax import nnx

    from kdjax.models import ModelSpec
    from kdjax.step import FrozenModel

FAMILIES = ("supervised", "logit", "feature", "mutual", "self", "token")
# The modules that register each task's methods.
TASKS = {"image": "kdjax.objectives", "lm": "kdjax.lm.objective"}

Metrics = dict[str, jax.Array]
# A term's weight: a number, or a schedule of the step.
Weight = float | Callable[[jax.Array], jax.Array]


# -- the weighted combinator ----------------------------------------------------------------

class Term(NamedTuple):
    """One term of an objective: `weight · fn(*args)`, logged as metric `name` (unless `log` is
    False: a part of a sum logged under another term's name). `fn` returns a scalar, or
    (scalar, metrics) for metrics that come with it (a temperature, per-exit accuracies)."""

    name: str
    weight: Weight
    fn: Callable[..., jax.Array | tuple[jax.Array, Metrics]]
    log: bool = True


def ramp(weight: float, warmup_steps: int) -> Weight:
    """`weight`, ramped linearly from weight/warmup_steps at step 0 to `weight` at step
    warmup_steps - 1 (DKD's recipe warms its loss up this way); the number itself when 0."""
    if not warmup_steps:
        return weight
    return lambda step: weight * jnp.minimum(1.0, (step + 1) / warmup_steps)


def combine(*terms: Term) -> Callable[..., tuple[jax.Array, Metrics]]:
    """`mixed(*args) -> (Σ_i w_i(step) · fn_i(*args), metrics)`: the terms' weighted sum.

    Every term's fn takes the same positional arguments, the last of which is the step that
    scheduled weights read (an objective's (out, teachers, labels, step)). Metrics hold each
    logged term's value under its name, "<name>_weight" for a scheduled weight, and the metrics
    the terms return.
    """
    names = [t.name for t in terms]
    if len(set(names)) != len(names):
        raise ValueError(f"an objective's terms need distinct names, got {names}")

    def mixed(*args):
        step = args[-1]
        total, metrics = 0.0, {}
        for term in terms:
            got = term.fn(*args)
            value, extra = got if isinstance(got, tuple) else (got, {})
            weight = term.weight(step) if callable(term.weight) else term.weight
            total = total + weight * value
            if term.log:
                metrics[term.name] = value
                if callable(term.weight):
                    metrics[f"{term.name}_weight"] = jnp.asarray(weight, jnp.float32)
            metrics.update(extra)
        return total, metrics

    return mixed


# -- the registry -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Build:
    """What a method's trainable parts are built from (`Method.trainables`)."""

    student: nnx.Module
    student_spec: ModelSpec
    teachers: tuple[FrozenModel, ...]
    image_shape: tuple[int, ...]
    seed: int
    dataset_labels: np.ndarray | None
    dtype: Any
    peers: tuple[ModelSpec, ...] = ()


def _no_parts(loss: Any, build: Build) -> dict[str, Part]:
    del loss, build
    return {}


def _no_check(loss: Any) -> None:
    del loss


def _always(kwargs: Mapping[str, Any]) -> bool:
    del kwargs
    return True


@dataclasses.dataclass(frozen=True)
class Method:
    """A distillation method: loss.name `name` of task `task`.

    objective: builds what the step minimises from the config's `loss` section; image methods
      take (loss, teacher section or None, *, total_steps) and return a kdjax.step.Objective,
      language-model methods (loss, *, chunk_size) and return a kdjax.lm.objective.TokenObjective.
    needs_teacher: whether a run with these loss.kwargs loads teachers.
    learns_from: where the student learns when it loads none ("from peer students"), for errors.
    teacher_is_student: whether the teacher must be a trained copy of the student (Tf-KD self).
    needs_dataset_labels: whether its parts need every training label up front (CRD's memory).
    check: raises ValueError on a `loss` section the method cannot run, naming key, value and fix
      (checks needing the run's total steps happen when the objective is built).
    trainables: (loss, Build) -> {slot: part} (kdjax.distillee.PARTS) it adds to the student.
    """

    name: str
    family: str
    objective: Callable[..., Any]
    task: str = "image"
    needs_teacher: Callable[[Mapping[str, Any]], bool] = _always
    learns_from: str = ""
    teacher_is_student: Callable[[Mapping[str, Any]], bool] = lambda kwargs: False
    needs_dataset_labels: bool = False
    check: Callable[[Any], None] = _no_check
    trainables: Callable[[Any, Build], dict[str, Part]] = _no_parts

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"Method.family must be one of {list(FAMILIES)}, got "
                             f"{self.family!r}")
        if self.task not in TASKS:
            raise ValueError(f"Method.task must be one of {sorted(TASKS)}, got {self.task!r}")


REGISTRY: dict[str, dict[str, Method]] = {task: {} for task in TASKS}


def register(method: Method, *, replace: bool = False) -> Method:
    """Add `method` to the registry of its task (`replace`: over a method of that name)."""
    methods = REGISTRY[method.task]
    if method.name in methods and not replace:
        raise ValueError(f"a {method.task} method named {method.name!r} is already registered; "
                         f"pass replace=True to replace it")
    methods[method.name] = method
    return method


def _loaded(task: str) -> dict[str, Method]:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {sorted(TASKS)}")
    importlib.import_module(TASKS[task])  # registers the task's built-in methods
    return REGISTRY[task]


def names(task: str = "image") -> list[str]:
    """The loss.name values valid for `task`, sorted."""
    return sorted(_loaded(task))


def get(name: str, *, task: str = "image") -> Method:
    """The method called `name` in `task`; an unknown name's error lists the valid ones."""
    methods = _loaded(task)
    if name not in methods:
        raise ValueError(f"unknown loss.name={name!r}; valid names: {sorted(methods)}")
    return methods[name]


# -- the Distillee of a run -------------------------------------------------------------------

def build_distillee(loss: Any, student: nnx.Module, student_spec: ModelSpec,
                    teachers: Sequence[FrozenModel], *, image_shape: Sequence[int], seed: int,
                    dataset_labels: np.ndarray | None = None, dtype: Any = jnp.float32,
                    peers: Sequence[ModelSpec] = ()) -> Distillee:
    """`student` with the trainable parts loss.name's method brings (`Method.trainables`),
    built from the teachers, the image shape, `seed` and, for methods that train peer students,
    their specs `peers` (config model.peers), which other methods refuse."""
    method = get(loss.name)
    parts = method.trainables(loss, Build(student, student_spec, tuple(teachers),
                                          tuple(image_shape), seed, dataset_labels, dtype,
                                          tuple(peers)))
    if peers and "peers" not in parts:
        raise ValueError(f"model.peers={tuple(s.name for s in peers)} are students trained "
                         f"alongside by mutual learning (loss.name='dml'), not by "
                         f"loss.name={loss.name!r}; clear model.peers")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"loss.name={loss.name!r} built parts {unknown}; a Distillee's slots "
                         f"are {list(PARTS)}")
    return Distillee(student, **parts)


def build_peers(build: Build) -> dict[str, Part]:
    """The peer students of `build.peers` (seeds after the student's), as the "peers" part."""
    return {"peers": Peers(spec.build(build.seed + i)
                           for i, spec in enumerate(build.peers, start=1))}
