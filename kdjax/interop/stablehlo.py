"""A framework-neutral serving artefact: the model as serialized StableHLO (`jax.export`).

One file holds the whole inference function, weights included as constants: uint8 images
[N, H, W, C] in, float32 logits [N, classes] out, with the input normalisation baked in and the
batch dimension symbolic (any N runs). It is lowered for CPU, CUDA and TPU at once, and loading
it needs jax alone, not kdjax or the model's code:

    exported = jax.export.deserialize(open(path, "rb").read())
    logits = exported.call(images)

StableHLO is also what XLA-based servers consume (TF Serving / IREE / PJRT plugins), with the
compatibility guarantees of jax.export's serialization (6 months backward, see its docs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax import augment, taps
from kdjax.models import ModelSpec

__all__ = ["PLATFORMS", "export", "snippet"]

PLATFORMS = ("cpu", "cuda", "tpu")

SNIPPET = """\
import jax, numpy as np
exported = jax.export.deserialize(bytearray(open("{path}", "rb").read()))
images = np.zeros((8, {shape}), np.uint8)  # your images: uint8 [N, H, W, C], any N
logits = exported.call(images)  # float32 [N, {classes}]
"""


def export(model: nnx.Module, spec: ModelSpec, preprocess: dict, path: str) -> list[str]:
    """Serialize `model`'s inference on uint8 images, normalised with `preprocess`
    {"mean", "std"}, to `path`; returns the platforms it was lowered for."""
    graphdef, state = nnx.split(model)
    recipe = augment.Preprocess(mean=tuple(preprocess["mean"]), std=tuple(preprocess["std"]))

    def serve(images: jax.Array) -> jax.Array:
        x = augment.preprocess(images, recipe, key=None, dtype=jnp.float32)
        return taps.call(nnx.merge(graphdef, state), x, train=False).astype(jnp.float32)

    (batch,) = jax.export.symbolic_shape("batch")
    images = jax.ShapeDtypeStruct((batch, *spec.input_shape), jnp.uint8)
    exported = jax.export.export(jax.jit(serve), platforms=PLATFORMS)(images)
    with open(path, "wb") as f:
        f.write(exported.serialize())
    return list(exported.platforms)


def snippet(path: str, spec: ModelSpec) -> str:
    return SNIPPET.format(path=path, shape=", ".join(map(str, spec.input_shape)),
                          classes=spec.num_classes)
