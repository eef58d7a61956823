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

from kdjax.losses._common import (_AT_LEAST_ONE, _MASKED, _POSITIVE, _UNIT_INTERVAL, _check,
                                  _kl, _log_mixture, _logit_pair)
from kdjax.losses.logit import topk_soft_target_kl


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


def token_topk_targets(teacher_logits: jax.Array, k: int
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A teacher's top-k targets per token: what a teacher cache stores (kdjax.lm.cache) and
    what online top-k distillation computes in the step.

    Args:
      teacher_logits: ``[B, T, V]``.
      k: ``1 <= k < V``, the tokens kept.

    Returns:
      ``(logprobs [B, T, k], ids [B, T, k] int32, log_tail [B, T])``: the k largest
      ``log softmax(teacher_logits)`` (descending) and their token ids, and
      ``log(1 - sum_k p)``, the log-mass of the other ``V - k`` tokens (float32, computed as a
      logsumexp over them, not as ``log(1 - sum)``, so it stays exact when the tail is tiny).
    """
    logits = jnp.asarray(teacher_logits, jnp.float32)
    vocab = logits.shape[-1]
    if not isinstance(k, int) or not 1 <= k < vocab:
        raise ValueError(f"k must be an integer in [1, {vocab}) (the vocabulary has {vocab} "
                         f"tokens; the tail needs at least one), got k={k!r}")
    log_p = jax.nn.log_softmax(logits)
    logprobs, ids = jax.lax.top_k(log_p, k)
    listed = jnp.put_along_axis(jnp.zeros(log_p.shape, bool), ids, True, axis=-1,
                                inplace=False)
    log_tail = jax.nn.logsumexp(jnp.where(listed, _MASKED, log_p), axis=-1)
    return logprobs, ids.astype(jnp.int32), log_tail


def token_topk_kl(student_logits: jax.Array, teacher_logprobs: jax.Array,
                  teacher_ids: jax.Array, teacher_log_tail: jax.Array, *,
                  mask: jax.Array | None = None, tail: bool = True,
                  temperature: float = 1.0) -> jax.Array:
    """Forward KL per token against a teacher known by its top-k (`token_topk_targets`, or a
    teacher cache's decoded targets).

    With ``p_i`` the teacher's listed probabilities, ``p_tail = exp(teacher_log_tail)`` and
    ``q = softmax(student / T)``:

    * ``tail=True`` (the default): both distributions collapsed onto ``k + 1`` buckets, the
      listed tokens and one for all others: ``sum_i p_i log(p_i / q_i) + p_tail log(p_tail /
      q_tail)``, ``q_tail`` the student's mass outside the listed ids. The listed
      log-probabilities are renormalised to ``1 - p_tail`` first, so an error common to all of
      them (a quantised cache's) cancels. It is the exact KL of a coarsening of both
      distributions, so it never exceeds the full forward KL and equals it when the tail holds
      one token; its gradient also moves the student's tail mass to the teacher's.
      Only ``T = 1``: the tail's mass at another temperature is not known from the top-k.
    * ``tail=False``, top-k renormalisation (DistillKit's, TRL's offline-logit form): the
      teacher's listed probabilities renormalised to sum to 1, against the student's full
      softmax: ``T^2 * sum_i p^_i log(p^_i / q_i)``, ``p^ = softmax(logprobs / T)`` over the
      k. It ignores the teacher's tail and pushes the student's mass into the listed tokens.

    Args:
      student_logits: ``[B, T, V]``.
      teacher_logprobs: ``[B, T, k]`` log-probabilities of the listed tokens (any order).
      teacher_ids: ``[B, T, k]`` their token ids, distinct per token.
      teacher_log_tail: ``[B, T]`` log of the teacher's mass outside them.
      mask: ``[B, T]``; 0 where the token does not count (values and gradients 0 there).
      tail: the tail bucket (True) or top-k renormalisation (False).
      temperature: ``T > 0``; 1 with ``tail=True``.

    Returns:
      ``[B, T]`` float32.
    """
    temp = _check("temperature", temperature, _POSITIVE)
    if tail and temp != 1.0:
        raise ValueError(f"the top-k loss with the tail bucket (tail=True) is at temperature 1 "
                         f"(the teacher's tail mass at another temperature is not known from "
                         f"its top-k), got temperature={temperature}; use temperature=1.0, or "
                         f"tail=False (top-k renormalisation)")
    s = jnp.asarray(student_logits, jnp.float32)
    mask = _mask(mask, s.shape[:-1])
    # Masked positions' ids and log-probs may be anything (an unused cache slot): made valid.
    ids = jnp.where(mask[..., None], jnp.clip(teacher_ids, 0, s.shape[-1] - 1),
                    jnp.arange(teacher_ids.shape[-1]))
    values = jnp.where(mask[..., None], jnp.asarray(teacher_logprobs, jnp.float32), 0.0)
    log_tail = jnp.where(mask, jnp.asarray(teacher_log_tail, jnp.float32), -1.0)
    value = topk_soft_target_kl(_clean(s, mask), values, ids, temperature=temp,
                                teacher_tail_logprob=log_tail if tail else None)
    return _masked(value, mask)


def topk_terms(student_logits: jax.Array, targets: tuple[jax.Array, jax.Array, jax.Array],
               mask: jax.Array, *, tail: bool = True, **hyperparameters: float
               ) -> dict[str, jax.Array]:
    """``{"kd": token_topk_kl, "agreement": student argmax == the teacher's top-1}`` per token
    against top-k `targets` ``(logprobs, ids, log_tail)``."""
    logprobs, ids, log_tail = targets
    top1 = jnp.take_along_axis(ids, logprobs.argmax(-1)[..., None], axis=-1)[..., 0]
    return {"kd": token_topk_kl(student_logits, logprobs, ids, log_tail, mask=mask, tail=tail,
                                **hyperparameters),
            "agreement": _masked((student_logits.argmax(-1) == top1).astype(jnp.float32),
                                 _mask(mask, top1.shape))}



def token_byte_log_probs(logits: jax.Array, first_byte: jax.Array, *,
                         num_classes: int = 257) -> jax.Array:
    """Log-probabilities of the next byte implied by a next-token distribution (cross-tokenizer
    distillation, kdjax.lm.cross_tokenizer): ``log P(b) = log sum_{v: first_byte[v] = b}
    softmax(logits)_v``.

    Two models with different tokenizers predict different events (a byte, a multi-byte token);
    marginalised onto the first byte of the next token, both predict the same one, so any token
    divergence compares them (pass the result as logits: its softmax is P itself).

    Args:
      logits: ``[..., V]``.
      first_byte: ``[V]`` integers in ``[0, num_classes)``: the class of each token (its first
        byte; ``num_classes - 1`` for tokens of no bytes, "no further byte").
      num_classes: the classes (257: 256 bytes and the end).

    Returns:
      ``[..., num_classes]`` float32; a class no token reaches (or whose mass underflows float32)
      is ``log`` of the smallest normal float32 rather than ``-inf``, so a divergence against it
      stays finite.
    """
    logits = jnp.asarray(logits, jnp.float32)
    first_byte = jnp.asarray(first_byte)
    if first_byte.shape != logits.shape[-1:]:
        raise ValueError(f"first_byte must give one class per vocabulary entry, shape "
                         f"{logits.shape[-1:]}, got {first_byte.shape}")
    top = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
    # A softmax summed class by class as one matmul with the token -> class one-hot: the
    # largest logit is subtracted first, as logsumexp does, so the sums cannot overflow.
    onehot = jax.nn.one_hot(first_byte, num_classes, dtype=jnp.float32)
    mass = jnp.exp(logits - top) @ onehot
    log_mass = jnp.log(jnp.maximum(mass, jnp.finfo(jnp.float32).tiny))
    return log_mass - jax.nn.logsumexp(log_mass, axis=-1, keepdims=True)


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
    top_k: int = 0,
    tail: bool = True,
    teacher_topk: tuple[jax.Array, jax.Array, jax.Array] | None = None,
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
      top_k: > 0: the divergence is `token_topk_kl` against the teacher's top `top_k` tokens
        (`token_topk_targets` of each chunk's teacher logits) instead of `divergence`.
      tail: `token_topk_kl`'s tail bucket (True) or top-k renormalisation (False).
      teacher_topk: the teacher's top-k targets ``(logprobs, ids [B, T, k], log_tail [B, T])``
        (a teacher cache's) in place of ``teacher_hidden`` and ``teacher_head``, which are then
        None; the divergence is `token_topk_kl`.
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
    if with_teacher and teacher_topk is not None:
        raise ValueError("pass the teacher's hidden states and head, or its top-k targets "
                         "(teacher_topk), not both")
    topk_mode = top_k > 0 or teacher_topk is not None
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
    fn = token_divergence(divergence) if with_teacher and not topk_mode else None
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
    if teacher_topk is not None:
        xs["topk"] = tuple(chunks(x) for x in teacher_topk)

    @jax.checkpoint
    def one_chunk(c):
        s_logits = _project(c["hs"], student_head)
        out = {"ce": token_cross_entropy(s_logits, c["labels"], mask=c["mask"]),
               "correct": _masked((s_logits.argmax(-1) == c["labels"]).astype(jnp.float32),
                                  c["mask"])}
        if with_teacher and not topk_mode:
            t_logits = _project(c["ht"], teacher_head)
            out["kd"] = fn(s_logits, t_logits, mask=c["mask"], **hyperparameters)
            out["agreement"] = _masked(
                (s_logits.argmax(-1) == t_logits.argmax(-1)).astype(jnp.float32), c["mask"])
        elif topk_mode and (with_teacher or teacher_topk is not None):
            targets = c["topk"] if teacher_topk is not None else token_topk_targets(
                _project(c["ht"], teacher_head), top_k)
            out.update(topk_terms(s_logits, targets, c["mask"], tail=tail, **hyperparameters))
        return out

    out = jax.lax.map(one_chunk, xs)
    return {k: jnp.moveaxis(v, 0, 1).reshape(b, n * chunk)[:, :t] for k, v in out.items()}
