"""A frozen teacher made cheap to run, and the check that it still answers like itself.

A distillation teacher is never trained again, so what only an inference engine may do is safe
here: fold its BatchNorms into the convolutions they follow (one pass over each activation
instead of two, and a bias the convolution's kernel applies in its epilogue), and store its
weights in the dtype it computes in (bfloat16 on GPU/TPU: half the bytes read per step and no
cast in the step). `prepare` does both; `agreement` measures the prepared teacher against its
float32 self on real examples, which `kdjax distill` reports before training and refuses below
`teacher.min_agreement`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax import augment, checkpoint, models, taps
from kdjax.models import ModelSpec
from kdjax.step import FrozenModel


@dataclasses.dataclass(frozen=True)
class Preparation:
    """What `prepare` changed: BatchNorms folded (of how many) and the compute dtype."""

    folded: int
    batchnorms: int
    dtype: str

    @property
    def changed(self) -> bool:
        return self.folded > 0 or self.dtype != "float32"

    def describe(self) -> str:
        return (f"{self.folded} of {self.batchnorms} BatchNorms folded into its convolutions, "
                f"{self.dtype} weights and compute")


@dataclasses.dataclass(frozen=True)
class Agreement:
    """The prepared teacher against its float32 self on `examples` examples."""

    examples: int
    top1: float  # fraction of examples with the same argmax
    max_abs_logit_diff: float

    def describe(self) -> str:
        return (f"top-1 agreement with its float32 self {100 * self.top1:.2f}% on "
                f"{self.examples} eval examples (max |logit difference| "
                f"{self.max_abs_logit_diff:.4g})")


def read(workdir: str, *, check: Callable[[ModelSpec, dict[str, Any]], None],
         shardings_for: Callable[[Any], Any] | None = None, name: str = "",
         kwargs: Mapping[str, Any] | None = None) -> tuple[nnx.Module, ModelSpec, dict[str, Any]]:
    """The latest checkpoint of the run in `workdir` as a teacher: the model as trained (float32),
    its spec and the checkpoint's run record.

    `name` and `kwargs` (teacher.model) state the architecture the experiment expects instead of
    the recorded one; a checkpoint that does not match it is refused. `check(spec, run)` refuses
    a teacher the task cannot use (classes, vocabulary, tokenizer) before its weights are read.
    """
    reader = checkpoint.RunReader(workdir, what="teacher.workdir")
    try:
        step = reader.resolve_step("latest")
        run = reader.run_meta(step)
        spec = ModelSpec.from_json(run["model"])
        if name:
            spec = dataclasses.replace(spec, name=name, kwargs=dict(kwargs or {}))
        check(spec, run)
        what = (f"the teacher model teacher.model.name={name!r}" if name else
                "the teacher model recorded with it")
        reference = reader.load_model(step, dataclasses.replace(spec, compute_dtype="float32"),
                                      what=what, shardings_for=shardings_for)
    finally:
        reader.close()
    return reference, spec, run


def prepare(reference: nnx.Module, spec: ModelSpec, *, dtype: jnp.dtype,
            fold_batchnorm: bool = True) -> tuple[nnx.Module, Preparation]:
    """A copy of `reference` (the teacher as trained, float32) for inference in `dtype`.

    Args:
      reference: the teacher, as restored from its checkpoint; left unchanged.
      spec: its ModelSpec, to rebuild the network with `dtype` as its compute dtype.
      dtype: float32 or bfloat16; every floating variable is stored in it (the layers would
        cast them to it at each call anyway, so results are the same as casting on the fly).
      fold_batchnorm: fold each BatchNorm that follows a convolution into it
        (`kdjax.models.fold_batchnorm`).

    Returns:
      The prepared teacher (inference only) and what was changed.
    """
    dtype = jnp.dtype(dtype)
    graphdef, _ = nnx.split(dataclasses.replace(spec, compute_dtype=dtype.name).abstract())
    # copy=True: Variables of its own, so folding and casting never touch `reference`'s.
    model = nnx.merge(graphdef, nnx.state(reference), copy=True)
    batchnorms = models.count_batchnorms(model)
    folded = models.fold_batchnorm(model) if fold_batchnorm else 0
    if dtype != jnp.float32:
        state = nnx.state(model)
        nnx.update(model, jax.tree.map(
            lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state))
    return model, Preparation(folded=folded, batchnorms=batchnorms, dtype=dtype.name)


def agreement(reference: FrozenModel, prepared: FrozenModel, batches: Iterable[dict[str, Any]],
              preprocess: augment.Preprocess, *, max_examples: int) -> Agreement:
    """Top-1 agreement and the largest logit difference of `prepared` against `reference`.

    `batches` are eval batches ("image", "mask" for padding), read until `max_examples` real
    examples have been compared (fewer when the split is smaller). `preprocess` is the run's;
    the teachers see its images in their own normalisation (FrozenModel.normalization).
    """
    if max_examples < 1:
        raise ValueError(f"max_examples (config teacher.agreement_examples) must be >= 1 to "
                         f"compare, got {max_examples}")

    @jax.jit
    def compare(ref_vars, prep_vars, batch):
        images = augment.preprocess(batch["image"], preprocess, key=None, dtype=jnp.float32)
        images = augment.teacher_view(images, preprocess, reference.normalization,
                                      reference.input_shape)
        ref = taps.call(nnx.merge(reference.graphdef, ref_vars), images,
                        train=False).astype(jnp.float32)
        out = taps.call(nnx.merge(prepared.graphdef, prep_vars), images,
                        train=False).astype(jnp.float32)
        real = batch["mask"] > 0
        same = (ref.argmax(-1) == out.argmax(-1)) & real
        diff = jnp.where(real[:, None], jnp.abs(ref - out), 0.0).max()
        return real.sum(), same.sum(), diff

    count = same = 0
    worst = 0.0
    for batch in batches:
        n, k, d = jax.device_get(compare(reference.variables, prepared.variables, batch))
        count, same, worst = count + int(n), same + int(k), max(worst, float(d))
        if count >= max_examples:
            break
    if count == 0:
        raise ValueError("no eval examples to compare the prepared teacher with its float32 self")
    return Agreement(examples=count, top1=same / count, max_abs_logit_diff=worst)
