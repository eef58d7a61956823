"""Self-distillation losses, with no external teacher: Tf-KD's virtual teacher and BYOT's feature
hint. Conventions: see kdjax.losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.losses._common import (_OPEN_UNIT_INTERVAL, _check, _check_same_shape, _features,
                                  _labels, _tempered_kl, _temperature)


def virtual_teacher_logits(
    labels: jax.Array, num_classes: int, *, correct_prob: float = 0.99
) -> jax.Array:
    """Tf-KD's hand-designed teacher (Yuan et al., 2020), as logits ``log p^d``.

    ``p^d_c = a`` for the labelled class ``c = y`` and ``(1 - a) / (C - 1)`` for every other
    class, so ``softmax(log p^d) = p^d`` and ``softmax(log p^d / T)`` is ``p^d`` softened at
    temperature ``T``.

    Args:
      labels: integer class ids ``[...]``.
      num_classes: ``C >= 2``.
      correct_prob: ``a``, in ``(0, 1)``.

    Returns:
      ``[..., C]`` float32.
    """
    a = _check("correct_prob", correct_prob, _OPEN_UNIT_INTERVAL)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got num_classes={num_classes}; a virtual "
                         "teacher spreads 1 - correct_prob over the other classes.")
    labels = jnp.asarray(labels)
    onehot = labels[..., None] == jnp.arange(num_classes)
    rest = (1.0 - a) / (num_classes - 1)
    return jnp.log(jnp.where(onehot, a, rest)).astype(jnp.float32)


def teacher_free_kd(
    student_logits: jax.Array,
    labels: jax.Array,
    *,
    correct_prob: float = 0.99,
    temperature: float = 20.0,
) -> jax.Array:
    """Tf-KD with the virtual teacher (Tf-KD_reg, Yuan et al., CVPR 2020, eq. 9's KL term).

    ``T^2 * KL(p^d_T || p_T)`` with the virtual teacher ``p^d`` of
    :func:`virtual_teacher_logits` and both sides softened at ``T``:
    ``p^d_T = softmax(log p^d / T)``, ``p_T = softmax(student_logits / T)``. The ``T^2`` is
    kdjax's convention for every divergence at a temperature (the paper's term has none: divide
    the weight by ``T^2`` to compare). The authors' code differs in two details this follows the
    paper on: it softens ``softmax(p^d / T)`` (probabilities taken as logits) and leaves the
    student at ``T = 1``.

    Args:
      student_logits: ``[..., C]``.
      labels: integer class ids ``[...]``.
      correct_prob: ``a``, the virtual teacher's probability of the labelled class, in ``(0, 1)``.
      temperature: ``T > 0``, a Python number or an array (scalar or ``[...]``), as in
        :func:`kdjax.losses.soft_target_kl`.

    Returns:
      ``[...]`` float32.
    """
    s = jnp.asarray(student_logits, jnp.float32)
    labels = _labels(s, labels)
    temp = _temperature(temperature, s.shape[:-1])
    teacher = virtual_teacher_logits(labels, s.shape[-1], correct_prob=correct_prob)
    return _tempered_kl(s, teacher, temp)


def byot_hint(features: jax.Array, target: jax.Array) -> jax.Array:
    """BYOT's feature hint (Zhang et al., ICCV 2019; the authors' ``feature_loss_function``).

    ``sum_d (f_d - g_d)^2 * [f_d > 0 or g_d > 0]`` per example, between a shallow exit's
    bottleneck feature ``f`` and the deepest classifier's input feature ``g``; where both are
    ``<= 0`` (after their ReLUs: both off) the difference does not count. ``g`` is detached, as
    in the reference: the deep feature teaches, it does not move towards the shallow one. The
    reference sums over the batch too; this returns one value per example (the caller's mean is
    the reference's sum divided by the batch size).

    Args:
      features: ``[B, ...]``.
      target: ``[B, ...]``, the same shape.

    Returns:
      ``[B]`` float32.
    """
    f = _features("features", features)
    g = jax.lax.stop_gradient(_features("target", target))
    _check_same_shape("features", f, "target", g)
    active = (f > 0) | (g > 0)
    return jnp.sum(jnp.where(active, (f - g) ** 2, 0.0).reshape(f.shape[0], -1), axis=-1)
