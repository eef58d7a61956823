"""Validation and numerical helpers shared by the loss modules (trace-time checks, stable
KL and mixtures, pooling)."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# Finite stand-in for -inf where a reduction over only-masked entries would give
# -inf - (-inf) = nan. Next to any finite logit its exp() is exactly 0, so results
# are unchanged whenever at least one entry is finite.
_MASKED = float(np.finfo(np.float32).min)

_ENSEMBLE_MODES = ("logits", "probs")

# ----------------------------------------------------------------------------------
# Validation helpers (all run in Python at trace time).
# ----------------------------------------------------------------------------------

_Constraint = tuple[Callable[[float], bool], str]
_POSITIVE: _Constraint = (lambda v: v > 0, "> 0")
_NON_NEGATIVE: _Constraint = (lambda v: v >= 0, ">= 0")
_AT_LEAST_ONE: _Constraint = (lambda v: v >= 1, ">= 1")
_UNIT_INTERVAL: _Constraint = (lambda v: 0 <= v <= 1, "in [0, 1]")
_OPEN_UNIT_INTERVAL: _Constraint = (lambda v: 0 < v < 1, "in (0, 1)")


def _static_float(name: str, value: float) -> float:
    try:
        return float(value)
    except TypeError as err:  # jax's ConcretizationTypeError for tracers is a TypeError
        raise ValueError(
            f"{name} must be a static Python number, got {name}={value!r}; bind it "
            "with functools.partial or jax.jit(..., static_argnames=...) instead of "
            "passing it as a traced argument."
        ) from err


def _check(name: str, value: float, constraint: _Constraint) -> float:
    holds, requirement = constraint
    v = _static_float(name, value)
    if not (math.isfinite(v) and holds(v)):
        raise ValueError(
            f"{name} must be {requirement}, got {name}={value!r}; "
            f"pass a finite number {requirement}."
        )
    return v


def _temperature(value, batch_shape: tuple[int, ...]) -> float | jax.Array:
    """A loss's temperature: a Python number is validated (finite, > 0) and returned as a float;
    anything else (a traced schedule value, a learned temperature) is a float32 array, a scalar or
    one value per example (``batch_shape``), which cannot be checked at trace time."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return _check("temperature", value, _POSITIVE)
    t = jnp.asarray(value, jnp.float32)
    if t.shape not in ((), tuple(batch_shape)):
        raise ValueError(
            f"temperature must be a scalar or one value per example (shape {tuple(batch_shape)}"
            f"), got an array of shape {t.shape}; pass a Python number, a scalar array or an "
            "array of the logits' leading shape."
        )
    return t


def _per_row(temp: float | jax.Array) -> float | jax.Array:
    """``temp`` broadcastable against ``[..., C]`` logits (per-example values get a class axis)."""
    return temp[..., None] if isinstance(temp, jax.Array) and temp.ndim else temp


def _check_same_shape(name_a: str, a: jax.Array, name_b: str, b: jax.Array) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got "
            f"{name_a}.shape={a.shape} and {name_b}.shape={b.shape}; pass arrays "
            "describing the same examples."
        )


def _check_same_batch(name_a: str, a: jax.Array, name_b: str, b: jax.Array) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same batch size (axis 0), got "
            f"{name_a}.shape={a.shape} and {name_b}.shape={b.shape}; pass features "
            "of the same examples."
        )


def _features(name: str, x: jax.Array, ndim: int | None = None) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    if ndim is not None and x.ndim != ndim:
        raise ValueError(
            f"{name} must have {ndim} dimensions (NHWC), got {name}.shape={x.shape}; "
            "pass a [batch, height, width, channels] feature map."
        )
    if x.ndim < 1:
        raise ValueError(
            f"{name} must have a leading batch axis, got {name}.shape={x.shape}; "
            "pass an array of shape [batch, ...]."
        )
    return x


def _logit_pair(
    student_logits: jax.Array, teacher_logits: jax.Array
) -> tuple[jax.Array, jax.Array]:
    s = jnp.asarray(student_logits, jnp.float32)
    t = jnp.asarray(teacher_logits, jnp.float32)
    if s.shape[-1:] != t.shape[-1:]:
        raise ValueError(
            "student_logits and teacher_logits must have the same number of classes "
            f"(last axis), got student_logits.shape={s.shape} and "
            f"teacher_logits.shape={t.shape}; map both models to the same label set."
        )
    _check_same_shape("student_logits", s, "teacher_logits", t)
    return s, t


def _labels(logits: jax.Array, labels: jax.Array) -> jax.Array:
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer) or labels.shape != logits.shape[:-1]:
        raise ValueError(
            "labels must be integer class ids of shape logits.shape[:-1]="
            f"{logits.shape[:-1]}, got labels.shape={labels.shape} with dtype "
            f"{labels.dtype}; pass one integer class index per example, not one-hot."
        )
    return labels


# ----------------------------------------------------------------------------------
# Numerical helpers.
# ----------------------------------------------------------------------------------


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """KL(p || q) over the last axis from log-probabilities, with 0 * log 0 = 0."""
    p = jnp.exp(log_p)
    # Outside p's support log_p - log_q may be -inf - (-inf) = nan; masking the
    # difference rather than the product keeps the nan out of the backward pass too.
    return jnp.sum(p * jnp.where(p > 0, log_p - log_q, 0.0), axis=-1)


def _tempered_kl(student: jax.Array, teacher: jax.Array, temp: float | jax.Array) -> jax.Array:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` (``T``: see ``_temperature``)."""
    log_s = jax.nn.log_softmax(student / _per_row(temp))
    log_t = jax.nn.log_softmax(teacher / _per_row(temp))
    return temp**2 * _kl(log_t, log_s)


def _log_mixture(log_probs: jax.Array, weights: jax.Array) -> jax.Array:
    """log sum_i w_i p_i over the leading axis of ``log_probs`` [M, ...]; ``weights`` [M]."""
    weights = weights.reshape((-1,) + (1,) * (log_probs.ndim - 1))
    masked = jnp.all(jnp.isneginf(log_probs), axis=0)
    # logsumexp's gradient is nan where every term is -inf, even under a zero
    # cotangent, so those entries are computed on dummy zeros and restored after.
    mixed = jax.nn.logsumexp(jnp.where(masked, 0.0, log_probs), axis=0, b=weights)
    return jnp.where(masked, -jnp.inf, mixed)


def _safe_sqrt(x: jax.Array) -> jax.Array:
    # sqrt's derivative is infinite at 0; route zeros through a dummy value.
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def l2_normalize(x: jax.Array) -> jax.Array:
    """Last-axis ``x / max(||x||, 1e-12)`` (torch's F.normalize); zero vectors stay 0.

    Public because connectors (CRD's embedding heads) normalise exactly as the losses do.
    """
    # Clamping the squared norm (instead of the norm) keeps the gradient at 0 finite.
    sq_norm = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq_norm, 1e-24))


def _flatten(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


def _adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] averaging matrix with torch.nn.AdaptiveAvgPool's bins."""
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool(x: jax.Array, height: int, width: int) -> jax.Array:
    """Adaptive average pooling of an NHWC map to [B, height, width, C] (torch's bins).

    Public because connectors (VID's regressor) match spatial sizes exactly as AT and NST do.
    """
    if x.shape[1:3] == (height, width):
        return x
    ph = _adaptive_pool_matrix(x.shape[1], height)
    pw = _adaptive_pool_matrix(x.shape[2], width)
    return jnp.einsum("ih,bhwc,jw->bijc", ph, x, pw)


def _pool_to_common_size(s: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    height, width = min(s.shape[1], t.shape[1]), min(s.shape[2], t.shape[2])
    return adaptive_avg_pool(s, height, width), adaptive_avg_pool(t, height, width)
