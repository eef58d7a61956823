"""The trainable side of a step: the student and the parts that train with it.

A `Distillee` is the student plus what a method trains alongside it: a feature method's
connectors (kdjax.connectors), mutual learning's peer students, BYOT's exits (kdjax.exits), CTKD's
temperature module (kdjax.temperature). Each part implements one protocol (`Part`), so the
Distillee and the step run any method's parts without knowing which method they serve; the
method registry (kdjax.methods) says which parts a method builds. One optimizer updates all of
it; only the student is exported (`split_student`).

The parts sit in fixed slots (`PARTS`) whose names are the Distillee's state tree keys, which
checkpoints store: a run written before a slot's part changed class still restores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import jax
from flax import nnx

from kdjax import taps as taps_lib


class Part(Protocol):
    """What trains with the student. `features` returns the entries it adds to the student's
    features dict (which the objective reads), from the input `x`, the student's features so far
    `out` and the teachers' features; `index` (each example's position in the training set) and
    `key` (a PRNG key of this step) serve parts with per-example state (CRD). `student_taps` are
    the student taps it reads beyond the student's own features. `eval_logits` are the
    classifiers it adds that evaluation scores beside the student (a peer, an exit), by metric
    prefix, from the input and the student's features in inference mode."""

    student_taps: tuple[str, ...]

    def features(self, x: jax.Array, out: dict, teachers: Sequence[dict], *, train: bool,
                 index: jax.Array | None = None, key: jax.Array | None = None
                 ) -> dict[str, Any]: ...

    def eval_logits(self, x: jax.Array, out: dict) -> dict[str, jax.Array]: ...


class PartList(nnx.List):
    """A part made of a list of modules; the empty one adds nothing (it fills a Distillee's unused
    slots, so that every Distillee has the same attributes)."""

    student_taps: tuple[str, ...] = ()

    def features(self, x, out, teachers, *, train, index=None, key=None) -> dict[str, Any]:
        del x, out, teachers, train, index, key
        return {}

    def eval_logits(self, x: jax.Array, out: dict) -> dict[str, jax.Array]:
        del x, out
        return {}


class Peers(PartList):
    """Further students trained alongside (deep mutual learning): their features as "peers"."""

    def features(self, x, out, teachers, *, train, index=None, key=None) -> dict[str, Any]:
        if not len(self):
            return {}
        return {"peers": tuple(taps_lib.features(p, x, train=train) for p in self)}

    def eval_logits(self, x: jax.Array, out: dict) -> dict[str, jax.Array]:
        return {f"peer{i}/": taps_lib.call(p, x, train=False) for i, p in enumerate(self, 1)}


# The slots, in the order their parts run (a part sees the entries of the ones before it).
PARTS = ("connectors", "peers", "exits", "temperature")
DISTILLEE_PARTS = frozenset({"student", *PARTS})


class Distillee(nnx.Module):
    """The student and its parts (`Part`, by slot name, e.g. `connectors=...`).

    The student is any NNX model: a zoo model's `features()` taps, or `{"logits": student(x)}`
    plus the sub-modules named in `taps` (attribute paths, kdjax.taps) and in its parts'
    `student_taps`. Calling a Distillee runs the student alone, so evaluation sees exactly the
    exported model; `features(..., teachers=...)` adds to the student's taps each part's entries.
    """

    def __init__(self, student: nnx.Module, *, taps: Sequence[str] = (), **parts: Part):
        unknown = sorted(set(parts) - set(PARTS))
        if unknown:
            raise ValueError(f"a Distillee's parts go in the slots {list(PARTS)} (the keys "
                             f"checkpoints store), got {unknown}")
        self.student = student
        for name in PARTS:
            setattr(self, name, parts.get(name, PartList()))
        self.taps = tuple(dict.fromkeys(
            [*taps, *(t for name in PARTS for t in getattr(self, name).student_taps)]))

    def __call__(self, x, *, train: bool = False) -> jax.Array:
        return taps_lib.call(self.student, x, train=train)

    def features(self, x, *, train: bool = False, teachers: Sequence[dict] = (),
                 index: jax.Array | None = None, key: jax.Array | None = None) -> dict:
        out = taps_lib.features(self.student, x, train=train, taps=self.taps,
                                what="loss.student_taps")
        for name in PARTS:
            out.update(getattr(self, name).features(x, out, teachers, train=train, index=index,
                                                    key=key))
        return out

    def eval_logits(self, x) -> dict[str, jax.Array]:
        """The logits evaluation scores, by metric prefix: the student's ("") and those its
        parts add (mutual learning's "peer<i>/", BYOT's "exit_<tap>/"), in inference mode."""
        out = taps_lib.features(self.student, x, train=False, taps=self.taps,
                                what="loss.student_taps")
        heads = {"": out["logits"]}
        for name in PARTS:
            heads.update(getattr(self, name).eval_logits(x, out))
        return heads


def split_student(tree: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(the student's part, the rest) of a Distillee's params or model_state.

    The student's part is the exported model: checkpoints store it as the item every reader of
    a run (teacher loading, `kdjax eval`) uses; the parts go with the training state.
    A plain model's state (not a Distillee's) is all student.
    """
    if not set(tree) <= DISTILLEE_PARTS:
        return tree, nnx.State({})
    # raw_mapping: the nested dicts as nnx.split makes them (indexing would wrap them in State,
    # a different pytree, hence another compiled step).
    raw = tree.raw_mapping
    return (nnx.State(raw.get("student", {})),
            nnx.State({k: v for k, v in raw.items() if k != "student"}))


def join_student(student: nnx.State, rest: nnx.State) -> nnx.State:
    """Inverse of `split_student` for a Distillee's state (nnx.split leaves out empty parts)."""
    return nnx.State({**({"student": student.raw_mapping} if len(student) else {}),
                      **rest.raw_mapping})
