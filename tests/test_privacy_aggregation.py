"""kdjax.privacy.aggregation: the noise's scale and the threshold's behaviour, statistically with
fixed keys; the ensemble's votes against each teacher run alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.stats import norm

from kdjax import augment, models
from kdjax.privacy import aggregation
from kdjax.step import freeze

N = 20_000  # identical queries: each draws its own noise
pytestmark = pytest.mark.usefixtures("quick_compiles")  # compile speed only


def _within(observed, p, n, sds=4.0):
    """|observed - p| within `sds` binomial standard errors."""
    return abs(observed - p) <= sds * np.sqrt(p * (1 - p) / n)


def test_vote_counts_histograms_the_argmaxes():
    logits = jax.random.normal(jax.random.key(0), (7, 50, 4))
    expected = np.zeros((50, 4), np.int64)
    for t in np.asarray(logits).argmax(-1):
        expected[np.arange(50), t] += 1
    np.testing.assert_array_equal(aggregation.vote_counts(logits), expected)


@pytest.mark.parametrize("sigma", [5.0, 10.0])
def test_gnmax_noise_has_the_stated_scale(sigma):
    # Two classes 10 votes apart: the runner-up wins iff N(0, s^2) - N(0, s^2) > 10, i.e. with
    # probability Phi(-10 / (sigma sqrt 2)): 0.079 at sigma 5, 0.240 at 10. A noise of sigma/2 or
    # 2 sigma, or one draw shared by all classes, would be many standard errors off.
    counts = jnp.tile(jnp.array([[30, 20, 0]], jnp.int32), (N, 1))
    labels = np.asarray(aggregation.gnmax(jax.random.key(1), counts, sigma=sigma))
    p = norm.cdf(-10 / (sigma * np.sqrt(2)))
    assert _within((labels == 1).mean(), p, N)
    again = aggregation.gnmax(jax.random.key(1), counts, sigma=sigma)
    np.testing.assert_array_equal(labels, again)  # a fixed key, the same release
    assert (np.asarray(aggregation.gnmax(jax.random.key(2), counts, sigma=sigma))
            != labels).any()


def test_confident_gnmax_answers_with_the_thresholds_probability():
    # max vote 50, T = 60, sigma1 = 10: answered iff N(0, 100) >= 10, probability Phi(-1) = 0.159.
    counts = jnp.tile(jnp.array([[50, 45, 5]], jnp.int32), (N, 1))
    out = aggregation.confident_gnmax(jax.random.key(3), counts, threshold=60.0, sigma1=10.0,
                                      sigma2=4.0)
    answered, labels = np.asarray(out.answered), np.asarray(out.labels)
    assert _within(answered.mean(), norm.sf(1.0), N)
    assert np.all(labels[~answered] == aggregation.UNANSWERED)
    # the answered ones carry GNMax(sigma2 = 4) labels: runner-up 5 votes behind wins with
    # Phi(-5 / (4 sqrt 2)) = 0.189, independently of having passed the check
    n = answered.sum()
    assert _within((labels[answered] == 1).mean(), norm.cdf(-5 / (4 * np.sqrt(2))), n)
    assert set(np.unique(labels[answered])) <= {0, 1, 2}


def test_confident_gnmax_threshold_extremes():
    counts = jnp.array([[100, 0], [0, 100], [3, 2]], jnp.int32)
    none = aggregation.confident_gnmax(jax.random.key(4), counts, threshold=1e6, sigma1=1.0,
                                       sigma2=1.0)
    assert not np.asarray(none.answered).any()
    every = aggregation.confident_gnmax(jax.random.key(4), counts, threshold=-1e6, sigma1=1.0,
                                        sigma2=1e-3)
    np.testing.assert_array_equal(every.labels, [0, 1, 0])


def _teachers(n, seed=0):
    return [freeze(models.create_model("mlp", hidden=(8,), num_classes=3, rngs=nnx.Rngs(seed + k),
                                       input_shape=(4, 4, 1))) for k in range(n)]


def test_ensemble_counts_are_each_teachers_argmax_counted():
    teachers = _teachers(5)
    images = np.random.default_rng(0).integers(0, 256, (23, 4, 4, 1), dtype=np.uint8)
    recipe = augment.Preprocess(mean=(0.3,), std=(0.2,))
    counts = aggregation.ensemble_counts(aggregation.stack_teachers(teachers), images,
                                         preprocess=recipe, batch_size=10)  # 3 batches, padded
    x = augment.preprocess(jnp.asarray(images), recipe, key=None, dtype=jnp.float32)
    expected = np.zeros((23, 3), np.int64)
    for t in teachers:
        expected[np.arange(23), np.asarray(nnx.merge(t.graphdef, t.variables)(x, train=False)).argmax(-1)] += 1
    np.testing.assert_array_equal(counts, expected)
    assert counts.sum(1).tolist() == [5] * 23


def test_an_ensemble_has_one_architecture():
    other = freeze(models.create_model("mlp", hidden=(9,), num_classes=3, rngs=nnx.Rngs(0),
                                       input_shape=(4, 4, 1)))
    with pytest.raises(ValueError, match="teacher 2 of the ensemble has another architecture or input normalisation"):
        aggregation.stack_teachers(_teachers(2) + [other])
    with pytest.raises(ValueError, match="at least one teacher"):
        aggregation.stack_teachers([])
