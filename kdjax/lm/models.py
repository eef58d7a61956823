"""Decoder-only transformers in the Llama style, as students and teachers of LM distillation.

RMSNorm before each sub-layer, rotary positions (RoPE, the half-split rotation of Llama's
Hugging Face port), SwiGLU feed-forward, grouped-query attention (``num_kv_heads`` key/value
heads shared by ``num_heads // num_kv_heads`` query heads each), no biases, optional tied input
and output embeddings. Options for the Hugging Face families (kdjax.lm.hf): query/key/value
biases (Qwen2), RMSNorms of each query and key head (Qwen3), Llama 3's rescaled rotary
frequencies (``rope_scaling``) and a sliding attention window (Mistral); and Gemma 2/3's: (1+w)
RMSNorms, an embedding scaled by sqrt(d_model), GeGLU, norms after attention and the feed-forward
too, ``query_pre_attn_scalar``, soft-capped attention scores and logits, and sliding-window
layers alternating with global ones (with their own rotary base in Gemma 3). Parameters are
float32; activations use the model's ``dtype`` (bfloat16 on accelerators,
`kdjax.step.compute_dtype`); norms, softmaxes and logits are computed in float32.

Masks. ``segment_ids [B, T]`` number the documents packed into each row (0 = padding): a position
attends to the positions at or before it in its own document only, and rotary positions restart
at 0 at each document's first token, so a packed row computes exactly what each of its documents
would compute alone (tests/test_lm_models.py checks it). Rows longer than ``attention_block``
attend blockwise (kdjax.lm.attention), without a ``[T, T]`` score matrix or mask.

Taps (``features``): ``"embedding"`` (the token embeddings), ``"layer_{i}"`` (each block's
output, the residual stream ``[B, T, d_model]``), ``"attention_{i}"`` (each block's attention
probabilities ``[B, num_heads, T, T]``), ``"hidden"`` (the final normed hidden state, what the
output projection reads) and ``"logits"``. Under jit the taps a caller does not read cost nothing.

A sequence is decoded with a KV cache through ``decode`` (kdjax.lm.sampling).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.lm import attention

_init = nnx.initializers.normal(0.02)  # Llama's initializer_range


class RMSNorm(nnx.Module):
    """``x / rms(x) * (offset + scale)``, computed in float32 and returned in the input's dtype
    (Gemma's norms hold ``scale`` around offset 1, the others around 0)."""

    def __init__(self, features: int, *, eps: float = 1e-5, offset: float = 0.0):
        self.scale = nnx.Param(jnp.full((features,), 1.0 - offset, jnp.float32))
        self.eps, self.offset = eps, offset

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...] + self.offset if self.offset else self.scale[...]
        return (y * scale).astype(x.dtype)


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """Gemma 2's soft cap: ``cap * tanh(x / cap)``, smooth and within (-cap, cap)."""
    return x if cap is None else jnp.tanh(x / cap) * cap


#: rope_scaling types the model computes ("rope_type" of a Hugging Face config), with the keys
#: each needs.
ROPE_SCALING = {"llama3": ("factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings"),
                "linear": ("factor",)}


def rope_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None = None
                     ) -> jax.Array:
    """The ``head_dim / 2`` rotary frequencies ``theta^(-2i / head_dim)``, rescaled as
    Hugging Face's ``rope_scaling`` says: "linear" divides all by ``factor``; "llama3" (Llama
    3.1+) divides the low ones by ``factor`` and interpolates the middle band smoothly."""
    half = head_dim // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":
        return freq / scaling["factor"]
    if kind == "llama3":
        factor, old = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * jnp.pi / freq
        scaled = jnp.where(wavelen > old / low, freq / factor, freq)
        smooth = (old / wavelen - low) / (high - low)
        middle = (wavelen >= old / high) & (wavelen <= old / low)
        return jnp.where(middle, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return freq


def rope(x: jax.Array, positions: jax.Array, *, theta: float,
         scaling: dict[str, Any] | None = None) -> jax.Array:
    """Rotary position embedding of ``x [B, T, heads, head_dim]`` at ``positions [B, T]``.

    Pairs dimension i with i + head_dim/2 (Llama's Hugging Face layout), angle
    ``position * rope_frequencies(...)[i]``; in float32, returned in x's dtype.
    """
    half = x.shape[-1] // 2
    freq = rope_frequencies(x.shape[-1], theta, scaling)
    angle = positions.astype(jnp.float32)[..., None, None] * freq  # [B, T, 1, half]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Each token's position within its document: 0 at every change of segment id."""
    idx = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def document_mask(segment_ids: jax.Array, sliding_window: int | None = None) -> jax.Array:
    """``[B, 1, T, T]``: query i may attend key j iff j <= i (and i - j < sliding_window), same
    segment, not padding."""
    return attention.allowed(segment_ids, segment_ids, window=sliding_window)[:, None]


def _linear(i: int, o: int, *, dtype, rngs, bias: bool = False) -> nnx.Linear:
    return nnx.Linear(i, o, use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
                      kernel_init=_init, rngs=rngs)


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary positions."""

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 rope_theta: float, block: int, dtype, rngs: nnx.Rngs, qkv_bias: bool = False,
                 qk_norm: bool = False, norm_eps: float = 1e-5, norm_offset: float = 0.0,
                 rope_scaling: tuple | None = None, sliding_window: int | None = None,
                 query_scale: float | None = None, softcap: float | None = None):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_theta, self.block, self.sliding_window = rope_theta, block, sliding_window
        self.softcap = softcap
        # Gemma's query_pre_attn_scalar stands for the head width in the score scale.
        self.scale = None if query_scale is None else query_scale ** -0.5
        # A tuple of items: a static attribute (a dict would become an NNX graph node).
        self.rope_scaling = rope_scaling
        self.q = _linear(d_model, num_heads * head_dim, dtype=dtype, rngs=rngs, bias=qkv_bias)
        self.k = _linear(d_model, num_kv_heads * head_dim, dtype=dtype, rngs=rngs, bias=qkv_bias)
        self.v = _linear(d_model, num_kv_heads * head_dim, dtype=dtype, rngs=rngs, bias=qkv_bias)
        self.o = _linear(num_heads * head_dim, d_model, dtype=dtype, rngs=rngs)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=norm_eps, offset=norm_offset)
            self.k_norm = RMSNorm(head_dim, eps=norm_eps, offset=norm_offset)
        self.qk_norm = qk_norm

    def _qkv(self, x, positions):
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        scaling = dict(self.rope_scaling) if self.rope_scaling else None
        return (rope(q, positions, theta=self.rope_theta, scaling=scaling),
                rope(k, positions, theta=self.rope_theta, scaling=scaling), v)

    def __call__(self, x, positions, segments) -> tuple[jax.Array, jax.Array]:
        q, k, v = self._qkv(x, positions)
        out, probs = attention.attend(q, k, v, segments, block=self.block,
                                      window=self.sliding_window, scale=self.scale,
                                      softcap=self.softcap)
        b, t = x.shape[:2]
        return self.o(out.reshape(b, t, -1)), probs

    def decode(self, x, positions, cache: dict, index, key_valid):
        """Attend from x's tokens, at cache slots index.., to every valid cached slot before."""
        q, k, v = self._qkv(x, positions)
        k_cache = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype),
                                                      index, axis=1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype),
                                                      index, axis=1)
        b, t, s = x.shape[0], x.shape[1], k_cache.shape[1]
        slot, key = (index + jnp.arange(t))[:, None], jnp.arange(s)[None, :]
        causal = (key <= slot) & ((slot - key < self.sliding_window)
                                  if self.sliding_window is not None else True)
        out, _ = attention.explicit(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype),
                                    causal[None] & key_valid[:, None, :], scale=self.scale,
                                    softcap=self.softcap)
        return self.o(out.reshape(b, t, -1)), {"k": k_cache, "v": v_cache}


#: The gated feed-forward's activations: SwiGLU's, and GeGLU's (Gemma: tanh-approximated GELU).
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


class SwiGLU(nnx.Module):
    def __init__(self, d_model: int, d_ff: int, *, dtype, rngs: nnx.Rngs,
                 activation: str = "silu"):
        self.gate = _linear(d_model, d_ff, dtype=dtype, rngs=rngs)
        self.up = _linear(d_model, d_ff, dtype=dtype, rngs=rngs)
        self.down = _linear(d_ff, d_model, dtype=dtype, rngs=rngs)
        self.activation = activation

    def __call__(self, x):
        return self.down(ACTIVATIONS[self.activation](self.gate(x)) * self.up(x))


class Block(nnx.Module):
    """Pre-norm attention and feed-forward; ``sandwich_norms`` (Gemma 2/3) also normalises
    each sub-layer's output, and names the feed-forward's input norm ``pre_mlp_norm``."""

    def __init__(self, d_model, num_heads, num_kv_heads, head_dim, d_ff, *, rope_theta, norm_eps,
                 attention_block, dtype, rngs, norm_offset=0.0, activation="silu",
                 sandwich_norms=False, **attention):
        def norm():
            return RMSNorm(d_model, eps=norm_eps, offset=norm_offset)

        self.attention_norm = norm()
        self.attention = Attention(d_model, num_heads, num_kv_heads, head_dim,
                                   rope_theta=rope_theta, block=attention_block,
                                   norm_eps=norm_eps, dtype=dtype, rngs=rngs,
                                   norm_offset=norm_offset, **attention)
        if sandwich_norms:
            self.post_attention_norm, self.pre_mlp_norm, self.post_mlp_norm = (
                norm(), norm(), norm())
        else:
            self.mlp_norm = norm()
        self.sandwich_norms = sandwich_norms
        self.mlp = SwiGLU(d_model, d_ff, dtype=dtype, rngs=rngs, activation=activation)

    def _residuals(self, x, a):
        if self.sandwich_norms:
            x = x + self.post_attention_norm(a)
            return x + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x)))
        x = x + a
        return x + self.mlp(self.mlp_norm(x))

    def __call__(self, x, positions, segments):
        a, probs = self.attention(self.attention_norm(x), positions, segments)
        return self._residuals(x, a), probs

    def decode(self, x, positions, cache, index, key_valid):
        a, cache = self.attention.decode(self.attention_norm(x), positions, cache, index,
                                         key_valid)
        return self._residuals(x, a), cache


#: model.kwargs "remat" -> the jax.checkpoint policy of each block (None: save nothing).
REMAT = {"none": None, "full": None, "dots_saveable": jax.checkpoint_policies.dots_saveable}


def _block_call(remat: str) -> Callable[..., Any]:
    """A block's forward, rematerialised as `remat` says (Transformer's docstring)."""
    def call(block, x, positions, segments):
        return block(x, positions, segments)

    if remat == "none":
        return call
    return nnx.remat(call, policy=REMAT[remat])


def _scan_blocks(f: Callable[..., Any], x: jax.Array, layers: Block, *xs: Any) -> Any:
    """`lax.scan` of ``f(x, block_i, *xs_i) -> (x, y_i)`` over a stacked Block's layers.

    The stacked variables are split off and each step merges its slice into a Block of its own
    trace: unlike `nnx.scan`, this also runs where the model is closed over by an outer JAX
    transform (the sampler's `lax.scan` over decoding steps). Blocks hold no state a forward
    updates, so nothing is written back."""
    graphdef, state = nnx.split(layers)

    def step(x, sliced):
        block_state, *rest = sliced
        return f(x, nnx.merge(graphdef, block_state), *rest)

    return jax.lax.scan(step, x, (state, *xs))


class Transformer(nnx.Module):
    """A Llama-style decoder-only language model.

    Args:
      vocab_size: tokens in the vocabulary (the tokenizer's; a ModelSpec's num_classes).
      d_model: width of the residual stream.
      num_layers: transformer blocks.
      num_heads: query heads; ``d_model`` must be divisible by it unless ``head_dim`` is given.
      num_kv_heads: key/value heads (grouped-query attention), dividing ``num_heads``; default
        ``num_heads`` (multi-head attention).
      d_ff: SwiGLU hidden width; default ``8/3 * d_model`` rounded up to a multiple of 32.
      head_dim: default ``d_model // num_heads``.
      tie_embeddings: the output projection is the input embedding's transpose.
      rope_theta, norm_eps: RoPE base and RMSNorm epsilon.
      attention_block: rows longer than this attend blockwise, this many key slots at a time,
        never materialising the [T, T] scores (kdjax.lm.attention); 0 = always whole.
      remat: what each block keeps for the backward pass (jax.checkpoint): "none" (everything),
        "full" (only its input: recomputed, the least memory) or "dots_saveable" (its matrix
        products' outputs, recomputing the cheap elementwise work).
      qkv_bias: biases on the query, key and value projections (Qwen2).
      qk_norm: an RMSNorm over each query and key head before the rotation (Qwen3).
      rope_scaling: rescaled rotary frequencies, a Hugging Face ``rope_scaling`` dict whose
        ``rope_type`` is one of ROPE_SCALING's (Llama 3's "llama3").
      sliding_window: a position attends to the last ``sliding_window`` positions only (Mistral).
      sliding_layers: the blocks that use ``sliding_window`` (Gemma's alternate); default all.
      local_rope_theta: the unscaled rotary base of the sliding blocks (Gemma 3's); default
        ``rope_theta`` and ``rope_scaling`` as the others.
      norm_offset: RMSNorms multiply by ``offset + scale`` (Gemma: 1).
      embed_scale: the embeddings are multiplied by sqrt(d_model) (Gemma).
      activation: the feed-forward's gate, a key of ACTIVATIONS ("gelu_tanh": Gemma's GeGLU).
      sandwich_norms: RMSNorms after attention and the feed-forward too (Gemma 2/3).
      query_scale: attention scores are scaled by ``query_scale ** -0.5`` instead of
        ``head_dim ** -0.5`` (Gemma's query_pre_attn_scalar).
      attn_softcap, final_softcap: soft caps of the attention scores and of the logits (Gemma 2).
      scan_layers: the blocks' variables stacked on a leading [num_layers] axis and run by one
        `nnx.scan`, so the program (and its compile time) does not grow with depth; the
        parameter tree differs from the unrolled one (layers.attention.q.kernel
        [num_layers, ...] instead of layers.0.attention.q.kernel).
      dtype: activation dtype; parameters are float32.
    """

    def __init__(self, *, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
                 num_kv_heads: int | None = None, d_ff: int | None = None,
                 head_dim: int | None = None, tie_embeddings: bool = False,
                 rope_theta: float = 10_000.0, norm_eps: float = 1e-5,
                 attention_block: int = 1024, remat: str = "none", scan_layers: bool = False,
                 qkv_bias: bool = False,
                 qk_norm: bool = False, rope_scaling: dict[str, Any] | None = None,
                 sliding_window: int | None = None, sliding_layers: Sequence[int] | None = None,
                 local_rope_theta: float | None = None, norm_offset: float = 0.0,
                 embed_scale: bool = False, activation: str = "silu",
                 sandwich_norms: bool = False, query_scale: float | None = None,
                 attn_softcap: float | None = None, final_softcap: float | None = None,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        if remat not in REMAT:
            raise ValueError(f"remat={remat!r}: expected one of {sorted(REMAT)} (model.kwargs)")
        if attention_block < 0:
            raise ValueError(f"attention_block={attention_block} must be >= 0 (0 = attention "
                             f"scores computed whole)")
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads="
                             f"{num_kv_heads} (each key/value head serves a whole group of "
                             f"query heads)")
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}; "
                                 f"pass head_dim or choose a divisor")
            head_dim = d_model // num_heads
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be even (rotary positions rotate pairs)")
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type")
            missing = [k for k in ROPE_SCALING.get(kind, ()) if k not in rope_scaling]
            if kind not in ROPE_SCALING or missing:
                raise ValueError(f"rope_scaling={rope_scaling} is not implemented: its rope_type "
                                 f"must be one of {sorted(ROPE_SCALING)} with the keys "
                                 f"{ROPE_SCALING.get(kind, ROPE_SCALING)}, or rope_scaling "
                                 f"None for unscaled rotary positions")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window={sliding_window} must be >= 1, or None for "
                             f"attention over the whole document")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of {sorted(ACTIVATIONS)}")
        sliding = set(range(num_layers) if sliding_layers is None else sliding_layers)
        if not sliding <= set(range(num_layers)):
            raise ValueError(f"sliding_layers={list(sliding_layers)} must be block indices in "
                             f"[0, {num_layers})")
        d_ff = d_ff or -(-(8 * d_model // 3) // 32) * 32
        self.vocab_size, self.d_model, self.tie_embeddings = vocab_size, d_model, tie_embeddings
        self.num_layers, self.num_heads, self.num_kv_heads = num_layers, num_heads, num_kv_heads
        self.head_dim, self.dtype, self.remat = head_dim, dtype, remat
        self.embed_scale, self.final_softcap = embed_scale, final_softcap
        self.embed = nnx.Embed(vocab_size, d_model, dtype=dtype, param_dtype=jnp.float32,
                               embedding_init=_init, rngs=rngs)
        scaling = tuple(sorted((rope_scaling or {}).items())) or None

        def block(i: int, rngs: nnx.Rngs) -> Block:
            local = sliding_window is not None and i in sliding
            own_rope = local and local_rope_theta is not None
            return Block(d_model, num_heads, num_kv_heads, head_dim, d_ff,
                         rope_theta=local_rope_theta if own_rope else rope_theta,
                         rope_scaling=None if own_rope else scaling,
                         sliding_window=sliding_window if local else None, norm_eps=norm_eps,
                         attention_block=attention_block, dtype=dtype, rngs=rngs,
                         qkv_bias=qkv_bias, qk_norm=qk_norm, norm_offset=norm_offset,
                         activation=activation, sandwich_norms=sandwich_norms,
                         query_scale=query_scale, softcap=attn_softcap)

        self.scan_layers = scan_layers
        if scan_layers:
            if sliding_window is not None and 0 < len(sliding) < num_layers:
                raise ValueError(f"scan_layers=True runs one block structure for every layer, "
                                 f"but sliding_layers={sorted(sliding)} makes some blocks "
                                 f"local and others global; set scan_layers=False")
            # one Block whose variables have a leading [num_layers] axis
            self.layers = nnx.split_rngs(splits=num_layers)(nnx.vmap(
                lambda r: block(0, r), in_axes=0, out_axes=0))(rngs)
        else:
            self.layers = nnx.List([block(i, rngs) for i in range(num_layers)])
        self.norm = RMSNorm(d_model, eps=norm_eps, offset=norm_offset)
        self.lm_head = None if tie_embeddings else _linear(d_model, vocab_size, dtype=dtype,
                                                           rngs=rngs)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return ("embedding", *(f"layer_{i}" for i in range(self.num_layers)),
                *(f"attention_{i}" for i in range(self.num_layers)), "hidden", "logits")

    def head(self) -> jax.Array:
        """The output projection ``[d_model, vocab_size]`` (float32): logits = hidden @ head."""
        if self.tie_embeddings:
            return self.embed.embedding[...].T
        return self.lm_head.kernel[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 ``[..., vocab]`` from final hidden states, the matmul in the compute dtype."""
        return _softcap(jnp.einsum("...h,hv->...v", hidden, self.head().astype(hidden.dtype),
                                   preferred_element_type=jnp.float32), self.final_softcap)

    def _embed(self, tokens):
        x = self.embed(tokens)
        # Gemma's sqrt(d_model), rounded to the activations' dtype as its reference does
        return x * jnp.asarray(self.d_model ** 0.5, jnp.float32).astype(x.dtype) \
            if self.embed_scale else x

    def _inputs(self, tokens, segment_ids, positions):
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length] token ids, got shape {tokens.shape}")
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        if positions is None:
            positions = positions_from_segments(segment_ids)
        return tokens, segment_ids, positions

    def features(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, train: bool = False,
                 logits: bool = True) -> dict[str, jax.Array]:
        """The named taps (module docstring) for ``tokens [B, T]``; ``logits=False`` leaves the
        ``[B, T, V]`` logits out (a chunked loss projects "hidden" itself)."""
        del train  # no dropout, no batch statistics: train and eval compute the same
        tokens, segment_ids, positions = self._inputs(tokens, segment_ids, positions)
        x = self._embed(tokens)
        out = {"embedding": x}
        call = _block_call(self.remat)
        if self.scan_layers:
            def layer(x, block):
                y, probs = call(block, x, positions, segment_ids)
                return y, (y, probs)

            x, (ys, probs) = _scan_blocks(layer, x, self.layers)
            for i in range(self.num_layers):  # taps a program does not read cost nothing
                out[f"layer_{i}"], out[f"attention_{i}"] = ys[i], probs[i]
        else:
            for i, block in enumerate(self.layers):
                x, probs = call(block, x, positions, segment_ids)
                out[f"layer_{i}"], out[f"attention_{i}"] = x, probs
        out["hidden"] = self.norm(x)
        if logits:
            out["logits"] = self.logits(out["hidden"])
        return out

    def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, train: bool = False) -> jax.Array:
        """float32 next-token logits ``[B, T, vocab]``."""
        return self.features(tokens, segment_ids=segment_ids, positions=positions,
                             train=train)["logits"]

    def init_cache(self, batch: int, length: int, dtype=None) -> Any:
        """An empty KV cache for ``batch`` sequences of up to ``length`` tokens: per layer
        {"k", "v"} ``[B, length, num_kv_heads, head_dim]`` (one stacked dict with scan_layers)."""
        shape = (batch, length, self.num_kv_heads, self.head_dim)
        dtype = dtype or self.dtype
        if self.scan_layers:  # the layers' caches stacked, as their variables are
            return {"k": jnp.zeros((self.num_layers, *shape), dtype),
                    "v": jnp.zeros((self.num_layers, *shape), dtype)}
        return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                for _ in range(self.num_layers)]

    def decode(self, tokens: jax.Array, *, positions: jax.Array, cache: Any, index,
               key_valid: jax.Array) -> tuple[jax.Array, Any]:
        """Run ``tokens [B, t]`` at cache slots ``index .. index + t``: logits and the cache.

        ``key_valid [B, S]`` marks the cache slots that hold real tokens (not left padding);
        ``positions [B, t]`` are the tokens' rotary positions.
        """
        x = self._embed(tokens)
        if self.scan_layers:
            def layer(x, block, c):
                return block.decode(x, positions, c, index, key_valid)

            x, stacked = _scan_blocks(layer, x, self.layers, cache)
            return self.logits(self.norm(x)), stacked
        new = []
        for block, c in zip(self.layers, cache):
            x, c = block.decode(x, positions, c, index, key_valid)
            new.append(c)
        return self.logits(self.norm(x)), new


# -- the registry --------------------------------------------------------------------------------

#: Sizes by name; the vocabulary comes from the data's tokenizer. The llama3_* entries are the
#: shapes of Llama 3.2 1B and 3B (for memory planning and benchmarks, not pretrained weights).
#: The Hugging Face families (FAMILIES) have no sizes: model.kwargs give them (an imported run
#: records them), and the family is the layout `kdjax export --format hf` writes.
LM_MODELS: dict[str, dict[str, Any]] = {
    "lm_tiny": dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64),
    "lm_mini": dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=192),
    "lm_small": dict(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=384),
    "lm_base": dict(d_model=256, num_layers=6, num_heads=8, num_kv_heads=4, d_ff=768),
    "llama3_1b": dict(d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, d_ff=8192,
                      tie_embeddings=True, rope_theta=500_000.0),
    "llama3_3b": dict(d_model=3072, num_layers=28, num_heads=24, num_kv_heads=8, d_ff=8192,
                      tie_embeddings=True, rope_theta=500_000.0),
}
_GEMMA = dict(norm_offset=1.0, embed_scale=True, activation="gelu_tanh", sandwich_norms=True,
              tie_embeddings=True)
FAMILIES: dict[str, dict[str, Any]] = {"llama": {}, "mistral": {}, "qwen2": {"qkv_bias": True},
                                       "qwen3": {"qk_norm": True}, "gemma2": _GEMMA,
                                       "gemma3_text": {**_GEMMA, "qk_norm": True}}
LM_MODELS.update(FAMILIES)


#: A Hugging Face causal LM run through torchax (kdjax.torchbridge.causal_lm): a teacher only.
TORCH_CAUSAL_LM = "kdjax.torchbridge:TorchCausalLM"


def is_lm(name: str) -> bool:
    """Whether model.name names a language model (so the run is an LM run)."""
    return name in LM_MODELS or name == TORCH_CAUSAL_LM


def create_lm(name: str, *, vocab_size: int, rngs: nnx.Rngs, dtype=jnp.float32,
              **kwargs: Any) -> Transformer:
    """The registered size ``name`` with ``vocab_size`` tokens; kwargs override its sizes."""
    if name not in LM_MODELS:
        raise ValueError(f"unknown language model {name!r}; valid: {sorted(LM_MODELS)}")
    valid = set(inspect.signature(Transformer.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise ValueError(f"model {name!r} takes no argument(s) {unknown} (model.kwargs); valid: "
                         f"{sorted(valid - {'vocab_size', 'rngs', 'dtype'})}")
    sizes = {**LM_MODELS[name], **kwargs}
    missing = [k for k in ("d_model", "num_layers", "num_heads") if k not in sizes]
    if missing:
        raise ValueError(f"model {name!r} has no default sizes: give {missing} in model.kwargs "
                         f"(or start from an imported run: init.workdir)")
    return Transformer(vocab_size=vocab_size, rngs=rngs, dtype=dtype, **sizes)


def registry() -> dict[str, Callable[..., Transformer]]:
    """kdjax.models.MODELS's entries for the language models: ``num_classes`` is the vocabulary
    size (an LM classifies each position over its vocabulary), so a ModelSpec of an LM (name,
    num_classes = vocabulary, input_shape = (sequence length,), kwargs) is saved, loaded and
    rebuilt exactly as an image model's."""

    def entry(name: str) -> Callable[..., Transformer]:
        def build(*, num_classes: int, rngs: nnx.Rngs, dtype=jnp.float32, **kwargs: Any):
            return create_lm(name, vocab_size=num_classes, rngs=rngs, dtype=dtype, **kwargs)
        return build

    return {name: entry(name) for name in LM_MODELS}


# -- reshaped copies -------------------------------------------------------------------------------


def rebuilt(model: nnx.Module, spec, take: Callable[[tuple, dict], jax.Array]
             ) -> nnx.Module:
    """`spec`'s model with each variable at path p set to ``take(p, source)``, `source` mapping
    each of `model`'s variable paths to its variable: a reshaped copy of `model` (fewer blocks,
    vocabulary rows or channels)."""
    graphdef, abstract = nnx.split(spec.abstract())
    source = dict(nnx.to_flat_state(nnx.state(model)))
    return nnx.merge(graphdef, nnx.from_flat_state(
        [(path, v.replace(take(path, source))) for path, v in nnx.to_flat_state(abstract)]))


def keep_layers(model: nnx.Module, spec, layers: Sequence[int]):
    """(spec, model) of ``len(layers)`` blocks, block i being `model`'s block ``layers[i]`` and
    every other weight `model`'s: DistilBERT's initialisation of a shallower student
    (init.layers). `spec` is a kdjax.models.ModelSpec of `model`."""
    total = getattr(model, "num_layers", None)
    if not isinstance(model, Transformer):
        raise ValueError(f"init.layers={list(layers)} picks blocks of a language model; "
                         f"init.workdir's {spec.name!r} is not one: leave init.layers empty")
    repeated = sorted({i for i in layers if list(layers).count(i) > 1})
    outside = [i for i in layers if not 0 <= i < total]
    if outside or repeated:
        raise ValueError(f"init.layers={list(layers)} must be distinct block indices in "
                         f"[0, {total}) of init.workdir's model (out of range: {outside}, "
                         f"repeated: {repeated})")
    smaller = dataclasses.replace(spec, kwargs={**spec.kwargs, "num_layers": len(layers)})

    def take(path, source):
        return source[(path[0], layers[path[1]], *path[2:]) if path[0] == "layers" else path][...]

    return smaller, rebuilt(model, smaller, take)


def slice_vocab(model: Transformer, spec, vocab: int):
    """(spec, model) with the first `vocab` rows of the embedding and output projection only:
    the padding rows a checkpoint carries beyond its tokenizer (Qwen2.5's 152,064 vs 151,936)
    dropped, every other weight `model`'s."""
    smaller = dataclasses.replace(spec, num_classes=vocab)

    def take(path, source):
        x = source[path][...]
        return x[:vocab] if path[0] == "embed" else x[:, :vocab] if path[0] == "lm_head" else x

    return smaller, rebuilt(model, smaller, take)
