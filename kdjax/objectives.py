"""Training objectives: turn the `loss` section of a config into the function the step calls.

`kdjax.losses` holds pure per-example losses; an objective picks the features they need from the
models' `features()` dicts, reduces over the batch, mixes in hard-label cross-entropy, and returns
the scalar to differentiate plus the terms for logging. Keeping this apart from `losses` keeps
the losses importable on their own, optax style.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from kdjax import losses
from kdjax.augment import MixedLabels
from kdjax.step import Objective

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


def supervised(*, label_smoothing: float = 0.0) -> Objective:
    """Plain cross-entropy on the labels: teachers and baseline students."""

    def objective(out, teacher_out, labels, step):
        del teacher_out, step
        logits = out["logits"].astype(jnp.float32)
        ce = cross_entropy(logits, labels, label_smoothing=label_smoothing).mean()
        return ce, {"ce": ce, "accuracy": (logits.argmax(-1) == hard_labels(labels)).mean()}

    return objective


def logit_distillation(name: str, *, ce_weight: float, kd_weight: float,
                       kd_warmup_steps: int = 0, teacher_weights: Sequence[float] | None = None,
                       ensemble_mode: str = "probs", label_smoothing: float = 0.0,
                       **kwargs: Any) -> Objective:
    """ce_weight · CE(labels) + kd_weight · ramp(step) · LOSS(student, teacher, **kwargs).

    Hinton's KD is name="kd" with ce_weight=1−α and kd_weight=α (losses.hinton_kd's mix). With
    several teachers, their logits are combined by `losses.ensemble_teacher` first. ramp goes
    linearly from 0 to 1 over kd_warmup_steps (DKD's recipe warms its loss up this way).
    """
    if name not in LOGIT_LOSSES:
        raise ValueError(f"unknown loss.name={name!r}; valid names: "
                         f"{sorted(['ce', *LOGIT_LOSSES])}")
    fn = LOGIT_LOSSES[name]
    valid = [p.name for p in inspect.signature(fn).parameters.values()
             if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"loss.kwargs {unknown} are not hyperparameters of loss.name={name!r}; "
                         f"valid: {valid}")
    for arg, value in (("ce_weight", ce_weight), ("kd_weight", kd_weight)):
        if value < 0:
            raise ValueError(f"loss.{arg} must be >= 0, got {arg}={value}")
    params = inspect.signature(fn).parameters
    takes_labels = "labels" in params
    # Several teachers are averaged at the loss's own temperature, so that the target is the
    # mean of the teachers' softened distributions rather than a softened mean.
    ensemble_temperature = kwargs.get("temperature", params["temperature"].default)

    def objective(out, teacher_out, labels, step):
        if not teacher_out:
            raise ValueError(f"loss.name={name!r} distils from a teacher, but none was given")
        student = out["logits"].astype(jnp.float32)
        teacher = [t["logits"].astype(jnp.float32) for t in teacher_out]
        target = teacher[0] if len(teacher) == 1 else losses.ensemble_teacher(
            teacher, weights=teacher_weights, mode=ensemble_mode,
            temperature=ensemble_temperature)
        hard = hard_labels(labels)
        args = (student, target, hard) if takes_labels else (student, target)
        kd = fn(*args, **kwargs).mean()
        ce = cross_entropy(student, labels, label_smoothing=label_smoothing).mean()
        ramp = (jnp.minimum(1.0, (step + 1) / kd_warmup_steps) if kd_warmup_steps
                else jnp.float32(1.0))
        total = ce_weight * ce + kd_weight * ramp * kd
        return total, {"ce": ce, "kd": kd, "accuracy": (student.argmax(-1) == hard).mean()}

    return objective


def from_config(loss: Mapping[str, Any]) -> Objective:
    """Build the objective of a config's `loss` section (see kdjax.config)."""
    kwargs = dict(loss["kwargs"])
    if loss["name"] == "ce":
        if kwargs:
            raise ValueError(f"loss.name='ce' takes no loss.kwargs, got {sorted(kwargs)}")
        return supervised(label_smoothing=loss["label_smoothing"])
    return logit_distillation(
        loss["name"], ce_weight=loss["ce_weight"], kd_weight=loss["kd_weight"],
        kd_warmup_steps=loss["kd_warmup_steps"], label_smoothing=loss["label_smoothing"],
        **kwargs)
