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
  tfkd                                 Tf-KD: a trained copy of the student as teacher ("self"),
                                       or the hand-designed virtual teacher ("virtual")
  byot                                 Be Your Own Teacher: exits on the student's stages learn
                                       from its deepest classifier (kdjax.exits)
Every logit loss (and feature methods' KD term, Tf-KD, BYOT) takes its temperature from
`loss.temperature_schedule` or CTKD's `loss.learned_temperature` when set (kdjax.temperature),
computed from the step inside the compiled step.
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

from kdjax import connectors, exits as exits_lib, losses, methods
from kdjax import plan as plan_lib
from kdjax import taps as taps_lib
from kdjax import temperature as temperature_lib
from kdjax.augment import MixedLabels
from kdjax.methods import Method, Term, ramp
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

TFKD_VARIANTS = ("virtual", "self")
# A temperature: a fixed Python number, or a source computing it from the step (and from the
# student's features: CTKD's module output), kdjax.temperature.Source.
Temperature = float | temperature_lib.Source
COMBINE = ("ensemble", "per_teacher")
# Connector arguments that kdjax derives itself (from the models and the data), not config keys.
_DERIVED = ("rngs", "dtype", "dataset_labels")


def _parameters(fn: Callable) -> Mapping[str, inspect.Parameter]:
    # A connector class: read __init__ (nnx's metaclass hides it from inspect.signature(cls)).
    return inspect.signature(fn.__init__ if isinstance(fn, type) else fn).parameters


def _keyword_only(fn: Callable) -> list[str]:
    return [p.name for p in _parameters(fn).values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


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


def _teacher_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Per-teacher weights, normalised to sum to 1 (uniform when None)."""
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if len(w) != n or min(w) < 0 or sum(w) <= 0:
        raise ValueError(f"teacher.weights must be {n} non-negative numbers, not all 0 (one per "
                         f"teacher), got {list(weights or [])}")
    return [x / sum(w) for x in w]


def _temperature_at(temperature: Temperature, out: Mapping[str, Any],
                    step: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
    """(the temperature of this step, its metrics): a fixed number as is (no metric)."""
    return temperature(out, step) if callable(temperature) else (temperature, {})


def _logit_term(fn: Callable[..., jax.Array], kwargs: Mapping[str, Any], *,
                teacher_weights: Sequence[float] | None, combine: str,
                ensemble_mode: str) -> Callable:
    """(student logits, teachers' logits, labels, temperature) -> the batch mean of `fn` against
    the teachers, at `temperature` (a number, or an array traced from the step).

    "ensemble" distils from one target; several teachers are averaged at the loss's own
    temperature, so that the target is the mean of their softened distributions rather than a
    softened mean. "per_teacher" distils from each and weights the losses.
    """
    if combine not in COMBINE:
        raise ValueError(f"teacher.combine must be one of {list(COMBINE)}, got {combine!r}")
    takes_labels = "labels" in inspect.signature(fn).parameters

    def term(student, teachers, labels, temperature):
        def against(target):
            args = (student, target, hard_labels(labels)) if takes_labels else (student, target)
            return fn(*args, temperature=temperature, **kwargs).mean()

        if len(teachers) == 1:
            return against(teachers[0])
        if combine == "ensemble":
            return against(losses.ensemble_teacher(teachers, weights=teacher_weights,
                                                   mode=ensemble_mode, temperature=temperature))
        w = _teacher_weights(teacher_weights, len(teachers))
        return sum(wi * against(t) for wi, t in zip(w, teachers))

    return term


def _accuracy(mix: Callable) -> Objective:
    """The objective of a combined mix, which also logs the student's training accuracy."""

    def objective(out, teacher_out, labels, step):
        total, metrics = mix(out, teacher_out, labels, step)
        logits = out["logits"]
        return total, {**metrics, "accuracy": (logits.argmax(-1) == hard_labels(labels)).mean()}

    return objective


def _ce_term(label_smoothing: float) -> Callable:
    def ce(out, teacher_out, labels, step):
        del teacher_out, step
        return cross_entropy(out["logits"].astype(jnp.float32), labels,
                             label_smoothing=label_smoothing).mean()

    return ce


def supervised(*, label_smoothing: float = 0.0) -> Objective:
    """Plain cross-entropy on the labels: teachers and baseline students."""
    return _accuracy(methods.combine(Term("ce", 1.0, _ce_term(label_smoothing))))


def _teacher_logits(name: str, teacher_out: Sequence[dict]) -> list[jax.Array]:
    if not teacher_out:
        raise ValueError(f"loss.name={name!r} distils from a teacher, but none was given")
    return [t["logits"].astype(jnp.float32) for t in teacher_out]


def _kd_term(name: str, term: Callable, temperature: Temperature) -> Callable:
    """The term of `_logit_term` against the step's teachers at the step's temperature (whose
    metrics it returns)."""

    def kd(out, teacher_out, labels, step):
        temp, temp_metrics = _temperature_at(temperature, out, step)
        return (term(out["logits"].astype(jnp.float32), _teacher_logits(name, teacher_out),
                     labels, temp), temp_metrics)

    return kd


def logit_distillation(name: str, *, ce_weight: float, kd_weight: float,
                       kd_warmup_steps: int = 0, teacher_weights: Sequence[float] | None = None,
                       combine: str = "ensemble", ensemble_mode: str = "probs",
                       label_smoothing: float = 0.0, **kwargs: Any) -> Objective:
    """ce_weight · CE(labels) + kd_weight · ramp(step) · LOSS(student, teacher(s), **kwargs).

    Hinton's KD is name="kd" with ce_weight=1−α and kd_weight=α (losses.hinton_kd's mix). Several
    teachers are combined as `combine` says (see `_logit_term`). ramp goes linearly from 0 to 1
    over kd_warmup_steps (methods.ramp). `kwargs["temperature"]` is a number (the loss's default
    when absent) or a kdjax.temperature source (a schedule, CTKD), whose value is logged as
    "temperature".
    """
    if name not in LOGIT_LOSSES:
        raise ValueError(f"unknown loss.name={name!r}; valid names: "
                         f"{sorted(['ce', *LOGIT_LOSSES])}")
    fn = LOGIT_LOSSES[name]
    _check_kwargs(name, kwargs, _keyword_only(fn))
    _check_weights(ce_weight=ce_weight, kd_weight=kd_weight)
    temperature = kwargs.pop("temperature", inspect.signature(fn).parameters["temperature"].default)
    term = _logit_term(fn, kwargs, teacher_weights=teacher_weights, combine=combine,
                       ensemble_mode=ensemble_mode)
    return _accuracy(methods.combine(
        Term("ce", ce_weight, _ce_term(label_smoothing)),
        Term("kd", ramp(kd_weight, kd_warmup_steps), _kd_term(name, term, temperature))))


def _from_step(weight: methods.Weight, start: int, before: float) -> methods.Weight:
    """`before` until step `start`, then `weight` (a number or a schedule)."""
    if not start:
        return weight
    return lambda step: jnp.where(step < start, before,
                                  weight(step) if callable(weight) else weight)


def feature_distillation(name: str, *, ce_weight: float = 1.0, kd_weight: float = 0.0,
                         feature_weight: float = 1.0, kd_temperature: Temperature = 4.0,
                         kd_warmup_steps: int = 0, hint_steps: int = 0,
                         teacher_weights: Sequence[float] | None = None,
                         combine: str = "ensemble", label_smoothing: float = 0.0,
                         **kwargs: Any) -> Objective:
    """ce_weight · CE + ramp(step) · (kd_weight · KD + feature_weight · Σ_teachers w_i Σ_pairs L).

    L is FEATURE_METHODS[name].loss on each of its connector's outputs (`Distillee.features`),
    reduced to its batch mean and summed over the tap pairs (RepDistiller sums AT's, NST's and
    VID's layers). KD is Hinton's soft-target KL at kd_temperature (a number or a
    kdjax.temperature source), combined over teachers as `combine` says. With hint_steps > 0 the
    first hint_steps steps optimise the feature term alone (FitNets' first stage; the paper's
    second stage then uses kd_weight and ce_weight).
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
    kd_term = _logit_term(losses.soft_target_kl, {}, teacher_weights=teacher_weights,
                          combine=combine, ensemble_mode="probs")

    def feature(out, teacher_out, labels, step):
        del teacher_out, labels, step
        if "connectors" not in out:
            raise ValueError(f"loss.name={name!r} needs the student's connectors: build the "
                             f"student as a kdjax.distillee.Distillee with "
                             f"objectives.build_connectors")
        weights = _teacher_weights(teacher_weights, len(out["connectors"]))
        return sum(w * sum(jnp.mean(loss_fn(*args, **loss_kwargs)) for args in pairs)
                   for w, pairs in zip(weights, out["connectors"]))

    terms = [Term("ce", _from_step(ce_weight, hint_steps, 0.0), _ce_term(label_smoothing)),
             Term("feature", _from_step(ramp(feature_weight, kd_warmup_steps), hint_steps, 1.0),
                  feature)]
    if kd_weight:
        terms.append(Term("kd", _from_step(ramp(kd_weight, kd_warmup_steps), hint_steps, 0.0),
                          _kd_term(name, kd_term, kd_temperature)))
    return _accuracy(methods.combine(*terms))


def mutual_learning(*, ce_weight: float = 1.0, kd_weight: float = 1.0,
                    kd_warmup_steps: int = 0, label_smoothing: float = 0.0,
                    **kwargs: Any) -> Objective:
    """Deep mutual learning: Σ_k ce_weight · CE_k + kd_weight · ramp · mean_{l≠k} KL(p_l ‖ p_k).

    Student 0 is the Distillee's student, the others its peers; peers' predictions are detached
    (losses.mutual_learning), so each student is trained on its own term only. `kwargs` go to
    losses.mutual_learning (temperature). Logs student 0's "ce" and "kd", each student's
    accuracy ("peer<i>/accuracy").
    """
    _check_kwargs("dml", kwargs, _keyword_only(losses.mutual_learning))
    _check_weights(ce_weight=ce_weight, kd_weight=kd_weight)

    def students(out, teacher_out, labels):
        if teacher_out:
            raise ValueError("loss.name='dml' trains students from each other, not from a "
                             "teacher; run it without teachers")
        if not out.get("peers"):
            raise ValueError("loss.name='dml' needs peer students: set model.peers, e.g. "
                             "model.peers=('mlp',)")
        return [f["logits"].astype(jnp.float32) for f in (out, *out["peers"])]

    def ce(out, teacher_out, labels, step):
        del step
        return jnp.stack([cross_entropy(z, labels, label_smoothing=label_smoothing).mean()
                          for z in students(out, teacher_out, labels)])

    def peer_ce(out, teacher_out, labels, step):
        acc = [(z.argmax(-1) == hard_labels(labels)).mean()
               for z in students(out, teacher_out, labels)[1:]]
        return (jnp.sum(ce(out, teacher_out, labels, step)[1:]),
                {f"peer{i}/accuracy": a for i, a in enumerate(acc, start=1)})

    def kl(out, teacher_out, labels, step):
        del step
        return losses.mutual_learning(students(out, teacher_out, labels), **kwargs).mean(axis=-1)

    kd = ramp(kd_weight, kd_warmup_steps)
    # The student's terms are logged; its peers' add to the loss under the same weights.
    return _accuracy(methods.combine(
        Term("ce", ce_weight, lambda *args: ce(*args)[0]),
        Term("peer_ce", ce_weight, peer_ce, log=False),
        Term("kd", kd, lambda *args: kl(*args)[0]),
        Term("peer_kd", kd, lambda *args: jnp.sum(kl(*args)[1:]), log=False)))


def teacher_free(*, variant: str = "virtual", ce_weight: float, kd_weight: float,
                 kd_warmup_steps: int = 0, label_smoothing: float = 0.0,
                 temperature: Temperature = 20.0, correct_prob: float | None = None,
                 teacher_weights: Sequence[float] | None = None,
                 combine: str = "ensemble") -> Objective:
    """Tf-KD (Yuan et al., CVPR 2020): distillation without a stronger teacher.

    variant="self" (Tf-KD_self): Hinton's KD, ce_weight · CE + kd_weight · T²·KL(p_t ‖ p_s),
    from a trained copy of the student (the run `teacher.workdir` names: train the student alone
    first; `kdjax distill` refuses a teacher of another architecture). variant="virtual"
    (Tf-KD_reg): no teacher is loaded; ce_weight · CE + kd_weight · ramp · losses.teacher_free_kd
    against the hand-designed distribution (correct_prob on the label, the rest uniform), the
    hard label of mixed (mixup/CutMix) labels.
    """
    if variant not in TFKD_VARIANTS:
        raise ValueError(f"loss.kwargs.variant of loss.name='tfkd' must be one of "
                         f"{list(TFKD_VARIANTS)}, got {variant!r}")
    common = dict(ce_weight=ce_weight, kd_weight=kd_weight, kd_warmup_steps=kd_warmup_steps,
                  label_smoothing=label_smoothing)
    if variant == "self":
        if correct_prob is not None:
            raise ValueError("loss.kwargs.correct_prob is the virtual teacher's (variant="
                             "'virtual'); the self-teacher variant distils from a trained student")
        return logit_distillation("kd", **common, teacher_weights=teacher_weights,
                                  combine=combine, temperature=temperature)
    _check_weights(ce_weight=ce_weight, kd_weight=kd_weight)
    correct_prob = 0.99 if correct_prob is None else correct_prob

    def kd(out, teacher_out, labels, step):
        if teacher_out:
            raise ValueError("loss.name='tfkd' with variant='virtual' has a virtual teacher: run "
                             "it without teacher.workdir (or use variant='self')")
        temp, temp_metrics = _temperature_at(temperature, out, step)
        return losses.teacher_free_kd(out["logits"].astype(jnp.float32), hard_labels(labels),
                                      correct_prob=correct_prob,
                                      temperature=temp).mean(), temp_metrics

    return _accuracy(methods.combine(
        Term("ce", ce_weight, _ce_term(label_smoothing)),
        Term("kd", ramp(kd_weight, kd_warmup_steps), kd)))


def byot(*, ce_weight: float, kd_weight: float, feature_weight: float,
         temperature: Temperature = 3.0, kd_warmup_steps: int = 0,
         label_smoothing: float = 0.0) -> Objective:
    """Be Your Own Teacher (Zhang et al., ICCV 2019), as the authors' training loss:

    ce_weight · Σ_classifiers CE + ramp · Σ_exits (kd_weight · T²·KL(q_deep ‖ q_exit)
    + feature_weight · losses.byot_hint(f_exit, f_deep))

    over the deepest classifier and the Distillee's exits (kdjax.exits); the deepest
    classifier's soft targets and feature are detached, so it learns from the labels alone
    (the reference's (1 − α), α, β are ce_weight, kd_weight, feature_weight; its KD term is the
    soft-target cross-entropy, which differs from the KL by the target's entropy, a constant).
    Logs the deepest classifier's "ce", the exits' "kd" and "feature", and each exit's training
    accuracy as "exit_<tap>/accuracy".
    """
    _check_weights(ce_weight=ce_weight, kd_weight=kd_weight, feature_weight=feature_weight)

    def exits(out, teacher_out):
        if teacher_out:
            raise ValueError("loss.name='byot' teaches the student's exits from its own deepest "
                             "classifier: run it without teacher.workdir")
        if not out.get("exits"):
            raise ValueError("loss.name='byot' needs the student's exits: build the student as "
                             "a kdjax.distillee.Distillee with objectives.build_exits")
        return out["exits"]

    def exit_ce(out, teacher_out, labels, step):
        del step
        y = hard_labels(labels)
        found = exits(out, teacher_out)
        return (sum(cross_entropy(logits, labels, label_smoothing=label_smoothing).mean()
                    for logits, _, _ in found.values()),
                {f"{name}/accuracy": (logits.argmax(-1) == y).mean()
                 for name, (logits, _, _) in found.items()})

    def kd(out, teacher_out, labels, step):
        del labels
        target = jax.lax.stop_gradient(out["logits"].astype(jnp.float32))
        temp, temp_metrics = _temperature_at(temperature, out, step)
        return (sum(losses.soft_target_kl(logits, target, temperature=temp).mean()
                    for logits, _, _ in exits(out, teacher_out).values()), temp_metrics)

    def hint(out, teacher_out, labels, step):
        del labels, step
        return sum(losses.byot_hint(feature, hint_target).mean()
                   for _, feature, hint_target in exits(out, teacher_out).values())

    ce = _ce_term(label_smoothing)
    return _accuracy(methods.combine(
        Term("exit_ce", ce_weight, exit_ce, log=False),
        Term("ce", ce_weight, ce),
        Term("kd", ramp(kd_weight, kd_warmup_steps), kd),
        Term("feature", ramp(feature_weight, kd_warmup_steps), hint)))


BYOT_EXIT_KEYS = ("hint_tap", "width")


def base_temperature(loss: Any) -> float:
    """The loss's fixed temperature: loss.kwargs.temperature or the method's default (feature
    methods: loss.kd_temperature). A learned temperature starts from it."""
    name, kwargs = loss.name, loss.kwargs
    if name in FEATURE_METHODS:
        return loss.kd_temperature
    fn = {**LOGIT_LOSSES, "tfkd": teacher_free, "byot": byot}.get(name)
    if fn is None:
        raise ValueError(f"loss.name={name!r} has no temperature")
    return kwargs.get("temperature", inspect.signature(fn).parameters["temperature"].default)


def _check_temperature(loss: Any, method: Method) -> None:
    """Refuse a schedule or learned temperature that `method` has no temperature for (or, for
    CTKD, no teacher to learn it against)."""
    which = temperature_lib.kind(loss)
    if not which:
        return
    name, kwargs = loss.name, loss.kwargs
    key = "loss.temperature_schedule" if which == "schedule" else "loss.learned_temperature"
    if method.family in ("supervised", "mutual"):
        raise ValueError(f"{key} sets the temperature of a distillation loss; loss.name={name!r} "
                         f"has none")
    if method.family == "feature" and not loss.kd_weight:
        raise ValueError(f"{key} sets the temperature of the KD term of loss.name={name!r}, "
                         f"whose loss.kd_weight is 0")
    if which == "schedule" and "temperature" in kwargs:
        raise ValueError(f"loss.kwargs.temperature={kwargs['temperature']} and "
                         f"loss.temperature_schedule both set the temperature; drop one (the "
                         f"schedule starts at its init_value)")
    if which == "learned" and not method.needs_teacher(kwargs):
        raise ValueError(f"loss.learned_temperature (CTKD) learns the temperature against a "
                         f"teacher; loss.name={name!r} has none here")


def from_config(loss: Any, teacher: Any | None = None, *,
                total_steps: int | None = None) -> Objective:
    """Build the objective of a config's `loss` section (and its `teacher` weights/combine):
    loss.name's method (kdjax.methods) checks the section and builds it.

    `total_steps` (train.steps) serves a temperature schedule or curriculum that runs until the
    end of training (their `steps` 0).
    """
    loss = plan_lib.section("loss", loss)
    teacher = None if teacher is None else plan_lib.section("teacher", teacher)
    method = methods.get(loss.name)
    method.check(loss)
    _check_temperature(loss, method)
    return method.objective(loss, teacher, total_steps=total_steps)


def _check_kwargs(name: str, kwargs: Mapping[str, Any], valid: Sequence[str]) -> None:
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"loss.kwargs {unknown} are not hyperparameters of loss.name={name!r}; "
                         f"valid: {sorted(valid)}")


def needs_teacher(name: str, kwargs: Mapping[str, Any] | None = None) -> bool:
    """Whether `kdjax distill` with this loss (name, loss.kwargs) loads teachers (the method's
    `Method.needs_teacher`): mutual learning, BYOT and Tf-KD's virtual teacher have none."""
    return methods.get(name).needs_teacher(kwargs or {})


def needs_dataset_labels(name: str) -> bool:
    """Whether loss.name's parts need every training label up front (CRD's memory draws
    negatives of other classes)."""
    return methods.get(name).needs_dataset_labels


def build_temperature(loss: Any, *, num_classes: int,
                      rngs: nnx.Rngs) -> temperature_lib.TemperatureModule | None:
    """CTKD's temperature module for `loss.learned_temperature` (None when its mode is ''),
    starting at the loss's fixed temperature (`base_temperature`)."""
    loss = plan_lib.section("loss", loss)
    if not loss.learned_temperature.mode:
        return None
    return temperature_lib.build(loss.learned_temperature, num_classes=num_classes,
                                 temperature=base_temperature(loss), rngs=rngs)


def build_exits(loss: Any, student: nnx.Module, *, image_shape: Sequence[int],
                rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32) -> exits_lib.Exits:
    """BYOT's exits for loss.name="byot" (none for other methods): one per stage in
    `loss.student_taps` (default: every stage of a zoo model but the last, the reference's
    choice), hinting at `loss.kwargs.hint_tap` (default "embedding"), built from the student's
    tap shapes traced abstractly."""
    loss = plan_lib.section("loss", loss)
    if loss.name != "byot":
        return exits_lib.Exits()
    kwargs = loss.kwargs
    hint_tap = kwargs.get("hint_tap", "embedding")
    graphdef, state = nnx.split(student)
    names = taps_lib.native_features(student)
    taps = tuple(loss.student_taps) or tuple(_stages(names)[:-1])
    if not taps:
        raise ValueError(f"loss.name='byot' attaches exits to the student's stages, but it has "
                         f"{'only ' + str(_stages(names)) if _stages(names) else 'no stage taps'}"
                         f"; name the layers in loss.student_taps (feature names or module "
                         f"paths)")
    shapes = {**connectors.feature_shapes(graphdef, state, image_shape, taps=taps,
                                          what="loss.student_taps"),
              **connectors.feature_shapes(graphdef, state, image_shape, taps=(hint_tap,),
                                          what="loss.kwargs.hint_tap")}
    return exits_lib.build(shapes, taps, hint_tap=hint_tap, num_classes=shapes["logits"][-1],
                           width=kwargs.get("width", 0), rngs=rngs, dtype=dtype)


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


def build_connectors(loss: Any, student: nnx.Module,
                     teachers: Sequence[FrozenModel], *, image_shape: Sequence[int],
                     rngs: nnx.Rngs, dataset_labels: np.ndarray | None = None,
                     dtype: jnp.dtype = jnp.float32) -> connectors.Connectors:
    """The connectors of `loss.name` (a list per teacher, one per tap pair; none for others).

    The tap shapes come from tracing both models abstractly on `image_shape` images (see
    `connectors_for_shapes`), with the sub-modules loss.student_taps / each teacher's taps name
    (kdjax.taps); `dataset_labels` (the training labels) serve CRD's memory.
    """
    loss = plan_lib.section("loss", loss)
    if loss.name not in FEATURE_METHODS:
        return connectors.Connectors()
    return connectors.Connectors(connectors_for_shapes(
        loss, connectors.feature_shapes(*nnx.split(student), image_shape,
                                        taps=loss.student_taps, what="loss.student_taps"),
        [connectors.feature_shapes(t.graphdef, t.variables, image_shape, taps=t.taps,
                                   what="loss.teacher_taps") for t in teachers],
        rngs=rngs, dataset_labels=dataset_labels, dtype=dtype))


def connectors_for_shapes(loss: Any, student_shapes: Mapping[str, tuple],
                          teacher_shapes: Sequence[Mapping[str, tuple]], *, rngs: nnx.Rngs,
                          dataset_labels: np.ndarray | None = None,
                          dtype: jnp.dtype = jnp.float32) -> list[list[connectors.Connector]]:
    """`build_connectors` from the models' tap shapes ({tap: shape}, student and per teacher)."""
    name = loss.name
    if not teacher_shapes:
        raise ValueError(f"loss.name={name!r} distils from a teacher, but none was given")
    method = FEATURE_METHODS[name]
    _, connector_kwargs = _split_kwargs(name, dict(loss.kwargs))
    accepted = _parameters(method.connector)
    derived = {k: v for k, v in (("dtype", dtype), ("dataset_labels", dataset_labels))
               if k in accepted}
    if "dataset_labels" in derived and dataset_labels is None:
        raise ValueError(f"loss.name={name!r} keeps per-example memory: pass the training "
                         f"labels (dataset_labels)")
    out = []
    for shapes in teacher_shapes:
        pairs = tap_pairs(name, loss.student_taps, loss.teacher_taps, list(student_shapes),
                          list(shapes))
        out.append([method.connector(s, t, student_shapes[s], shapes[t], rngs=rngs, **derived,
                                     **connector_kwargs)
                    for s, t in pairs])
    return out


# -- the image methods (kdjax.methods) ----------------------------------------------------------

def _common(loss: Any) -> dict[str, Any]:
    return dict(ce_weight=loss.ce_weight, kd_weight=loss.kd_weight,
                kd_warmup_steps=loss.kd_warmup_steps, label_smoothing=loss.label_smoothing)


def _teachers(teacher: Any | None) -> dict[str, Any]:
    """teacher.weights and teacher.combine as the objectives' keywords."""
    if teacher is None:
        return dict(teacher_weights=None, combine="ensemble")
    return dict(teacher_weights=tuple(teacher.weights) or None, combine=teacher.combine)


def _kwargs(loss: Any, total_steps: int | None) -> dict[str, Any]:
    """loss.kwargs, with loss.temperature's schedule or learned source when set."""
    source = temperature_lib.from_config(loss, total_steps=total_steps)
    return {**loss.kwargs, **({} if source is None else {"temperature": source})}


def _no_taps(loss: Any) -> None:
    if loss.student_taps or loss.teacher_taps or loss.hint_steps:
        raise ValueError(f"loss.student_taps, loss.teacher_taps and loss.hint_steps belong to "
                         f"feature methods {sorted(FEATURE_METHODS)} (and byot's student_taps), "
                         f"not loss.name={loss.name!r}")


def _check_ce(loss: Any) -> None:
    _no_taps(loss)
    if loss.kwargs:
        raise ValueError(f"loss.name='ce' takes no loss.kwargs, got {sorted(loss.kwargs)}; "
                         f"clear them")


def _check_tfkd(loss: Any) -> None:
    _no_taps(loss)
    _check_kwargs("tfkd", loss.kwargs, _keyword_only(teacher_free))


def _check_byot(loss: Any) -> None:
    if loss.teacher_taps or loss.hint_steps:
        raise ValueError("loss.teacher_taps and loss.hint_steps belong to feature methods; "
                         "byot names its stages in loss.student_taps")
    _check_kwargs("byot", loss.kwargs, ["temperature", *BYOT_EXIT_KEYS])


def _temperature_part(loss: Any, build: methods.Build) -> dict[str, Any]:
    module = build_temperature(loss, num_classes=build.student_spec.num_classes,
                               rngs=nnx.Rngs(build.seed + 0x7E))
    return {} if module is None else {"temperature": module}


def _connectors_part(loss: Any, build: methods.Build) -> dict[str, Any]:
    return {"connectors": build_connectors(
        loss, build.student, build.teachers, image_shape=build.image_shape,
        rngs=nnx.Rngs(build.seed + 0xC0), dataset_labels=build.dataset_labels,
        dtype=build.dtype), **_temperature_part(loss, build)}


def _exits_part(loss: Any, build: methods.Build) -> dict[str, Any]:
    return {"exits": build_exits(loss, build.student, image_shape=build.image_shape,
                                 rngs=nnx.Rngs(build.seed + 0xE0), dtype=build.dtype),
            **_temperature_part(loss, build)}


def _never(kwargs: Mapping[str, Any]) -> bool:
    del kwargs
    return False


def _self_variant(kwargs: Mapping[str, Any]) -> bool:
    return kwargs.get("variant", "virtual") == "self"


def _register() -> None:
    methods.register(Method(
        "ce", "supervised", check=_check_ce, needs_teacher=_never,
        objective=lambda loss, teacher=None, *, total_steps=None: supervised(
            label_smoothing=loss.label_smoothing)))
    for name in LOGIT_LOSSES:
        methods.register(Method(
            name, "logit", check=_no_taps, trainables=_temperature_part,
            objective=lambda loss, teacher=None, *, total_steps=None, name=name:
                logit_distillation(name, **_common(loss), **_teachers(teacher),
                                   **_kwargs(loss, total_steps))))
    for name, feature in FEATURE_METHODS.items():
        methods.register(Method(
            name, "feature", trainables=_connectors_part,
            needs_dataset_labels="dataset_labels" in _parameters(feature.connector),
            objective=lambda loss, teacher=None, *, total_steps=None, name=name:
                feature_distillation(
                    name, feature_weight=loss.feature_weight, hint_steps=loss.hint_steps,
                    kd_temperature=(temperature_lib.from_config(loss, total_steps=total_steps)
                                    or loss.kd_temperature),
                    **_common(loss), **_teachers(teacher), **loss.kwargs)))
    methods.register(Method(
        "dml", "mutual", check=_no_taps, needs_teacher=_never, learns_from="from peer students",
        trainables=lambda loss, build: methods.build_peers(build),
        objective=lambda loss, teacher=None, *, total_steps=None: mutual_learning(
            **_common(loss), **loss.kwargs)))
    methods.register(Method(
        "tfkd", "self", check=_check_tfkd, needs_teacher=_self_variant,
        teacher_is_student=_self_variant, trainables=_temperature_part,
        learns_from="from a virtual teacher (variant='virtual'; 'self' loads one)",
        objective=lambda loss, teacher=None, *, total_steps=None: teacher_free(
            **_common(loss), **_teachers(teacher), **_kwargs(loss, total_steps))))
    methods.register(Method(
        "byot", "self", check=_check_byot, needs_teacher=_never, trainables=_exits_part,
        learns_from="from its own deepest classifier",
        objective=lambda loss, teacher=None, *, total_steps=None: byot(
            **_common(loss), feature_weight=loss.feature_weight,
            **{k: v for k, v in _kwargs(loss, total_steps).items()
               if k not in BYOT_EXIT_KEYS})))


_register()
