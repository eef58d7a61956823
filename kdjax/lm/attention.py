"""Causal self-attention over packed documents, with or without the `[T, S]` score matrix.

Two forms compute the same function (tests/test_lm_attention.py checks them against each other
and against a numpy formula):

- ``explicit``: the scores `[B, K, G, T, S]` and their softmax, whole. What a short sequence, a
  KV-cached decoding step and the "attention_{i}" taps use.
- ``blockwise``: the keys in blocks of `block` slots, folded into a running softmax (the online
  softmax of Milakov & Gimelshein 2018, as FlashAttention computes it): per block only the
  `[T, block]` scores exist, and the masks are computed per block from the segment ids and slot
  indices, so neither a `[T, S]` score matrix nor a `[T, S]` mask is ever materialised. The
  block step is rematerialised (`jax.checkpoint`), so the backward pass keeps the running
  statistics per block, not the blocks' probabilities. Memory grows with T * block instead of
  T^2 (benchmarks/results/lm_memory_plan_cpu.md measures both).

Why not `jax.nn.dot_product_attention`: in jax 0.10.2 it takes a dense `[B, 1, T, S]` mask for
packed documents (its cuDNN kernel has no segment ids), which is the `[T, S]` tensor this module
exists to avoid; its XLA path materialises the scores. The blockwise form runs on every backend.

Masks. Query slot i may attend key slot j iff j <= i (the keys are the same row's slots, or a KV
cache's, offset by `q_offset`), both are in the same document (segment ids equal, key not
padding: segment 0), and, with a sliding `window`, i - j < window.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["MASKED", "allowed", "attend", "blockwise", "explicit"]

# Finite stand-in for -inf: exp(MASKED - max) is exactly 0 next to any real score, and a row with
# no allowed key (a padding query) stays finite instead of 0/0.
MASKED = float(jnp.finfo(jnp.float32).min)


def allowed(q_segments: jax.Array, k_segments: jax.Array, *, q_offset: jax.Array | int = 0,
            k_offset: jax.Array | int = 0, window: int | None = None) -> jax.Array:
    """``[B, T, S]``: query slot ``q_offset + i`` may attend key slot ``k_offset + j``."""
    qi = q_offset + jnp.arange(q_segments.shape[1])[:, None]
    kj = k_offset + jnp.arange(k_segments.shape[1])[None, :]
    ok = kj <= qi
    if window is not None:
        ok = ok & (qi - kj < window)
    same = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] != 0)
    return ok[None] & same


def _grouped(q: jax.Array, k: jax.Array) -> jax.Array:
    # q [B, T, H, D] -> [B, T, K, G, D]: each group of G = H/K query heads reads one key head
    # (a reshape, not a repeat: K/V are never copied G times).
    b, t, h, d = q.shape
    kv = k.shape[2]
    return q.reshape(b, t, kv, h // kv, d)


def explicit(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
    """(output ``[B, T, H, D]``, probabilities ``[B, H, T, S]``) with the whole score matrix.

    q ``[B, T, H, D]``; k, v ``[B, S, K, D]``; mask ``[B, T, S]`` (`allowed`)."""
    b, t, h, d = q.shape
    qg = _grouped(q, k)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k,
                        preferred_element_type=jnp.float32) / jnp.sqrt(d).astype(jnp.float32)
    scores = jnp.where(mask[:, None, None], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)
    return out.reshape(b, t, h, d), probs.reshape(b, h, t, -1)


def blockwise(q: jax.Array, k: jax.Array, v: jax.Array, q_segments: jax.Array,
              k_segments: jax.Array, *, block: int, window: int | None = None) -> jax.Array:
    """The output ``[B, T, H, D]`` of `explicit`, keys taken `block` slots at a time (module
    docstring); a query with no allowed key (padding) gets zeros.

    q ``[B, T, H, D]``; k, v ``[B, S, K, D]``; segments ``[B, T]``, ``[B, S]``; the keys are the
    queries' own slots (self-attention of one packed row)."""
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    pad = -s % block
    if pad:  # padding keys are segment 0: never attended
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        k_segments = jnp.pad(k_segments, ((0, 0), (0, pad)))
    n_blocks = (s + pad) // block
    qg = _grouped(q, k).astype(jnp.float32) / jnp.sqrt(d).astype(jnp.float32)
    k_blocks = k.reshape(b, n_blocks, block, kv, d).swapaxes(0, 1)
    v_blocks = v.reshape(b, n_blocks, block, kv, d).swapaxes(0, 1)
    seg_blocks = k_segments.reshape(b, n_blocks, block).swapaxes(0, 1)

    @jax.checkpoint
    def step(carry, xs):
        m, l, acc = carry  # running max and sum [B, K, G, T], weighted values [B, K, G, T, D]
        kb, vb, segb, j = xs
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, kb.astype(jnp.float32))
        ok = allowed(q_segments, segb, k_offset=j * block, window=window)[:, None, None]
        scores = jnp.where(ok, scores, MASKED)
        m_new = jnp.maximum(m, scores.max(-1))
        p = jnp.where(ok, jnp.exp(scores - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(-1)
        acc = acc * correction[..., None] + jnp.einsum("bkgts,bskd->bkgtd", p,
                                                       vb.astype(jnp.float32))
        return (m_new, l, acc), None

    g = h // kv
    init = (jnp.full((b, kv, g, t), MASKED, jnp.float32), jnp.zeros((b, kv, g, t), jnp.float32),
            jnp.zeros((b, kv, g, t, d), jnp.float32))
    (_, l, acc), _ = jax.lax.scan(step, init, (k_blocks, v_blocks, seg_blocks,
                                               jnp.arange(n_blocks)))
    out = acc / jnp.maximum(l, jnp.finfo(jnp.float32).tiny)[..., None]
    return jnp.moveaxis(out, 3, 1).reshape(b, t, h, d).astype(q.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *, block: int,
           window: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Self-attention of packed rows: (output, probabilities). The output takes the blockwise
    form when the row is longer than `block` (0: always explicit); the probabilities (the
    "attention_{i}" taps) are the explicit form's, which jit leaves out of a program that does
    not read them."""
    mask = allowed(segments, segments, window=window)
    out, probs = explicit(q, k, v, mask)
    if block and q.shape[1] > block:
        out = blockwise(q, k, v, segments, segments, block=block, window=window)
    return out, probs
