"""Tests for kdjax.losses against independent float64 NumPy implementations.

XLA compilation dominates the run time on CPU, so each group of checks evaluates
all of its losses in one jitted function (a module-scoped fixture) and the
parametrized tests then compare individual entries.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _float32 as f32
from kdjax import losses as L

pytestmark = pytest.mark.usefixtures("quick_compiles")  # what is computed, not its speed


def rand(shape, seed, scale=1.5):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def labels_for(shape, seed, num_classes):
    return np.random.default_rng(seed).integers(0, num_classes, size=shape)


def batched(cases):
    """One jitted function evaluating every ``name -> fn(*args)`` entry of ``cases``."""
    return jax.jit(lambda *args: {name: fn(*args) for name, fn in cases.items()})


def assert_close(actual, expected, rtol=1e-5, atol=1e-6):
    actual = np.asarray(actual)
    assert actual.dtype == np.float32
    assert actual.shape == np.shape(expected)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------
# Independent NumPy references (float64, written from the published formulas).
# ----------------------------------------------------------------------------------


def np_softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_kl(p, q):
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    out = np.zeros(p.shape[:-1])
    for idx in np.ndindex(*p.shape[:-1]):
        pairs = zip(p[idx], q[idx], strict=True)
        out[idx] = sum(pi * math.log(pi / qi) for pi, qi in pairs if pi > 0)
    return out


def np_soft_target_kl(s, t, temperature):
    return temperature**2 * np_kl(np_softmax(t / temperature), np_softmax(s / temperature))


def np_reverse_kl(s, t, temperature):
    return temperature**2 * np_kl(np_softmax(s / temperature), np_softmax(t / temperature))


def np_jsd(s, t, temperature, beta):
    p_s, p_t = np_softmax(s / temperature), np_softmax(t / temperature)
    m = beta * p_t + (1 - beta) * p_s
    return temperature**2 * (beta * np_kl(p_t, m) + (1 - beta) * np_kl(p_s, m))


def np_tvd(s, t, temperature):
    diff = np_softmax(t / temperature) - np_softmax(s / temperature)
    return temperature**2 * 0.5 * np.abs(diff).sum(-1)


def np_lskd(s, t, temperature):
    def zscore(z):
        z = np.asarray(z, np.float64)
        return (z - z.mean(-1, keepdims=True)) / (z.std(-1, ddof=1, keepdims=True) + 1e-7)

    return np_soft_target_kl(zscore(s), zscore(t), temperature)


def np_cross_entropy(z, y, eps=0.0):
    out = np.zeros(y.shape)
    for idx in np.ndindex(*y.shape):
        logp = np.log(np_softmax(z[idx]))
        out[idx] = -((1 - eps) * logp[y[idx]] + eps * logp.mean())
    return out


def np_dkd(s, t, y, alpha, beta, temperature):
    """Row-by-row port of mdistiller's dkd_loss (target logit masked by -1000)."""
    out = np.zeros(y.shape)
    for idx in np.ndindex(*y.shape):
        zs, zt, yi = np.float64(s[idx]), np.float64(t[idx]), y[idx]
        gt = np.eye(len(zs))[yi]
        ps, pt = np_softmax(zs / temperature), np_softmax(zt / temperature)
        bs = np.array([ps[yi], (ps * (1 - gt)).sum()])
        bt = np.array([pt[yi], (pt * (1 - gt)).sum()])
        qs = np_softmax(zs / temperature - 1000.0 * gt)
        qt = np_softmax(zt / temperature - 1000.0 * gt)
        out[idx] = temperature**2 * (alpha * np_kl(bt, bs) + beta * np_kl(qt, qs))
    return out


def np_topk_kl(s, values, indices, temperature, tail=None):
    out = np.zeros(s.shape[:-1])
    for idx in np.ndindex(*s.shape[:-1]):
        ps = np_softmax(s[idx] / temperature)
        listed = list(indices[idx])
        rest = sum(ps[j] for j in range(len(ps)) if j not in listed)
        student = [ps[i] for i in listed] + [rest]
        tail_mass = 0.0 if tail is None else math.exp(tail[idx])
        teacher = list(np_softmax(values[idx] / temperature) * (1 - tail_mass)) + [tail_mass]
        out[idx] = temperature**2 * np_kl(np.array(teacher), np.array(student))
    return out


def np_adaptive_pool(x, oh, ow):
    b, h, w, c = x.shape
    out = np.zeros((b, oh, ow, c))
    for i in range(oh):
        h0, h1 = math.floor(i * h / oh), math.ceil((i + 1) * h / oh)
        for j in range(ow):
            w0, w1 = math.floor(j * w / ow), math.ceil((j + 1) * w / ow)
            out[:, i, j] = np.float64(x[:, h0:h1, w0:w1]).mean(axis=(1, 2))
    return out


def np_pool_common(s, t):
    oh, ow = min(s.shape[1], t.shape[1]), min(s.shape[2], t.shape[2])
    return np_adaptive_pool(s, oh, ow), np_adaptive_pool(t, oh, ow)


def np_attention_transfer(s, t, p):
    s, t = np_pool_common(s, t)

    def amap(f):
        a = (np.abs(f) ** p).mean(-1).reshape(f.shape[0], -1)
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    return ((amap(s) - amap(t)) ** 2).mean(1)


def np_similarity_preserving(s, t):
    def gram(f):
        f = np.float64(f).reshape(f.shape[0], -1)
        g = f @ f.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    return ((gram(s) - gram(t)) ** 2).sum() / s.shape[0] ** 2


def np_rkd(s, t, wd, wa):
    def huber(x):
        return np.where(np.abs(x) < 1, 0.5 * x**2, np.abs(x) - 0.5)

    def dist(e):
        n = len(e)
        d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(n)] for i in range(n)])
        return d / d[d > 0].mean()

    def unit(v):
        return v / max(np.linalg.norm(v), 1e-12)

    def angles(e):
        n = len(e)
        out = np.zeros((n, n, n))
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    out[i, j, k] = unit(e[j] - e[i]) @ unit(e[k] - e[i])
        return out

    s, t = np.float64(s), np.float64(t)
    return wd * huber(dist(s) - dist(t)).mean() + wa * huber(angles(s) - angles(t)).mean()


def np_pkt(s, t, eps=1e-7):
    def conditional(x):
        x = np.float64(x)
        x = x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)
        sim = (x @ x.T + 1) / 2
        return sim / sim.sum(1, keepdims=True)

    ps, pt = conditional(s), conditional(t)
    return (pt * np.log((pt + eps) / (ps + eps))).mean()


def np_nst(s, t):
    s, t = np_pool_common(s, t)

    def rows(f):
        r = f.reshape(-1, f.shape[-1]).T
        return r / np.linalg.norm(r, axis=1, keepdims=True)

    def k(x, y):
        return np.mean([(xi @ yj) ** 2 for xi in x for yj in y])

    out = []
    for fs, ft in zip(s, t, strict=True):
        rs, rt = rows(fs), rows(ft)
        out.append(k(rt, rt) + k(rs, rs) - 2 * k(rs, rt))
    return np.array(out)


def np_cc(s, t):
    s, t = np.float64(s), np.float64(t)
    return ((s @ s.T - t @ t.T) ** 2).sum() / s.shape[0] ** 2


def np_vid(mu, t, log_scale, eps=1e-5):
    var = np.log1p(np.exp(np.float64(log_scale))) + eps
    nll = 0.5 * ((np.float64(t) - mu) ** 2 / var + np.log(var))
    return nll.reshape(nll.shape[0], -1).mean(1)


# ----------------------------------------------------------------------------------
# Logit losses against NumPy, on inputs with leading axes [2, 3] and 7 classes.
# ----------------------------------------------------------------------------------

LEAD, NC = (2, 3), 7
LS, LT = rand(LEAD + (NC,), 0), rand(LEAD + (NC,), 1)
LY = labels_for(LEAD, 2, NC)
TOPK_IDX = np.argsort(-LT, axis=-1)[..., :3]
TOPK_VAL = np.take_along_axis(LT, TOPK_IDX, axis=-1)
TAIL = np.log(np.random.default_rng(3).uniform(1e-3, 0.5, LEAD)).astype(np.float32)
# The zero-weight teacher masks classes: it must be dropped, not multiplied by 0.
TEACHERS = [LS, np.where(np.arange(NC) % 3 == 0, -np.inf, LT), rand(LEAD + (NC,), 4)]
WEIGHTS = [1.0, 0.0, 3.0]


def np_mixture(temperature):
    pairs = zip(WEIGHTS, TEACHERS, strict=True)
    return sum(w / sum(WEIGHTS) * np_softmax(z / temperature) for w, z in pairs)


LOGIT_CASES = {
    "soft_target_kl T=1": (
        lambda s, t, y: L.soft_target_kl(s, t),
        lambda: np_soft_target_kl(LS, LT, 1.0),
    ),
    "soft_target_kl T=2.5": (
        lambda s, t, y: L.soft_target_kl(s, t, temperature=2.5),
        lambda: np_soft_target_kl(LS, LT, 2.5),
    ),
    "reverse_kl": (
        lambda s, t, y: L.reverse_kl(s, t, temperature=2.5),
        lambda: np_reverse_kl(LS, LT, 2.5),
    ),
    "generalized_jsd": (
        lambda s, t, y: L.generalized_jsd(s, t, beta=0.3, temperature=2.5),
        lambda: np_jsd(LS, LT, 2.5, 0.3),
    ),
    "tvd": (lambda s, t, y: L.tvd(s, t, temperature=2.5), lambda: np_tvd(LS, LT, 2.5)),
    "logit_standardized_kd": (
        lambda s, t, y: L.logit_standardized_kd(s, t),
        lambda: np_lskd(LS, LT, 2.0),
    ),
    "cross_entropy": (lambda s, t, y: L.cross_entropy(s, y), lambda: np_cross_entropy(LS, LY)),
    "cross_entropy smoothed": (
        lambda s, t, y: L.cross_entropy(s, y, label_smoothing=0.2),
        lambda: np_cross_entropy(LS, LY, 0.2),
    ),
    "hinton_kd": (
        lambda s, t, y: L.hinton_kd(s, t, y, temperature=3.0, alpha=0.7),
        lambda: 0.7 * np_soft_target_kl(LS, LT, 3.0) + 0.3 * np_cross_entropy(LS, LY),
    ),
    "dkd defaults": (lambda s, t, y: L.dkd(s, t, y), lambda: np_dkd(LS, LT, LY, 1.0, 8.0, 4.0)),
    "dkd custom": (
        lambda s, t, y: L.dkd(s, t, y, alpha=0.5, beta=2.0, temperature=1.0),
        lambda: np_dkd(LS, LT, LY, 0.5, 2.0, 1.0),
    ),
    "topk no tail": (
        lambda s, t, y: L.topk_soft_target_kl(s, TOPK_VAL, TOPK_IDX, temperature=2.0),
        lambda: np_topk_kl(LS, TOPK_VAL, TOPK_IDX, 2.0),
    ),
    "topk with tail": (
        lambda s, t, y: L.topk_soft_target_kl(
            s, TOPK_VAL, TOPK_IDX, temperature=2.0, teacher_tail_logprob=TAIL
        ),
        lambda: np_topk_kl(LS, TOPK_VAL, TOPK_IDX, 2.0, TAIL),
    ),
    "ensemble probs": (
        lambda s, t, y: L.ensemble_teacher(TEACHERS, weights=WEIGHTS, temperature=2.0),
        lambda: 2.0 * np.log(np_mixture(2.0)),
    ),
    "ensemble logits": (
        lambda s, t, y: L.ensemble_teacher(TEACHERS, weights=WEIGHTS, mode="logits"),
        lambda: sum(w / 4 * np.float64(z) for w, z in zip(WEIGHTS, TEACHERS, strict=True) if w),
    ),
    "ensemble uniform": (
        lambda s, t, y: L.ensemble_teacher(TEACHERS),
        lambda: np.log(sum(np_softmax(z) for z in TEACHERS) / 3),
    ),
}


@pytest.fixture(scope="module")
def logit_values():
    return batched({name: fn for name, (fn, _) in LOGIT_CASES.items()})(LS, LT, LY)


@pytest.mark.parametrize("name", list(LOGIT_CASES))
def test_logit_losses_match_numpy(logit_values, name):
    assert_close(logit_values[name], LOGIT_CASES[name][1]())


def test_ensemble_probs_is_weighted_mean_of_teacher_distributions(logit_values):
    mean_probs = np_mixture(2.0)
    result = logit_values["ensemble probs"]
    np.testing.assert_allclose(np_softmax(result / 2.0), mean_probs, rtol=1e-5)


# ----------------------------------------------------------------------------------
# Logit losses: closed forms and identities.
# ----------------------------------------------------------------------------------

S, T_ = rand((4, 6), 10), rand((4, 6), 11)
Y = np.array([0, 2, 3, 5])
SHIFTED_S, SHIFTED_T = 3.0 * S - 2.0, 0.5 * T_ + 7.0
PERM = np.stack([np.random.default_rng(i).permutation(6) for i in range(4)])
TWO_CLASS_S, TWO_CLASS_T = np.log([[0.5, 0.5]]), np.log([[0.75, 0.25]])

IDENTITY_CASES = {
    "hinton alpha=1": lambda: L.hinton_kd(S, T_, Y, alpha=1.0, temperature=3.0),
    "soft_target_kl T=3": lambda: L.soft_target_kl(S, T_, temperature=3.0),
    "hinton alpha=0": lambda: L.hinton_kd(S, T_, Y, alpha=0.0),
    "cross_entropy": lambda: L.cross_entropy(S, Y),
    "jsd(s,t) 0.5": lambda: L.generalized_jsd(S, T_),
    "jsd(t,s) 0.5": lambda: L.generalized_jsd(T_, S),
    "jsd(s,t) 0.2": lambda: L.generalized_jsd(S, T_, beta=0.2),
    "jsd(t,s) 0.8": lambda: L.generalized_jsd(T_, S, beta=0.8),
    "jsd(t,s) 0.2": lambda: L.generalized_jsd(T_, S, beta=0.2),
    "lskd": lambda: L.logit_standardized_kd(S, T_),
    "lskd moved": lambda: L.logit_standardized_kd(SHIFTED_S, SHIFTED_T),
    "kl moved": lambda: L.soft_target_kl(SHIFTED_S, T_, temperature=2.0),
    "kl": lambda: L.soft_target_kl(S, T_, temperature=2.0),
    "topk all classes": lambda: L.topk_soft_target_kl(
        S, np.take_along_axis(T_, PERM, -1), PERM, temperature=3.0
    ),
    # softmax((T log p) / T) = p, so each divergence is T^2 times its T = 1 value.
    **{
        f"two-class {fn.__name__} T={temp}": functools.partial(
            lambda fn, temp: fn(temp * TWO_CLASS_S, temp * TWO_CLASS_T, temperature=temp), fn, temp
        )
        for fn in (L.soft_target_kl, L.reverse_kl, L.tvd, L.generalized_jsd)
        for temp in (1.0, 2.0)
    },
}


@pytest.fixture(scope="module")
def identity_values():
    return batched(IDENTITY_CASES)()


TWO_CLASS_BY_HAND = {
    # p_t = [0.75, 0.25], p_s = [0.5, 0.5], m = [0.625, 0.375].
    "soft_target_kl": 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5),
    "reverse_kl": 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25),
    "tvd": 0.25,
    "generalized_jsd": 0.5 * (0.75 * math.log(0.75 / 0.625) + 0.25 * math.log(0.25 / 0.375))
    + 0.5 * (0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375)),
}


@pytest.mark.parametrize("name", list(TWO_CLASS_BY_HAND))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_two_class_closed_forms(identity_values, name, temperature):
    out = identity_values[f"two-class {name} T={temperature}"]
    np.testing.assert_allclose(out, [temperature**2 * TWO_CLASS_BY_HAND[name]], rtol=1e-5)


def test_two_class_kl_known_number(identity_values):
    out = identity_values["two-class soft_target_kl T=1.0"]
    np.testing.assert_allclose(out, [0.1308120], rtol=1e-5)


def test_hinton_kd_alpha_extremes(identity_values):
    v = identity_values
    # two formulas: float32 reassociation (_float32.py) over the 6 classes
    f32.assert_close(v["hinton alpha=1"], v["soft_target_kl T=3"], n=6)
    f32.assert_close(v["hinton alpha=0"], v["cross_entropy"], n=6)


def test_generalized_jsd_swap_symmetry(identity_values):
    v = identity_values
    np.testing.assert_allclose(v["jsd(s,t) 0.5"], v["jsd(t,s) 0.5"], rtol=1e-5, atol=1e-7)
    # In general swapping the arguments maps beta to 1 - beta (the same mixture).
    np.testing.assert_allclose(v["jsd(s,t) 0.2"], v["jsd(t,s) 0.8"], rtol=1e-5, atol=1e-7)
    assert not np.allclose(v["jsd(s,t) 0.2"], v["jsd(t,s) 0.2"], rtol=1e-3)


def test_logit_standardized_kd_scale_shift_invariance(identity_values):
    v = identity_values
    np.testing.assert_allclose(v["lskd moved"], v["lskd"], rtol=1e-4, atol=1e-6)
    assert not np.allclose(v["kl moved"], v["kl"], rtol=1e-2)


def test_topk_with_all_classes_equals_soft_target_kl(identity_values):
    v = identity_values
    f32.assert_close(v["topk all classes"], v["soft_target_kl T=3"], n=6)  # over 6 classes


GRAD_CASES = {
    "kl T=1": lambda s, t: L.soft_target_kl(s, t),
    "kl T=3": lambda s, t: L.soft_target_kl(s, t, temperature=3.0),
    "topk all classes": lambda s, t: L.topk_soft_target_kl(
        s, jnp.take_along_axis(t, PERM, -1), PERM, temperature=3.0
    ),
    "lskd constant student": lambda s, t: L.logit_standardized_kd(jnp.zeros_like(s) + s[:, :1], t),
}


@pytest.fixture(scope="module")
def student_grads():
    cases = {
        name: jax.grad(lambda s, t, fn=fn: jnp.sum(fn(s, t))) for name, fn in GRAD_CASES.items()
    }
    return batched(cases)(S, T_)


@pytest.mark.parametrize("temperature", [1, 3])
def test_soft_target_kl_gradient_identity(student_grads, temperature):
    expected = temperature * (np_softmax(S / temperature) - np_softmax(T_ / temperature))
    # float64 NumPy vs float32 XLA: float32 reassociation (_float32.py) over the 6 classes
    f32.assert_close(student_grads[f"kl T={temperature}"], expected, n=6)


def test_topk_with_all_classes_has_soft_target_kl_gradient(student_grads):
    f32.assert_close(student_grads["topk all classes"], student_grads["kl T=3"], n=6)


def test_logit_standardized_kd_constant_rows_have_finite_grad(student_grads):
    assert np.all(np.isfinite(student_grads["lskd constant student"]))


# ----------------------------------------------------------------------------------
# Identical logits and masked (-inf) logits.
# ----------------------------------------------------------------------------------

DIVERGENCES = {
    "soft_target_kl": lambda s, t, y: L.soft_target_kl(s, t, temperature=2.0),
    "reverse_kl": lambda s, t, y: L.reverse_kl(s, t, temperature=2.0),
    "generalized_jsd": lambda s, t, y: L.generalized_jsd(s, t, beta=0.3, temperature=2.0),
    "tvd": lambda s, t, y: L.tvd(s, t, temperature=2.0),
    "hinton_kd alpha=1": lambda s, t, y: L.hinton_kd(s, t, y, alpha=1.0),
    "dkd": lambda s, t, y: L.dkd(s, t, y),
    "logit_standardized_kd": lambda s, t, y: L.logit_standardized_kd(s, t),
    "topk all classes": lambda s, t, y: L.topk_soft_target_kl(
        s, t, jnp.broadcast_to(jnp.arange(t.shape[-1]), t.shape), temperature=2.0
    ),
}
MASKABLE = {
    **DIVERGENCES,
    "hinton_kd": lambda s, t, y: L.hinton_kd(s, t, y, alpha=0.5),
    "cross_entropy": lambda s, t, y: L.cross_entropy(s, y),
    "ensemble probs": lambda s, t, y: L.ensemble_teacher([s, t]),
    "ensemble logits": lambda s, t, y: L.ensemble_teacher([s, t], mode="logits"),
}

KEEP = np.array([True, False, True, True, False, True])
S_MASKED, T_MASKED = np.where(KEEP, S, -np.inf), np.where(KEEP, T_, -np.inf)
Y_SUB = np.cumsum(KEEP)[Y] - 1  # labels of the sub-problem without masked classes


@pytest.fixture(scope="module")
def identical_values():
    return batched(DIVERGENCES)(S, S, Y)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_identical_logits_give_zero(identical_values, name):
    np.testing.assert_allclose(identical_values[name], np.zeros(4), atol=1e-6)


@pytest.fixture(scope="module")
def masked_results():
    def value_and_grads(fn):
        def total(s, t):
            out = fn(s, t, Y)
            # Sum only the finite entries: masked classes of an ensemble stay -inf.
            return jnp.sum(jnp.where(jnp.isfinite(out), out, 0.0)), out

        def f():
            (_, out), grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(
                S_MASKED, T_MASKED
            )
            return out, grads, fn(S[:, KEEP], T_[:, KEEP], Y_SUB)

        return f

    def topk_with_masked_tail():
        # Only the unmasked classes are listed, so the tail holds just -inf logits.
        listed = np.broadcast_to(np.flatnonzero(KEEP), (4, KEEP.sum()))

        def loss(s):
            return jnp.sum(L.topk_soft_target_kl(s, T_[:, KEEP], listed, temperature=2.0))

        return jax.value_and_grad(loss)(S_MASKED)

    cases = {name: value_and_grads(fn) for name, fn in MASKABLE.items()}
    return batched({**cases, "topk masked tail": topk_with_masked_tail})()


@pytest.mark.parametrize("name", list(MASKABLE))
def test_masked_logits_are_finite_and_match_unmasked_subproblem(masked_results, name):
    masked_values, grads, sub_values = masked_results[name]
    if masked_values.shape == S.shape:  # ensembles return logits; masked classes stay -inf
        np.testing.assert_array_equal(np.isfinite(masked_values), np.broadcast_to(KEEP, S.shape))
        masked_values = masked_values[:, KEEP]
    np.testing.assert_allclose(masked_values, sub_values, rtol=1e-5, atol=1e-6)
    for g in grads:
        assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(g[:, ~KEEP], 0.0)


def test_topk_with_only_masked_classes_in_the_tail(masked_results):
    loss, grad = masked_results["topk masked tail"]
    expected = np_soft_target_kl(S[:, KEEP], T_[:, KEEP], 2.0).sum()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert np.all(np.isfinite(grad))


def test_dkd_with_only_the_target_unmasked_is_finite():
    only_target = np.where(np.eye(6)[Y] > 0, 0.5, -np.inf).astype(np.float32)
    fn = jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(L.dkd(a, b, Y)), argnums=(0, 1)))
    loss, grads = fn(only_target, 2 * only_target)
    assert loss == 0.0
    assert all(np.all(np.isfinite(g)) for g in grads)


# ----------------------------------------------------------------------------------
# Feature and relational losses.
# ----------------------------------------------------------------------------------

F_S, F_T = rand((4, 3, 2, 5), 20), rand((4, 3, 2, 5), 21)
AT_SHAPES = [
    ((3, 4, 4, 5), (3, 4, 4, 2), 2.0),
    ((3, 6, 6, 4), (3, 3, 3, 5), 2.0),
    ((3, 3, 3, 4), (3, 5, 5, 2), 1.0),  # uneven, overlapping bins; teacher pooled
    ((2, 4, 6, 3), (2, 5, 3, 3), 3.0),  # each spatial axis pooled independently
]
AT_INPUTS = [(rand(a, 22 + i), rand(b, 32 + i), p) for i, (a, b, p) in enumerate(AT_SHAPES)]
NST_INPUTS = [
    (rand((3, 4, 4, 3), 40), rand((3, 4, 4, 5), 41)),
    (rand((3, 5, 5, 2), 42), rand((3, 3, 3, 4), 43)),
]
E_S, E_T = rand((5, 4), 44), rand((5, 6), 45)
SP_S, SP_T = rand((5, 2, 2, 3), 46), rand((5, 7), 47)
VID_SCALE = rand((5,), 48)

FEATURE_CASES = {
    "fitnet": (
        lambda: L.fitnet(F_S, F_T),
        lambda: ((np.float64(F_S) - F_T) ** 2).reshape(4, -1).mean(1),
    ),
    **{
        f"attention_transfer {i}": (
            functools.partial(lambda s, t, p: L.attention_transfer(s, t, p=p), s, t, p),
            functools.partial(np_attention_transfer, s, t, p),
        )
        for i, (s, t, p) in enumerate(AT_INPUTS)
    },
    "similarity_preserving": (
        lambda: L.similarity_preserving(SP_S, SP_T),
        lambda: np_similarity_preserving(SP_S, SP_T),
    ),
    "rkd": (lambda: L.rkd(E_S, E_T), lambda: np_rkd(E_S, E_T, 25.0, 50.0)),
    "rkd distance only": (
        lambda: L.rkd(E_S, E_T, distance_weight=1.0, angle_weight=0.0),
        lambda: np_rkd(E_S, E_T, 1.0, 0.0),
    ),
    "pkt": (lambda: L.pkt(E_S, E_T), lambda: np_pkt(E_S, E_T)),
    "pkt eps=0.1": (lambda: L.pkt(E_S, E_T, eps=0.1), lambda: np_pkt(E_S, E_T, 0.1)),
    **{
        f"nst {i}": (functools.partial(L.nst, s, t), functools.partial(np_nst, s, t))
        for i, (s, t) in enumerate(NST_INPUTS)
    },
    "correlation_congruence": (
        lambda: L.correlation_congruence(E_S, E_T),
        lambda: np_cc(E_S, E_T),
    ),
    "vid": (
        lambda: L.vid(F_S, F_T, VID_SCALE),
        lambda: np_vid(F_S, F_T, VID_SCALE),
    ),
}


@pytest.fixture(scope="module")
def feature_values():
    return batched({name: fn for name, (fn, _) in FEATURE_CASES.items()})()


@pytest.mark.parametrize("name", list(FEATURE_CASES))
def test_feature_losses_match_numpy(feature_values, name):
    assert_close(feature_values[name], FEATURE_CASES[name][1](), rtol=1e-5, atol=1e-5)


ZERO_S = np.zeros((3, 2, 2, 4), np.float32)
ZERO_S[0] = 1.0  # zero feature maps, plus coincident embeddings for RKD
ZERO_T = rand((3, 2, 2, 4), 50)
DEGENERATE_CASES = {
    "attention_transfer": lambda s, t: jnp.sum(L.attention_transfer(s, t)),
    "nst": lambda s, t: jnp.sum(L.nst(s, t)),
    "similarity_preserving": L.similarity_preserving,
    "pkt": L.pkt,
    "rkd": L.rkd,
}


@pytest.fixture(scope="module")
def feature_grads():
    def nst_cross_term(t):
        # Independent jnp form of the only teacher-dependent term left undetached.
        def rows(f):
            r = jnp.swapaxes(f.reshape(f.shape[0], -1, f.shape[-1]), 1, 2)
            return r / jnp.linalg.norm(r, axis=-1, keepdims=True)

        k = jnp.einsum("bid,bjd->bij", rows(jnp.asarray(NST_INPUTS[0][0])), rows(t)) ** 2
        return jnp.sum(-2.0 * k.mean(axis=(1, 2)))

    cases = {
        **{
            f"degenerate {name}": functools.partial(jax.value_and_grad(fn), ZERO_S, ZERO_T)
            for name, fn in DEGENERATE_CASES.items()
        },
        "rkd": lambda: jax.grad(L.rkd, argnums=(0, 1))(E_S, E_S + 1.0),
        "nst teacher": lambda: jax.grad(lambda t: jnp.sum(L.nst(NST_INPUTS[0][0], t)))(
            NST_INPUTS[0][1]
        ),
        "nst cross term": lambda: jax.grad(nst_cross_term)(NST_INPUTS[0][1]),
    }
    return batched(cases)()


@pytest.mark.parametrize("name", list(DEGENERATE_CASES))
def test_feature_losses_finite_on_zero_features(feature_grads, name):
    loss, grad = feature_grads[f"degenerate {name}"]
    assert np.isfinite(loss) and np.all(np.isfinite(grad))


def test_rkd_teacher_side_is_stop_gradient(feature_grads):
    g_s, g_t = feature_grads["rkd"]
    assert np.any(np.asarray(g_s) != 0)
    np.testing.assert_array_equal(g_t, 0.0)


def test_nst_teacher_gradient_only_through_cross_term(feature_grads):
    np.testing.assert_allclose(
        feature_grads["nst teacher"], feature_grads["nst cross term"], rtol=1e-4, atol=1e-6
    )


# ----------------------------------------------------------------------------------
# Dtypes: bf16 in, float32 out (checked by tracing only, no compilation needed).
# ----------------------------------------------------------------------------------


def bf16(shape):
    return jax.ShapeDtypeStruct(shape, jnp.bfloat16)


INT4 = jax.ShapeDtypeStruct((4,), jnp.int32)
DTYPE_CASES = {
    "soft_target_kl": (L.soft_target_kl, bf16((4, 6)), bf16((4, 6))),
    "reverse_kl": (L.reverse_kl, bf16((4, 6)), bf16((4, 6))),
    "generalized_jsd": (L.generalized_jsd, bf16((4, 6)), bf16((4, 6))),
    "tvd": (L.tvd, bf16((4, 6)), bf16((4, 6))),
    "hinton_kd": (L.hinton_kd, bf16((4, 6)), bf16((4, 6)), INT4),
    "dkd": (L.dkd, bf16((4, 6)), bf16((4, 6)), INT4),
    "logit_standardized_kd": (L.logit_standardized_kd, bf16((4, 6)), bf16((4, 6))),
    "topk_soft_target_kl": (
        L.topk_soft_target_kl, bf16((4, 6)), bf16((4, 2)), jax.ShapeDtypeStruct((4, 2), jnp.int32)
    ),
    "ensemble_teacher": (lambda a, b: L.ensemble_teacher([a, b]), bf16((4, 6)), bf16((4, 6))),
    "cross_entropy": (functools.partial(L.cross_entropy, label_smoothing=0.1), bf16((4, 6)), INT4),
    "fitnet": (L.fitnet, bf16((4, 3)), bf16((4, 3))),
    "attention_transfer": (L.attention_transfer, bf16((4, 2, 2, 3)), bf16((4, 2, 2, 3))),
    "similarity_preserving": (L.similarity_preserving, bf16((4, 3)), bf16((4, 3))),
    "rkd": (L.rkd, bf16((4, 3)), bf16((4, 3))),
    "pkt": (L.pkt, bf16((4, 3)), bf16((4, 3))),
    "nst": (L.nst, bf16((4, 2, 2, 3)), bf16((4, 2, 2, 3))),
    "correlation_congruence": (L.correlation_congruence, bf16((4, 3)), bf16((4, 3))),
    "vid": (L.vid, bf16((4, 3)), bf16((4, 3)), bf16((3,))),
}


@pytest.mark.parametrize("name", list(DTYPE_CASES))
def test_bf16_inputs_give_float32_outputs(name):
    fn, *args = DTYPE_CASES[name]
    assert jax.eval_shape(fn, *args).dtype == jnp.float32


# ----------------------------------------------------------------------------------
# Argument validation.
# ----------------------------------------------------------------------------------

F4 = rand((4, 3, 3, 2), 60)
ERROR_CASES = [
    (lambda: L.soft_target_kl(S, T_, temperature=0.0),
     r"temperature must be > 0, got temperature=0\.0"),
    (lambda: L.reverse_kl(S, T_, temperature=-1.0),
     r"temperature must be > 0, got temperature=-1\.0"),
    (lambda: L.tvd(S, T_, temperature=float("nan")),
     r"temperature must be > 0, got temperature=nan"),
    (lambda: L.generalized_jsd(S, T_, temperature=0.0),
     r"temperature must be > 0, got temperature=0\.0"),
    (lambda: L.generalized_jsd(S, T_, beta=0.0), r"beta must be in \(0, 1\), got beta=0\.0"),
    (lambda: L.generalized_jsd(S, T_, beta=1.0), r"beta must be in \(0, 1\), got beta=1\.0"),
    (lambda: L.hinton_kd(S, T_, Y, alpha=1.5), r"alpha must be in \[0, 1\], got alpha=1\.5"),
    (lambda: L.hinton_kd(S, T_, Y, alpha=-0.1), r"alpha must be in \[0, 1\], got alpha=-0\.1"),
    (lambda: L.hinton_kd(S, T_, Y, temperature=0.0),
     r"temperature must be > 0, got temperature=0\.0"),
    (lambda: L.dkd(S, T_, Y, alpha=-1.0), r"alpha must be >= 0, got alpha=-1\.0"),
    (lambda: L.dkd(S, T_, Y, beta=-2.0), r"beta must be >= 0, got beta=-2\.0"),
    (lambda: L.dkd(S, T_, Y, temperature=0.0), r"temperature must be > 0, got temperature=0\.0"),
    (lambda: L.logit_standardized_kd(S, T_, temperature=0.0),
     r"temperature must be > 0, got temperature=0\.0"),
    (lambda: L.topk_soft_target_kl(S, T_[:, :2], PERM[:, :2], temperature=0.0),
     r"temperature must be > 0, got temperature=0\.0"),
    (lambda: L.ensemble_teacher([S], temperature=0.0),
     r"temperature must be > 0, got temperature=0\.0"),
    (lambda: L.cross_entropy(S, Y, label_smoothing=1.5),
     r"label_smoothing must be in \[0, 1\], got label_smoothing=1\.5"),
    (lambda: L.soft_target_kl(S[:, :5], T_),
     r"same number of classes.*student_logits\.shape=\(4, 5\) and teacher_logits\.shape=\(4, 6\)"),
    (lambda: L.reverse_kl(S[:3], T_),
     r"same shape.*student_logits\.shape=\(3, 6\) and teacher_logits\.shape=\(4, 6\)"),
    (lambda: L.dkd(S, T_[:, :5], Y),
     r"student_logits\.shape=\(4, 6\) and teacher_logits\.shape=\(4, 5\)"),
    (lambda: L.hinton_kd(S, T_, Y[:3]), r"labels must be integer class ids.*labels\.shape=\(3,\)"),
    (lambda: L.cross_entropy(S, np.float32(Y)), r"labels must be integer class ids.*float32"),
    (lambda: L.topk_soft_target_kl(S, rand((4, 7), 0), np.zeros((4, 7), int)),
     r"k <= num_classes.*teacher_topk_values\.shape=\(4, 7\)"),
    (lambda: L.topk_soft_target_kl(S, T_[:, :2], np.zeros((4, 2), np.float32)),
     r"teacher_topk_indices must be integer.*float32"),
    (lambda: L.topk_soft_target_kl(S, T_[:, :2], PERM[:, :2], teacher_tail_logprob=np.zeros(3)),
     r"teacher_tail_logprob\.shape=\(3,\)"),
    (lambda: L.ensemble_teacher([S, T_], weights=[1.0]),
     r"weights must have one entry per teacher, got len\(weights\)=1 for 2 teachers"),
    (lambda: L.ensemble_teacher([S, T_], weights=[1.0, -1.0]),
     r"weights must be finite and >= 0, got weights=\[1\.0, -1\.0\]"),
    (lambda: L.ensemble_teacher([S, T_], weights=[0.0, 0.0]),
     r"weights must not all be zero, got weights=\[0\.0, 0\.0\]"),
    (lambda: L.ensemble_teacher([S, T_], mode="median"),
     r"mode must be one of \('logits', 'probs'\), got mode='median'"),
    (lambda: L.ensemble_teacher([]), r"teacher_logits_list must contain at least one array"),
    (lambda: L.ensemble_teacher([S, T_[:, :5]]), r"teacher_logits_list\[1\]\.shape=\(4, 5\)"),
    (lambda: L.fitnet(F4, F4[..., :1]),
     r"student_feat\.shape=\(4, 3, 3, 2\) and teacher_feat\.shape=\(4, 3, 3, 1\)"),
    (lambda: L.attention_transfer(F4, F4, p=0.5), r"p must be >= 1, got p=0\.5"),
    (lambda: L.attention_transfer(F4[:, 0], F4),
     r"student_feat must have 4 dimensions.*\(4, 3, 2\)"),
    (lambda: L.nst(F4, F4[:3]), r"same batch size.*\(4, 3, 3, 2\).*\(3, 3, 3, 2\)"),
    (lambda: L.similarity_preserving(S, T_[:3]),
     r"student_feat\.shape=\(4, 6\) and teacher_feat\.shape=\(3, 6\)"),
    (lambda: L.rkd(S, T_, distance_weight=-1.0),
     r"distance_weight must be >= 0, got distance_weight=-1\.0"),
    (lambda: L.rkd(S, T_, angle_weight=float("inf")),
     r"angle_weight must be >= 0, got angle_weight=inf"),
    (lambda: L.pkt(S, T_, eps=0.0), r"eps must be > 0, got eps=0\.0"),
    (lambda: L.correlation_congruence(S, T_[:2]),
     r"student_emb\.shape=\(4, 6\) and teacher_emb\.shape=\(2, 6\)"),
    (lambda: L.vid(S, T_, np.zeros(6), eps=0.0), r"eps must be > 0, got eps=0\.0"),
    (lambda: L.vid(S, T_, np.zeros(5)), r"log_scale must broadcast.*log_scale\.shape=\(5,\)"),
    (lambda: L.vid(S, T_[:, :5], np.zeros(5)),
     r"student_feat_mean\.shape=\(4, 6\) and teacher_feat\.shape=\(4, 5\)"),
]


@pytest.mark.parametrize("case", range(len(ERROR_CASES)))
def test_bad_arguments_raise(case):
    thunk, pattern = ERROR_CASES[case]
    with pytest.raises(ValueError, match=pattern):
        thunk()


@pytest.mark.parametrize(
    "fn,args,pattern",
    [
        (functools.partial(L.soft_target_kl, temperature=0.0), (S, T_),
         r"temperature must be > 0, got temperature=0\.0"),
        (functools.partial(L.dkd, temperature=0.0), (S, T_, Y),
         r"temperature must be > 0, got temperature=0\.0"),
        (functools.partial(L.generalized_jsd, beta=1.0), (S, T_),
         r"beta must be in \(0, 1\), got beta=1\.0"),
        (functools.partial(L.hinton_kd, alpha=2.0), (S, T_, Y),
         r"alpha must be in \[0, 1\], got alpha=2\.0"),
        (functools.partial(L.ensemble_teacher, weights=[1.0, -1.0]), ([S, T_],),
         r"weights=\[1\.0, -1\.0\]"),
        (functools.partial(L.soft_target_kl, temperature=2.0), (S[:, :5], T_),
         r"\(4, 5\).*\(4, 6\)"),
        (L.fitnet, (F4, F4[..., :1]), r"\(4, 3, 3, 2\).*\(4, 3, 3, 1\)"),
    ],
)
def test_bad_arguments_raise_under_jit(fn, args, pattern):
    with pytest.raises(ValueError, match=pattern):
        jax.jit(fn)(*args)


def test_traced_hyperparameter_raises_helpful_error():
    call = jax.jit(lambda s, t, beta: L.generalized_jsd(s, t, beta=beta))
    with pytest.raises(ValueError, match=r"beta must be a static Python number"):
        call(S, T_, 0.3)


# ----------------------------------------------------------------------------------
# Traced temperatures (schedules, CTKD): scalar or per example, one compiled program.
# ----------------------------------------------------------------------------------

TRACED = {  # name -> (loss at temperature T, its NumPy reference at a Python number T)
    "kd": (lambda s, t, y, T: L.soft_target_kl(s, t, temperature=T), np_soft_target_kl),
    "reverse_kl": (lambda s, t, y, T: L.reverse_kl(s, t, temperature=T), np_reverse_kl),
    "jsd": (lambda s, t, y, T: L.generalized_jsd(s, t, beta=0.3, temperature=T),
            lambda s, t, T: np_jsd(s, t, T, 0.3)),
    "tvd": (lambda s, t, y, T: L.tvd(s, t, temperature=T), np_tvd),
    "lskd": (lambda s, t, y, T: L.logit_standardized_kd(s, t, temperature=T), np_lskd),
    "dkd": (lambda s, t, y, T: L.dkd(s, t, y, alpha=1.0, beta=2.0, temperature=T), None),
    "tfkd": (lambda s, t, y, T: L.teacher_free_kd(s, y, correct_prob=0.9, temperature=T), None),
}


@pytest.fixture(scope="module")
def traced_losses():
    """Every loss jitted once with the temperature as a traced argument."""
    return jax.jit(lambda s, t, y, temp: {k: fn(s, t, y, temp) for k, (fn, _) in TRACED.items()})


def _traced_reference(name, s, t, y, temps):
    """Row by row, at each row's Python-number temperature (the static, validated path's
    NumPy reference where one exists above)."""
    _, ref = TRACED[name]
    if name == "dkd":
        return np.array([np_dkd(s[i:i + 1], t[i:i + 1], y[i:i + 1], 1.0, 2.0, temps[i])[0]
                         for i in range(len(y))])
    if name == "tfkd":
        return np.array([np_teacher_free_kd(s[i:i + 1], y[i:i + 1], 0.9, temps[i])[0]
                         for i in range(len(y))])
    return np.array([ref(s[i:i + 1], t[i:i + 1], temps[i])[0] for i in range(len(y))])


@pytest.mark.parametrize("name", list(TRACED))
def test_traced_temperature_scalar_and_per_example(traced_losses, name):
    s, t, y = rand((5, 6), 30), rand((5, 6), 31), labels_for((5,), 32, 6)
    for temp in (np.float32(2.5), np.float32(7.0)):
        assert_close(traced_losses(s, t, y, temp)[name],
                     _traced_reference(name, s, t, y, [float(temp)] * 5), rtol=2e-5)
    per_example = np.array([0.5, 1.0, 2.0, 4.0, 9.0], np.float32)
    assert_close(traced_losses(s, t, y, per_example)[name],
                 _traced_reference(name, s, t, y, per_example), rtol=2e-5)
    assert traced_losses._cache_size() == 2  # one program per temperature shape, not per value


def test_traced_temperature_in_ensembles_and_top_k_and_shape_errors():
    s, t1, t2 = rand((3, 5), 40), rand((3, 5), 41), rand((3, 5), 42)
    temps = np.array([1.5, 3.0, 6.0], np.float32)
    ens = jax.jit(lambda a, b, T: L.ensemble_teacher([a, b], temperature=T))(t1, t2, temps)
    for i, T in enumerate(temps):  # softmax(ens / T) is the mean of the softened teachers
        np.testing.assert_allclose(np_softmax(np.asarray(ens[i]) / T),
                                   (np_softmax(t1[i] / T) + np_softmax(t2[i] / T)) / 2, rtol=1e-5)
    idx = np.argsort(-t1, axis=-1)[:, :5].astype(np.int32)
    vals = np.take_along_axis(t1, idx, -1)
    topk = jax.jit(lambda a, v, i, T: L.topk_soft_target_kl(a, v, i, temperature=T))
    assert_close(topk(s, vals, idx, temps), [np_soft_target_kl(s[i], t1[i], temps[i])
                                             for i in range(3)], rtol=2e-5)
    with pytest.raises(ValueError, match=r"temperature must be a scalar or one value per "
                                         r"example \(shape \(3,\)\), got an array of shape "
                                         r"\(2,\)"):
        L.soft_target_kl(s, t1, temperature=np.ones(2, np.float32))
    with pytest.raises(ValueError, match=r"temperature must be > 0, got temperature=-1"):
        L.soft_target_kl(s, t1, temperature=-1)  # Python numbers are still validated


# ----------------------------------------------------------------------------------
# Self-distillation: Tf-KD's virtual teacher, BYOT's hint.
# ----------------------------------------------------------------------------------


def np_teacher_free_kd(s, y, a, temperature):
    """Tf-KD_reg's KL term (paper eq. 9) with kdjax's T^2: the virtual distribution
    p^d = a on the label, (1 - a) / (C - 1) elsewhere, softened as p^(1/T) / sum p^(1/T)."""
    s = np.asarray(s, np.float64)
    c = s.shape[-1]
    out = np.zeros(len(y))
    for i, yi in enumerate(y):
        pd = np.full(c, (1 - a) / (c - 1))
        pd[yi] = a
        soft = pd ** (1 / temperature) / (pd ** (1 / temperature)).sum()
        out[i] = temperature**2 * np_kl(soft, np_softmax(s[i] / temperature))
    return out


def np_byot_hint(f, g):
    f, g = np.asarray(f, np.float64), np.asarray(g, np.float64)
    out = np.zeros(len(f))
    for i in range(len(f)):
        for a, b in zip(f[i].ravel(), g[i].ravel()):
            if a > 0 or b > 0:
                out[i] += (a - b) ** 2
    return out


def test_teacher_free_kd_and_virtual_teacher_match_numpy():
    s, y = rand((6, 7), 50), labels_for((6,), 51, 7)
    fns = batched({f"{a}_{T}": functools.partial(lambda s, y, a, T: L.teacher_free_kd(
        s, y, correct_prob=a, temperature=T), a=a, T=T)
        for a in (0.9, 0.99) for T in (1.0, 20.0)})
    out = fns(s, y)
    for a in (0.9, 0.99):
        for T in (1.0, 20.0):
            # at T = 20 the KL is small and T^2 = 400 scales float32's rounding with it
            assert_close(out[f"{a}_{T}"], np_teacher_free_kd(s, y, a, T), rtol=1e-4)
    virtual = np.asarray(L.virtual_teacher_logits(y, 7, correct_prob=0.9))
    np.testing.assert_allclose(np_softmax(virtual)[np.arange(6), y], 0.9, rtol=1e-6)
    np.testing.assert_allclose(np_softmax(virtual).sum(-1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match=r"correct_prob must be in \(0, 1\), got "
                                         r"correct_prob=1\.0"):
        L.teacher_free_kd(s, y, correct_prob=1.0)
    with pytest.raises(ValueError, match=r"labels must be integer class ids of shape"):
        L.teacher_free_kd(s, y[:3])


def test_byot_hint_matches_numpy_and_detaches_its_target():
    f, g = rand((4, 3, 3, 2), 60), rand((4, 3, 3, 2), 61)
    assert_close(jax.jit(L.byot_hint)(f, g), np_byot_hint(f, g), rtol=1e-5)
    fv, gv = rand((4, 9), 62), rand((4, 9), 63)
    assert_close(L.byot_hint(fv, gv), np_byot_hint(fv, gv), rtol=1e-5)
    grad_f, grad_g = jax.grad(lambda a, b: L.byot_hint(a, b).sum(), argnums=(0, 1))(fv, gv)
    active = (fv > 0) | (gv > 0)
    np.testing.assert_allclose(grad_f, np.where(active, 2 * (fv - gv), 0.0), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_array_equal(grad_g, 0.0)  # the deep feature teaches, it is not taught
    with pytest.raises(ValueError, match=r"features and target must have the same shape"):
        L.byot_hint(fv, gv[:, :4])


# ----------------------------------------------------------------------------------
# CRD and mutual learning (the method zoo's own losses).
# ----------------------------------------------------------------------------------


def np_unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_crd(s, t, mem_s, mem_t, idx, z, temperature):
    """RepDistiller's ContrastMemory + ContrastLoss, gathering the sampled rows as it does."""
    n = mem_s.shape[0]

    def nce(p):
        c = (p.shape[1] - 1) / n
        return -(np.log(p[:, 0] / (p[:, 0] + c + 1e-7)).sum()
                 + np.log(c / (p[:, 1:] + c + 1e-7)).sum()) / p.shape[0]

    p_s = np.exp(np.einsum("bkd,bd->bk", mem_t[idx], s) / temperature) / z[0]
    p_t = np.exp(np.einsum("bkd,bd->bk", mem_s[idx], t) / temperature) / z[1]
    return nce(p_s) + nce(p_t)


def np_mutual_learning(logits, temperature):
    p = [np_softmax(np.asarray(z) / temperature) for z in logits]
    return np.stack([
        np.mean([temperature**2 * np_kl(p[j], p[k]) for j in range(len(p)) if j != k], axis=0)
        for k in range(len(p))
    ])


CRD_S, CRD_T = np_unit(rand((4, 6), 60)).astype(np.float32), np_unit(rand((4, 6), 61)).astype(
    np.float32)
CRD_MS, CRD_MT = np_unit(rand((10, 6), 62)).astype(np.float32), np_unit(rand((10, 6), 63)).astype(
    np.float32)
CRD_IDX = np.random.default_rng(64).integers(0, 10, (4, 4)).astype(np.int32)
CRD_Z = np.array([3.0, 5.0], np.float32)
DML = [rand((3, 5), 65), rand((3, 5), 66), rand((3, 5), 67)]


@pytest.fixture(scope="module")
def zoo_values():
    def crd(s, t, temperature=0.07):
        return L.crd(s, t, CRD_MS, CRD_MT, CRD_IDX, CRD_Z, temperature=temperature)

    def dml_first(z0):
        return jnp.sum(L.mutual_learning([z0, *DML[1:]], temperature=2.0)[0])

    def dml_second(z1):  # student 0's loss must not reach student 1
        return jnp.sum(L.mutual_learning([DML[0], z1, DML[2]], temperature=2.0)[0])

    return batched({
        "crd": lambda: crd(CRD_S, CRD_T),
        "crd T=0.5": lambda: crd(CRD_S, CRD_T, 0.5),
        "crd grads": lambda: jax.grad(crd, argnums=(0, 1))(CRD_S, CRD_T),
        "crd_scores": lambda: L.crd_scores(CRD_S, CRD_MT, CRD_IDX, temperature=0.1),
        # a bank with more rows than samples: the gathering branch
        "crd_scores gather": lambda: L.crd_scores(CRD_S, np.tile(CRD_MT, (2, 1)), CRD_IDX,
                                                  temperature=0.1),
        "dml T=1": lambda: L.mutual_learning(DML[:2]),
        "dml T=2": lambda: L.mutual_learning(DML, temperature=2.0),
        "dml own grad": lambda: jax.grad(dml_first)(DML[0]),
        "dml peer grad": lambda: jax.grad(dml_second)(DML[1]),
    })()


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_crd_matches_numpy(zoo_values, temperature):
    key = "crd" if temperature == 0.07 else f"crd T={temperature}"
    assert_close(zoo_values[key],
                 np_crd(CRD_S, CRD_T, CRD_MS, CRD_MT, CRD_IDX, CRD_Z, temperature), rtol=1e-5)


def test_crd_scores_and_gradients(zoo_values):
    expected = np.exp(np.einsum("bkd,bd->bk", np.float64(CRD_MT)[CRD_IDX], CRD_S) / 0.1)
    assert_close(zoo_values["crd_scores"], expected, rtol=1e-5)
    assert_close(zoo_values["crd_scores gather"], expected, rtol=1e-5)
    for g in zoo_values["crd grads"]:
        assert np.all(np.isfinite(g)) and np.any(np.asarray(g) != 0)


@pytest.mark.parametrize("key,n,temperature", [("dml T=1", 2, 1.0), ("dml T=2", 3, 2.0)])
def test_mutual_learning_matches_numpy(zoo_values, key, n, temperature):
    assert_close(zoo_values[key], np_mutual_learning(DML[:n], temperature), rtol=1e-5)


def test_mutual_learning_peers_are_detached(zoo_values):
    assert np.all(np.isfinite(zoo_values["dml own grad"]))
    assert np.any(np.asarray(zoo_values["dml own grad"]) != 0)
    np.testing.assert_array_equal(zoo_values["dml peer grad"], 0.0)


@pytest.mark.parametrize("thunk,pattern", [
    (lambda: L.crd(CRD_S, CRD_T, CRD_MS, CRD_MT, CRD_IDX, CRD_Z[:1]),
     r"normalizers\.shape=\(1,\)"),
    (lambda: L.crd(CRD_S, CRD_T, CRD_MS[:, :5], CRD_MT, CRD_IDX, CRD_Z),
     r"\[num_data, 6\].*memory\.shape=\(10, 5\)"),
    (lambda: L.crd(CRD_S, CRD_T, CRD_MS, CRD_MT, CRD_IDX[:3], CRD_Z),
     r"contrast_idx must be integer \[batch, 1 \+ K\] with batch=4.*\(3, 4\)"),
    (lambda: L.crd(CRD_S, CRD_T, CRD_MS, CRD_MT, CRD_IDX, CRD_Z, temperature=0.0),
     r"temperature must be > 0, got temperature=0\.0"),
    (lambda: L.mutual_learning(DML[:1]), r"at least 2 students, got len\(logits\)=1"),
    (lambda: L.mutual_learning([DML[0], DML[1][:, :4]]), r"logits\[1\]\.shape=\(3, 4\)"),
])
def test_zoo_bad_arguments_raise(thunk, pattern):
    with pytest.raises(ValueError, match=pattern):
        thunk()
