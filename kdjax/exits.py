"""BYOT's auxiliary exits: shallow classifiers on a student's stages, trained with it.

Be Your Own Teacher (Zhang et al., ICCV 2019) attaches a bottleneck and a classifier to each
stage of a network; each such exit learns from the labels, from the deepest classifier's soft
targets and from a hint towards the deepest classifier's input feature (kdjax.objectives.byot).
After training, an exit is a cheaper model: evaluation reports each exit's accuracy.

An exit reads two of the student's taps: its stage (a zoo feature name such as "stage1", or a
module path, kdjax.taps) and the hint target (default "embedding": the vector the deepest
classifier reads). Like connectors, exits are built from the taps' shapes (traced abstractly),
live in the student's Distillee (`Exits`, a kdjax.distillee part), train in the same step under
the same optimizer, are checkpointed with it (the checkpoint's train/extras) and are not part of the exported student.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.distillee import PartList

Shape = tuple[int, ...]


def _pool(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, C] (global average); [B, D] unchanged; anything else flattened."""
    if x.ndim == 4:
        return jnp.mean(x, axis=(1, 2), dtype=jnp.float32)
    return x.reshape(x.shape[0], -1).astype(jnp.float32)


class Exit(nnx.Module):
    """One BYOT exit: bottleneck -> features f -> linear classifier.

    On an NHWC stage, the bottleneck is the reference's `branchBottleNeck`: a 1x1 conv to `width`
    channels, a `reduce` x `reduce` conv of stride `reduce` (which brings the map down to the
    deepest stage's size), a 1x1 conv to the hint's width, each followed by BatchNorm and ReLU,
    then global average pooling. On a `[B, D]` tap (an MLP's hidden layer) the same with linear
    layers. `width` 0 is the reference's quarter of the hint's width.

    `exit(features, train=...)` returns (logits [B, classes], f [B, D], the hint target [B, D]:
    the hint tap, average-pooled if it is a map).
    """

    def __init__(self, tap: str, hint_tap: str, tap_shape: Shape, hint_shape: Shape,
                 num_classes: int, *, reduce: int = 1, width: int = 0, rngs: nnx.Rngs,
                 dtype: jnp.dtype = jnp.float32):
        self.tap, self.hint_tap = tap, hint_tap
        self.exit_name = f"exit_{tap}"
        d = hint_shape[-1] if len(hint_shape) == 4 else math.prod(hint_shape[1:])
        mid = width or max(1, d // 4)
        kw = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        if len(tap_shape) == 4:
            c = tap_shape[-1]
            self.layers = nnx.List([
                nnx.Conv(c, mid, (1, 1), **kw),
                nnx.Conv(mid, mid, (reduce, reduce), strides=(reduce, reduce), padding="VALID",
                         **kw),
                nnx.Conv(mid, d, (1, 1), **kw)])
        elif len(tap_shape) == 2:
            self.layers = nnx.List([nnx.Linear(tap_shape[1], mid, **kw),
                                    nnx.Linear(mid, d, **kw)])
        else:
            raise ValueError(f"a byot exit attaches to an NHWC feature map or a [B, D] vector; "
                             f"the student's tap {tap!r} has shape {tuple(tap_shape)} "
                             f"(loss.student_taps)")
        self.norms = nnx.List([nnx.BatchNorm(layer.out_features, momentum=0.9, epsilon=1e-5,
                                             **kw) for layer in self.layers])
        self.head = nnx.Linear(d, num_classes, **kw)

    @property
    def taps(self) -> tuple[str, str]:
        return self.tap, self.hint_tap

    def __call__(self, features: dict, *, train: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
        x = features[self.tap]
        for layer, norm in zip(self.layers, self.norms):
            x = nnx.relu(norm(layer(x), use_running_average=not train))
        f = _pool(x)
        return self.head(f).astype(jnp.float32), f, _pool(features[self.hint_tap])


class Exits(PartList):
    """BYOT's exits as a Distillee part: its entry "exits" maps each exit's name to its
    (logits, feature, hint target)."""

    @property
    def student_taps(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t for e in self for t in e.taps))

    def features(self, x, out, teachers, *, train, index=None, key=None) -> dict:
        del x, teachers, index, key
        if not len(self):
            return {}
        return {"exits": {e.exit_name: e(out, train=train) for e in self}}

    def eval_logits(self, x: jax.Array, out: dict) -> dict[str, jax.Array]:
        """Each exit's logits in inference mode from the student's features `out`, under the
        metric prefix "<exit name>/"."""
        del x
        return {f"{e.exit_name}/": e(out, train=False)[0] for e in self}


def build(shapes: dict[str, Shape], taps: Sequence[str], *, hint_tap: str, num_classes: int,
          width: int = 0, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32) -> Exits:
    """One exit per tap in `taps`, from the student's tap shapes ({tap: shape}, which must hold
    `taps` and `hint_tap`). An exit on a map reduces it to the smallest map among the student's
    taps (its deepest stage) before pooling, as the reference brings each to the last stage's."""
    if hint_tap not in shapes:
        raise ValueError(f"the student has no tap {hint_tap!r} for byot's hint (loss.kwargs."
                         f"hint_tap); its taps: {sorted(shapes)}")
    if not taps:
        raise ValueError("byot needs at least one stage to attach an exit to: name them in "
                         f"loss.student_taps (the student's taps: {sorted(shapes)})")
    if width < 0:
        raise ValueError(f"loss.kwargs.width must be >= 0 (0: a quarter of the hint's width), "
                         f"got {width}")
    smallest = min((s[1] for s in shapes.values() if len(s) == 4), default=1)
    out = []
    for tap in taps:
        if tap not in shapes:
            raise ValueError(f"the student has no tap {tap!r} (loss.student_taps); its taps: "
                             f"{sorted(shapes)}")
        shape = shapes[tap]
        reduce = max(1, shape[1] // smallest) if len(shape) == 4 else 1
        out.append(Exit(tap, hint_tap, shape, shapes[hint_tap], num_classes, reduce=reduce,
                        width=width, rngs=rngs, dtype=dtype))
    return Exits(out)
