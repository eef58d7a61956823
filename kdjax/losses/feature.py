"""Feature and relational losses (FitNets, AT, SP, RKD, PKT, NST, CC, VID, CRD) and deep mutual
learning. Conventions: see kdjax.losses."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax.losses._common import (_AT_LEAST_ONE, _NON_NEGATIVE, _POSITIVE, _check, _check_same_batch,
                                  _check_same_shape, _features, _flatten, _pool_to_common_size,
                                  _safe_sqrt, _tempered_kl, l2_normalize)

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
