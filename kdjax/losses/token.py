"""Token losses for language models: per-token divergences between a student's and a teacher's
next-token distributions, cross-entropy on the labels, and their vocabulary-chunked form.

Conventions (see also kdjax.losses):

* Logits are ``[B, T, V]`` (any leading shape works: ``[..., V]``); the result is per token,
  ``[B, T]`` float32. ``mask`` (``[B, T]``, bool or 0/1) marks the positions that count: the
  value at a masked-out position is exactly 0 and so is its gradient, whatever the logits hold
  there (padding, the last token of a document), even nan or inf. Reduction is the caller's: a token mean is
  ``(loss * mask).sum() / mask.sum()``.
* ``p_t = softmax(teacher / T)``, ``p_s = softmax(student / T)``; every divergence is
  multiplied by ``T**2`` (Hinton et al., 2015), so gradient magnitudes stay comparable across
  temperatures. Cross-entropy on the labels is at temperature 1.
* Naming, as the LM-distillation literature (GKD, MiniLLM, DistiLLM, TRL) uses it: *forward*
  KL is ``KL(p_t || p_s)`` (mass-covering), *reverse* KL is ``KL(p_s || p_t)`` (mode-seeking).

The chunked form, `chunked_token_losses`, takes the final hidden states and the output
projections of both models instead of logits: an LM's ``[B, T, V]`` logits (34 GB in float32 at
B=8, T=4096, V=256k) are then never materialised for either model, neither in the forward nor in
the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from kdjax.losses._common import (_AT_LEAST_ONE, _POSITIVE, _UNIT_INTERVAL, _check, _kl,
                                  _log_mixture, _logit_pair)


def _mask(mask: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
    if mask is None:
        return jnp.ones(shape, bool)
    mask = jnp.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"mask must have the logits' token shape {shape} (logits.shape[:-1]), "
                         f"got mask.shape={mask.shape}; pass one entry per token, 1 where it "
                         f"counts")
    return mask.astype(bool)


def _masked(value: jax.Array, mask: jax.Array) -> jax.Array:
    # where, not a product: a masked position's value is 0 even when it is inf or nan.
    return jnp.where(mask, value, 0.0)


def _clean(logits: jax.Array, mask: jax.Array) -> jax.Array:
    # Zeros in place of the masked positions' logits: were they nan or inf, the zero cotangent
    # of the final `_masked` would still meet a nan Jacobian and give a nan gradient (XLA fuses
    # this select into the softmax: no extra [B, T, V] array).
    return jnp.where(mask[..., None], logits, 0.0)


def _log_probs(student_logits, teacher_logits, temperature, mask
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    s, t = _logit_pair(student_logits, teacher_logits)
    mask = _mask(mask, s.shape[:-1])
    return (jax.nn.log_softmax(_clean(s, mask) / temperature),
            jax.nn.log_softmax(_clean(t, mask) / temperature), mask)


def token_cross_entropy(logits: jax.Array, labels: jax.Array, *,
                        mask: jax.Array | None = None) -> jax.Array:
    """Next-token cross-entropy on the labels: ``-log softmax(logits)[label]`` per token.

    Args:
      logits: ``[B, T, V]``.
      labels: integer token ids ``[B, T]`` (any value where ``mask`` is 0).
      mask: ``[B, T]``; 0 where the token does not count (the value there is 0).

    Returns:
      ``[B, T]`` float32.
    """
    logits = jnp.asarray(logits, jnp.float32)
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer) or labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must be integer token ids of shape logits.shape[:-1]="
                         f"{logits.shape[:-1]}, got labels.shape={labels.shape} with dtype "
                         f"{labels.dtype}")
    mask = _mask(mask, logits.shape[:-1])
    # Masked positions may hold any label (-100, padding): clip so the gather stays in range.
    safe = jnp.clip(labels, 0, logits.shape[-1] - 1)
    logits = _clean(logits, mask)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return _masked(logz - picked, mask)


def token_forward_kl(student_logits: jax.Array, teacher_logits: jax.Array, *,
                     mask: jax.Array | None = None, temperature: float = 1.0) -> jax.Array:
    """Forward KL per token: ``T^2 * KL(p_t || p_s) = T^2 * sum_v p_t (log p_t - log p_s)``.

    Args:
      student_logits, teacher_logits: ``[B, T, V]``.
      mask: ``[B, T]``; 0 where the token does not count.
      temperature: ``T > 0``.

    Returns:
      ``[B, T]`` float32.
    """
    temp = _check("temperature", temperature, _POSITIVE)
    log_s, log_t, mask = _log_probs(student_logits, teacher_logits, temp, mask)
    return _masked(temp**2 * _kl(log_t, log_s), mask)


def token_reverse_kl(student_logits: jax.Array, teacher_logits: jax.Array, *,
                     mask: jax.Array | None = None, temperature: float = 1.0) -> jax.Array:
    """Reverse KL per token (MiniLLM): ``T^2 * KL(p_s || p_t)``.

    Args:
      student_logits, teacher_logits: ``[B, T, V]``.
      mask: ``[B, T]``; 0 where the token does not count.
      temperature: ``T > 0``.

    Returns:
      ``[B, T]`` float32.
    """
    temp = _check("temperature", temperature, _POSITIVE)
    log_s, log_t, mask = _log_probs(student_logits, teacher_logits, temp, mask)
    return _masked(temp**2 * _kl(log_s, log_t), mask)


def token_generalized_jsd(student_logits: jax.Array, teacher_logits: jax.Array, *,
                          mask: jax.Array | None = None, beta: float = 0.5,
                          temperature: float = 1.0) -> jax.Array:
    """Generalized Jensen-Shannon divergence per token, as GKD (Agarwal et al., 2024) and TRL's
    GKDTrainer define it.

    For ``0 < beta < 1``: ``T^2 * [beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)]`` with the
    mixture ``m = beta * p_t + (1 - beta) * p_s``. The ends are the two KLs, as in TRL:
    ``beta = 0`` is the forward ``KL(p_t || p_s)`` and ``beta = 1`` the reverse
    ``KL(p_s || p_t)``. (The interior formula itself tends to 0 at both ends, like
    ``beta * (1 - beta)`` times a KL: the ends are defined, not limits.)

    Args:
      student_logits, teacher_logits: ``[B, T, V]``.
      mask: ``[B, T]``; 0 where the token does not count.
      beta: in ``[0, 1]``, the teacher's weight in the mixture.
      temperature: ``T > 0``.

    Returns:
      ``[B, T]`` float32.
    """
    b = _check("beta", beta, _UNIT_INTERVAL)
    temp = _check("temperature", temperature, _POSITIVE)
    log_s, log_t, mask = _log_probs(student_logits, teacher_logits, temp, mask)
    if b == 0.0:
        value = _kl(log_t, log_s)
    elif b == 1.0:
        value = _kl(log_s, log_t)
    else:
        log_m = _log_mixture(jnp.stack([log_t, log_s]), jnp.array([b, 1.0 - b]))
        value = b * _kl(log_t, log_m) + (1.0 - b) * _kl(log_s, log_m)
    return _masked(temp**2 * value, mask)


def token_skew_kl(student_logits: jax.Array, teacher_logits: jax.Array, *,
                  mask: jax.Array | None = None, alpha: float = 0.1,
                  temperature: float = 1.0) -> jax.Array:
    """Skew KL per token (DistiLLM, Ko et al., 2024):
    ``T^2 * KL(p_t || alpha * p_t + (1 - alpha) * p_s)``.

    ``alpha = 0`` is the forward KL; the skew keeps the divergence bounded (by ``-log alpha``)
    where the student puts almost no mass on the teacher's tokens.

    Args:
      student_logits, teacher_logits: ``[B, T, V]``.
      mask: ``[B, T]``; 0 where the token does not count.
      alpha: in ``[0, 1]``, the teacher's share of the skewed student distribution.
      temperature: ``T > 0``.

    Returns:
      ``[B, T]`` float32.
    """
    a = _check("alpha", alpha, _UNIT_INTERVAL)
    temp = _check("temperature", temperature, _POSITIVE)
    log_s, log_t, mask = _log_probs(student_logits, teacher_logits, temp, mask)
    log_m = log_s if a == 0.0 else _log_mixture(jnp.stack([log_t, log_s]),
                                                jnp.array([a, 1.0 - a]))
    return _masked(temp**2 * _kl(log_t, log_m), mask)


def token_skew_reverse_kl(student_logits: jax.Array, teacher_logits: jax.Array, *,
                          mask: jax.Array | None = None, alpha: float = 0.1,
                          temperature: float = 1.0) -> jax.Array:
    """Skew reverse KL per token (DistiLLM):
    ``T^2 * KL(p_s || (1 - alpha) * p_t + alpha * p_s)``; ``alpha = 0`` is the reverse KL.

    Args:
      student_logits, teacher_logits: ``[B, T, V]``.
      mask: ``[B, T]``; 0 where the token does not count.
      alpha: in ``[0, 1]``, the student's share of the skewed teacher distribution.
      temperature: ``T > 0``.

    Returns:
      ``[B, T]`` float32.
    """
    a = _check("alpha", alpha, _UNIT_INTERVAL)
    temp = _check("temperature", temperature, _POSITIVE)
    log_s, log_t, mask = _log_probs(student_logits, teacher_logits, temp, mask)
    log_m = log_t if a == 0.0 else _log_mixture(jnp.stack([log_t, log_s]),
                                                jnp.array([1.0 - a, a]))
    return _masked(temp**2 * _kl(log_s, log_m), mask)


def token_tvd(student_logits: jax.Array, teacher_logits: jax.Array, *,
              mask: jax.Array | None = None, temperature: float = 1.0) -> jax.Array:
    """Total variation distance per token: ``T^2 * 0.5 * sum_v |p_t - p_s|``.

    Args:
      student_logits, teacher_logits: ``[B, T, V]``.
      mask: ``[B, T]``; 0 where the token does not count.
      temperature: ``T > 0``.

    Returns:
      ``[B, T]`` float32.
    """
    temp = _check("temperature", temperature, _POSITIVE)
    log_s, log_t, mask = _log_probs(student_logits, teacher_logits, temp, mask)
    value = 0.5 * jnp.sum(jnp.abs(jnp.exp(log_t) - jnp.exp(log_s)), axis=-1)
    return _masked(temp**2 * value, mask)


#: The token divergences by the name configs use (loss.name of an LM experiment).
TOKEN_DIVERGENCES: dict[str, Callable[..., jax.Array]] = {
    "forward_kl": token_forward_kl,
    "reverse_kl": token_reverse_kl,
    "jsd": token_generalized_jsd,
    "skew_kl": token_skew_kl,
    "skew_reverse_kl": token_skew_reverse_kl,
    "tvd": token_tvd,
}


def token_divergence(name: str) -> Callable[..., jax.Array]:
    """The token divergence called `name` (a key of TOKEN_DIVERGENCES)."""
    try:
        return TOKEN_DIVERGENCES[name]
    except KeyError:
        raise ValueError(f"unknown token divergence {name!r}; valid: "
                         f"{sorted(TOKEN_DIVERGENCES)}") from None


def _project(hidden: jax.Array, head: jax.Array) -> jax.Array:
    # The matmul in the activations' dtype (bfloat16 on accelerators) with a float32 result, as
    # the models' own output layer computes it.
    return jnp.einsum("...h,hv->...v", hidden, head.astype(hidden.dtype),
                      preferred_element_type=jnp.float32)


def chunked_token_losses(
    student_hidden: jax.Array,
    student_head: jax.Array,
    teacher_hidden: jax.Array | None,
    teacher_head: jax.Array | None,
    labels: jax.Array,
    *,
    mask: jax.Array | None = None,
    divergence: str = "forward_kl",
    chunk_size: int = 128,
    **hyperparameters: float,
) -> dict[str, jax.Array]:
    """Cross-entropy and a token divergence from hidden states, never materialising the logits.

    The logits are ``student_hidden @ student_head`` and ``teacher_hidden @ teacher_head``. They
    are computed ``chunk_size`` positions at a time (``[B, chunk_size, V]`` per model, inside a
    `lax.map`), and the chunk's body is rematerialised (`jax.checkpoint`): the backward pass
    recomputes each chunk's logits from its hidden states instead of keeping them, so it stays
    chunked too. Memory for logits drops from ``O(B T V)`` to ``O(B chunk_size V)``; the price is
    recomputing both projections in the backward pass. Value and gradients equal the unchunked
    losses (`token_cross_entropy`, `TOKEN_DIVERGENCES[divergence]`) up to float rounding.

    The chunks split the sequence axis, not the batch, so a batch sharded over devices stays
    where it is.

    Args:
      student_hidden: ``[B, T, H_s]``, the student's final (normed) hidden states.
      student_head: ``[H_s, V]``, its output projection (a tied embedding's transpose).
      teacher_hidden: ``[B, T, H_t]``, or None for cross-entropy alone (supervised training).
      teacher_head: ``[H_t, V]``, or None with ``teacher_hidden``.
      labels: integer next-token ids ``[B, T]``.
      mask: ``[B, T]``; 0 where the token does not count (values and gradients 0 there).
      divergence: a key of TOKEN_DIVERGENCES.
      chunk_size: positions (along T) per chunk, ``>= 1``; T is padded to a multiple of it.
      **hyperparameters: the divergence's keyword hyperparameters (temperature, beta, alpha).

    Returns:
      A dict of ``[B, T]`` float32 arrays: ``"ce"`` and ``"correct"`` (student argmax == label,
      0/1, not differentiable), and with a teacher ``"kd"`` (the divergence) and ``"agreement"``
      (student argmax == teacher argmax). Masked positions are 0 in every one.
    """
    chunk = int(_check("chunk_size", chunk_size, _AT_LEAST_ONE))
    with_teacher = teacher_hidden is not None
    if with_teacher != (teacher_head is not None):
        raise ValueError("pass teacher_hidden and teacher_head together (or neither, for "
                         "cross-entropy alone)")
    b, t = student_hidden.shape[:2]
    vocab = student_head.shape[-1]
    if with_teacher and teacher_head.shape[-1] != vocab:
        raise ValueError(f"the student's vocabulary has {vocab} tokens (student_head.shape="
                         f"{student_head.shape}) but the teacher's has {teacher_head.shape[-1]} "
                         f"(teacher_head.shape={teacher_head.shape}); token distributions are "
                         f"compared token by token: use one vocabulary")
    if with_teacher and teacher_hidden.shape[:2] != (b, t):
        raise ValueError(f"student_hidden and teacher_hidden must cover the same tokens, got "
                         f"{student_hidden.shape} and {teacher_hidden.shape}")
    if labels.shape != (b, t):
        raise ValueError(f"labels must have shape {(b, t)} (student_hidden.shape[:2]), got "
                         f"{labels.shape}")
    fn = token_divergence(divergence) if with_teacher else None
    if fn is not None:  # bad hyperparameters fail here, with the function's own message
        jax.eval_shape(lambda: fn(jnp.zeros((1, vocab)), jnp.zeros((1, vocab)),
                                  **hyperparameters))
    mask = _mask(mask, (b, t))
    n = -(-t // chunk)
    pad = n * chunk - t

    def chunks(x):  # [B, T, ...] -> [n, B, chunk, ...], padded positions masked out
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    xs = {"hs": chunks(student_hidden), "labels": chunks(labels), "mask": chunks(mask)}
    if with_teacher:
        xs["ht"] = chunks(teacher_hidden)

    @jax.checkpoint
    def one_chunk(c):
        s_logits = _project(c["hs"], student_head)
        out = {"ce": token_cross_entropy(s_logits, c["labels"], mask=c["mask"]),
               "correct": _masked((s_logits.argmax(-1) == c["labels"]).astype(jnp.float32),
                                  c["mask"])}
        if with_teacher:
            t_logits = _project(c["ht"], teacher_head)
            out["kd"] = fn(s_logits, t_logits, mask=c["mask"], **hyperparameters)
            out["agreement"] = _masked(
                (s_logits.argmax(-1) == t_logits.argmax(-1)).astype(jnp.float32), c["mask"])
        return out

    out = jax.lax.map(one_chunk, xs)
    return {k: jnp.moveaxis(v, 0, 1).reshape(b, n * chunk)[:, :t] for k, v in out.items()}
