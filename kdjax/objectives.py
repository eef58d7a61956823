"""Training objectives: turn the `loss` section of a config into the function the step calls.

`kdjax.losses` holds pure per-example losses; an objective picks the features they need from the
models' `features()` dicts, reduces over the batch, mixes in hard-label cross-entropy, and returns
the scalar to differentiate plus the terms for logging. Keeping this apart from `losses` keeps
the losses importable on their own, optax style.

Methods (`loss.name`):
  ce                                   supervised (teachers, baselines)
  kd dkd lskd reverse_kl jsd tvd       logit distillation (LOGIT_LOSSES)
  fitnet at sp rkd pkt nst cc vid crd  feature and relational distillation (FEATURE_METHODS): a
                                       loss between tapped features, through trainable
                                       connectors (kdjax.connectors), per teacher and tap pair
  dml                                  deep mutual learning between the student and its peers
Feature methods follow RepDistiller's recipe `ce_weight * CE + kd_weight * KD + feature_weight *
feature loss` (its -r, -a, -b). With several teachers, logit losses distil from their ensemble
(`losses.ensemble_teacher`) or from each teacher (weighted sum); feature methods always from each
teacher, through that teacher's own connectors.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import connectors, losses
from kdjax.augment import MixedLabels
from kdjax.step import FrozenModel, Objective

# Logit-matching distillation losses by config name.
LOGIT_LOSSES: dict[str, Callable[..., jax.Array]] = {
    "kd": losses.soft_target_kl,
    "dkd": losses.dkd,
    "lskd": losses.logit_standardized_kd,
    "reverse_kl": losses.reverse_kl,
    "jsd": losses.generalized_jsd,
    "tvd": losses.tvd,
}


def cross_entropy(logits: jax.Array, labels, *, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example CE for int labels, or w·CE(label) + (1−w)·CE(other) for mixed labels
    (augment.MixedLabels from mixup/CutMix): the CE against the mixed target."""
    if isinstance(labels, MixedLabels):
        return (labels.weight * losses.cross_entropy(logits, labels.label,
                                                     label_smoothing=label_smoothing)
                + (1.0 - labels.weight) * losses.cross_entropy(logits, labels.other,
                                                               label_smoothing=label_smoothing))
    return losses.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def hard_labels(labels) -> jax.Array:
    """Int labels; for mixed labels, the class with the larger weight (for accuracy, and for
    losses such as DKD that need one target class)."""
    if isinstance(labels, MixedLabels):
        return jnp.where(labels.weight >= 0.5, labels.label, labels.other)
    return labels


@dataclasses.dataclass(frozen=True)
class FeatureMethod:
    """A feature method: its loss, the connector class between its taps, its default taps.

    `taps` names RepDistiller's choice of layers, resolved per model by `tap_pairs`: "hint" (the
    second stage, its hint_layer=2), "stages" (every stage, its feat[1:-1]), "last_stage" (its
    feat[-2]) or "embedding" (the pooled pre-logit vector, its feat[-1]).
    """

    loss: Callable[..., jax.Array]
    connector: type[connectors.Connector]
    taps: str
    connector_defaults: tuple[tuple[str, Any], ...] = ()  # (key, value) pairs


FEATURE_METHODS: dict[str, FeatureMethod] = {
    "fitnet": FeatureMethod(losses.fitnet, connectors.Regressor, "hint"),
    "at": FeatureMethod(losses.attention_transfer, connectors.Connector, "stages"),
    "sp": FeatureMethod(losses.similarity_preserving, connectors.Connector, "last_stage"),
    # RepDistiller compares raw embeddings for RKD and PKT; embed_dim > 0 adds heads.
    "rkd": FeatureMethod(losses.rkd, connectors.Embed, "embedding", (("embed_dim", 0),)),
    "pkt": FeatureMethod(losses.pkt, connectors.Embed, "embedding", (("embed_dim", 0),)),
    "cc": FeatureMethod(losses.correlation_congruence, connectors.Embed, "embedding",
                        (("normalize", True),)),
    "nst": FeatureMethod(losses.nst, connectors.Connector, "stages"),
    "vid": FeatureMethod(losses.vid, connectors.VIDRegressor, "stages"),
    "crd": FeatureMethod(losses.crd, connectors.ContrastMemory, "embedding"),
}

METHODS = sorted(["ce", "dml", *LOGIT_LOSSES, *FEATURE_METHODS])
COMBINE = ("ensemble", "per_teacher")
# Connector arguments that kdjax derives itself (from the models and the data), not config keys.
_DERIVED = ("rngs", "dtype", "dataset_labels")


def needs_dataset_labels(name: str) -> bool:
    """Whether loss.name's connectors need every training label up front (CRD's memory draws
    negatives of other classes)."""
    method = FEATURE_METHODS.get(name)
    return method is not None and "dataset_labels" in _parameters(method.connector)


def _parameters(fn: Callable) -> Mapping[str, inspect.Parameter]:
    # A connector class: read __init__ (nnx's metaclass hides it from inspect.signature(cls)).
    return inspect.signature(fn.__init__ if isinstance(fn, type) else fn).parameters


def _keyword_only(fn: Callable) -> list[str]:
    return [p.name for p in _parameters(fn).values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _check_name(name: str) -> None:
    if name not in METHODS:
        raise ValueError(f"unknown loss.name={name!r}; valid names: {METHODS}")


def _split_kwargs(name: str, kwargs: Mapping[str, Any]) -> tuple[dict, dict]:
    """`loss.kwargs` of a feature method -> (the loss's, the connector's); refuses the rest."""
    method = FEATURE_METHODS[name]
    loss_keys = _keyword_only(method.loss)
    connector_keys = [k for k in _keyword_only(method.connector) if k not in _DERIVED]
    unknown = sorted(set(kwargs) - set(loss_keys) - set(connector_keys))
    if unknown:
        raise ValueError(f"loss.kwargs {unknown} are not hyperparameters of loss.name={name!r}; "
                         f"valid: {loss_keys} (loss) and {connector_keys} (connector)")
    # A key both take (CRD's temperature: the loss's scores and the connector's first-batch
    # normalisers) goes to both.
    return ({k: v for k, v in kwargs.items() if k in loss_keys},
            {**dict(method.connector_defaults),
             **{k: v for k, v in kwargs.items() if k in connector_keys}})


def _check_weights(**weights: float) -> None:
    for arg, value in weights.items():
        if value < 0:
            raise ValueError(f"loss.{arg} must be >= 0, got {arg}={value}")


def _ramp(step: jax.Array, warmup_steps: int) -> jax.Array:
    """Linear from 0 to 1 over warmup_steps (DKD's recipe warms its loss up this way)."""
    if not warmup_steps:
        return jnp.float32(1.0)
    return jnp.minimum(1.0, (step + 1) / warmup_steps)


def _teacher_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Per-teacher weights, normalised to sum to 1 (uniform when None)."""
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if len(w) != n or min(w) < 0 or sum(w) <= 0:
        raise ValueError(f"teacher.weights must be {n} non-negative numbers, not all 0 (one per "
                         f"teacher), got {list(weights or [])}")
    return [x / sum(w) for x in w]


def _logit_term(fn: Callable[..., jax.Array], kwargs: Mapping[str, Any], *,
                teacher_weights: Sequence[float] | None, combine: str,
                ensemble_mode: str) -> Callable:
    """(student logits, teachers' logits, labels) -> the batch mean of `fn` against the teachers.

    "ensemble" distils from one target; several teachers are averaged at the loss's own
    temperature, so that the target is the mean of their softened distributions rather than a
    softened mean. "per_teacher" distils from each and weights the losses.
    """
    if combine not in COMBINE:
        raise ValueError(f"teacher.combine must be one of {list(COMBINE)}, got {combine!r}")
    params = inspect.signature(fn).parameters
    takes_labels = "labels" in params
    temperature = kwargs.get("temperature", params["temperature"].default)

    def term(student, teachers, labels):
        def against(target):
            args = (student, target, hard_labels(labels)) if takes_labels else (student, target)
            return fn(*args, **kwargs).mean()

        if len(teachers) == 1:
            return against(teachers[0])
        if combine == "ensemble":
            return against(losses.ensemble_teacher(teachers, weights=teacher_weights,
                                                   mode=ensemble_mode, temperature=temperature))
        w = _teacher_weights(teacher_weights, len(teachers))
        return sum(wi * against(t) for wi, t in zip(w, teachers))

    return term


def supervised(*, label_smoothing: float = 0.0) -> Objective:
    """Plain cross-entropy on the labels: teachers and baseline students."""

    def objective(out, teacher_out, labels, step):
        del teacher_out, step
        logits = out["logits"].astype(jnp.float32)
        ce = cross_entropy(logits, labels, label_smoothing=label_smoothing).mean()
        return ce, {"ce": ce, "accuracy": (logits.argmax(-1) == hard_labels(labels)).mean()}

    return objective


def _teacher_logits(name: str, teacher_out: Sequence[dict]) -> list[jax.Array]:
    if not teacher_out:
        raise ValueError(f"loss.name={name!r} distils from a teacher, but none was given")
    return [t["logits"].astype(jnp.float32) for t in teacher_out]


def logit_distillation(name: str, *, ce_weight: float, kd_weight: float,
                       kd_warmup_steps: int = 0, teacher_weights: Sequence[float] | None = None,
                       combine: str = "ensemble", ensemble_mode: str = "probs",
                       label_smoothing: float = 0.0, **kwargs: Any) -> Objective:
    """ce_weight · CE(labels) + kd_weight · ramp(step) · LOSS(student, teacher(s), **kwargs).

    Hinton's KD is name="kd" with ce_weight=1−α and kd_weight=α (losses.hinton_kd's mix). Several
    teachers are combined as `combine` says (see `_logit_term`). ramp goes linearly from 0 to 1
    over kd_warmup_steps (DKD's recipe warms its loss up this way).
    """
    if name not in LOGIT_LOSSES:
        raise ValueError(f"unknown loss.name={name!r}; valid names: "
                         f"{sorted(['ce', *LOGIT_LOSSES])}")
    fn = LOGIT_LOSSES[name]
    valid = _keyword_only(fn)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"loss.kwargs {unknown} are not hyperparameters of loss.name={name!r}; "
                         f"valid: {valid}")
    _check_weights(ce_weight=ce_weight, kd_weight=kd_weight)
    term = _logit_term(fn, kwargs, teacher_weights=teacher_weights, combine=combine,
                       ensemble_mode=ensemble_mode)

    def objective(out, teacher_out, labels, step):
        student = out["logits"].astype(jnp.float32)
        kd = term(student, _teacher_logits(name, teacher_out), labels)
        ce = cross_entropy(student, labels, label_smoothing=label_smoothing).mean()
        total = ce_weight * ce + kd_weight * _ramp(step, kd_warmup_steps) * kd
        return total, {"ce": ce, "kd": kd, "accuracy": (student.argmax(-1) == hard_labels(labels)).mean()}

    return objective


def feature_distillation(name: str, *, ce_weight: float = 1.0, kd_weight: float = 0.0,
                         feature_weight: float = 1.0, kd_temperature: float = 4.0,
                         kd_warmup_steps: int = 0, hint_steps: int = 0,
                         teacher_weights: Sequence[float] | None = None,
                         combine: str = "ensemble", label_smoothing: float = 0.0,
                         **kwargs: Any) -> Objective:
    """ce_weight · CE + ramp(step) · (kd_weight · KD + feature_weight · Σ_teachers w_i Σ_pairs L).

    L is FEATURE_METHODS[name].loss on each of its connector's outputs (`Distillee.features`),
    reduced to its batch mean and summed over the tap pairs (RepDistiller sums AT's, NST's and
    VID's layers). KD is Hinton's soft-target KL at kd_temperature, combined over teachers as
    `combine` says. With hint_steps > 0 the first hint_steps steps optimise the feature term
    alone (FitNets' first stage; the paper's second stage then uses kd_weight and ce_weight).
    `kwargs` are the loss's keyword hyperparameters (the connector's were used to build it).
    """
    if name not in FEATURE_METHODS:
        raise ValueError(f"unknown feature method loss.name={name!r}; valid: "
                         f"{sorted(FEATURE_METHODS)}")
    loss_kwargs, _ = _split_kwargs(name, kwargs)
    _check_weights(ce_weight=ce_weight, kd_weight=kd_weight, feature_weight=feature_weight)
    if hint_steps < 0:
        raise ValueError(f"loss.hint_steps must be >= 0, got hint_steps={hint_steps}")
    loss_fn = FEATURE_METHODS[name].loss
    kd_term = _logit_term(losses.soft_target_kl, {"temperature": kd_temperature},
                          teacher_weights=teacher_weights, combine=combine,
                          ensemble_mode="probs")

    def objective(out, teacher_out, labels, step):
        if "connectors" not in out:
            raise ValueError(f"loss.name={name!r} needs the student's connectors: build the "
                             f"student as a kdjax.step.Distillee with objectives.build_connectors")
        student = out["logits"].astype(jnp.float32)
        weights = _teacher_weights(teacher_weights, len(out["connectors"]))
        feature = sum(w * sum(jnp.mean(loss_fn(*args, **loss_kwargs)) for args in pairs)
                      for w, pairs in zip(weights, out["connectors"]))
        ce = cross_entropy(student, labels, label_smoothing=label_smoothing).mean()
        distill = feature_weight * feature
        metrics = {"ce": ce, "feature": feature,
                   "accuracy": (student.argmax(-1) == hard_labels(labels)).mean()}
        if kd_weight:
            kd = kd_term(student, _teacher_logits(name, teacher_out), labels)
            distill, metrics["kd"] = distill + kd_weight * kd, kd
        total = ce_weight * ce + _ramp(step, kd_warmup_steps) * distill
        if hint_steps:
            total = jnp.where(step < hint_steps, feature, total)
        return total, metrics

    return objective


def mutual_learning(*, ce_weight: float = 1.0, kd_weight: float = 1.0,
                    kd_warmup_steps: int = 0, label_smoothing: float = 0.0,
                    **kwargs: Any) -> Objective:
    """Deep mutual learning: Σ_k ce_weight · CE_k + kd_weight · ramp · mean_{l≠k} KL(p_l ‖ p_k).

    Student 0 is the Distillee's student, the others its peers; peers' predictions are detached
    (losses.mutual_learning), so each student is trained on its own term only. `kwargs` go to
    losses.mutual_learning (temperature). Logs each student's accuracy ("peer<i>/accuracy").
    """
    valid = _keyword_only(losses.mutual_learning)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"loss.kwargs {unknown} are not hyperparameters of loss.name='dml'; "
                         f"valid: {valid}")
    _check_weights(ce_weight=ce_weight, kd_weight=kd_weight)

    def objective(out, teacher_out, labels, step):
        if teacher_out:
            raise ValueError("loss.name='dml' trains students from each other, not from a "
                             "teacher; run it without teachers")
        if not out.get("peers"):
            raise ValueError("loss.name='dml' needs peer students: set model.peers, e.g. "
                             "model.peers=('mlp',)")
        logits = [f["logits"].astype(jnp.float32) for f in (out, *out["peers"])]
        kl = losses.mutual_learning(logits, **kwargs).mean(axis=-1)
        ce = jnp.stack([cross_entropy(z, labels, label_smoothing=label_smoothing).mean()
                        for z in logits])
        total = jnp.sum(ce_weight * ce + kd_weight * _ramp(step, kd_warmup_steps) * kl)
        acc = [(z.argmax(-1) == hard_labels(labels)).mean() for z in logits]
        return total, {"ce": ce[0], "kd": kl[0], "accuracy": acc[0],
                       **{f"peer{i}/accuracy": a for i, a in enumerate(acc[1:], start=1)}}

    return objective


def from_config(loss: Mapping[str, Any], teacher: Mapping[str, Any] | None = None) -> Objective:
    """Build the objective of a config's `loss` section (and its `teacher` weights/combine)."""
    name, kwargs = loss["name"], dict(loss["kwargs"])
    _check_name(name)
    if name not in FEATURE_METHODS and (loss["student_taps"] or loss["teacher_taps"]
                                        or loss["hint_steps"]):
        raise ValueError(f"loss.student_taps, loss.teacher_taps and loss.hint_steps belong to "
                         f"feature methods {sorted(FEATURE_METHODS)}, not loss.name={name!r}")
    common = dict(ce_weight=loss["ce_weight"], kd_weight=loss["kd_weight"],
                  kd_warmup_steps=loss["kd_warmup_steps"],
                  label_smoothing=loss["label_smoothing"])
    teachers = dict(teacher_weights=tuple(teacher["weights"]) or None if teacher else None,
                    combine=teacher["combine"] if teacher else "ensemble")
    if name == "ce":
        if kwargs:
            raise ValueError(f"loss.name='ce' takes no loss.kwargs, got {sorted(kwargs)}")
        return supervised(label_smoothing=loss["label_smoothing"])
    if name == "dml":
        return mutual_learning(**common, **kwargs)
    if name in FEATURE_METHODS:
        return feature_distillation(name, feature_weight=loss["feature_weight"],
                                    kd_temperature=loss["kd_temperature"],
                                    hint_steps=loss["hint_steps"], **common, **teachers, **kwargs)
    return logit_distillation(name, **common, **teachers, **kwargs)


def needs_teacher(name: str) -> bool:
    """Whether `kdjax distill` with this loss loads teachers (mutual learning has none)."""
    return name not in ("ce", "dml")


def _stages(names: Sequence[str]) -> list[str]:
    """A model's intermediate layers in order: its stage taps, or an MLP's hidden ones."""
    return [n for n in names if n.startswith("stage")] or [n for n in names
                                                          if n.startswith("hidden")]


def tap_pairs(name: str, student_taps: Sequence[str], teacher_taps: Sequence[str],
              student_names: Sequence[str], teacher_names: Sequence[str]) -> list[tuple[str, str]]:
    """The (student tap, teacher tap) pairs of a feature method for one student/teacher pair.

    Explicit `loss.student_taps`/`loss.teacher_taps` pair up one to one; empty ones mean the
    method's default (FeatureMethod.taps) resolved on the models' tap names.
    """
    if len(student_taps) != len(teacher_taps):
        raise ValueError(f"loss.student_taps and loss.teacher_taps pair up one to one, got "
                         f"{tuple(student_taps)} and {tuple(teacher_taps)}")
    if student_taps:
        pairs = list(zip(student_taps, teacher_taps))
    elif FEATURE_METHODS[name].taps == "embedding":
        pairs = [("embedding", "embedding")]
    else:
        rule = FEATURE_METHODS[name].taps
        s, t = _stages(student_names), _stages(teacher_names)
        if not s or not t or (rule == "stages" and len(s) != len(t)):
            raise ValueError(
                f"loss.name={name!r} pairs the {rule} of student and teacher, but the student "
                f"has stages {s} and the teacher {t}; name the layers in loss.student_taps and "
                f"loss.teacher_taps")
        pairs = {"stages": list(zip(s, t)), "last_stage": [(s[-1], t[-1])],
                 "hint": [(s[min(1, len(s) - 1)], t[min(1, len(t) - 1)])]}[rule]
    for s_tap, t_tap in pairs:
        for side, tap, names in (("student", s_tap, student_names),
                                 ("teacher", t_tap, teacher_names)):
            if tap not in names:
                raise ValueError(f"the {side} has no tap {tap!r} (loss.{side}_taps); its taps: "
                                 f"{list(names)}")
    return pairs


def build_connectors(loss: Mapping[str, Any], student: nnx.Module,
                     teachers: Sequence[FrozenModel], *, image_shape: Sequence[int],
                     rngs: nnx.Rngs, dataset_labels: np.ndarray | None = None,
                     dtype: jnp.dtype = jnp.float32) -> list[list[connectors.Connector]]:
    """The connectors of `loss.name` (a list per teacher, one per tap pair; [] for others).

    The tap shapes come from tracing both models abstractly on `image_shape` images (see
    `connectors_for_shapes`), with the sub-modules loss.student_taps / each teacher's taps name
    (kdjax.taps); `dataset_labels` (the training labels) serve CRD's memory.
    """
    if loss["name"] not in FEATURE_METHODS:
        return []
    return connectors_for_shapes(
        loss, connectors.feature_shapes(*nnx.split(student), image_shape,
                                        taps=loss["student_taps"], what="loss.student_taps"),
        [connectors.feature_shapes(t.graphdef, t.variables, image_shape, taps=t.taps,
                                   what="loss.teacher_taps") for t in teachers],
        rngs=rngs, dataset_labels=dataset_labels, dtype=dtype)


def connectors_for_shapes(loss: Mapping[str, Any], student_shapes: Mapping[str, tuple],
                          teacher_shapes: Sequence[Mapping[str, tuple]], *, rngs: nnx.Rngs,
                          dataset_labels: np.ndarray | None = None,
                          dtype: jnp.dtype = jnp.float32) -> list[list[connectors.Connector]]:
    """`build_connectors` from the models' tap shapes ({tap: shape}, student and per teacher)."""
    name = loss["name"]
    if name not in FEATURE_METHODS:
        return []
    if not teacher_shapes:
        raise ValueError(f"loss.name={name!r} distils from a teacher, but none was given")
    method = FEATURE_METHODS[name]
    _, connector_kwargs = _split_kwargs(name, dict(loss["kwargs"]))
    accepted = _parameters(method.connector)
    derived = {k: v for k, v in (("dtype", dtype), ("dataset_labels", dataset_labels))
               if k in accepted}
    if "dataset_labels" in derived and dataset_labels is None:
        raise ValueError(f"loss.name={name!r} keeps per-example memory: pass the training "
                         f"labels (dataset_labels)")
    out = []
    for shapes in teacher_shapes:
        pairs = tap_pairs(name, loss["student_taps"], loss["teacher_taps"], list(student_shapes),
                          list(shapes))
        out.append([method.connector(s, t, student_shapes[s], shapes[t], rngs=rngs, **derived,
                                     **connector_kwargs)
                    for s, t in pairs])
    return out
