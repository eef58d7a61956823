"""On-device preprocessing: uint8 images in, normalised (and augmented) compute-dtype images out.

Everything here runs inside the jitted step, so the host never touches pixels and the input
pipeline only moves uint8 (4x fewer bytes than float32). Randomness comes from an explicit key
that the step derives from (seed, step), which makes augmentation reproducible and resumable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Static preprocessing recipe (hashable, so it can live in a jit closure).

    Attributes:
      mean, std: per-channel statistics in [0, 1] pixel units.
      crop_padding: pad each side by this many pixels (zeros) then crop back at a random offset;
        0 disables random crops.
      flip: random horizontal flips with probability 1/2.
    """

    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    crop_padding: int = 0
    flip: bool = False

    def __post_init__(self):
        if len(self.mean) != len(self.std):
            raise ValueError(
                f"mean and std must have one value per channel, got mean={self.mean} std={self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be > 0 for every channel, got std={self.std}")
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got crop_padding={self.crop_padding}")


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float], dtype) -> jax.Array:
    """uint8 [..., H, W, C] -> (x/255 - mean)/std in `dtype`; the arithmetic is float32."""
    x = images.astype(jnp.float32) * (1.0 / 255.0)
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x.astype(dtype)


def random_crop(key: jax.Array, images: jax.Array, padding: int) -> jax.Array:
    """Zero-pad [B, H, W, C] by `padding` and crop each example back to H x W at a random offset."""
    b, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(key, (b, 2), 0, 2 * padding + 1)

    def crop(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))

    return jax.vmap(crop)(padded, offsets)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
    """Flip each example of [B, H, W, C] left-right with probability 1/2."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1, :], images)


def preprocess(images: jax.Array, recipe: Preprocess, *, key: jax.Array | None, dtype) -> jax.Array:
    """Normalise uint8 images and, when `key` is given (training), augment them.

    Augmentation runs on uint8 before normalisation: crops pad with black pixels, as torchvision's
    RandomCrop(padding=...) does, so kdjax and the PyTorch recipes see the same inputs.
    """
    if images.ndim == 3:  # [B, H, W] greyscale without a channel axis
        images = images[..., None]
    if key is not None:
        crop_key, flip_key = jax.random.split(key)
        if recipe.crop_padding:
            images = random_crop(crop_key, images, recipe.crop_padding)
        if recipe.flip:
            images = random_flip(flip_key, images)
    return normalize(images, recipe.mean, recipe.std, dtype)
