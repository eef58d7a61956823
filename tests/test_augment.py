"""On-device preprocessing: exact normalisation, crops that are windows of the padded image,
flips that mirror, and no augmentation without a key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import augment

pytestmark = pytest.mark.usefixtures("quick_compiles")  # what is computed, not its speed

IMAGES = np.random.default_rng(0).integers(0, 256, (64, 6, 5, 2)).astype(np.uint8)


def test_normalize_matches_formula():
    out = augment.normalize(jnp.asarray(IMAGES), (0.2, 0.6), (0.5, 0.25), jnp.float32)
    expected = (IMAGES / 255.0 - np.array([0.2, 0.6])) / np.array([0.5, 0.25])
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    assert augment.normalize(jnp.asarray(IMAGES), (0.5,), (0.5,), jnp.bfloat16).dtype == jnp.bfloat16


def test_random_crop_is_a_window_of_the_zero_padded_image():
    p = 2
    out = np.asarray(augment.random_crop(jax.random.key(1), jnp.asarray(IMAGES), p))
    padded = np.pad(IMAGES, ((0, 0), (p, p), (p, p), (0, 0)))
    offsets = set()
    for img, pad in zip(out, padded):
        hits = [(i, j) for i in range(2 * p + 1) for j in range(2 * p + 1)
                if np.array_equal(pad[i:i + 6, j:j + 5], img)]
        assert hits, "crop is not a window of the padded image"
        offsets.add(hits[0])
    assert len(offsets) > 5  # offsets really vary across the batch


def test_random_flip_mirrors_about_half():
    out = np.asarray(augment.random_flip(jax.random.key(2), jnp.asarray(IMAGES)))
    same = [np.array_equal(o, i) for o, i in zip(out, IMAGES)]
    mirrored = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, IMAGES)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 16 < sum(mirrored) < 48


def test_crop_flip_in_one_gather_is_crop_then_flip():
    """The single gather equals the two steps it replaces: the same keys draw the same offsets and
    flips as random_crop and random_flip, composed here in numpy."""
    x, ck, fk = jnp.asarray(IMAGES), jax.random.key(4), jax.random.key(5)
    out = np.asarray(augment.random_crop_flip(x, crop_key=ck, padding=2, flip_key=fk))
    cropped = np.asarray(augment.random_crop(ck, x, 2))
    flips = np.asarray(jax.random.bernoulli(fk, 0.5, (len(IMAGES), 1)))[:, 0]
    expected = np.where(flips[:, None, None, None], cropped[:, :, ::-1], cropped)
    np.testing.assert_array_equal(out, expected)
    assert 0 < flips.sum() < len(flips)
    np.testing.assert_array_equal(augment.random_crop_flip(x), IMAGES)  # no key: the identity


def test_preprocess_augments_only_with_a_key():
    recipe = augment.Preprocess(mean=(0.5, 0.5), std=(0.5, 0.5), crop_padding=2, flip=True)
    plain = augment.preprocess(jnp.asarray(IMAGES), recipe, key=None, dtype=jnp.float32)
    np.testing.assert_allclose(plain, (IMAGES / 255.0 - 0.5) / 0.5, atol=1e-6)
    a = augment.preprocess(jnp.asarray(IMAGES), recipe, key=jax.random.key(3), dtype=jnp.float32)
    b = augment.preprocess(jnp.asarray(IMAGES), recipe, key=jax.random.key(3), dtype=jnp.float32)
    np.testing.assert_array_equal(a, b)  # same key, same views
    assert not np.allclose(a, plain)
    grey = augment.preprocess(jnp.asarray(IMAGES[..., 0]), augment.Preprocess(), key=None,
                              dtype=jnp.float32)
    assert grey.shape == (64, 6, 5, 1)


def test_bad_recipes_are_refused():
    with pytest.raises(ValueError, match="one value per channel"):
        augment.Preprocess(mean=(0.5, 0.5), std=(0.5,))
    with pytest.raises(ValueError, match=r"std must be > 0.*std=\(0.0,\)"):
        augment.Preprocess(std=(0.0,))
    with pytest.raises(ValueError, match="crop_padding=-1"):
        augment.Preprocess(crop_padding=-1)


def test_teacher_view_replicates_grayscale_and_resizes_in_its_normalisation():
    recipe = augment.Preprocess(mean=(0.3,), std=(0.2,))
    rgb = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    x = np.random.default_rng(0).normal(size=(2, 4, 6, 1)).astype(np.float32)
    same = augment.teacher_view(jnp.asarray(x), recipe, ((0.5,), (0.5,)), (4, 6, 1))
    np.testing.assert_array_equal(same, augment.renormalize(jnp.asarray(x), recipe,
                                                            ((0.5,), (0.5,))))
    # channels: the same pixels in each, each in the teacher's own statistics
    got = np.asarray(augment.teacher_view(jnp.asarray(x), recipe, rgb, (4, 6, 3)))
    pixels = np.float64(x) * 0.2 + 0.3
    want = (np.repeat(pixels, 3, -1) - np.array(rgb[0])) / np.array(rgb[1])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # size: bilinear with half-pixel centres keeps a ramp a ramp away from the clamped edges
    ramp = np.broadcast_to(np.arange(8, dtype=np.float32)[None, :, None, None], (1, 8, 8, 1))
    identity = augment.Preprocess(mean=(0.0,), std=(1.0,))
    up = np.asarray(augment.teacher_view(jnp.asarray(ramp), identity, None, (16, 16, 1)))
    rows = (np.arange(16) + 0.5) / 2 - 0.5
    inside = (rows >= 0) & (rows <= 7)
    np.testing.assert_allclose(up[0, inside, 3, 0], rows[inside], atol=1e-5)
    with pytest.raises(ValueError, match=r"cannot see 2-channel images"):
        augment.teacher_view(jnp.zeros((1, 4, 4, 2)), augment.Preprocess(mean=(0.5, 0.5),
                                                                         std=(0.5, 0.5)),
                             None, (4, 4, 3))
