"""Helpers of the interop tests: a run's logits on uint8 images, PyTorch's on the same images."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import augment, checkpoint, taps


def run_logits(workdir: str, images: np.ndarray) -> np.ndarray:
    """The latest checkpoint of `workdir` on `images` (uint8 NHWC), normalised as its run
    record's "preprocess" says, in eval mode, float32."""
    reader = checkpoint.RunReader(workdir)
    try:
        step = reader.resolve_step("latest")
        pre = reader.run_meta(step)["preprocess"]
    finally:
        reader.close()
    return model_logits(load_run_model(workdir), images, pre["mean"], pre["std"])


def model_logits(model, images, mean, std) -> np.ndarray:
    graphdef, state = nnx.split(model)
    recipe = augment.Preprocess(mean=tuple(mean), std=tuple(std))

    @jax.jit
    def forward(state, x):
        x = augment.preprocess(x, recipe, key=None, dtype=jnp.float32)
        return taps.call(nnx.merge(graphdef, state), x, train=False)

    return np.asarray(forward(state, jnp.asarray(images)))


def torch_logits(model, images: np.ndarray, mean, std) -> np.ndarray:
    """A PyTorch model (eval mode) on `images` (uint8 NHWC) normalised with mean/std."""
    import torch

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        return model.eval()(x).numpy()


def max_relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| over max |want|: the error relative to the logits' scale."""
    return float(np.abs(got - want).max() / np.abs(want).max())


def images(n: int, shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def random_model(name: str, *, num_classes: int = 10, shape=(32, 32, 3), seed: int = 0,
                 **kwargs):
    """Zoo model `name` with random weights and BatchNorm statistics far from their init, drawn
    with numpy into the abstract model (no JAX initialisers to compile: fast on a busy CPU)."""
    from kdjax import models

    abstract = nnx.eval_shape(lambda: models.create_model(
        name, num_classes=num_classes, rngs=nnx.Rngs(0), input_shape=shape, **kwargs))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def draw(path, v):
        leaf, shape_ = path[-1], v.shape
        if leaf == "var":
            x = rng.uniform(0.5, 2.0, shape_)
        elif leaf == "scale":
            x = rng.uniform(0.5, 1.5, shape_)
        elif leaf in ("mean", "bias"):
            x = rng.normal(0.0, 0.2, shape_)
        else:  # kernels: He-scaled, so that deep models keep finite, informative logits
            x = rng.normal(0.0, (2.0 / max(1, int(np.prod(shape_[:-1])))) ** 0.5, shape_)
        return v.replace(jnp.asarray(x, v.dtype))

    state = nnx.from_flat_state([(p, draw(p, v)) for p, v in nnx.to_flat_state(state)])
    return nnx.merge(graphdef, state)


def flat_arrays(model) -> dict:
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}


def load_run_model(workdir: str):
    reader = checkpoint.RunReader(workdir)
    try:
        step = reader.resolve_step("latest")
        return reader.load_model(step, reader.model_spec(step))
    finally:
        reader.close()
