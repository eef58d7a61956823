"""Token losses (kdjax.losses.token): each against an independent float64 numpy formula, with
masks, beta at both ends, alpha and T; the chunked form against the unchunked one in value and
gradient."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _float32
from kdjax import losses

B, T, V = 2, 5, 11

pytestmark = pytest.mark.usefixtures("quick_compiles")


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_kl(p, q):
    return np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.log(q)), 0), -1)


def np_token(name, s, t, *, temperature=1.0, beta=0.5, alpha=0.1):
    """The reference formulas, in float64."""
    ps, pt = np.exp(_np_log_softmax(s / temperature)), np.exp(_np_log_softmax(t / temperature))
    if name == "forward_kl":
        v = _np_kl(pt, ps)
    elif name == "reverse_kl":
        v = _np_kl(ps, pt)
    elif name == "jsd":
        if beta == 0:
            v = _np_kl(pt, ps)
        elif beta == 1:
            v = _np_kl(ps, pt)
        else:
            m = beta * pt + (1 - beta) * ps
            v = beta * _np_kl(pt, m) + (1 - beta) * _np_kl(ps, m)
    elif name == "skew_kl":
        v = _np_kl(pt, alpha * pt + (1 - alpha) * ps)
    elif name == "skew_reverse_kl":
        v = _np_kl(ps, (1 - alpha) * pt + alpha * ps)
    elif name == "tvd":
        v = 0.5 * np.abs(pt - ps).sum(-1)
    return temperature**2 * v


@pytest.fixture(scope="module")
def logits():
    rng = np.random.default_rng(0)
    s = rng.normal(0, 2, (B, T, V))
    t = rng.normal(0, 2, (B, T, V))
    labels = rng.integers(0, V, (B, T))
    mask = rng.random((B, T)) < 0.7
    mask[0, 0] = True
    return s, t, labels, mask


CASES = [("forward_kl", {}), ("forward_kl", {"temperature": 2.0}),
         ("reverse_kl", {"temperature": 0.5}),
         ("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0}), ("jsd", {"beta": 0.3}),
         ("jsd", {"beta": 0.5, "temperature": 3.0}),
         ("skew_kl", {"alpha": 0.1}), ("skew_kl", {"alpha": 0.0}),
         ("skew_kl", {"alpha": 0.5, "temperature": 2.0}),
         ("skew_reverse_kl", {"alpha": 0.1}), ("skew_reverse_kl", {"alpha": 1.0}),
         ("tvd", {"temperature": 2.0})]


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{kw}" for n, kw in CASES])
def test_token_divergences_match_numpy_with_mask(logits, name, kw):
    s, t, _, mask = logits
    got = np.asarray(losses.TOKEN_DIVERGENCES[name](
        jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), mask=mask, **kw))
    want = np_token(name, s, t, **kw)
    assert got.shape == (B, T) and got.dtype == np.float32
    np.testing.assert_allclose(got[mask], want[mask], rtol=2e-5, atol=1e-6)
    assert (got[~mask] == 0).all()


def test_jsd_ends_are_the_two_kls_as_in_gkd(logits):
    s, t, _, _ = logits
    fwd = losses.token_forward_kl(s, t, temperature=2.0)
    rev = losses.token_reverse_kl(s, t, temperature=2.0)
    np.testing.assert_array_equal(losses.token_generalized_jsd(s, t, beta=0.0, temperature=2.0),
                                  fwd)
    np.testing.assert_array_equal(losses.token_generalized_jsd(s, t, beta=1.0, temperature=2.0),
                                  rev)
    # forward KL(p_t || p_s): its gradient in the student logits is T * (p_s - p_t)
    g = jax.grad(lambda x: losses.token_forward_kl(x, t, temperature=2.0).sum())(
        jnp.asarray(s, jnp.float32))
    ps, pt = np.exp(_np_log_softmax(s / 2)), np.exp(_np_log_softmax(t / 2))
    np.testing.assert_allclose(g, 2.0 * (ps - pt), rtol=1e-4, atol=1e-6)


def test_cross_entropy_matches_numpy_and_ignores_masked_labels(logits):
    s, _, labels, mask = logits
    labels = np.where(mask, labels, -100)  # any label where masked
    got = np.asarray(losses.token_cross_entropy(jnp.asarray(s, jnp.float32), labels, mask=mask))
    want = -np.take_along_axis(_np_log_softmax(s), np.clip(labels, 0, V)[..., None], -1)[..., 0]
    np.testing.assert_allclose(got[mask], want[mask], rtol=1e-5)
    assert (got[~mask] == 0).all()


def test_masked_positions_have_zero_value_and_gradient_even_when_not_finite(logits):
    s, t, _, mask = logits
    s = np.where(mask[..., None], s, np.nan).astype(np.float32)  # garbage under the mask
    for name, kw in CASES:
        fn = functools.partial(losses.TOKEN_DIVERGENCES[name], mask=mask, **kw)
        value, grad = jax.value_and_grad(lambda x: fn(x, t).sum())(jnp.asarray(s))
        assert np.isfinite(value), name
        assert np.isfinite(grad).all() and (np.asarray(grad)[~mask] == 0).all(), name


def test_bad_hyperparameters_and_shapes_are_refused(logits):
    s, t, labels, mask = logits
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got beta=1.5"):
        losses.token_generalized_jsd(s, t, beta=1.5)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        losses.token_skew_kl(s, t, alpha=-0.1)
    with pytest.raises(ValueError, match=r"mask must have the logits' token shape \(2, 5\)"):
        losses.token_tvd(s, t, mask=mask[:, :3])
    with pytest.raises(ValueError, match="unknown token divergence 'kl'"):
        losses.token_divergence("kl")


# -- the chunked form -------------------------------------------------------------------------

H_S, H_T = 6, 9


@pytest.fixture(scope="module")
def hidden():
    rng = np.random.default_rng(1)
    f32 = functools.partial(np.asarray, dtype=np.float32)
    return dict(hs=f32(rng.normal(0, 1, (B, T, H_S))), ws=f32(rng.normal(0, 1, (H_S, V))),
                ht=f32(rng.normal(0, 1, (B, T, H_T))), wt=f32(rng.normal(0, 1, (H_T, V))),
                labels=rng.integers(0, V, (B, T)), mask=rng.random((B, T)) < 0.7)


@pytest.mark.parametrize("name,kw,chunk", [("forward_kl", {"temperature": 2.0}, 2),
                                           ("jsd", {"beta": 0.3}, 3),
                                           ("skew_reverse_kl", {"alpha": 0.1}, 5)])
def test_chunked_equals_unchunked_in_value_and_gradient(hidden, name, kw, chunk):
    h = hidden

    def objective(ws, hs, chunked):
        if chunked:
            out = losses.chunked_token_losses(hs, ws, h["ht"], h["wt"], h["labels"],
                                              mask=h["mask"], divergence=name, chunk_size=chunk,
                                              **kw)
            ce, kd = out["ce"], out["kd"]
        else:
            s, t = hs @ ws, h["ht"] @ h["wt"]
            ce = losses.token_cross_entropy(s, h["labels"], mask=h["mask"])
            kd = losses.TOKEN_DIVERGENCES[name](s, t, mask=h["mask"], **kw)
        # distinct weights so that a mix-up of the terms or of positions shows
        weights = jnp.arange(B * T, dtype=jnp.float32).reshape(B, T)
        return (0.3 * ce * weights + kd * weights[::-1]).sum()

    values = {c: jax.jit(jax.value_and_grad(objective, argnums=(0, 1)),
                         static_argnums=2)(h["ws"], h["hs"], c) for c in (False, True)}
    (v0, (gw0, gh0)), (v1, (gw1, gh1)) = values[False], values[True]
    # two programs: equal up to float32 reassociation (_float32.py) along H_S hidden units, V
    # logits and B*T tokens
    n = H_S + V + B * T
    _float32.assert_close(v1, v0, n=n)
    _float32.assert_close(gw1, gw0, n=n)
    _float32.assert_close(gh1, gh0, n=n)


def test_chunked_metrics_and_cross_entropy_alone(hidden):
    h = hidden
    out = losses.chunked_token_losses(h["hs"], h["ws"], h["ht"], h["wt"], h["labels"],
                                      mask=h["mask"], chunk_size=4)
    s, t = h["hs"] @ h["ws"], h["ht"] @ h["wt"]
    np.testing.assert_array_equal(out["correct"], (s.argmax(-1) == h["labels"]) & h["mask"])
    np.testing.assert_array_equal(out["agreement"], (s.argmax(-1) == t.argmax(-1)) & h["mask"])
    alone = losses.chunked_token_losses(h["hs"], h["ws"], None, None, h["labels"],
                                        mask=h["mask"], chunk_size=4)
    assert set(alone) == {"ce", "correct"}
    _float32.assert_close(alone["ce"], out["ce"], n=H_S + V)  # two programs (_float32.py)


def test_chunked_refuses_different_vocabularies(hidden):
    h = hidden
    with pytest.raises(ValueError, match=r"the student's vocabulary has 11 tokens .* but the "
                                         r"teacher's has 12"):
        losses.chunked_token_losses(h["hs"], h["ws"], h["ht"], np.zeros((H_T, 12), np.float32),
                                    h["labels"])


def test_chunked_backward_never_holds_the_whole_logits():
    """The compiled gradient's temporaries stay far below one [B, T, V] float32 logit array."""
    b, t, hs, ht, v = 2, 256, 32, 48, 4096
    f32 = jnp.float32
    args = (jax.ShapeDtypeStruct((b, t, hs), f32), jax.ShapeDtypeStruct((hs, v), f32),
            jax.ShapeDtypeStruct((b, t, ht), f32), jax.ShapeDtypeStruct((ht, v), f32),
            jax.ShapeDtypeStruct((b, t), jnp.int32))

    def loss(chunk, hs_, ws, ht_, wt, labels):
        out = losses.chunked_token_losses(hs_, ws, ht_, wt, labels, chunk_size=chunk)
        return (out["ce"] + out["kd"]).mean()

    logits_bytes = b * t * v * 4
    temp = {c: jax.jit(jax.grad(functools.partial(loss, c), argnums=(0, 1))).lower(
        *args).compile().memory_analysis().temp_size_in_bytes for c in (16, t)}
    assert temp[16] < 0.5 * logits_bytes < temp[t]


# -- top-k targets and the top-k loss ---------------------------------------------------------

def np_topk_kl(s, t, k, *, tail, temperature=1.0):
    """The k + 1 bucket KL (tail) or the renormalised top-k KL, in float64, from full logits."""
    pt, ps = np.exp(_np_log_softmax(t)), np.exp(_np_log_softmax(s / temperature))
    top = np.argsort(-t, -1)[..., :k]
    p, q = np.take_along_axis(pt, top, -1), np.take_along_axis(ps, top, -1)
    if tail:
        return (_np_kl(np.concatenate([p, 1 - p.sum(-1, keepdims=True)], -1),
                       np.concatenate([q, 1 - q.sum(-1, keepdims=True)], -1)))
    p_hat = np.exp(_np_log_softmax(np.log(p) / temperature))
    return temperature**2 * (p_hat * (np.log(p_hat) - np.log(q))).sum(-1)


def test_topk_targets_are_the_teachers_largest_and_their_tail(logits):
    _, t, _, _ = logits
    lp, ids, log_tail = losses.token_topk_targets(jnp.asarray(t, jnp.float32), 4)
    want = _np_log_softmax(t)
    np.testing.assert_array_equal(ids, np.argsort(-t, -1)[..., :4])
    np.testing.assert_allclose(lp, np.take_along_axis(want, np.asarray(ids), -1), rtol=1e-5)
    rest = np.sort(want, -1)[..., :-4]
    np.testing.assert_allclose(log_tail, np.log(np.exp(rest).sum(-1)), rtol=1e-5)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 11\).*got k=11"):
        losses.token_topk_targets(t, V)


@pytest.mark.parametrize("k,tail,temperature", [(3, True, 1.0), (10, True, 1.0),
                                                (3, False, 1.0), (5, False, 2.0)])
def test_topk_kl_matches_numpy_with_mask(logits, k, tail, temperature):
    s, t, _, mask = logits
    targets = losses.token_topk_targets(jnp.asarray(t, jnp.float32), k)
    got = np.asarray(losses.token_topk_kl(jnp.asarray(s, jnp.float32), *targets, mask=mask,
                                          tail=tail, temperature=temperature))
    want = np_topk_kl(s, t, k, tail=tail, temperature=temperature)
    assert got.shape == (B, T)
    np.testing.assert_allclose(got[mask], want[mask], rtol=2e-5, atol=1e-6)
    assert (got[~mask] == 0).all()
    # the coarsened KL never exceeds the full one, and with a one-token tail equals it
    if tail:
        full = np_token("forward_kl", s, t)
        assert (want <= full + 1e-12).all()
        if k == V - 1:
            np.testing.assert_allclose(want, full, rtol=1e-9)


def test_topk_kl_refuses_a_temperature_with_the_tail(logits):
    s, t, _, _ = logits
    with pytest.raises(ValueError, match=r"tail=True\) is at temperature 1 .* got "
                                         r"temperature=2.0; use temperature=1.0, or tail=False"):
        losses.token_topk_kl(s, *losses.token_topk_targets(t, 3), temperature=2.0)


@pytest.mark.parametrize("cached", [False, True])
def test_chunked_topk_equals_unchunked(hidden, cached):
    """The chunked top-k loss, from the teacher's hidden states (online top-k) or from its
    targets (a cache), against `token_topk_kl` on whole logits, in value and gradient."""
    h = hidden
    t_logits = h["ht"] @ h["wt"]
    targets = losses.token_topk_targets(t_logits, 4)

    def objective(ws, chunked):
        s = h["hs"] @ ws
        if chunked:
            teacher = dict(teacher_topk=targets) if cached else dict(top_k=4)
            out = losses.chunked_token_losses(
                h["hs"], ws, None if cached else h["ht"], None if cached else h["wt"],
                h["labels"], mask=h["mask"], chunk_size=2, **teacher)
            kd, agreement = out["kd"], out["agreement"]
        else:
            kd = losses.token_topk_kl(s, *targets, mask=h["mask"])
            agreement = (s.argmax(-1) == t_logits.argmax(-1)) & h["mask"]
        return (kd * jnp.arange(B * T, dtype=jnp.float32).reshape(B, T)).sum(), agreement

    (v0, a0), g0 = jax.value_and_grad(objective, has_aux=True)(h["ws"], False)
    (v1, a1), g1 = jax.value_and_grad(objective, has_aux=True)(h["ws"], True)
    n = H_S + V + B * T
    _float32.assert_close(v1, v0, n=n)
    _float32.assert_close(g1, g0, n=n)
    np.testing.assert_array_equal(a1, a0)
