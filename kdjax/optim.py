"""Optimizers and learning-rate schedules from the run's `optimizer` section (optax)."""

from __future__ import annotations

import optax

from kdjax import plan as plan_lib

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant", "step")


def schedule(opt: plan_lib.Optimizer, total_steps: int) -> optax.Schedule:
    """Linear warm-up, then cosine decay to 0, a constant, or step decays (the CRD recipes)."""
    lr, warmup = opt.learning_rate, opt.warmup_steps
    name = opt.schedule
    if name == "cosine":
        main = optax.cosine_decay_schedule(lr, max(1, total_steps - warmup))
    elif name == "constant":
        main = optax.constant_schedule(lr)
    elif name == "step":
        main = optax.piecewise_constant_schedule(
            lr, {int(b) - warmup: opt.decay_factor for b in opt.decay_boundaries})
    else:
        raise ValueError(f"unknown optimizer.schedule={name!r}; valid: {list(SCHEDULES)}")
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(opt: plan_lib.Optimizer, total_steps: int) -> optax.GradientTransformation:
    """SGD applies weight decay as PyTorch's SGD does (added to the gradient before momentum), so
    the CRD-paper recipes transfer unchanged; AdamW decays decoupled from the gradient."""
    if opt.learning_rate <= 0:
        raise ValueError(f"optimizer.learning_rate must be > 0, got {opt.learning_rate}")
    lr = schedule(opt, total_steps)
    name, wd = opt.name, opt.weight_decay
    if name == "sgd":
        return optax.chain(optax.add_decayed_weights(wd) if wd else optax.identity(),
                           optax.sgd(lr, momentum=opt.momentum or None,
                                     nesterov=opt.nesterov))
    if name == "adam":
        return optax.chain(optax.add_decayed_weights(wd) if wd else optax.identity(),
                           optax.adam(lr))
    if name == "adamw":
        return optax.adamw(lr, weight_decay=wd)
    raise ValueError(f"unknown optimizer.name={name!r}; valid: {list(OPTIMIZERS)}")
