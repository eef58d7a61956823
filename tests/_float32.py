"""How far two float32 programs that compute the same value may disagree.

XLA may sum the terms of a reduction (a matmul, a mean over the batch, a gradient's sum over
examples) in any order, and orders differ between jit and eager, between batch shapes, between
CPUs (Intel vs AMD get different kernels), XLA versions and devices. Each order rounds
differently: adding a term rounds the partial sum S_k by at most eps/2 of itself, so one order's
error is a random walk of n such roundings, at most about eps/2 * sqrt(n) * max_k |S_k|, and two
orders differ by about sqrt(2) times that. `atol` allows 4 such standard deviations:

    atol = 4 * eps * sqrt(n) * magnitude

n counts the additions along the chain of reductions that produces the value: their errors add
as independent random walks, so a matmul over k inputs, then a sum over m examples, is n = k + m
(the product would count each rounding many times).
where `magnitude` bounds the partial sums: the sum of the terms' absolute values bounds them
always (a gradient summed over examples: the sum of the per-example gradients' |.|); where the
terms have mixed signs (a forward pass, a gradient at init) the partial sums stay at the scale of
the results, and the largest |result| of the array is a fair magnitude for all its elements (not
each element's own value: a small element is a cancellation of terms as large as the others').
A comparison between two programs uses that; a wrong tap, a missing reversal or a wrong formula
moves a value by a large fraction of its terms, orders of magnitude beyond it. Comparisons of the
SAME compiled program on the same machine (a resumed run against an uninterrupted one) are exact
and stay exact.
"""

import math

import jax
import numpy as np

EPS = float(np.finfo(np.float32).eps)  # 2**-23 ~ 1.19e-7


def atol(n, magnitude):
    """The reassociation tolerance for n summed terms whose absolute values sum to `magnitude`
    (a scalar, or an array broadcast against the compared values)."""
    return 4 * EPS * math.sqrt(n) * np.asarray(magnitude, np.float64)


def assert_close(actual, desired, *, n, magnitude=None, err_msg=""):
    """np.testing.assert_allclose(actual, desired) up to float32 reassociation: each element may
    differ by atol(n, magnitude); `magnitude` defaults to max |desired| (see the module's note:
    right for mixed-sign terms and for one-signed sums such as a loss, a count or a mean)."""
    desired = np.asarray(desired, np.float64)
    if magnitude is None:
        magnitude = np.abs(desired).max(initial=0.0)
    diff = np.abs(np.asarray(actual, np.float64) - desired)
    bound = np.broadcast_to(atol(n, magnitude), diff.shape)
    bad = diff > bound
    assert not bad.any(), (
        f"{err_msg} {int(bad.sum())} of {diff.size} elements differ by more than float32 "
        f"reassociation over {n} terms allows: max |diff| {diff.max():.3g}, "
        f"at the worst element {diff[bad].max():.3g} > {bound[bad][diff[bad].argmax()]:.3g}")


def assert_trees_close(actual, desired, *, n, magnitudes=None):
    """assert_close leaf by leaf over two pytrees (magnitudes: a matching pytree, or None)."""
    leaves_a, tree = jax.tree.flatten(actual)
    leaves_d = tree.flatten_up_to(desired)
    leaves_m = [None] * len(leaves_a) if magnitudes is None else tree.flatten_up_to(magnitudes)
    for i, (a, d, m) in enumerate(zip(leaves_a, leaves_d, leaves_m)):
        assert_close(a, d, n=n, magnitude=m, err_msg=f"leaf {i}:")


def abs_sum(per_example):
    """The magnitude of a batch sum's terms: sum over the leading axis of |per-example value|,
    leaf by leaf (e.g. of jax.vmap(jax.grad(loss_of_one_example))(...))."""
    return jax.tree.map(lambda t: np.abs(np.asarray(t, np.float64)).sum(0), per_example)


def near_ties(logits, n, rank=1):
    """The fraction of rows whose rank-th and (rank+1)-th largest logits lie within float32
    reassociation (atol(n, the largest |logit|)) of each other: another program computing the
    same logits may order them either way, so a top-`rank` accuracy (or agreement) two programs
    compute may differ by that fraction, and by nothing where there are none (the usual case:
    the check stays exact)."""
    z = np.sort(np.asarray(logits, np.float64), axis=-1)
    gap = z[..., -rank] - z[..., -rank - 1]
    return float(np.mean(gap <= atol(n, np.abs(z).max())))
