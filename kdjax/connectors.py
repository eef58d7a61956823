"""Trainable connectors: what a feature method puts between two tapped features and its loss.

A feature method (`kdjax.objectives.FEATURE_METHODS`) compares a student tap with a teacher tap
(FitNets: the student's `stage2` with the teacher's `stage2`). Its connector turns the two
features into the positional arguments of the method's loss in `kdjax.losses`: the identity for
methods that compare raw features (AT, SP, NST, RKD, PKT), FitNets' regressor, linear embedding
heads (CC), VID's regressor and variance, CRD's embedding heads and memory banks.

Connectors are built from the *shapes* of the tapped features (`feature_shapes` traces the models
abstractly; nothing is computed), live in the student bundle (`Connectors`, a part of a
`kdjax.distillee.Distillee`), so they
train with the student in the same step under the same optimizer and are checkpointed with it,
and are not part of the exported student.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import losses, sharding
from kdjax import taps as taps_lib
from kdjax.distillee import PartList

Shape = tuple[int, ...]


class Buffer(nnx.Variable):
    """Non-trainable connector state: no gradient, no optimizer state, checkpointed."""


class MemoryBank(sharding.DataSharded):
    """CRD's memory: one embedding per training example, updated by momentum inside the step.

    Split over the data axis of the mesh like the training set it indexes.
    """


def feature_shapes(graphdef: nnx.GraphDef, state: nnx.State, image_shape: Sequence[int], *,
                   taps: Sequence[str] = (), what: str = "tap") -> dict[str, Shape]:
    """The shapes of a model's features for a batch of 2 images, traced abstractly: its own
    `features()` taps (zoo models) or its logits, plus the sub-modules named in `taps`
    (kdjax.taps.features; `what` is their config key, for errors)."""
    images = jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)
    out = jax.eval_shape(lambda s, x: taps_lib.features(nnx.merge(graphdef, s), x, train=False,
                                                        taps=taps, what=what), state, images)
    return {name: tuple(x.shape) for name, x in out.items()}


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


class Connector(nnx.Module):
    """The identity connector and the base of all: it picks the two taps it connects.

    `connector(student, teacher, *, train, index, key)` takes the student's features and one
    teacher's features (dicts of taps) and returns the positional arguments of the method's loss.
    `index` (each example's position in the training set) and `key` (a PRNG key of this step)
    serve connectors that keep per-example state (CRD).
    """

    def __init__(self, student_tap: str, teacher_tap: str, student_shape: Shape,
                 teacher_shape: Shape, *, rngs: nnx.Rngs):
        del student_shape, teacher_shape, rngs  # the identity has no parameters
        self.student_tap = student_tap
        self.teacher_tap = teacher_tap

    def taps(self, student: dict, teacher: dict) -> tuple[jax.Array, jax.Array]:
        return student[self.student_tap], teacher[self.teacher_tap]

    def __call__(self, student: dict, teacher: dict, *, train: bool,
                 index: jax.Array | None = None, key: jax.Array | None = None) -> tuple:
        del train, index, key
        return self.taps(student, teacher)


class Connectors(PartList):
    """A feature method's connectors as a Distillee part: `self[i][j]` connects the student to
    teacher i for tap pair j. Its entry "connectors" holds, per teacher and pair, the loss's
    arguments."""

    def __init__(self, per_teacher: Sequence[Sequence[Connector]] = ()):
        super().__init__(nnx.List(list(pairs)) for pairs in per_teacher)

    @property
    def student_taps(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.student_tap for pairs in self for c in pairs))

    def features(self, x, out, teachers, *, train, index=None, key=None) -> dict:
        del x
        if not len(self):
            return {}
        if len(self) != len(teachers):
            raise ValueError(f"the student has connectors for {len(self)} teacher(s) but the "
                             f"step has {len(teachers)}; build both from the same teachers")
        return {"connectors": tuple(
            tuple(c(out, t, train=train, index=index,
                    key=None if key is None else jax.random.fold_in(key, 1000 * i + j))
                  for j, c in enumerate(pairs))
            for i, (pairs, t) in enumerate(zip(self, teachers)))}


def _spatial_refusal(method: str, s: Shape, t: Shape, fix: str) -> ValueError:
    return ValueError(f"{method} cannot connect a student tap of shape {s} to a teacher tap of "
                      f"shape {t}; {fix}")


class Regressor(Connector):
    """FitNets' regressor, as RepDistiller's `ConvReg`: the student tap mapped to the teacher's.

    NHWC taps: conv -> BatchNorm -> ReLU, the conv chosen by the spatial sizes as the reference
    does: 3x3 stride 2 when the student's map is twice the teacher's, a 4x4 stride-2 transposed
    conv when it is half, a (1 + Hs - Ht) x (1 + Ws - Wt) valid conv when it is at least as large
    (1x1 for equal sizes). `[B, D]` taps: linear -> BatchNorm -> ReLU.
    """

    def __init__(self, student_tap: str, teacher_tap: str, student_shape: Shape,
                 teacher_shape: Shape, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        super().__init__(student_tap, teacher_tap, student_shape, teacher_shape, rngs=rngs)
        s, t = tuple(student_shape[1:]), tuple(teacher_shape[1:])
        kw = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        if len(s) == 3 and len(t) == 3:
            (sh, sw, sc), (th, tw, tc) = s, t
            if (sh, sw) == (2 * th, 2 * tw):
                self.proj = nnx.Conv(sc, tc, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                                     **kw)
            elif (2 * sh, 2 * sw) == (th, tw):
                self.proj = nnx.ConvTranspose(sc, tc, (4, 4), strides=(2, 2), padding="SAME", **kw)
            elif sh >= th and sw >= tw:
                self.proj = nnx.Conv(sc, tc, (1 + sh - th, 1 + sw - tw), padding="VALID", **kw)
            else:
                raise _spatial_refusal(
                    "fitnet's regressor", student_shape, teacher_shape,
                    "a smaller student map must be exactly half the teacher's (RepDistiller's "
                    "rule); tap a student layer with a larger map (loss.student_taps)")
        elif len(s) == 1 and len(t) == 1:
            tc = t[0]
            self.proj = nnx.Linear(s[0], tc, **kw)
        else:
            raise _spatial_refusal(
                "fitnet's regressor", student_shape, teacher_shape,
                "tap two NHWC feature maps or two [B, D] vectors (loss.student_taps, "
                "loss.teacher_taps)")
        self.bn = nnx.BatchNorm(tc, momentum=0.9, epsilon=1e-5, **kw)

    def __call__(self, student, teacher, *, train, index=None, key=None):
        s, t = self.taps(student, teacher)
        return nnx.relu(self.bn(self.proj(s), use_running_average=not train)), t


class Embed(Connector):
    """Linear embedding heads on both (flattened) taps, as RepDistiller's `LinearEmbed` for CC,
    optionally L2-normalised.

    `embed_dim=0` passes the taps through unchanged (RKD and PKT compare raw embeddings in the
    reference; give them heads with a positive `embed_dim`). CC normalises: its Gram matrices
    then hold cosines, the setting in which the paper's kernel expansion holds, and its loss stays
    bounded (on raw embeddings it grows with the fourth power of their scale).
    """

    def __init__(self, student_tap: str, teacher_tap: str, student_shape: Shape,
                 teacher_shape: Shape, *, rngs: nnx.Rngs, embed_dim: int = 128,
                 normalize: bool = False):
        super().__init__(student_tap, teacher_tap, student_shape, teacher_shape, rngs=rngs)
        if embed_dim < 0:
            raise ValueError(f"embed_dim must be >= 0 (0: no heads), got embed_dim={embed_dim}")
        self.student_head, self.teacher_head = (
            (nnx.Linear(math.prod(student_shape[1:]), embed_dim, rngs=rngs),
             nnx.Linear(math.prod(teacher_shape[1:]), embed_dim, rngs=rngs))
            if embed_dim else (None, None))
        self.normalize = normalize

    def __call__(self, student, teacher, *, train, index=None, key=None):
        s, t = self.taps(student, teacher)
        if self.student_head is not None:
            s = self.student_head(_flat(s).astype(jnp.float32))
            t = self.teacher_head(_flat(t).astype(jnp.float32))
        if self.normalize:
            s, t = losses.l2_normalize(_flat(s)), losses.l2_normalize(_flat(t))
        return s, t


class VIDRegressor(Connector):
    """VID's variational regressor (Ahn et al., 2019; RepDistiller's `VIDLoss` module).

    The mean of a Gaussian over the teacher tap is predicted from the student tap by three
    bias-free 1x1 convs with ReLUs between them (hidden width = the teacher's channels; linear
    layers for `[B, D]` taps); the per-channel variance is `softplus(log_scale) + 1e-5`, starting
    at `init_pred_var`. Spatial sizes are matched first, as in the reference, by adaptive average
    pooling of the larger map: the student's input, or the teacher's target. Returns
    `(mean, target, log_scale)` for `kdjax.losses.vid`.
    """

    def __init__(self, student_tap: str, teacher_tap: str, student_shape: Shape,
                 teacher_shape: Shape, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32,
                 init_pred_var: float = 5.0):
        super().__init__(student_tap, teacher_tap, student_shape, teacher_shape, rngs=rngs)
        s, t = tuple(student_shape[1:]), tuple(teacher_shape[1:])
        if len(s) != len(t) or len(s) not in (1, 3):
            raise _spatial_refusal(
                "vid's regressor", student_shape, teacher_shape,
                "tap two NHWC feature maps or two [B, D] vectors (loss.student_taps, "
                "loss.teacher_taps)")
        if init_pred_var <= 1e-5:
            raise ValueError(f"init_pred_var must be > 1e-5 (the variance floor), got "
                             f"init_pred_var={init_pred_var}")
        kw = dict(use_bias=False, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        sc, tc = s[-1], t[-1]
        if len(s) == 3:
            self.layers = nnx.List([nnx.Conv(a, b, (1, 1), **kw)
                                    for a, b in ((sc, tc), (tc, tc), (tc, tc))])
        else:
            self.layers = nnx.List([nnx.Linear(a, b, **kw)
                                    for a, b in ((sc, tc), (tc, tc), (tc, tc))])
        # softplus^-1(init_pred_var - eps), so that the initial variance is init_pred_var.
        self.log_scale = nnx.Param(
            jnp.full((tc,), np.log(np.expm1(init_pred_var - 1e-5)), jnp.float32))

    def __call__(self, student, teacher, *, train, index=None, key=None):
        s, t = self.taps(student, teacher)
        if s.ndim == 4 and s.shape[1:3] != t.shape[1:3]:
            h, w = min(s.shape[1], t.shape[1]), min(s.shape[2], t.shape[2])
            s, t = losses.adaptive_avg_pool(s, h, w), losses.adaptive_avg_pool(t, h, w)
        x = s
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = nnx.relu(x)
        return x, t, self.log_scale[...]


class ContrastMemory(Connector):
    """CRD's embedding heads and memory banks (Tian et al., 2020; RepDistiller's `CRDLoss`).

    Both taps are flattened, embedded by a linear head and L2-normalised. Each model has a bank
    of `num_data x embed_dim` embeddings (uniform in +-1/sqrt(embed_dim / 3) at first, as the
    reference). Each step draws, from the step's key, `num_negatives` examples of *other classes*
    per example (the reference's default "exact" mode), scores the embeddings against the other
    model's bank, and afterwards moves each example's bank rows towards its new embeddings by
    momentum (`m * row + (1 - m) * emb`, re-normalised). NCE's normalising constants are fixed
    from the first batch, as in the reference. Returns the arguments of `kdjax.losses.crd`
    (banks as they were before this step's update).

    Negatives are drawn without replacement, as the reference does, which sorts `num_data`
    random keys per example: cheap on accelerators, slow on CPU. `replacement=True` draws them
    independently instead (a gather per negative); each draw is still uniform over the other
    classes, but a row may repeat an example.
    """

    def __init__(self, student_tap: str, teacher_tap: str, student_shape: Shape,
                 teacher_shape: Shape, *, rngs: nnx.Rngs, dataset_labels: np.ndarray,
                 embed_dim: int = 128, num_negatives: int = 16384, momentum: float = 0.5,
                 temperature: float = 0.07, replacement: bool = False):
        super().__init__(student_tap, teacher_tap, student_shape, teacher_shape, rngs=rngs)
        labels = np.asarray(dataset_labels).astype(np.int32)
        num_data = len(labels)
        counts = np.bincount(labels) if num_data else np.zeros(1, np.int64)
        available = num_data - int(counts.max())
        if num_negatives < 1 or available < 1 or (not replacement and num_negatives > available):
            raise ValueError(
                f"crd draws num_negatives={num_negatives} examples of other classes "
                f"{'with' if replacement else 'without'} replacement, but this training set of "
                f"{num_data} examples has only {available} outside the largest class; set "
                f"loss.kwargs.num_negatives between 1 and {available}"
                + ("" if replacement else " (or replacement=True)"))
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got momentum={momentum}")
        self.student_head = nnx.Linear(math.prod(student_shape[1:]), embed_dim, rngs=rngs)
        self.teacher_head = nnx.Linear(math.prod(teacher_shape[1:]), embed_dim, rngs=rngs)
        stdv = 1.0 / math.sqrt(embed_dim / 3)
        keys = jax.random.split(rngs.params())
        self.student_memory, self.teacher_memory = (
            MemoryBank(jax.random.uniform(k, (num_data, embed_dim), jnp.float32, -stdv, stdv))
            for k in keys)
        self.normalizers = Buffer(jnp.full((2,), -1.0, jnp.float32))  # < 0: not yet estimated
        self.labels = Buffer(jnp.asarray(labels))
        # The examples sorted by class, and where each class starts: sampling with replacement
        # skips the example's own class range in that order.
        self.by_class = Buffer(jnp.asarray(np.argsort(labels, kind="stable"), jnp.int32))
        self.class_start = Buffer(jnp.asarray(np.cumsum(counts) - counts, jnp.int32))
        self.class_count = Buffer(jnp.asarray(counts, jnp.int32))
        self.num_negatives = num_negatives
        self.momentum = momentum
        self.temperature = temperature
        self.replacement = replacement

    def _contrast_idx(self, key: jax.Array, index: jax.Array) -> jax.Array:
        """[B, 1 + K]: each example itself, then K examples of other classes."""
        labels = self.labels[...]
        y = labels[index]
        if self.replacement:
            count, start = self.class_count[...][y][:, None], self.class_start[...][y][:, None]
            u = jax.random.randint(key, (index.shape[0], self.num_negatives), 0,
                                   labels.shape[0] - count)
            negatives = self.by_class[...][jnp.where(u >= start, u + count, u)]
        else:
            u = jax.random.uniform(key, (index.shape[0], labels.shape[0]))
            # Same-class examples sort last, so the K smallest keys are a uniform draw without
            # replacement from the other classes (K <= their number was checked at build time).
            u = jnp.where(labels[None, :] == y[:, None], 2.0, u)
            negatives = jax.lax.top_k(-u, self.num_negatives)[1]
        return jnp.concatenate([index[:, None], negatives], axis=1).astype(jnp.int32)

    def _update(self, bank: MemoryBank, index: jax.Array, emb: jax.Array) -> None:
        rows = bank[...][index] * self.momentum + emb * (1.0 - self.momentum)
        bank[...] = bank[...].at[index].set(losses.l2_normalize(rows))

    def __call__(self, student, teacher, *, train, index=None, key=None):
        if index is None or key is None:
            raise ValueError("crd needs each example's index in the training set and a PRNG key: "
                             "sample batches on device (kdjax.step.DeviceData) or stream them "
                             "with kdjax.input.TrainStream, which both add batch['index']")
        s, t = self.taps(student, teacher)
        e_s = losses.l2_normalize(self.student_head(_flat(s).astype(jnp.float32)))
        e_t = losses.l2_normalize(self.teacher_head(_flat(t).astype(jnp.float32)))
        idx = self._contrast_idx(key, index)
        mem_s, mem_t = self.student_memory[...], self.teacher_memory[...]
        scores = (losses.crd_scores(e_s, mem_t, idx, temperature=self.temperature),
                  losses.crd_scores(e_t, mem_s, idx, temperature=self.temperature))
        estimate = jax.lax.stop_gradient(mem_s.shape[0] * jnp.stack([x.mean() for x in scores]))
        z = jnp.where(self.normalizers[...] > 0, self.normalizers[...], estimate)
        if train:
            self.normalizers[...] = z
            self._update(self.student_memory, index, jax.lax.stop_gradient(e_s))
            self._update(self.teacher_memory, index, jax.lax.stop_gradient(e_t))
        return e_s, e_t, mem_s, mem_t, idx, z
