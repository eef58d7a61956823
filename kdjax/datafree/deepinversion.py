"""DeepInversion (Yin et al., "Dreaming to Distill", CVPR 2020): training inputs synthesised
from the teacher alone.

A batch of images x̂ (in the teacher's normalised input space), started from N(0, 1), is
optimised with Adam so that the frozen teacher classifies it as chosen targets y and so that the
activations it produces match the statistics the teacher's BatchNorms saw in training:

    L(x̂) = CE(T(jitter(x̂)), y) + bn_weight · Σ_l ||μ_l(x̂) - μ_l||₂ + ||σ²_l(x̂) - σ²_l||₂
           + tv_weight · TV(x̂) + l2_weight · mean(x̂²)

with TV(x̂) = mean((x̂[i+1, j] - x̂[i, j])²) + mean((x̂[i, j+1] - x̂[i, j])²) (the paper's
total-variation prior, squared differences) and `jitter` a random shift by up to
`jitter` pixels and a random flip each iteration (the paper's augmentation of x̂). After every
update x̂ is clipped to the range of valid pixels. The teacher runs in inference mode (running
BatchNorm statistics; kdjax.datafree.bn_stats records each BatchNorm's input).

Each batch's whole optimisation is one compiled program (a `lax.fori_loop` over the iterations,
in chunks of `steps_per_call`); the finished batch is quantised to uint8 images, the form every
kdjax training set has, which the student then trains on with the teacher in the fused step
(kdjax.datafree.run). The training images are never read.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from kdjax import augment, sharding
from kdjax.datafree import bn_stats
from kdjax.step import FrozenModel


@dataclasses.dataclass(frozen=True)
class Recipe:
    """DeepInversion's hyperparameters (the config's `datafree` section)."""

    steps: int = 200  # Adam iterations per batch
    learning_rate: float = 0.1
    bn_weight: float = 1.0
    tv_weight: float = 1e-2
    l2_weight: float = 1e-4
    jitter: int = 2  # pixels
    flip: bool = True
    steps_per_call: int = 0  # iterations per compiled call; 0 = all of them

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"datafree.synthesis_steps must be >= 1, got {self.steps}")
        if self.learning_rate <= 0:
            raise ValueError(f"datafree.synthesis_lr must be > 0, got {self.learning_rate}")
        for name in ("bn_weight", "tv_weight", "l2_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"datafree.{name} must be >= 0, got {getattr(self, name)}")
        if self.jitter < 0:
            raise ValueError(f"datafree.jitter must be >= 0, got {self.jitter}")


def total_variation(x: jax.Array) -> jax.Array:
    """Mean squared difference of vertically and horizontally neighbouring pixels, [B, H, W, C]."""
    return (jnp.mean(jnp.square(x[:, 1:] - x[:, :-1]))
            + jnp.mean(jnp.square(x[:, :, 1:] - x[:, :, :-1])))


def _jitter(key: jax.Array, x: jax.Array, pixels: int, flip: bool) -> jax.Array:
    """One random shift (a roll, as the paper's) and optional flip for the whole batch."""
    shift_key, flip_key = jax.random.split(key)
    if pixels:
        dy, dx = jax.random.randint(shift_key, (2,), -pixels, pixels + 1)
        x = jnp.roll(x, (dy, dx), axis=(1, 2))
    if flip:
        x = jnp.where(jax.random.bernoulli(flip_key), x[:, :, ::-1], x)
    return x


def inversion_loss(teacher: nnx.Module, x: jax.Array, targets: jax.Array, key: jax.Array,
                   recipe: Recipe) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(L(x̂), its terms) for a merged teacher; see the module docstring."""
    view = _jitter(key, x, recipe.jitter, recipe.flip)
    with bn_stats.recording(teacher) as records:
        logits = teacher(view, train=False).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    bn = bn_stats.statistics_loss(records)
    tv = total_variation(x)
    l2 = jnp.mean(jnp.square(x))
    loss = ce + recipe.bn_weight * bn + recipe.tv_weight * tv + recipe.l2_weight * l2
    accuracy = (logits.argmax(-1) == targets).mean()
    return loss, {"loss": loss, "ce": ce, "bn": bn, "tv": tv, "l2": l2,
                  "teacher_accuracy": accuracy}


def pixel_range(preprocess: augment.Preprocess) -> tuple[jax.Array, jax.Array]:
    """The normalised values of black and white pixels, per channel."""
    mean, std = (jnp.asarray(v, jnp.float32) for v in (preprocess.mean, preprocess.std))
    return (0.0 - mean) / std, (1.0 - mean) / std


def to_uint8(x: np.ndarray, preprocess: augment.Preprocess) -> np.ndarray:
    """Normalised images back to uint8 pixels (rounded; the inverse of augment.normalize)."""
    pixels = np.asarray(x, np.float32) * np.asarray(preprocess.std) + np.asarray(preprocess.mean)
    return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)


def make_inverter(teacher: FrozenModel, recipe: Recipe, preprocess: augment.Preprocess, *,
                  mesh: Mesh | None = None):
    """`invert(key, targets [B], image_shape) -> (x̂ [B, H, W, C] normalised, final metrics)`,
    compiled once for the batch's shape, its arrays replicated on `mesh` (default: all
    devices)."""
    rep = sharding.replicated(mesh or sharding.make_mesh())
    tx = optax.adam(recipe.learning_rate)
    lo, hi = pixel_range(preprocess)
    per_call = recipe.steps_per_call or recipe.steps
    if recipe.steps % per_call:
        raise ValueError(f"datafree.synthesis_steps={recipe.steps} must be a multiple of "
                         f"datafree.synthesis_steps_per_call={per_call}")

    def one(i, carry, variables, targets, key):
        x, opt_state, _ = carry
        model = nnx.merge(teacher.graphdef, variables)
        grad, metrics = jax.grad(
            lambda x: inversion_loss(model, x, targets, jax.random.fold_in(key, i), recipe),
            has_aux=True)(x)
        updates, opt_state = tx.update(grad, opt_state, x)
        x = jnp.clip(optax.apply_updates(x, updates), lo, hi)
        return x, opt_state, metrics

    @functools.partial(jax.jit, in_shardings=rep, out_shardings=rep)
    def chunk(variables, carry, targets, key, start):
        return jax.lax.fori_loop(start, start + per_call,
                                 lambda i, c: one(i, c, variables, targets, key), carry)

    def invert(key: jax.Array, targets: jax.Array, image_shape) -> tuple[jax.Array, dict]:
        init_key, loop_key = jax.random.split(key)
        x = jax.random.normal(init_key, (len(targets), *image_shape), jnp.float32)
        # metrics of iteration 0's shape, as fori_loop's carry needs a fixed structure
        metrics = jax.eval_shape(lambda: inversion_loss(
            nnx.merge(teacher.graphdef, teacher.variables), x, targets, loop_key, recipe)[1])
        # placed as the chunk's outputs are, so that every call hits one compiled program
        carry = sharding.put((x, tx.init(x), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                                          metrics)), rep)
        for start in range(0, recipe.steps, per_call):
            carry = chunk(teacher.variables, carry, targets, loop_key, start)
        return carry[0], carry[2]

    return invert


def synthesize(teacher: FrozenModel, *, key: jax.Array, num_images: int, batch_size: int,
               num_classes: int, image_shape: tuple[int, ...], recipe: Recipe,
               preprocess: augment.Preprocess, mesh: Mesh | None = None,
               log: Callable[..., None] = print) -> dict[str, Any]:
    """`num_images` uint8 images and their target classes (cycling through the classes, so the
    set is balanced), batch by batch. Returns {"image", "label", "metrics": per batch}."""
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"datafree.num_images={num_images} and datafree.synthesis_batch_size="
                         f"{batch_size} must be >= 1")
    invert = make_inverter(teacher, recipe, preprocess, mesh=mesh)
    images, labels, history = [], [], []
    batches = math.ceil(num_images / batch_size)
    for b in range(batches):
        n = min(batch_size, num_images - b * batch_size)
        targets = (jnp.arange(n) + b * batch_size) % num_classes
        x, metrics = invert(jax.random.fold_in(key, b), targets.astype(jnp.int32), image_shape)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        history.append(metrics)
        log(f"kdjax: DeepInversion batch {b + 1} of {batches}: " + ", ".join(
            f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
        images.append(to_uint8(jax.device_get(x), preprocess))
        labels.append(np.asarray(targets, np.int32))
    return {"image": np.concatenate(images), "label": np.concatenate(labels), "metrics": history}
