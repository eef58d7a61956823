"""Mixup, CutMix and the teacher's view on device; mixed labels in the objectives. (The step
training with mixing on, device-resident and streamed alike, is in test_cli_cifar.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import _float32 as f32
from kdjax import augment, losses, objectives

pytestmark = pytest.mark.usefixtures("quick_compiles")  # what is computed, not its speed

rng = np.random.default_rng(0)
IMAGES = rng.integers(0, 256, (8, 6, 5, 3)).astype(np.uint8)
LABELS = np.arange(8, dtype=np.int32)


def test_mixup_is_a_convex_combination_with_the_reversed_batch():
    x = jnp.asarray(IMAGES, jnp.float32)
    mixed, labels = jax.jit(augment.mixup, static_argnums=3)(jax.random.key(0), x,
                                                             jnp.asarray(LABELS), 0.4)
    lam = float(labels.weight[0])
    assert 0.0 <= lam <= 1.0 and np.all(np.asarray(labels.weight) == lam)
    np.testing.assert_allclose(mixed, lam * IMAGES + (1 - lam) * IMAGES[::-1], rtol=1e-5,
                               atol=1e-4)
    np.testing.assert_array_equal(labels.label, LABELS)
    np.testing.assert_array_equal(labels.other, LABELS[::-1])


def test_cutmix_pastes_one_box_and_weights_by_its_area():
    x = jnp.asarray(IMAGES, jnp.float32)
    cutmix = jax.jit(augment.cutmix, static_argnums=3)
    for seed in range(5):
        mixed, labels = cutmix(jax.random.key(seed), x, jnp.asarray(LABELS), 1.0)
        mixed = np.asarray(mixed)
        from_other = np.all(mixed == IMAGES[::-1].astype(np.float32), axis=-1)
        from_self = np.all(mixed == IMAGES.astype(np.float32), axis=-1)
        assert np.all(from_other | from_self)
        box = ~from_self[0]  # same box for the whole batch
        kept = 1.0 - box.sum() / box.size
        np.testing.assert_allclose(labels.weight, kept, atol=1e-6)
        if box.any():  # a rectangle
            ys, xs = np.nonzero(box)
            assert box[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()


_views = jax.jit(augment.train_views, static_argnames=("recipe", "dtype"))


def test_train_views_teacher_same_or_clean():
    batch = {"image": jnp.asarray(IMAGES), "label": jnp.asarray(LABELS)}
    key = jax.random.key(1)
    same = augment.Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, flip=True, crop_padding=1,
                              mixup_alpha=1.0)
    v = _views(batch, recipe=same, key=key, dtype=jnp.float32)
    np.testing.assert_array_equal(v.teacher, v.student)
    assert isinstance(v.labels, augment.MixedLabels)
    clean = augment.Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, flip=True, crop_padding=1,
                               mixup_alpha=1.0, teacher_view="clean")
    v2 = _views(batch, recipe=clean, key=key, dtype=jnp.float32)
    np.testing.assert_array_equal(v2.student, v.student)
    np.testing.assert_allclose(v2.teacher, (IMAGES / 255.0 - 0.5) / 0.5, rtol=1e-6, atol=1e-6)
    # Without mixing: plain labels and exactly the augmentation augment.preprocess draws.
    plain = augment.Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, flip=True, crop_padding=1)
    v3 = augment.train_views(batch, plain, key=key, dtype=jnp.float32)
    assert v3.labels is batch["label"]  # eager: no mixing, cheap
    np.testing.assert_array_equal(v3.student, augment.preprocess(batch["image"], plain, key=key,
                                                                 dtype=jnp.float32))
    both = augment.Preprocess(mixup_alpha=0.2, cutmix_alpha=1.0)
    grey = {"image": jnp.asarray(IMAGES[..., :1]), "label": jnp.asarray(LABELS)}
    x = (IMAGES[..., :1] / 255.0 - 0.5) / 0.5
    kinds = set()
    for seed in range(12):  # both get used
        student = np.asarray(_views(grey, recipe=both, key=jax.random.key(seed),
                                    dtype=jnp.float32).student)
        exact = (np.isclose(student, x, atol=1e-6) | np.isclose(student, x[::-1], atol=1e-6))
        kinds.add("cutmix" if exact.all() else "mixup")
    assert kinds == {"cutmix", "mixup"}
    with pytest.raises(ValueError, match="teacher_view"):
        augment.Preprocess(teacher_view="other")
    with pytest.raises(ValueError, match="mixup_alpha"):
        augment.Preprocess(mixup_alpha=-1.0)


def test_objectives_use_the_mixed_target():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(8, 10)), jnp.float32)
    mixed = augment.MixedLabels(jnp.asarray(LABELS), jnp.asarray(LABELS[::-1]),
                                jnp.full((8,), 0.3))
    ce = objectives.cross_entropy(logits, mixed)
    expected = (0.3 * losses.cross_entropy(logits, LABELS)
                + 0.7 * losses.cross_entropy(logits, LABELS[::-1]))
    # two formulas: equal up to float32 reassociation (_float32.py) over 10 classes
    f32.assert_close(ce, expected, n=10)
    soft = 0.3 * jax.nn.one_hot(LABELS, 10) + 0.7 * jax.nn.one_hot(LABELS[::-1], 10)
    np.testing.assert_allclose(ce, optax.softmax_cross_entropy(logits, soft), rtol=1e-5)
    np.testing.assert_array_equal(objectives.hard_labels(mixed), LABELS[::-1])
    out = {"logits": logits}
    loss, metrics = objectives.supervised()(out, (), mixed, 0)
    f32.assert_close(loss, expected.mean(), n=10 + 8)
    loss, metrics = objectives.logit_distillation("dkd", ce_weight=1.0, kd_weight=1.0)(
        out, ({"logits": logits * 2},), mixed, 0)
    assert np.isfinite(float(loss)) and "accuracy" in metrics
