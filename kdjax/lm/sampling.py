"""Text generation with a KV cache: greedy, temperature, top-k and top-p (nucleus) sampling.

One jitted program per (batch, prompt length, new tokens, sampling settings): the prompts are
left-padded to a common length and run through the model at once (prefill), writing every
layer's keys and values into the cache; then a `lax.scan` decodes one token per step, each step
attending to the cache instead of recomputing the sequence. Left padding is masked out of the
attention (`key_valid`) and rotary positions start at each prompt's first real token, so a
padded prompt generates exactly what it generates alone.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax.lm.models import Transformer


class SamplingConfig(NamedTuple):
    """temperature 0 is greedy (argmax); top_k 0 and top_p 1.0 keep the whole vocabulary."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def check(self) -> "SamplingConfig":
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no top-k filter), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filter), got {self.top_p}")
        return self


def sample_token(logits: jax.Array, key: jax.Array, config: SamplingConfig) -> jax.Array:
    """One token id per row of ``logits [B, V]`` (float32), as `config` says.

    top-k keeps the k largest logits; top-p then keeps the smallest set of the most likely tokens
    whose probabilities sum to at least p (the most likely token always stays).
    """
    if config.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / config.temperature
    if config.top_k:
        kth = jax.lax.top_k(logits, min(config.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if config.top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # drop a token when the tokens before it already cover top_p
        drop_sorted = jnp.cumsum(probs, axis=-1) - probs >= config.top_p
        drop = jnp.zeros_like(drop_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, P] left-padded with pad_id, pad lengths [B])."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start prompts with the "
                         "tokenizer's bos token)")
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
    return tokens, np.array([width - len(p) for p in prompts], np.int32)


def decode(model: Transformer, tokens: jax.Array, pad: jax.Array, key: jax.Array, *,
           max_new_tokens: int, config: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """The KV-cached decode loop, traceable inside any jitted function (the fused train step
    samples with the student's current parameters through it).

    `tokens` ``[B, P]`` are prompts left-padded by `pad` ``[B]`` tokens (`left_pad`); step i
    samples with key ``fold_in(key, i)``. Returns the new tokens ``[B, max_new_tokens]`` int32
    and the float32 logits ``[B, max_new_tokens, V]`` each was sampled from.
    """
    b, p = tokens.shape
    slots = jnp.arange(p + max_new_tokens)
    key_valid = slots[None, :] >= pad[:, None]
    positions = jnp.maximum(slots[None, :] - pad[:, None], 0)
    cache = model.init_cache(b, p + max_new_tokens)
    logits, cache = model.decode(tokens, positions=positions[:, :p], cache=cache, index=0,
                                 key_valid=key_valid)

    def step(carry, i):
        last, cache = carry
        token = sample_token(last, jax.random.fold_in(key, i), config)
        index = p + i
        logits, cache = model.decode(
            token[:, None], positions=jax.lax.dynamic_slice_in_dim(positions, index, 1, axis=1),
            cache=cache, index=index, key_valid=key_valid)
        return (logits[:, 0], cache), (token, last)

    _, (new, step_logits) = jax.lax.scan(step, (logits[:, -1], cache),
                                         jnp.arange(max_new_tokens))
    return new.T, jnp.moveaxis(step_logits, 0, 1)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "config"))
def _generate(graphdef, state, tokens, pad, key, *, max_new_tokens: int, config: SamplingConfig):
    return decode(nnx.merge(graphdef, state), tokens, pad, key, max_new_tokens=max_new_tokens,
                  config=config)


def generate(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             return_logits: bool = False):
    """Continue each prompt (token ids) by ``max_new_tokens`` tokens.

    Step i samples with key ``fold_in(PRNGKey(seed), i)``, so a run is reproducible.

    Returns:
      ``[B, max_new_tokens]`` int32 numpy array of new tokens; with ``return_logits`` also the
      float32 ``[B, max_new_tokens, V]`` logits each token was sampled from.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    config = SamplingConfig(float(temperature), int(top_k), float(top_p)).check()
    tokens, pad = left_pad(prompts)
    graphdef, state = nnx.split(model)
    new, logits = _generate(graphdef, state, tokens, pad, jax.random.key(seed),
                            max_new_tokens=max_new_tokens, config=config)
    new = np.asarray(new)
    return (new, np.asarray(logits)) if return_logits else new
