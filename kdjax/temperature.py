"""The distillation temperature over training: schedules, and CTKD's learned temperature.

Both are computed inside the fused step from its step counter (a traced scalar), so the
temperature is a value of the compiled program like any other: one program serves every step, and
a different schedule is a different config, never a retrace. The logit losses of kdjax.losses take
such a traced temperature (scalar, or one per example) and keep their T^2 scaling.

Schedules (config `loss.temperature_schedule`, in the spirit of MaxText's `*_schedule` keys) are
optax schedules of the step: constant, linear and cosine from `init_value` to `end_value` over
`steps` steps from `begin_step`, and step (piecewise constant) schedules.

CTKD (Li et al., "Curriculum Temperature for Knowledge Distillation", AAAI 2023; config
`loss.learned_temperature`) learns the temperature adversarially: a module predicts
`z` (one global value, or one per example from both models' logits), the loss uses
`T = t_min + t_range * sigmoid(GRL(z))`, and the gradient-reversal layer GRL (identity forward,
`-lambda * gradient` backward) makes the optimizer that minimises the loss for the student
*maximise* it for the temperature. lambda follows the paper's cosine curriculum from 0 to
`max_strength`, so distillation starts easy and the temperature gets harder to learn from.
The module is a part of the student's Distillee (kdjax.distillee): it trains with the student, in
the same step and optimizer, is
checkpointed with it and is not part of the exported student.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kdjax import plan as plan_lib

SCHEDULES = ("constant", "linear", "cosine", "step")
MODES = ("global", "instance")

# (the student's features incl. the Distillee's "temperature" output, step) -> (T, metrics)
Source = Callable[[Mapping[str, Any], jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def _positive(key: str, value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{key} must be a finite number > 0, got {value!r}")
    return float(value)


def schedule(cfg: plan_lib.TemperatureSchedule, *, total_steps: int | None,
             key: str = "loss.temperature_schedule") -> optax.Schedule:
    """The optax schedule of a `loss.temperature_schedule` section (its `name` must be set).

    The value at step s (0-based: the first update is step 0) is, with I = init_value,
    E = end_value, b = begin_step, n = steps (0: until total_steps) and u = clip((s - b) / n):

      constant  I
      linear    I + (E - I) u                             (optax.linear_schedule)
      cosine    E + (I - E) (1 + cos(pi u)) / 2           (optax.cosine_decay_schedule)
      step      I times every factors[i] whose boundaries[i] <= s (optax.piecewise_constant)
    """
    name = cfg.name
    if name not in SCHEDULES:
        raise ValueError(f"{key}.name must be one of {list(SCHEDULES)} (or '' for the fixed "
                         f"temperature), got {name!r}")
    init = _positive(f"{key}.init_value", cfg.init_value)
    if name == "constant":
        return optax.constant_schedule(init)
    if name == "step":
        boundaries, factors = tuple(cfg.boundaries), tuple(cfg.factors)
        if len(boundaries) != len(factors) or not boundaries:
            raise ValueError(f"{key}.boundaries and {key}.factors pair up one to one (a factor "
                             f"applies from its boundary step on), got {boundaries} and {factors}")
        if (any(not isinstance(b, int) or b < 0 for b in boundaries)
                or list(boundaries) != sorted(set(boundaries))):
            raise ValueError(f"{key}.boundaries must be increasing step numbers >= 0, got "
                             f"{boundaries}")
        for i, f in enumerate(factors):
            _positive(f"{key}.factors[{i}]", f)
        return optax.piecewise_constant_schedule(init, dict(zip(boundaries, map(float, factors))))
    end = _positive(f"{key}.end_value", cfg.end_value)
    begin = cfg.begin_step
    if begin < 0:
        raise ValueError(f"{key}.begin_step must be >= 0, got {begin}")
    steps = cfg.steps
    if not steps:
        if total_steps is None:
            raise ValueError(f"{key}.steps=0 runs the schedule until the end of training, which "
                             f"needs the run's total steps (objectives.from_config(..., "
                             f"total_steps=train.steps)); or set {key}.steps")
        steps = total_steps - begin
    if steps <= 0:
        raise ValueError(f"{key} must span at least one step: steps={cfg.steps} from "
                         f"begin_step={begin} (of {total_steps} steps); set {key}.steps > 0 or "
                         f"an earlier begin_step")
    if name == "linear":
        return optax.linear_schedule(init, end, steps, transition_begin=begin)
    cosine = optax.cosine_decay_schedule(init, steps, alpha=end / init)
    return optax.join_schedules([optax.constant_schedule(init), cosine], [begin])


def gradient_reversal(x: jax.Array, strength: jax.Array) -> jax.Array:
    """Identity on `x` forward; the gradient w.r.t. `x` is multiplied by `-strength` backward
    (Ganin & Lempitsky, 2015). `strength` gets no gradient."""
    return _grl(x, jnp.asarray(strength, jnp.float32))


@jax.custom_vjp
def _grl(x, strength):
    return x


def _grl_fwd(x, strength):
    return x, strength


def _grl_bwd(strength, g):
    return (-strength * g).astype(g.dtype), jnp.zeros_like(strength)


_grl.defvjp(_grl_fwd, _grl_bwd)


def curriculum(step: jax.Array, *, max_strength: float, steps: int) -> jax.Array:
    """CTKD's curriculum: lambda = max_strength * (1 - cos(pi * min(step, steps) / steps)) / 2,
    from 0 at step 0 to max_strength at `steps` and after (the paper's eq. with lambda_min = 0,
    per step instead of per epoch)."""
    return max_strength * (1.0 - optax.cosine_decay_schedule(1.0, steps)(step))


def logit_of(temperature: float, *, t_min: float, t_range: float) -> float:
    """The z with t_min + t_range * sigmoid(z) = temperature (a module's starting value)."""
    u = (temperature - t_min) / t_range
    if not 0.0 < u < 1.0:
        raise ValueError(f"the learned temperature starts at the loss's temperature "
                         f"{temperature}, which must lie strictly between "
                         f"loss.learned_temperature.t_min={t_min} and t_min + t_range="
                         f"{t_min + t_range}; change the loss's temperature or that range")
    return math.log(u / (1.0 - u))


class TemperatureModule(nnx.Module):
    """CTKD's module as a Distillee part: its entry "temperature" is its output `z` from the
    student's and the first teacher's logits."""

    student_taps: tuple[str, ...] = ()

    def features(self, x, out, teachers, *, train, index=None, key=None) -> dict:
        del x, train, index, key
        if not teachers:
            raise ValueError("a learned temperature (loss.learned_temperature) distils from a "
                             "teacher, but the step has none")
        return {"temperature": self(out["logits"], teachers[0]["logits"])}

    def eval_logits(self, x: jax.Array, out: dict) -> dict[str, jax.Array]:
        del x, out  # a temperature adds no classifier to evaluate
        return {}


class GlobalTemperature(TemperatureModule):
    """CTKD's global temperature: one learned `z` for every example."""

    def __init__(self, *, init: float):
        self.z = nnx.Param(jnp.asarray(init, jnp.float32))

    def __call__(self, student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
        del student_logits, teacher_logits
        return self.z[...]


class InstanceTemperature(TemperatureModule):
    """CTKD's instance-wise temperature: `z` per example from an MLP over the concatenated
    student and teacher logits. Its inputs are detached, so the module learns only through its
    own (reversed) gradient and sends none into the student. The output layer starts at zero
    weights and bias `init`, so every example starts at the same temperature."""

    def __init__(self, num_classes: int, *, init: float, hidden: int, rngs: nnx.Rngs):
        if hidden < 1:
            raise ValueError(f"loss.learned_temperature.hidden must be >= 1, got {hidden}")
        self.hidden = nnx.Linear(2 * num_classes, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 1, kernel_init=nnx.initializers.zeros,
                              bias_init=nnx.initializers.constant(init), rngs=rngs)

    def __call__(self, student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
        x = jax.lax.stop_gradient(jnp.concatenate(
            [student_logits.astype(jnp.float32), teacher_logits.astype(jnp.float32)], axis=-1))
        return self.out(nnx.relu(self.hidden(x)))[..., 0]


def build(cfg: plan_lib.LearnedTemperature, *, num_classes: int, temperature: float,
          rngs: nnx.Rngs) -> TemperatureModule | None:
    """The temperature module of a `loss.learned_temperature` section (None when `mode` is ''),
    starting at `temperature`."""
    mode = cfg.mode
    if not mode:
        return None
    if mode not in MODES:
        raise ValueError(f"loss.learned_temperature.mode must be one of {list(MODES)} (or '' "
                         f"for none), got {mode!r}")
    init = logit_of(temperature, t_min=cfg.t_min, t_range=cfg.t_range)
    if mode == "global":
        return GlobalTemperature(init=init)
    return InstanceTemperature(num_classes, init=init, hidden=cfg.hidden, rngs=rngs)


def learned(cfg: plan_lib.LearnedTemperature, *, total_steps: int | None) -> Source:
    """The source of CTKD's temperature: the Distillee's module output `z` (its features'
    "temperature") through the gradient-reversal layer at the curriculum's strength."""
    key = "loss.learned_temperature"
    t_min = _positive(f"{key}.t_min", cfg.t_min)
    t_range = _positive(f"{key}.t_range", cfg.t_range)
    max_strength = cfg.max_strength
    if not (math.isfinite(max_strength) and max_strength >= 0):
        raise ValueError(f"{key}.max_strength must be >= 0, got {max_strength}")
    steps = cfg.curriculum_steps or total_steps
    if steps is None:
        raise ValueError(f"{key}.curriculum_steps=0 spreads the curriculum over the whole run, "
                         f"which needs its total steps (objectives.from_config(..., "
                         f"total_steps=train.steps)); or set {key}.curriculum_steps")
    if steps <= 0:
        raise ValueError(f"{key}.curriculum_steps must be >= 0, got {cfg.curriculum_steps}")

    def source(out, step):
        if "temperature" not in out:
            raise ValueError("loss.learned_temperature needs the temperature module in the "
                             "student's Distillee: build it with objectives.build_temperature")
        strength = curriculum(step, max_strength=max_strength, steps=steps)
        z = gradient_reversal(out["temperature"], strength)
        t = t_min + t_range * jax.nn.sigmoid(z)
        return t, {"temperature": jnp.mean(t), "temperature_strength": strength}

    return source


def scheduled(cfg: plan_lib.TemperatureSchedule, *, total_steps: int | None) -> Source:
    """The source of a scheduled temperature (also logged, as "temperature")."""
    fn = schedule(cfg, total_steps=total_steps)

    def source(out, step):
        del out
        t = jnp.asarray(fn(step), jnp.float32)
        return t, {"temperature": t}

    return source


def kind(loss: Any) -> str:
    """Which temperature a config's `loss` section sets: "schedule", "learned" (CTKD) or ""
    (the loss's fixed one)."""
    sched, mode = loss.temperature_schedule.name, loss.learned_temperature.mode
    if sched and mode:
        raise ValueError(f"loss.temperature_schedule.name={sched!r} and "
                         f"loss.learned_temperature.mode={mode!r} both set the "
                         f"temperature; choose one")
    if mode and mode not in MODES:
        raise ValueError(f"loss.learned_temperature.mode must be one of {list(MODES)} (or "
                         f"'' for none), got {mode!r}")
    return "schedule" if sched else "learned" if mode else ""


def from_config(loss: Any, *, total_steps: int | None) -> Source | None:
    """The temperature source of a config's `loss` section: a schedule, CTKD's learned
    temperature, or None when neither is set (the loss's fixed temperature)."""
    which = kind(loss)
    if which == "schedule":
        return scheduled(loss.temperature_schedule, total_steps=total_steps)
    if which == "learned":
        return learned(loss.learned_temperature, total_steps=total_steps)
    return None
