"""Calibration metrics from logits and labels: ECE, MCE, Brier score, NLL, temperature scaling.

Conventions are kdjax.losses': plain functions of ``logits [..., C]`` (float32 compute) and
integer ``labels [...]``; per-example values where a metric has them (Brier, NLL), reduction left
to the caller. A ``mask [...]`` (1 for real examples, 0 for padding, as kdjax's eval batches carry)
weights every sum, so a padded last batch counts only its real examples.

Binned metrics (ECE, MCE, reliability diagrams) are computed from :class:`CalibrationBins`, the
per-bin *sums* (example count, summed top-label confidence, number correct). Sums of batches add
up: compute bins per batch, add them (``jax.tree.map(jnp.add, a, b)``, or inside an eval step's
sums), and turn the total into ECE/MCE at the end, exactly as if all examples were one batch.

Binning follows torchmetrics' ``CalibrationError(n_bins=15, norm="l1")`` (its
``_binning_bucketize``): with edges ``e_b = b / num_bins`` (float32), the top-label confidence
``c`` falls in bin ``b`` when ``e_b <= c < e_{b+1}``: bins are closed on the left, so a
confidence exactly on an edge ``e_b`` counts in the bin above it. A confidence of exactly 1.0 is
kept in an extra bin ``[1, 1]`` of its own (index ``num_bins``; torchmetrics keeps
``len(edges) = num_bins + 1`` buckets for the same reason), so there are ``num_bins + 1`` bins.
Empty bins contribute nothing: 0 to ECE, and ``|acc - conf| = 0`` to MCE.

This module imports only jax, numpy and optax (no Flax, Orbax or TFDS), like kdjax.losses.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

NUM_BINS = 15  # Guo et al. (2017) and torchmetrics' default


class CalibrationBins(NamedTuple):
    """Per-bin sums over examples, each ``[num_bins + 1]`` float32 (see the module docstring).

    ``count[b]``: examples in bin b (mask-weighted); ``confidence[b]``: their summed top-label
    confidence; ``correct[b]``: how many of them have the top label right. A pytree: bins of
    batches add leaf by leaf.
    """

    count: jax.Array
    confidence: jax.Array
    correct: jax.Array


def _logits(logits: jax.Array) -> jax.Array:
    logits = jnp.asarray(logits, jnp.float32)
    if logits.ndim < 1 or logits.shape[-1] < 2:
        raise ValueError(f"logits must have a class axis of at least 2 classes, got "
                         f"logits.shape={logits.shape}; pass [..., C] unnormalised scores")
    return logits


def _labels(logits: jax.Array, labels: jax.Array) -> jax.Array:
    labels = jnp.asarray(labels)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must have the shape of logits without the class axis, got "
                         f"labels.shape={labels.shape} and logits.shape={logits.shape}; pass "
                         f"integer class ids [...] for logits [..., C]")
    return labels


def _mask(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.ones(logits.shape[:-1], jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    if mask.shape != logits.shape[:-1]:
        raise ValueError(f"mask must have the shape of logits without the class axis, got "
                         f"mask.shape={mask.shape} and logits.shape={logits.shape}; pass 1 for "
                         f"real examples and 0 for padding")
    return mask


def _check_num_bins(num_bins: int) -> int:
    if not isinstance(num_bins, (int, np.integer)) or isinstance(num_bins, bool) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive Python int, got num_bins={num_bins!r}")
    return int(num_bins)


def bin_edges(num_bins: int = NUM_BINS) -> np.ndarray:
    """The ``num_bins + 1`` float32 edges ``b / num_bins``, ``b = 0..num_bins`` (0 and 1 exact)."""
    num_bins = _check_num_bins(num_bins)
    return (np.arange(num_bins + 1, dtype=np.float64) / num_bins).astype(np.float32)


def top_label(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(confidence, correct) of the top label: ``max_c softmax(logits)_c`` and whether
    ``argmax_c logits == labels``, both ``[...]`` float32."""
    logits = _logits(logits)
    return _top_label(logits, _labels(logits, labels))


@jax.jit
def _top_label(logits, labels):
    confidence = jax.nn.softmax(logits, axis=-1).max(-1)
    return confidence, (logits.argmax(-1) == labels).astype(jnp.float32)


def calibration_bins(logits: jax.Array, labels: jax.Array, *, mask: jax.Array | None = None,
                     num_bins: int = NUM_BINS) -> CalibrationBins:
    """Per-bin sums of the top-label confidence (module docstring: which bin an edge goes to).

    Args:
      logits: ``[..., C]``.
      labels: integer class ids ``[...]``.
      mask: ``[...]`` example weights (1 real, 0 padding); default all ones.
      num_bins: equal-width bins over [0, 1] (plus the bin of confidence 1.0).

    Returns:
      CalibrationBins of ``[num_bins + 1]`` sums; add those of several batches to stream.
    """
    logits = _logits(logits)
    confidence, correct = top_label(logits, labels)
    return bins_from_confidence(confidence, correct, mask=_mask(logits, mask), num_bins=num_bins)


def bins_from_confidence(confidence: jax.Array, correct: jax.Array, *,
                         mask: jax.Array | None = None,
                         num_bins: int = NUM_BINS) -> CalibrationBins:
    """`calibration_bins` from top-label confidences in [0, 1] (e.g. of an ensemble's averaged
    probabilities) and whether each top label is right.

    Args:
      confidence: ``[...]`` in [0, 1]; correct: ``[...]`` (1/0 or bool); mask: ``[...]``.
      num_bins: equal-width bins over [0, 1] (plus the bin of confidence 1.0).

    Returns:
      CalibrationBins of ``[num_bins + 1]`` sums.
    """
    num_bins = _check_num_bins(num_bins)
    confidence = jnp.asarray(confidence, jnp.float32)
    correct = jnp.asarray(correct, jnp.float32)
    if correct.shape != confidence.shape:
        raise ValueError(f"correct must have the shape of confidence, got correct.shape="
                         f"{correct.shape} and confidence.shape={confidence.shape}")
    weight = jnp.ones_like(confidence) if mask is None else jnp.asarray(mask, jnp.float32)
    if weight.shape != confidence.shape:
        raise ValueError(f"mask must have the shape of confidence, got mask.shape={weight.shape}"
                         f" and confidence.shape={confidence.shape}")
    return _bins(confidence.reshape(-1), correct.reshape(-1), weight.reshape(-1), num_bins)


@functools.partial(jax.jit, static_argnums=3)
def _bins(confidence, correct, weight, num_bins):
    # side="right": e_b <= c < e_{b+1} (torch.bucketize(..., right=True) - 1). Top-label
    # confidences are >= 1/C > 0, but a padded row may hold anything: the clip keeps its index
    # valid, and its weight of 0 keeps it out of every sum.
    index = jnp.searchsorted(jnp.asarray(bin_edges(num_bins)), confidence, side="right") - 1
    index = jnp.clip(index, 0, num_bins)

    def segment(values):
        return jax.ops.segment_sum(values * weight, index, num_segments=num_bins + 1)

    return CalibrationBins(count=segment(jnp.ones_like(confidence)),
                           confidence=segment(confidence), correct=segment(correct))


def bin_statistics(bins: CalibrationBins) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(accuracy, mean confidence, fraction of examples) per bin, ``[num_bins + 1]`` each.

    Empty bins have accuracy and confidence 0 (torchmetrics' nan_to_num), and fraction 0. This
    is what a reliability diagram plots.
    """
    count = jnp.asarray(bins.count, jnp.float32)
    safe = jnp.where(count > 0, count, 1.0)
    accuracy = jnp.where(count > 0, bins.correct / safe, 0.0)
    confidence = jnp.where(count > 0, bins.confidence / safe, 0.0)
    total = count.sum()
    fraction = count / jnp.where(total > 0, total, 1.0)
    return accuracy, confidence, fraction


def ece_from_bins(bins: CalibrationBins) -> jax.Array:
    """Expected calibration error ``ECE = sum_b (n_b / N) |acc_b - conf_b|`` (scalar)."""
    accuracy, confidence, fraction = bin_statistics(bins)
    return jnp.sum(fraction * jnp.abs(accuracy - confidence))


def mce_from_bins(bins: CalibrationBins) -> jax.Array:
    """Maximum calibration error ``MCE = max_b |acc_b - conf_b|`` over the bins (scalar; empty
    bins count as 0, as in torchmetrics' norm="max")."""
    accuracy, confidence, _ = bin_statistics(bins)
    return jnp.max(jnp.abs(accuracy - confidence))


def expected_calibration_error(logits: jax.Array, labels: jax.Array, *,
                               mask: jax.Array | None = None,
                               num_bins: int = NUM_BINS) -> jax.Array:
    """ECE of the top label with `num_bins` equal-width bins (torchmetrics'
    ``CalibrationError(n_bins=15, norm="l1")``): ``sum_b (n_b / N) |acc_b - conf_b|``.

    Args:
      logits: ``[..., C]``; labels: ``[...]``; mask: ``[...]`` (optional).

    Returns:
      scalar float32. For data in batches, add `calibration_bins` and use `ece_from_bins`.
    """
    return ece_from_bins(calibration_bins(logits, labels, mask=mask, num_bins=num_bins))


def maximum_calibration_error(logits: jax.Array, labels: jax.Array, *,
                              mask: jax.Array | None = None,
                              num_bins: int = NUM_BINS) -> jax.Array:
    """MCE of the top label: ``max_b |acc_b - conf_b|`` over non-empty bins (scalar)."""
    return mce_from_bins(calibration_bins(logits, labels, mask=mask, num_bins=num_bins))


def brier_score(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example multi-class Brier score ``sum_c (softmax(logits)_c - onehot(labels)_c)^2``.

    Args:
      logits: ``[..., C]``; labels: integer class ids ``[...]``.

    Returns:
      ``[...]`` float32, in [0, 2]. (Some papers divide by C; this is Brier's original sum.)
    """
    logits = _logits(logits)
    labels = _labels(logits, labels)
    probs = jax.nn.softmax(logits, axis=-1)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    return jnp.sum((probs - onehot) ** 2, axis=-1)


def negative_log_likelihood(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example NLL ``-log softmax(logits)_label`` (the cross-entropy), ``[...]`` float32."""
    logits = _logits(logits)
    return optax.softmax_cross_entropy_with_integer_labels(logits, _labels(logits, labels))


# Bisection brackets for 1/T: temperatures from 1/64 to 64 cover every trained classifier we have
# met (Guo et al. report optimal T in 1-4); 60 halvings of a 2*log(64) interval in log space
# locate the optimum far below float32 resolution.
_LOG_INV_T_RANGE = (-float(np.log(64.0)), float(np.log(64.0)))
_BISECTION_STEPS = 60


def fit_temperature(logits: jax.Array, labels: jax.Array, *,
                    mask: jax.Array | None = None) -> jax.Array:
    """Temperature scaling (Guo et al., 2017): the T > 0 minimising the held-out NLL of
    ``softmax(logits / T)``.

    ``NLL(b) = mean_i [logsumexp_c(b z_ic) - b z_i,y_i]`` with ``b = 1 / T`` is convex in b (a
    log-sum-exp of linear functions minus a linear one), so its derivative
    ``mean_i [E_{softmax(b z_i)}[z_i] - z_i,y_i]`` increases with b and the optimum is where it
    crosses 0. Why bisection rather than Guo et al.'s LBFGS: a one-dimensional convex problem has
    a monotone derivative, and bisecting its sign over log b (60 steps over T in [1/64, 64]) finds
    the minimiser to float32 precision with no step size, line search or optimizer state to tune,
    deterministically, in one jitted loop. A T at the bracket's end means the optimum lies beyond
    it (e.g. perfectly separated data, where NLL falls forever as T -> 0).

    Args:
      logits: held-out ``[N, C]`` (or ``[..., C]``), never those of the data the model trained on.
      labels: ``[N]``; mask: ``[N]`` example weights (optional).

    Returns:
      scalar float32 T; use ``logits / T`` afterwards. Accuracy is unchanged (argmax is).
    """
    logits = _logits(logits)
    labels = _labels(logits, labels)
    weight = _mask(logits, mask)
    if logits.size == 0:
        raise ValueError("fit_temperature needs at least one held-out example, got none")
    return _fit_temperature(logits, labels, weight)


@jax.jit
def _fit_temperature(logits, labels, weight):
    z_true = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), -1)[..., 0]
    total = jnp.maximum(weight.sum(), 1e-12)

    def slope(log_b):  # d NLL / d b at b = exp(log_b); same sign as d NLL / d log b
        p = jax.nn.softmax(jnp.exp(log_b) * logits, axis=-1)
        return jnp.sum(weight * (jnp.sum(p * logits, -1) - z_true)) / total

    def body(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        rising = slope(mid) > 0  # past the minimum: it lies below mid
        return jnp.where(rising, lo, mid), jnp.where(rising, mid, hi)

    lo, hi = jax.lax.fori_loop(0, _BISECTION_STEPS, body,
                               (jnp.float32(_LOG_INV_T_RANGE[0]),
                                jnp.float32(_LOG_INV_T_RANGE[1])))
    return jnp.exp(-0.5 * (lo + hi))
