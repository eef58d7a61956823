"""kdjax.lm.attention: the explicit form against a numpy formula, the blockwise form against the
explicit one (outputs and gradients, packed documents, padding, grouped heads, a sliding window,
a block that does not divide the row), its program free of any [T, T] array, and the Transformer
with blockwise attention and each rematerialisation policy computing the same logits and
gradients as without them."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _float32
from kdjax.lm import attention
from kdjax.lm.models import Transformer

B, T, H, K, D = 2, 13, 4, 2, 8
SEGMENTS = np.array([[1] * 5 + [2] * 6 + [0] * 2, [1] * 13], np.int32)


def qkv(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(B, T, H, D)).astype(np.float32),
            rng.normal(size=(B, T, K, D)).astype(np.float32),
            rng.normal(size=(B, T, K, D)).astype(np.float32))


def numpy_attention(q, k, v, segments, window=None):
    """Each query's softmax over its allowed keys, one head and one query at a time."""
    out = np.zeros(q.shape, np.float64)
    for b in range(B):
        for i in range(T):
            keys = [j for j in range(T) if j <= i and segments[b, j] == segments[b, i] != 0
                    and (window is None or i - j < window)]
            if not keys:  # a padding query: left at zero, and not compared
                continue
            for h in range(H):
                kv = h // (H // K)
                s = np.array([q[b, i, h] @ k[b, j, kv] for j in keys]) / np.sqrt(D)
                p = np.exp(s - s.max())
                out[b, i, h] = (p / p.sum()) @ v[b, keys, kv]
    return out


REAL = SEGMENTS != 0  # padding queries attend nothing: their outputs differ between the forms


@pytest.mark.parametrize("window", [None, 3])
def test_both_forms_compute_the_formula(window):
    q, k, v = qkv()
    want = numpy_attention(q, k, v, SEGMENTS, window)
    mask = attention.allowed(jnp.asarray(SEGMENTS), jnp.asarray(SEGMENTS), window=window)
    explicit, probs = attention.explicit(q, k, v, mask)
    assert probs.shape == (B, H, T, T)
    blockwise = jax.jit(lambda q, k, v: attention.blockwise(
        q, k, v, SEGMENTS, SEGMENTS, block=4, window=window))(q, k, v)  # 13 = 3 blocks + 1
    # a softmax-weighted mean of at most T values of |v| <= ~4, after D-term dot products
    bound = _float32.atol(D + T, 4 * np.abs(v).max())
    np.testing.assert_allclose(np.asarray(explicit)[REAL], want[REAL], atol=bound)
    np.testing.assert_allclose(np.asarray(blockwise)[REAL], want[REAL], atol=bound)
    assert np.all(np.asarray(blockwise)[~REAL] == 0)


def test_blockwise_gradients_equal_the_explicit_forms():
    q, k, v = qkv(1)
    w = np.random.default_rng(2).normal(size=(B, T, H, D)).astype(np.float32) * REAL[..., None,
                                                                                      None]
    mask = attention.allowed(jnp.asarray(SEGMENTS), jnp.asarray(SEGMENTS))

    def loss_explicit(q, k, v):
        return jnp.sum(attention.explicit(q, k, v, mask)[0] * w)

    def loss_blockwise(q, k, v):
        return jnp.sum(attention.blockwise(q, k, v, SEGMENTS, SEGMENTS, block=4) * w)

    want = jax.grad(loss_explicit, argnums=(0, 1, 2))(q, k, v)
    got = jax.jit(jax.grad(loss_blockwise, argnums=(0, 1, 2)))(q, k, v)
    for g, e in zip(got, want):
        _float32.assert_close(g, e, n=D + T + B * T, magnitude=np.abs(e).max())


def test_the_blockwise_program_has_no_t_by_t_array():
    t, block = 64, 16
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, t, H, D)), jnp.float32)
    kv = jnp.asarray(rng.normal(size=(1, t, K, D)), jnp.float32)
    seg = jnp.ones((1, t), jnp.int32)

    def loss(q, k, v):
        return attention.blockwise(q, k, v, seg, seg, block=block).sum()

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).as_text()
    assert not re.search(rf"\b{t}x{t}x", hlo)  # no [.., T, T, ..] tensor, forward or backward
    assert re.search(rf"\b{t}x{block}x", hlo)  # [T, block] score blocks instead
    explicit = jax.jit(jax.grad(lambda q, k, v: attention.explicit(
        q, k, v, attention.allowed(seg, seg))[0].sum(), argnums=(0, 1, 2))).lower(
        q, kv, kv).as_text()
    assert re.search(rf"\b{t}x{t}x", explicit)  # the check sees one where there is one


@pytest.mark.parametrize("remat", ["none", "full", "dots_saveable"])
def test_a_transformer_with_blockwise_attention_and_remat_computes_the_same(remat):
    tokens = np.random.default_rng(3).integers(0, 50, (B, T)).astype(np.int32)

    def model(**kw):
        return Transformer(vocab_size=50, d_model=16, num_layers=2, num_heads=H, num_kv_heads=K,
                           d_ff=32, rngs=nnx.Rngs(0), **kw)

    def loss_and_grad(m):
        graphdef, params, rest = nnx.split(m, nnx.Param, ...)

        def loss(p):
            logits = nnx.merge(graphdef, p, rest)(tokens, segment_ids=SEGMENTS)
            return jnp.sum(jnp.where(REAL[..., None], jax.nn.log_softmax(logits), 0.0)), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, want), want_grads = loss_and_grad(model(attention_block=0))
    (_, got), got_grads = loss_and_grad(model(attention_block=4, remat=remat))
    _float32.assert_close(np.asarray(got)[REAL], np.asarray(want)[REAL], n=2 * (16 + T + 32),
                          magnitude=np.abs(np.asarray(want)[REAL]).max())
    for g, e in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        _float32.assert_close(g, e, n=2 * (16 + T + 32) + B * T * 50,
                              magnitude=np.abs(np.asarray(e)).max())


def test_bad_attention_settings_are_refused():
    with pytest.raises(ValueError, match=r"remat='some': expected one of \['dots_saveable', "
                                         r"'full', 'none'\]"):
        Transformer(vocab_size=8, d_model=8, num_layers=1, num_heads=2, remat="some",
                    rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="attention_block=-1 must be >= 0"):
        Transformer(vocab_size=8, d_model=8, num_layers=1, num_heads=2, attention_block=-1,
                    rngs=nnx.Rngs(0))


def _unrolled_from(scanned: Transformer, **kwargs) -> Transformer:
    """An unrolled Transformer holding a scanned one's weights (layer i = slice i)."""
    unrolled = Transformer(**kwargs, scan_layers=False, rngs=nnx.Rngs(9))
    stacked = nnx.state(scanned.layers)
    for i, block in enumerate(unrolled.layers):
        nnx.update(block, jax.tree.map(lambda x: x[i], stacked))
    for name in ("embed", "norm", "lm_head"):
        nnx.update(getattr(unrolled, name), nnx.state(getattr(scanned, name)))
    return unrolled


def test_scanned_layers_compute_what_unrolled_ones_do_and_decode():
    from kdjax.lm import sampling

    kwargs = dict(vocab_size=50, d_model=16, num_layers=3, num_heads=H, num_kv_heads=K, d_ff=32)
    scanned = Transformer(**kwargs, scan_layers=True, remat="full", rngs=nnx.Rngs(0))
    assert nnx.state(scanned.layers)["attention"]["q"]["kernel"][...].shape == (3, 16, 16)
    unrolled = _unrolled_from(scanned, **kwargs)
    tokens = np.random.default_rng(4).integers(0, 50, (B, T)).astype(np.int32)
    got = scanned.features(tokens, segment_ids=SEGMENTS)
    want = unrolled.features(tokens, segment_ids=SEGMENTS)
    for key in ("layer_2", "logits"):
        _float32.assert_close(np.asarray(got[key])[REAL], np.asarray(want[key])[REAL],
                              n=3 * (16 + T + 32), magnitude=np.abs(want[key]).max())
    prompts = [[1, 2, 3], [4, 5]]
    a = sampling.generate(scanned, prompts, max_new_tokens=4)
    b = sampling.generate(unrolled, prompts, max_new_tokens=4)
    np.testing.assert_array_equal(a, b)  # greedy: the same tokens from the same logits
    assert np.asarray(a).shape == (2, 4)
