"""KV-cached generation (kdjax.lm.sampling) against full recomputation, and the samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax.lm import models as lm_models, sampling

pytestmark = pytest.mark.usefixtures("quick_compiles")
V = 64
PROMPTS = [[1, 5, 9, 2, 7], [1, 3], [1, 8, 8, 4]]


@pytest.fixture(scope="module")
def model():
    # larger weights than the init's, so that the logits are far from uniform
    m = lm_models.create_lm("lm_tiny", vocab_size=V, rngs=nnx.Rngs(1))
    state = nnx.state(m, nnx.Param)
    nnx.update(m, jax.tree.map(lambda x: x * 8, state))
    return m


def _full_recompute(model, config, *, new_tokens, seed=0):
    """The reference: at every step, run the whole left-padded sequence again (in a buffer of
    the final width: a causal model's logits at a position ignore what lies to its right)."""
    prompt, pad = sampling.left_pad(PROMPTS)
    p, width = prompt.shape[1], prompt.shape[1] + new_tokens
    tokens = np.zeros((len(PROMPTS), width), np.int32)
    tokens[:, :p] = prompt
    seg = (np.arange(width)[None] >= pad[:, None]).astype(np.int32)
    positions = np.maximum(np.arange(width)[None] - pad[:, None], 0)
    forward = jax.jit(lambda t: model(t, segment_ids=seg, positions=positions))
    key = jax.random.key(seed)
    out, all_logits = [], []
    for i in range(new_tokens):
        logits = forward(tokens)[:, p + i - 1]
        token = np.asarray(sampling.sample_token(logits, jax.random.fold_in(key, i), config))
        out.append(token)
        all_logits.append(np.asarray(logits))
        tokens[:, p + i] = token
    return np.stack(out, 1), np.stack(all_logits, 1)


@pytest.mark.parametrize("config", [sampling.SamplingConfig(),
                                    sampling.SamplingConfig(1.0, top_k=10, top_p=0.9)],
                         ids=["greedy", "temperature-topk-topp"])
def test_kv_cached_generation_equals_full_recomputation(model, config):
    tokens, logits = sampling.generate(model, PROMPTS, max_new_tokens=6, seed=0,
                                       return_logits=True, **config._asdict())
    want_tokens, want_logits = _full_recompute(model, config, new_tokens=6)
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-4)


def test_a_padded_prompt_generates_what_it_generates_alone(model):
    together = sampling.generate(model, PROMPTS, max_new_tokens=5)
    alone = sampling.generate(model, PROMPTS[1:2], max_new_tokens=5)
    np.testing.assert_array_equal(together[1], alone[0])


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    keys = jax.random.key(0)

    def support(**kw):
        drawn = sampling.sample_token(logits, keys, sampling.SamplingConfig(1.0, **kw))
        return set(np.asarray(drawn).tolist())

    assert support() == {0, 1, 2, 3}
    assert support(top_k=2) == {0, 1}
    assert support(top_p=0.7) == {0, 1}
    assert support(top_p=0.85) == {0, 1, 2}
    assert support(top_p=0.01) == {0}
    np.testing.assert_array_equal(
        sampling.sample_token(logits[:1], keys, sampling.SamplingConfig()), [0])


def test_bad_sampling_settings_are_refused(model):
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        sampling.generate(model, PROMPTS, max_new_tokens=2, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        sampling.generate(model, [[1], []], max_new_tokens=2)
