"""The batch statistics of what a model's BatchNorm layers receive, next to their running ones.

Data-free distillation matches these: a BatchNorm's running mean and variance summarise the
activations the training data produced at that layer, so inputs whose activations have the same
per-channel statistics resemble the training data to the network (DeepInversion, Yin et al.
2020). They are read during one forward pass by swapping each BatchNorm instance's class, for
that pass only, for a subclass that records its input's batch mean and variance; the model is
never edited, and since this runs while jax traces the step, the statistics are ordinary values
of the compiled program. (kdjax.taps swaps classes the same way to record module outputs by
path; this needs every BatchNorm's input, which is no module's output in general.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


class BatchNormInput(NamedTuple):
    mean: jax.Array  # float32 [C]: the batch's per-channel mean at the layer's input
    var: jax.Array  # float32 [C]: its (biased) per-channel variance
    running_mean: jax.Array  # float32 [C]: the layer's running statistics
    running_var: jax.Array


def batchnorms(model: nnx.Module) -> list[nnx.BatchNorm]:
    return [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.BatchNorm)]


@contextlib.contextmanager
def recording(model: nnx.Module) -> Iterator[list[BatchNormInput]]:
    """Within the block, each call of one of `model`'s BatchNorms appends its BatchNormInput to
    the yielded list (in call order). Raises ValueError for a model without BatchNorm."""
    layers = batchnorms(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer (left): data-free "
                         f"synthesis matches BatchNorm statistics; use a teacher with BatchNorm, "
                         f"not folded into its convolutions (teacher.fold_batchnorm=False)")
    records: list[BatchNormInput] = []
    originals = [type(layer) for layer in layers]

    def subclass(cls):
        def __call__(self, x, *args, **kwargs):
            axes = tuple(range(x.ndim - 1))
            xf = x.astype(jnp.float32)
            mean = xf.mean(axes)
            var = jnp.square(xf - mean).mean(axes)
            records.append(BatchNormInput(mean, var, self.mean[...].astype(jnp.float32),
                                          self.var[...].astype(jnp.float32)))
            return cls.__call__(self, x, *args, **kwargs)

        # type(cls) is Flax's module metaclass; the subclass only overrides __call__.
        return type(cls)(cls.__name__, (cls,), {"__call__": __call__,
                                                "__module__": cls.__module__,
                                                "__qualname__": cls.__qualname__})

    swapped = {cls: subclass(cls) for cls in set(originals)}
    try:
        for layer, cls in zip(layers, originals):
            object.__setattr__(layer, "__class__", swapped[cls])
        yield records
    finally:
        for layer, cls in zip(layers, originals):
            object.__setattr__(layer, "__class__", cls)


def statistics_loss(records: list[BatchNormInput]) -> jax.Array:
    """Σ_l ||μ_l(x) - μ_l||₂ + ||σ²_l(x) - σ²_l||₂ over the recorded layers (DeepInversion's
    feature-distribution regulariser R_feature), float32 scalar."""
    return sum(jnp.linalg.norm(r.mean - r.running_mean) + jnp.linalg.norm(r.var - r.running_var)
               for r in records)
