"""PATE's noisy vote aggregation, on the device, from explicit PRNG keys.

A teacher ensemble answers a query x with the histogram of its members' top-1 votes,
n_j(x) = #{teachers whose argmax is j}. What is released is never that histogram, nor any
teacher's logits: only a class chosen from it with noise (Papernot et al., ICLR 2018):

- GNMax:           argmax_j (n_j(x) + N(0, σ²))
- Confident-GNMax: if max_j n_j(x) + N(0, σ₁²) >= T, release argmax_j (n_j(x) + N(0, σ₂²)),
                   else release nothing (the query is not answered).

The noise comes from the key passed in, so a run is reproducible from its seed and the tests can
check the noise's scale and the threshold's behaviour statistically. `kdjax.privacy.rdp` prices
what these functions release.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import augment
from kdjax.step import FrozenModel

UNANSWERED = -1  # the label of a query Confident-GNMax declined


def vote_counts(teacher_logits: jax.Array) -> jax.Array:
    """int32 [N, C]: the vote histogram of logits [T, N, C] (T teachers, N queries)."""
    num_classes = teacher_logits.shape[-1]
    votes = jax.nn.one_hot(teacher_logits.argmax(-1), num_classes, dtype=jnp.int32)
    return votes.sum(0)


def gnmax(key: jax.Array, counts: jax.Array, *, sigma: float) -> jax.Array:
    """int32 [N]: argmax_j (n_j + N(0, σ²)) per query of `counts` [N, C]."""
    noise = sigma * jax.random.normal(key, counts.shape, jnp.float32)
    return (counts.astype(jnp.float32) + noise).argmax(-1).astype(jnp.int32)


class Answers(NamedTuple):
    labels: jax.Array  # int32 [N]: the released class, UNANSWERED where none was
    answered: jax.Array  # bool [N]


def confident_gnmax(key: jax.Array, counts: jax.Array, *, threshold: float, sigma1: float,
                    sigma2: float) -> Answers:
    """Confident-GNMax (the paper's Algorithm 1) on `counts` [N, C].

    The threshold check and the argmax draw independent noise (two keys split from `key`); the
    argmax is drawn for every query but released only where the check passed.
    """
    check_key, argmax_key = jax.random.split(key)
    noisy_max = counts.max(-1).astype(jnp.float32) + sigma1 * jax.random.normal(
        check_key, counts.shape[:1], jnp.float32)
    answered = noisy_max >= threshold
    labels = jnp.where(answered, gnmax(argmax_key, counts, sigma=sigma2), UNANSWERED)
    return Answers(labels.astype(jnp.int32), answered)


def plurality(counts: jax.Array) -> jax.Array:
    """int32 [N]: the noise-free plurality vote (NOT private: the non-private baseline)."""
    return counts.argmax(-1).astype(jnp.int32)


def stack_teachers(teachers: Sequence[FrozenModel]) -> FrozenModel:
    """One FrozenModel whose variables have a leading [T] axis, for teachers of one architecture
    (the members of an ensemble): the vote is then one vmapped forward pass."""
    if not teachers:
        raise ValueError("an ensemble needs at least one teacher")
    first = teachers[0]
    for i, t in enumerate(teachers[1:], start=1):
        if t.graphdef != first.graphdef or t.normalization != first.normalization:
            raise ValueError(f"teacher {i} of the ensemble has another architecture or input "
                             f"normalisation than teacher 0; an ensemble's teachers share them "
                             f"(train them with one config)")
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(t.variables for t in teachers))
    return first._replace(variables=stacked)


def ensemble_counts(ensemble: FrozenModel, images: np.ndarray, *,
                    preprocess: augment.Preprocess = augment.Preprocess(),
                    batch_size: int = 1000) -> np.ndarray:
    """int32 [N, C]: the votes of a stacked ensemble (`stack_teachers`) on uint8 images [N, ...].

    One compiled program per batch runs every teacher (vmapped over the leading axis) and
    histograms their argmaxes on the device; only the counts come back to the host. The last
    partial batch is padded and its rows dropped.
    """
    graphdef = ensemble.graphdef

    @jax.jit
    def count(variables, batch):
        x = augment.renormalize(augment.preprocess(batch, preprocess, key=None,
                                                   dtype=jnp.float32),
                                preprocess, ensemble.normalization)
        logits = jax.vmap(lambda v: nnx.merge(graphdef, v)(x, train=False))(variables)
        return vote_counts(logits.astype(jnp.float32))

    out = []
    for start in range(0, len(images), batch_size):
        chunk = np.asarray(images[start:start + batch_size])
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]),
                                                    chunk.dtype)])
        out.append(np.asarray(count(ensemble.variables, chunk))[:n])
    return np.concatenate(out)
