"""Knowledge-distillation losses: logit divergences, feature and relational losses.

Conventions (optax style):

* Pure functions. Logits / features are the leading positional arguments;
  hyperparameters are keyword-only static Python numbers, validated at trace time
  (bad values raise ``ValueError``). Under ``jax.jit`` bind them with
  ``functools.partial`` or ``static_argnames`` rather than passing them traced.
* Everything is computed in float32 whatever the input dtype, and returned as float32.
* Logit losses take ``[..., num_classes]`` arrays and return per-example values of
  shape ``[...]``; the caller reduces. Feature losses return ``[batch]``; losses
  defined on the structure of a whole batch (SP, RKD, PKT, CC) return a scalar.
* ``p = softmax(logits / T)``. Divergences between student and teacher logits
  evaluate both sides at the same temperature ``T`` and multiply by ``T**2``, which
  keeps gradient magnitudes comparable across temperatures (Hinton et al., 2015).
* ``-inf`` logits (masked classes) are supported when student and teacher mask the
  same classes: ``0 * log 0`` is taken as 0 and values and gradients stay finite.
* Logit losses let gradients flow into both arguments: a frozen teacher is normally
  computed outside the differentiated function (otherwise wrap it in
  ``jax.lax.stop_gradient``). Feature losses stop gradients exactly where their
  reference implementations detach (RKD's teacher side, NST's teacher-teacher term).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "adaptive_avg_pool",
    "attention_transfer",
    "correlation_congruence",
    "crd",
    "crd_scores",
    "cross_entropy",
    "dkd",
    "ensemble_teacher",
    "fitnet",
    "generalized_jsd",
    "hinton_kd",
    "l2_normalize",
    "logit_standardized_kd",
    "mutual_learning",
    "nst",
    "pkt",
    "reverse_kl",
    "rkd",
    "similarity_preserving",
    "soft_target_kl",
    "topk_soft_target_kl",
    "tvd",
    "vid",
]

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


def _tempered_kl(student: jax.Array, teacher: jax.Array, temp: float) -> jax.Array:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``."""
    log_s = jax.nn.log_softmax(student / temp)
    log_t = jax.nn.log_softmax(teacher / temp)
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


# ----------------------------------------------------------------------------------
# Logit losses.
# ----------------------------------------------------------------------------------


def cross_entropy(
    logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0
) -> jax.Array:
    """Per-example cross-entropy with integer labels and optional label smoothing.

    ``loss = -sum_c y_c log softmax(logits)_c`` with the smoothed target
    ``y = (1 - eps) * onehot(labels) + eps / C``.

    Args:
      logits: ``[..., C]``.
      labels: integer class ids ``[...]``.
      label_smoothing: ``eps`` in ``[0, 1]``.

    Returns:
      ``[...]`` float32.
    """
    eps = _check("label_smoothing", label_smoothing, _UNIT_INTERVAL)
    logits = jnp.asarray(logits, jnp.float32)
    labels = _labels(logits, labels)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    # Skipped at eps == 0 so that masked (-inf) classes don't yield 0 * inf = nan.
    if eps == 0.0:
        return nll
    # The smoothed target splits into (1 - eps) * NLL + eps * (uniform CE), which
    # avoids materialising a one-hot target.
    uniform_ce = -jnp.mean(jax.nn.log_softmax(logits), axis=-1)
    return (1.0 - eps) * nll + eps * uniform_ce


def soft_target_kl(
    student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float = 1.0
) -> jax.Array:
    """Forward KL from the teacher's soft targets (Hinton et al., 2015).

    ``T^2 * KL(p_t || p_s) = T^2 * sum_c p_t,c (log p_t,c - log p_s,c)`` with
    ``p = softmax(logits / T)``. Its gradient w.r.t. the student logits is
    ``T * (p_s - p_t)``.

    Args:
      student_logits: ``[..., C]``.
      teacher_logits: ``[..., C]``.
      temperature: ``T > 0``.

    Returns:
      ``[...]`` float32.
    """
    temp = _check("temperature", temperature, _POSITIVE)
    s, t = _logit_pair(student_logits, teacher_logits)
    return _tempered_kl(s, t, temp)


def reverse_kl(
    student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float = 1.0
) -> jax.Array:
    """Reverse (mode-seeking) KL: ``T^2 * KL(p_s || p_t)``, ``p = softmax(logits / T)``.

    Args:
      student_logits: ``[..., C]``.
      teacher_logits: ``[..., C]``.
      temperature: ``T > 0``.

    Returns:
      ``[...]`` float32.
    """
    temp = _check("temperature", temperature, _POSITIVE)
    s, t = _logit_pair(student_logits, teacher_logits)
    return _tempered_kl(t, s, temp)


def generalized_jsd(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> jax.Array:
    """Generalized Jensen-Shannon divergence (GKD, Agarwal et al., 2024).

    ``T^2 * [beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)]`` with the mixture
    ``m = beta * p_t + (1 - beta) * p_s`` and ``p = softmax(logits / T)``.
    ``beta = 0.5`` gives the symmetric JSD; small ``beta`` behaves like forward
    KL(p_t || p_s) and large ``beta`` like reverse KL, up to a ``beta``-dependent
    scale.

    Args:
      student_logits: ``[..., C]``.
      teacher_logits: ``[..., C]``.
      beta: mixture weight of the teacher, in ``(0, 1)``.
      temperature: ``T > 0``.

    Returns:
      ``[...]`` float32.
    """
    b = _check("beta", beta, _OPEN_UNIT_INTERVAL)
    temp = _check("temperature", temperature, _POSITIVE)
    s, t = _logit_pair(student_logits, teacher_logits)
    log_s = jax.nn.log_softmax(s / temp)
    log_t = jax.nn.log_softmax(t / temp)
    log_m = _log_mixture(jnp.stack([log_t, log_s]), jnp.array([b, 1.0 - b]))
    return temp**2 * (b * _kl(log_t, log_m) + (1.0 - b) * _kl(log_s, log_m))


def tvd(
    student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float = 1.0
) -> jax.Array:
    """Total variation distance: ``T^2 * 0.5 * sum_c |p_t,c - p_s,c|``.

    ``p = softmax(logits / T)``; the ``T^2`` factor matches the other divergences.

    Args:
      student_logits: ``[..., C]``.
      teacher_logits: ``[..., C]``.
      temperature: ``T > 0``.

    Returns:
      ``[...]`` float32.
    """
    temp = _check("temperature", temperature, _POSITIVE)
    s, t = _logit_pair(student_logits, teacher_logits)
    p_s = jax.nn.softmax(s / temp)
    p_t = jax.nn.softmax(t / temp)
    return temp**2 * 0.5 * jnp.sum(jnp.abs(p_t - p_s), axis=-1)


def hinton_kd(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> jax.Array:
    """Classic knowledge distillation (Hinton et al., 2015).

    ``alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE(labels, softmax(student_logits))``
    where the KL uses ``p = softmax(logits / T)`` and the cross-entropy ``T = 1``.

    Args:
      student_logits: ``[..., C]``.
      teacher_logits: ``[..., C]``.
      labels: integer class ids ``[...]``.
      temperature: ``T > 0``.
      alpha: weight of the distillation term, in ``[0, 1]``.

    Returns:
      ``[...]`` float32.
    """
    a = _check("alpha", alpha, _UNIT_INTERVAL)
    temp = _check("temperature", temperature, _POSITIVE)
    s, t = _logit_pair(student_logits, teacher_logits)
    nll = optax.softmax_cross_entropy_with_integer_labels(s, _labels(s, labels))
    return a * _tempered_kl(s, t, temp) + (1.0 - a) * nll


def _dkd_log_probs(z: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """DKD's binary ``[target, rest]`` log-probs and the non-target log-softmax."""
    # The target is excluded with a finite _MASKED rather than -inf (mdistiller
    # subtracts 1000): exact whenever another class is finite, and if every other
    # class is masked the non-target softmax degrades to a point mass (NCKD 0)
    # instead of nan.
    z_rest = jnp.where(target, _MASKED, z)
    lse = jax.nn.logsumexp(z, axis=-1)
    lse_rest = jax.nn.logsumexp(z_rest, axis=-1)
    z_target = jnp.sum(jnp.where(target, z, 0.0), axis=-1)
    binary = jnp.stack([z_target - lse, lse_rest - lse], axis=-1)
    return binary, z_rest - lse_rest[..., None]


def dkd(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> jax.Array:
    """Decoupled knowledge distillation (Zhao et al., 2022; mdistiller's ``dkd_loss``).

    ``T^2 * (alpha * TCKD + beta * NCKD)`` with ``p = softmax(logits / T)``, ``y`` the
    label:

    * ``TCKD = KL(b_t || b_s)``, ``b = [p_y, 1 - p_y]`` (target vs. all other classes);
    * ``NCKD = KL(q_t || q_s)``, ``q = softmax over the non-target classes of
      logits / T``, i.e. ``q_c = p_c / (1 - p_y)`` for ``c != y``.

    Args:
      student_logits: ``[..., C]``.
      teacher_logits: ``[..., C]``.
      labels: integer class ids ``[...]``.
      alpha: TCKD weight, ``>= 0``.
      beta: NCKD weight, ``>= 0``.
      temperature: ``T > 0``.

    Returns:
      ``[...]`` float32.
    """
    a = _check("alpha", alpha, _NON_NEGATIVE)
    b = _check("beta", beta, _NON_NEGATIVE)
    temp = _check("temperature", temperature, _POSITIVE)
    s, t = _logit_pair(student_logits, teacher_logits)
    target = _labels(s, labels)[..., None] == jnp.arange(s.shape[-1])
    binary_s, rest_s = _dkd_log_probs(s / temp, target)
    binary_t, rest_t = _dkd_log_probs(t / temp, target)
    return temp**2 * (a * _kl(binary_t, binary_s) + b * _kl(rest_t, rest_s))


def _standardize(z: jax.Array) -> jax.Array:
    """``(z - mean) / (std + 1e-7)`` per row, over the finite (unmasked) entries."""
    finite = jnp.isfinite(z)
    n = jnp.sum(finite, axis=-1, keepdims=True)
    mean = jnp.sum(jnp.where(finite, z, 0.0), axis=-1, keepdims=True) / n
    centered = jnp.where(finite, z - mean, 0.0)
    # Unbiased (n - 1) std, as torch.std in the reference code.
    var = jnp.sum(centered**2, axis=-1, keepdims=True) / jnp.maximum(n - 1, 1)
    return jnp.where(finite, centered / (_safe_sqrt(var) + 1e-7), z)


def logit_standardized_kd(
    student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float = 2.0
) -> jax.Array:
    """KD on z-scored logits (Sun et al., 2024, "Logit Standardization in KD").

    ``T^2 * KL(softmax(Z(t) / T) || softmax(Z(s) / T))`` with
    ``Z(z) = (z - mean(z)) / (std(z) + 1e-7)`` per row, ``std`` unbiased as
    ``torch.std`` in the reference code. Up to the 1e-7, invariant to a positive
    scale and a shift of either side's logits. Masked (``-inf``) entries are left
    out of the mean and std and stay masked.

    Args:
      student_logits: ``[..., C]``.
      teacher_logits: ``[..., C]``.
      temperature: ``T > 0``.

    Returns:
      ``[...]`` float32.
    """
    temp = _check("temperature", temperature, _POSITIVE)
    s, t = _logit_pair(student_logits, teacher_logits)
    return _tempered_kl(_standardize(s), _standardize(t), temp)


def topk_soft_target_kl(
    student_logits: jax.Array,
    teacher_topk_values: jax.Array,
    teacher_topk_indices: jax.Array,
    *,
    temperature: float = 1.0,
    teacher_tail_logprob: jax.Array | None = None,
) -> jax.Array:
    """Soft-target KL against a teacher known only through its top-k logits.

    Both distributions are collapsed onto ``k + 1`` buckets: the ``k`` listed
    classes and a tail bucket holding every other class. With ``tail`` the
    teacher's log-probability mass outside the listed classes at temperature ``T``
    (``teacher_tail_logprob``; ``None`` means ``-inf``, i.e. no tail mass):

    * teacher: ``q_i = (1 - e^tail) * softmax(values / T)_i`` and ``q_tail = e^tail``;
    * student: ``r_i = p_s[indices_i]`` and ``r_tail = sum of p_s over the unlisted
      classes``, with ``p_s = softmax(student_logits / T)``;

    ``loss = T^2 * KL(q || r)`` over the buckets. With ``k = C`` (every class
    listed) this equals :func:`soft_target_kl`.

    Args:
      student_logits: ``[..., C]``.
      teacher_topk_values: teacher logits of the listed classes, ``[..., k]``.
      teacher_topk_indices: their class ids, ``[..., k]``, distinct within a row
        (duplicates would be counted twice) and in ``[0, C)``.
      temperature: ``T > 0``.
      teacher_tail_logprob: ``[...]`` log of the teacher's unlisted mass at
        temperature ``T``, or ``None``.

    Returns:
      ``[...]`` float32.
    """
    temp = _check("temperature", temperature, _POSITIVE)
    s = jnp.asarray(student_logits, jnp.float32)
    values = jnp.asarray(teacher_topk_values, jnp.float32)
    indices = jnp.asarray(teacher_topk_indices)
    _check_same_shape("teacher_topk_values", values, "teacher_topk_indices", indices)
    if values.shape[:-1] != s.shape[:-1] or values.shape[-1] > s.shape[-1]:
        raise ValueError(
            "teacher_topk_values must have shape [..., k] with the leading axes of "
            f"student_logits and k <= num_classes, got student_logits.shape={s.shape} "
            f"and teacher_topk_values.shape={values.shape}; pass the teacher's top-k "
            "of the same examples."
        )
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(
            f"teacher_topk_indices must be integer class ids, got dtype "
            f"{indices.dtype}; pass the indices returned by jax.lax.top_k."
        )
    if teacher_tail_logprob is None:
        tail = jnp.full(values.shape[:-1], -jnp.inf, jnp.float32)
    else:
        tail = jnp.asarray(teacher_tail_logprob, jnp.float32)
        if tail.shape != values.shape[:-1]:
            raise ValueError(
                "teacher_tail_logprob must have shape teacher_topk_values.shape[:-1]="
                f"{values.shape[:-1]}, got teacher_tail_logprob.shape={tail.shape}; "
                "pass one log-mass per example."
            )

    log_s = jax.nn.log_softmax(s / temp)
    listed = jnp.put_along_axis(
        jnp.zeros(s.shape, bool), indices, True, axis=-1, inplace=False
    )
    # _MASKED rather than -inf: a tail made only of masked (-inf) classes would
    # otherwise give logsumexp an all -inf row, whose gradient is nan.
    log_s_tail = jax.nn.logsumexp(jnp.where(listed, _MASKED, log_s), axis=-1)
    log_r = jnp.concatenate(
        [jnp.take_along_axis(log_s, indices, axis=-1), log_s_tail[..., None]], axis=-1
    )
    log_head_mass = jnp.log(-jnp.expm1(tail))  # log(1 - e^tail), accurate near 0
    log_q = jnp.concatenate(
        [jax.nn.log_softmax(values / temp) + log_head_mass[..., None], tail[..., None]],
        axis=-1,
    )
    return temp**2 * _kl(log_q, log_r)


def _ensemble_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    w = [_static_float(f"weights[{i}]", x) for i, x in enumerate(weights)]
    if len(w) != n:
        raise ValueError(
            f"weights must have one entry per teacher, got len(weights)={len(w)} "
            f"for {n} teachers (weights={w}); pass {n} weights or weights=None."
        )
    if not all(math.isfinite(x) and x >= 0 for x in w):
        raise ValueError(
            f"weights must be finite and >= 0, got weights={w}; pass non-negative "
            "weights (they are normalised to sum to 1)."
        )
    total = sum(w)
    if total <= 0:
        raise ValueError(
            f"weights must not all be zero, got weights={w}; give at least one "
            "teacher a positive weight."
        )
    return [x / total for x in w]


def ensemble_teacher(
    teacher_logits_list: Sequence[jax.Array],
    *,
    weights: Sequence[float] | None = None,
    mode: str = "probs",
    temperature: float = 1.0,
) -> jax.Array:
    """Combine several teachers into one multi-teacher target, returned as logits.

    With normalised weights ``w_i`` (uniform by default):

    * ``mode="logits"``: ``sum_i w_i z_i``, the weighted mean of the logits
      (``temperature`` has no effect since it commutes with the mean).
    * ``mode="probs"``: ``T * log(sum_i w_i softmax(z_i / T))``, so that
      ``softmax(result / T)`` is exactly the weighted mean of the teachers'
      temperature-``T`` distributions. Use the same ``T`` in the loss that consumes
      the result.

    Args:
      teacher_logits_list: non-empty sequence of ``[..., C]`` arrays of equal shape.
      weights: static non-negative weights, one per teacher, not all zero;
        normalised to sum to 1.
      mode: ``"logits"`` or ``"probs"``.
      temperature: ``T > 0``, used by ``mode="probs"``.

    Returns:
      ``[..., C]`` float32 logits.
    """
    if mode not in _ENSEMBLE_MODES:
        raise ValueError(
            f"mode must be one of {_ENSEMBLE_MODES}, got mode={mode!r}; pick one of "
            "those."
        )
    temp = _check("temperature", temperature, _POSITIVE)
    if len(teacher_logits_list) == 0:
        raise ValueError(
            "teacher_logits_list must contain at least one array, got an empty "
            "sequence; pass the logits of every teacher."
        )
    logits = [jnp.asarray(z, jnp.float32) for z in teacher_logits_list]
    for i, z in enumerate(logits[1:], start=1):
        _check_same_shape("teacher_logits_list[0]", logits[0], f"teacher_logits_list[{i}]", z)
    w = _ensemble_weights(weights, len(logits))
    # Zero-weight teachers are dropped statically so their masked (-inf) entries
    # cannot produce 0 * -inf = nan.
    kept = [(wi, z) for wi, z in zip(w, logits, strict=True) if wi > 0]
    stacked = jnp.stack([z for _, z in kept])
    w_kept = jnp.array([wi for wi, _ in kept], jnp.float32)
    if mode == "logits":
        return jnp.einsum("m,m...->...", w_kept, stacked)
    return temp * _log_mixture(jax.nn.log_softmax(stacked / temp), w_kept)


# ----------------------------------------------------------------------------------
# Feature and relational losses.
# ----------------------------------------------------------------------------------


def fitnet(student_feat: jax.Array, teacher_feat: jax.Array) -> jax.Array:
    """FitNets hint loss (Romero et al., 2015): per-example mean squared error.

    ``loss_b = mean over all non-batch axes of (s_b - t_b)^2``; the student feature
    must already have gone through its connector (regressor) to the teacher's shape.

    Args:
      student_feat: ``[B, ...]``.
      teacher_feat: ``[B, ...]``, same shape.

    Returns:
      ``[B]`` float32.
    """
    s = _features("student_feat", student_feat)
    t = _features("teacher_feat", teacher_feat)
    _check_same_shape("student_feat", s, "teacher_feat", t)
    return jnp.mean(_flatten(jnp.square(s - t)), axis=-1)


def _attention_map(f: jax.Array, p: float) -> jax.Array:
    return l2_normalize(_flatten(jnp.mean(jnp.abs(f) ** p, axis=-1)))


def attention_transfer(
    student_feat: jax.Array, teacher_feat: jax.Array, *, p: float = 2.0
) -> jax.Array:
    """Attention transfer (Zagoruyko & Komodakis, 2017; RepDistiller's ``Attention``).

    ``a(f) = normalize(vec(mean_c |f|^p))`` (L2 over the flattened spatial
    positions) and ``loss_b = mean over positions of (a(s)_b - a(t)_b)^2``.
    ``|f|^p`` follows the paper; the reference's ``f.pow(p)`` agrees for even ``p``.
    Channel counts may differ. If the spatial sizes differ, the larger feature map
    (not the attention map) is adaptive-average-pooled to the smaller size, per
    spatial axis, before the attention maps are taken, as the reference code does.

    Args:
      student_feat: NHWC ``[B, Hs, Ws, Cs]``.
      teacher_feat: NHWC ``[B, Ht, Wt, Ct]``.
      p: exponent, ``>= 1`` (for ``p < 1`` the slope of ``|f|^p`` is infinite at
        the exact zeros that ReLU features contain).

    Returns:
      ``[B]`` float32.
    """
    p = _check("p", p, _AT_LEAST_ONE)
    s = _features("student_feat", student_feat, ndim=4)
    t = _features("teacher_feat", teacher_feat, ndim=4)
    _check_same_batch("student_feat", s, "teacher_feat", t)
    s, t = _pool_to_common_size(s, t)
    return jnp.mean(jnp.square(_attention_map(s, p) - _attention_map(t, p)), axis=-1)


def similarity_preserving(student_feat: jax.Array, teacher_feat: jax.Array) -> jax.Array:
    """Similarity-preserving KD (Tung & Mori, 2019; RepDistiller's ``Similarity``).

    ``G = normalize_rows(F F^T)`` with ``F`` the batch features flattened to
    ``[B, -1]`` (rows of ``G`` L2-normalised); ``loss = ||G_s - G_t||_F^2 / B^2``.

    Args:
      student_feat: ``[B, ...]``.
      teacher_feat: ``[B, ...]``; non-batch shapes may differ.

    Returns:
      Scalar float32.
    """
    s = _features("student_feat", student_feat)
    t = _features("teacher_feat", teacher_feat)
    _check_same_batch("student_feat", s, "teacher_feat", t)
    s, t = _flatten(s), _flatten(t)
    g_s = l2_normalize(s @ s.T)
    g_t = l2_normalize(t @ t.T)
    return jnp.sum(jnp.square(g_s - g_t)) / s.shape[0] ** 2


def _rkd_distances(e: jax.Array) -> jax.Array:
    """Pairwise distances normalised by their mean positive value (RKD ``pdist``)."""
    sq = jnp.sum(e * e, axis=-1)
    # Clamped before the sqrt as in the reference, which also keeps gradients finite.
    d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * (e @ e.T), 1e-12)
    d = jnp.where(jnp.eye(e.shape[0], dtype=bool), 0.0, jnp.sqrt(d2))
    mean = jnp.sum(d) / jnp.maximum(jnp.count_nonzero(d), 1)
    return d / jnp.where(mean > 0, mean, 1.0)


def _rkd_angles(e: jax.Array) -> jax.Array:
    """``[i, j, k] = <n(e_j - e_i), n(e_k - e_i)>`` with ``n`` the L2 normalisation."""
    unit = l2_normalize(e[None, :, :] - e[:, None, :])
    return jnp.einsum("ijd,ikd->ijk", unit, unit)


def _span_coordinates(e: jax.Array) -> jax.Array:
    """The rows' coordinates in an orthonormal basis of their span (``e^T = QR``, rows of
    ``R^T``): ``[B, min(B, D)]`` with every distance and angle of ``e``. The angles cost B^3 D
    multiply-adds, so a wide embedding (a 1200-d teacher, batch 128) needs ~9x fewer. For the
    teacher side only: QR's gradient needs full rank, which a student's embeddings need not
    have."""
    if e.shape[1] <= e.shape[0]:
        return e
    return jnp.linalg.qr(e.T)[1].T


def rkd(
    student_emb: jax.Array,
    teacher_emb: jax.Array,
    *,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> jax.Array:
    """Relational KD (Park et al., 2019; RepDistiller's ``RKDLoss``).

    Embeddings are flattened to ``[B, D]``.

    * Distance: ``psi_D[i, j] = ||x_i - x_j|| / mu`` (diagonal 0, ``mu`` the mean of
      the positive distances); ``L_D = mean over B^2 of huber(psi_D^s - psi_D^t)``.
    * Angle: ``psi_A[i, j, k] = <n(x_j - x_i), n(x_k - x_i)>`` (zero vectors stay
      zero); ``L_A = mean over B^3 of huber(psi_A^s - psi_A^t)``.

    ``huber`` is smooth-L1 with ``delta = 1``. The teacher side is under
    ``stop_gradient``, as the reference computes it under ``torch.no_grad``.
    ``loss = distance_weight * L_D + angle_weight * L_A``.

    Args:
      student_emb: ``[B, ...]``.
      teacher_emb: ``[B, ...]``; non-batch shapes may differ.
      distance_weight: ``>= 0``.
      angle_weight: ``>= 0``.

    Returns:
      Scalar float32.
    """
    w_d = _check("distance_weight", distance_weight, _NON_NEGATIVE)
    w_a = _check("angle_weight", angle_weight, _NON_NEGATIVE)
    s = _features("student_emb", student_emb)
    t = _features("teacher_emb", teacher_emb)
    _check_same_batch("student_emb", s, "teacher_emb", t)
    s, t = _flatten(s), jax.lax.stop_gradient(_flatten(t))
    loss_d = jnp.mean(optax.huber_loss(_rkd_distances(s), _rkd_distances(t), delta=1.0))
    loss_a = jnp.mean(optax.huber_loss(_rkd_angles(s), _rkd_angles(_span_coordinates(t)),
                                       delta=1.0))
    return w_d * loss_d + w_a * loss_a


def _pkt_conditional(x: jax.Array, eps: float) -> jax.Array:
    x = x / (_safe_sqrt(jnp.sum(x * x, axis=-1, keepdims=True)) + eps)
    sim = (x @ x.T + 1.0) / 2.0
    return sim / jnp.sum(sim, axis=-1, keepdims=True)


def pkt(student_emb: jax.Array, teacher_emb: jax.Array, *, eps: float = 1e-7) -> jax.Array:
    """Probabilistic knowledge transfer (Passalis & Tefas, 2018; RepDistiller's ``PKT``).

    Rows flattened to ``[B, D]`` and divided by ``||x|| + eps``; cosine matrices
    shifted to ``S' = (S + 1) / 2`` and row-normalised to conditional distributions
    ``P[i, j] = S'[i, j] / sum_j S'[i, j]``;
    ``loss = mean over B^2 of P_t log((P_t + eps) / (P_s + eps))``.

    Args:
      student_emb: ``[B, ...]``.
      teacher_emb: ``[B, ...]``; non-batch shapes may differ.
      eps: ``> 0``.

    Returns:
      Scalar float32.
    """
    e = _check("eps", eps, _POSITIVE)
    s = _features("student_emb", student_emb)
    t = _features("teacher_emb", teacher_emb)
    _check_same_batch("student_emb", s, "teacher_emb", t)
    s, t = _flatten(s), _flatten(t)
    p_s = _pkt_conditional(s, e)
    p_t = _pkt_conditional(t, e)
    return jnp.mean(p_t * jnp.log((p_t + e) / (p_s + e)))


def _channel_rows(f: jax.Array) -> jax.Array:
    """NHWC ``[B, H, W, C]`` -> ``[B, C, H*W]`` with every channel row L2-normalised."""
    b, h, w, c = f.shape
    return l2_normalize(jnp.swapaxes(f.reshape(b, h * w, c), 1, 2))


def nst(student_feat: jax.Array, teacher_feat: jax.Array) -> jax.Array:
    """Neuron selectivity transfer (Huang & Wang, 2017; RepDistiller's ``NSTLoss``).

    Each channel's spatial map is a sample ``f_c in R^{HW}``, L2-normalised.
    Polynomial-kernel MMD with ``K(x, y) = (x^T y)^2`` (``d = 2, c = 0``):
    ``loss_b = mean K(t, t) + mean K(s, s) - 2 mean K(s, t)``, each mean over the
    channel pairs of example ``b``. The ``K(t, t)`` term is under ``stop_gradient``
    as in the reference. Spatial sizes are matched by adaptive average pooling of
    the larger map, as in :func:`attention_transfer`; channel counts may differ.

    Args:
      student_feat: NHWC ``[B, Hs, Ws, Cs]``.
      teacher_feat: NHWC ``[B, Ht, Wt, Ct]``.

    Returns:
      ``[B]`` float32.
    """
    s = _features("student_feat", student_feat, ndim=4)
    t = _features("teacher_feat", teacher_feat, ndim=4)
    _check_same_batch("student_feat", s, "teacher_feat", t)
    s, t = _pool_to_common_size(s, t)
    s, t = _channel_rows(s), _channel_rows(t)

    def mean_kernel(x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.mean(jnp.einsum("bid,bjd->bij", x, y) ** 2, axis=(1, 2))

    return (
        jax.lax.stop_gradient(mean_kernel(t, t))
        + mean_kernel(s, s)
        - 2.0 * mean_kernel(s, t)
    )


def correlation_congruence(student_emb: jax.Array, teacher_emb: jax.Array) -> jax.Array:
    """Correlation congruence (Peng et al., 2019) with the identity (linear) kernel.

    ``C = F F^T`` (``C[i, j] = <f_i, f_j>``) over the embeddings flattened to
    ``[B, D]``; ``loss = ||C_s - C_t||_F^2 / B^2``. This is the paper's
    ``||psi(F_t) - psi(F_s)||^2 / n^2`` with the kernel ``k(x, y) = x^T y`` in
    place of the Taylor-expanded Gaussian RBF. Note that RepDistiller's active
    ``Correlation`` class computes a different quantity,
    ``mean_i <|s_i - t_i|, |s_{i+1} - t_{i+1}|>`` (and its commented-out variant
    divides each Gram matrix by its Frobenius norm); neither is implemented here.
    Normalise the embeddings first if unit-norm features are wanted.

    Args:
      student_emb: ``[B, ...]``.
      teacher_emb: ``[B, ...]``; non-batch shapes may differ.

    Returns:
      Scalar float32.
    """
    s = _features("student_emb", student_emb)
    t = _features("teacher_emb", teacher_emb)
    _check_same_batch("student_emb", s, "teacher_emb", t)
    s, t = _flatten(s), _flatten(t)
    return jnp.sum(jnp.square(s @ s.T - t @ t.T)) / s.shape[0] ** 2


def vid(
    student_feat_mean: jax.Array,
    teacher_feat: jax.Array,
    log_scale: jax.Array,
    *,
    eps: float = 1e-5,
) -> jax.Array:
    """Variational information distillation NLL (Ahn et al., 2019; RepDistiller's ``VIDLoss``).

    Gaussian with mean ``mu`` (the student's regressor output) and per-channel
    variance ``sigma^2 = softplus(log_scale) + eps``:
    ``loss_b = 0.5 * mean over non-batch axes of ((t - mu)^2 / sigma^2 + log sigma^2)``.
    Spatial pooling of mismatched maps, done by the reference before its
    regressor, is the caller's job here.

    Args:
      student_feat_mean: ``[B, ...]`` predicted mean, same shape as the teacher.
      teacher_feat: ``[B, ...]``, e.g. NHWC ``[B, H, W, C]``.
      log_scale: learned parameter broadcastable to ``teacher_feat``, typically
        ``[C]`` for NHWC maps.
      eps: variance floor, ``> 0``.

    Returns:
      ``[B]`` float32.
    """
    e = _check("eps", eps, _POSITIVE)
    mu = _features("student_feat_mean", student_feat_mean)
    t = _features("teacher_feat", teacher_feat)
    _check_same_shape("student_feat_mean", mu, "teacher_feat", t)
    log_scale = jnp.asarray(log_scale, jnp.float32)
    try:
        broadcast_ok = np.broadcast_shapes(log_scale.shape, t.shape) == t.shape
    except ValueError:
        broadcast_ok = False
    if not broadcast_ok:
        raise ValueError(
            f"log_scale must broadcast to teacher_feat.shape={t.shape}, got "
            f"log_scale.shape={log_scale.shape}; pass one value per channel, e.g. "
            f"shape ({t.shape[-1]},) for NHWC features."
        )
    var = jax.nn.softplus(log_scale) + e
    nll = 0.5 * (jnp.square(t - mu) / var + jnp.log(var))
    return jnp.mean(_flatten(nll), axis=-1)


def _contrast_inputs(
    emb: jax.Array, memory: jax.Array, contrast_idx: jax.Array, name: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
    e = _features(name, emb, ndim=2)
    m = jnp.asarray(memory, jnp.float32)
    idx = jnp.asarray(contrast_idx)
    if m.ndim != 2 or m.shape[1] != e.shape[1]:
        raise ValueError(
            f"the memory bank must be [num_data, {e.shape[1]}] to match {name}.shape={e.shape}, "
            f"got memory.shape={m.shape}; pass one row per training example of the same "
            "embedding size."
        )
    if not jnp.issubdtype(idx.dtype, jnp.integer) or idx.ndim != 2 or idx.shape[0] != e.shape[0]:
        raise ValueError(
            f"contrast_idx must be integer [batch, 1 + K] with batch={e.shape[0]}, got "
            f"contrast_idx.shape={idx.shape} with dtype {idx.dtype}; column 0 holds each "
            "example's own index, columns 1..K its negatives."
        )
    return e, m, idx


def crd_scores(
    emb: jax.Array, memory: jax.Array, contrast_idx: jax.Array, *, temperature: float = 0.07
) -> jax.Array:
    """CRD's unnormalised contrast scores ``exp(<emb_b, memory[contrast_idx[b, k]]> / T)``.

    When the samples outnumber the bank's rows (``B * (K + 1) >= N``, e.g. CRD's K = 16384
    on CIFAR) the whole bank is scored at once and the samples picked from ``[B, N]``: that
    reads each row once instead of gathering ``B * (K + 1)`` copies. Otherwise only the sampled
    rows are gathered and scored (``B * (K + 1) * D`` multiply-adds instead of ``B * N * D``).

    Args:
      emb: ``[B, D]`` L2-normalised embeddings of one model.
      memory: ``[N, D]`` the *other* model's memory bank (one row per training example).
      contrast_idx: integer ``[B, 1 + K]`` rows of ``memory`` to score; column 0 is the
        positive (the example itself), columns 1..K the negatives.
      temperature: ``T > 0``.

    Returns:
      ``[B, 1 + K]`` float32.
    """
    temp = _check("temperature", temperature, _POSITIVE)
    e, m, idx = _contrast_inputs(emb, memory, contrast_idx, "emb")
    if idx.size >= m.shape[0]:
        logits = jnp.take_along_axis(e @ m.T, idx, axis=1)
    else:
        logits = jnp.einsum("bkd,bd->bk", m[idx], e)
    return jnp.exp(logits / temp)


def _nce(scores: jax.Array, num_data: int) -> jax.Array:
    # RepDistiller's ContrastLoss: noise distribution uniform over the data (Pn = 1 / N),
    # K noise samples per positive.
    k_pn = (scores.shape[1] - 1) / num_data
    eps = 1e-7
    log_d1 = jnp.log(scores[:, 0] / (scores[:, 0] + k_pn + eps))
    log_d0 = jnp.log(k_pn / (scores[:, 1:] + k_pn + eps))
    return -(jnp.sum(log_d1) + jnp.sum(log_d0)) / scores.shape[0]


def crd(
    student_emb: jax.Array,
    teacher_emb: jax.Array,
    student_memory: jax.Array,
    teacher_memory: jax.Array,
    contrast_idx: jax.Array,
    normalizers: jax.Array,
    *,
    temperature: float = 0.07,
) -> jax.Array:
    """Contrastive representation distillation (Tian et al., 2020; RepDistiller's CRDLoss).

    NCE with a memory bank of each model's embeddings (N rows, one per training example).
    With ``P_s = crd_scores(student_emb, teacher_memory) / Z_s`` (the student's embedding
    against the teacher's bank) and ``P_t = crd_scores(teacher_emb, student_memory) / Z_t``,
    K negatives per example and ``c = K / N`` (uniform noise),
    ``NCE(P) = -(1/B) sum_b [log(P_b0 / (P_b0 + c + 1e-7))
    + sum_{k>=1} log(c / (P_bk + c + 1e-7))]`` and ``loss = NCE(P_s) + NCE(P_t)``.
    ``Z`` are NCE's normalising constants, which the reference fixes from the first batch
    (``Z = N * mean(scores)``); the banks are read as given (update them after the loss).

    Args:
      student_emb: ``[B, D]`` L2-normalised student embeddings (after its embedding head).
      teacher_emb: ``[B, D]`` L2-normalised teacher embeddings.
      student_memory: ``[N, D]`` bank of student embeddings.
      teacher_memory: ``[N, D]`` bank of teacher embeddings.
      contrast_idx: integer ``[B, 1 + K]``; column 0 each example's own index.
      normalizers: ``[2]`` ``(Z_s, Z_t)``, positive.
      temperature: ``T > 0``.

    Returns:
      Scalar float32.
    """
    s, mem_s, idx = _contrast_inputs(student_emb, student_memory, contrast_idx, "student_emb")
    t, mem_t, _ = _contrast_inputs(teacher_emb, teacher_memory, contrast_idx, "teacher_emb")
    _check_same_shape("student_emb", s, "teacher_emb", t)
    _check_same_shape("student_memory", mem_s, "teacher_memory", mem_t)
    z = jnp.asarray(normalizers, jnp.float32)
    if z.shape != (2,):
        raise ValueError(
            f"normalizers must be [2] (Z_s, Z_t), got normalizers.shape={z.shape}; pass the "
            "NCE normalising constants of the student and teacher scores."
        )
    p_s = crd_scores(s, mem_t, idx, temperature=temperature) / z[0]
    p_t = crd_scores(t, mem_s, idx, temperature=temperature) / z[1]
    return _nce(p_s, mem_s.shape[0]) + _nce(p_t, mem_s.shape[0])


def mutual_learning(
    logits: Sequence[jax.Array], *, temperature: float = 1.0
) -> jax.Array:
    """Deep mutual learning (Zhang et al., 2018): each student mimics its peers.

    For student ``k`` of ``M >= 2``:
    ``loss_k = mean over l != k of T^2 * KL(p_l || p_k)``, ``p = softmax(logits / T)``,
    with every peer ``p_l`` under ``stop_gradient`` (each student learns from the others'
    current predictions, never pushes them), so summing the ``M`` losses trains every
    student on its own term only.

    Args:
      logits: sequence of ``M >= 2`` arrays ``[..., C]`` of equal shape.
      temperature: ``T > 0``.

    Returns:
      ``[M, ...]`` float32.
    """
    temp = _check("temperature", temperature, _POSITIVE)
    if len(logits) < 2:
        raise ValueError(
            f"mutual learning needs at least 2 students, got len(logits)={len(logits)}; pass "
            "the logits of every student."
        )
    z = [jnp.asarray(x, jnp.float32) for x in logits]
    for i, x in enumerate(z[1:], start=1):
        _check_same_shape("logits[0]", z[0], f"logits[{i}]", x)
    return jnp.stack([
        sum(_tempered_kl(zk, jax.lax.stop_gradient(zl), temp)
            for j, zl in enumerate(z) if j != k) / (len(z) - 1)
        for k, zk in enumerate(z)
    ])
