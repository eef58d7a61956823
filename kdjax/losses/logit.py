"""Logit losses: divergences between student and teacher class distributions, DKD, LS-KD,
top-k (cached) teachers, ensembles. Conventions: see kdjax.losses."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from kdjax.losses._common import (_ENSEMBLE_MODES, _MASKED, _NON_NEGATIVE, _OPEN_UNIT_INTERVAL,
                                  _UNIT_INTERVAL, _check, _check_same_shape, _kl,
                                  _labels, _log_mixture, _logit_pair, _per_row, _safe_sqrt,
                                  _static_float, _temperature, _tempered_kl)

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
      temperature: ``T > 0``: a Python number (validated), or an array, scalar or one
        value per example ``[...]``, e.g. a schedule's value traced from the step or a learned
        temperature (kdjax.temperature; not checked under jit).

    Returns:
      ``[...]`` float32.
    """
    s, t = _logit_pair(student_logits, teacher_logits)
    temp = _temperature(temperature, s.shape[:-1])
    return _tempered_kl(s, t, temp)


def reverse_kl(
    student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float = 1.0
) -> jax.Array:
    """Reverse (mode-seeking) KL: ``T^2 * KL(p_s || p_t)``, ``p = softmax(logits / T)``.

    Args:
      student_logits: ``[..., C]``.
      teacher_logits: ``[..., C]``.
      temperature: ``T > 0``: a Python number (validated), or an array, scalar or one
        value per example ``[...]``, e.g. a schedule's value traced from the step or a learned
        temperature (kdjax.temperature; not checked under jit).

    Returns:
      ``[...]`` float32.
    """
    s, t = _logit_pair(student_logits, teacher_logits)
    temp = _temperature(temperature, s.shape[:-1])
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
      temperature: ``T > 0``: a Python number (validated), or an array, scalar or one
        value per example ``[...]``, e.g. a schedule's value traced from the step or a learned
        temperature (kdjax.temperature; not checked under jit).

    Returns:
      ``[...]`` float32.
    """
    b = _check("beta", beta, _OPEN_UNIT_INTERVAL)
    s, t = _logit_pair(student_logits, teacher_logits)
    temp = _temperature(temperature, s.shape[:-1])
    log_s = jax.nn.log_softmax(s / _per_row(temp))
    log_t = jax.nn.log_softmax(t / _per_row(temp))
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
      temperature: ``T > 0``: a Python number (validated), or an array, scalar or one
        value per example ``[...]``, e.g. a schedule's value traced from the step or a learned
        temperature (kdjax.temperature; not checked under jit).

    Returns:
      ``[...]`` float32.
    """
    s, t = _logit_pair(student_logits, teacher_logits)
    temp = _temperature(temperature, s.shape[:-1])
    p_s = jax.nn.softmax(s / _per_row(temp))
    p_t = jax.nn.softmax(t / _per_row(temp))
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
      temperature: ``T > 0``: a Python number (validated), or an array, scalar or one
        value per example ``[...]``, e.g. a schedule's value traced from the step or a learned
        temperature (kdjax.temperature; not checked under jit).
      alpha: weight of the distillation term, in ``[0, 1]``.

    Returns:
      ``[...]`` float32.
    """
    a = _check("alpha", alpha, _UNIT_INTERVAL)
    s, t = _logit_pair(student_logits, teacher_logits)
    temp = _temperature(temperature, s.shape[:-1])
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
      temperature: ``T > 0``: a Python number (validated), or an array, scalar or one
        value per example ``[...]``, e.g. a schedule's value traced from the step or a learned
        temperature (kdjax.temperature; not checked under jit).

    Returns:
      ``[...]`` float32.
    """
    a = _check("alpha", alpha, _NON_NEGATIVE)
    b = _check("beta", beta, _NON_NEGATIVE)
    s, t = _logit_pair(student_logits, teacher_logits)
    temp = _temperature(temperature, s.shape[:-1])
    target = _labels(s, labels)[..., None] == jnp.arange(s.shape[-1])
    binary_s, rest_s = _dkd_log_probs(s / _per_row(temp), target)
    binary_t, rest_t = _dkd_log_probs(t / _per_row(temp), target)
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
      temperature: ``T > 0``: a Python number (validated), or an array, scalar or one
        value per example ``[...]``, e.g. a schedule's value traced from the step or a learned
        temperature (kdjax.temperature; not checked under jit).

    Returns:
      ``[...]`` float32.
    """
    s, t = _logit_pair(student_logits, teacher_logits)
    temp = _temperature(temperature, s.shape[:-1])
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
      temperature: ``T > 0``: a Python number (validated), or an array, scalar or one
        value per example ``[...]``, e.g. a schedule's value traced from the step or a learned
        temperature (kdjax.temperature; not checked under jit).
      teacher_tail_logprob: ``[...]`` log of the teacher's unlisted mass at
        temperature ``T``, or ``None``.

    Returns:
      ``[...]`` float32.
    """
    s = jnp.asarray(student_logits, jnp.float32)
    temp = _temperature(temperature, s.shape[:-1])
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

    log_s = jax.nn.log_softmax(s / _per_row(temp))
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
        [jax.nn.log_softmax(values / _per_row(temp)) + log_head_mass[..., None], tail[..., None]],
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
      temperature: ``T > 0``, used by ``mode="probs"``: a Python number, or an array
        (scalar or ``[...]``, one per example), as in the divergences.

    Returns:
      ``[..., C]`` float32 logits.
    """
    if mode not in _ENSEMBLE_MODES:
        raise ValueError(
            f"mode must be one of {_ENSEMBLE_MODES}, got mode={mode!r}; pick one of "
            "those."
        )
    if len(teacher_logits_list) == 0:
        raise ValueError(
            "teacher_logits_list must contain at least one array, got an empty "
            "sequence; pass the logits of every teacher."
        )
    logits = [jnp.asarray(z, jnp.float32) for z in teacher_logits_list]
    for i, z in enumerate(logits[1:], start=1):
        _check_same_shape("teacher_logits_list[0]", logits[0], f"teacher_logits_list[{i}]", z)
    temp = _temperature(temperature, logits[0].shape[:-1])
    w = _ensemble_weights(weights, len(logits))
    # Zero-weight teachers are dropped statically so their masked (-inf) entries
    # cannot produce 0 * -inf = nan.
    kept = [(wi, z) for wi, z in zip(w, logits, strict=True) if wi > 0]
    stacked = jnp.stack([z for _, z in kept])
    w_kept = jnp.array([wi for wi, _ in kept], jnp.float32)
    if mode == "logits":
        return jnp.einsum("m,m...->...", w_kept, stacked)
    return _per_row(temp) * _log_mixture(jax.nn.log_softmax(stacked / _per_row(temp)), w_kept)
