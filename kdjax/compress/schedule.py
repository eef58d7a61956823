"""When masks change and how sparse they are: one-shot, or the cubic schedule of Zhu & Gupta.

Zhu & Gupta (2017), "To prune, or not to prune": the sparsity at step t rises from s_i to s_f as

    s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_end - t_0))**3,   t_0 <= t <= t_end,

fast at first, while many weights are redundant, and slowly near the end, so the network recovers
between the last prunings. Masks are recomputed at t_0, every `every_steps` after it and at t_end
(so the final sparsity is always reached); before t_0 nothing is pruned, after t_end the masks
stay fixed. One-shot pruning is a single update at t_0 to s_f.

Both functions take the step as a traced int32 array inside the compiled step (the optimizer's own
counter), or as a Python int in tests and on the host.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

SCHEDULES = ("one_shot", "cubic")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """`kind` one of SCHEDULES; sparsities in [0, 1); steps count optimizer updates (the
    TrainState.step of the step that applies them)."""

    kind: str
    final: float
    initial: float = 0.0
    begin: int = 0
    end: int = 0
    every: int = 1

    def sparsity(self, step):
        """The target sparsity of the masks computed at `step` (meaningful on update steps)."""
        if self.kind != "cubic":
            return jnp.full((), self.final, jnp.float32)
        frac = jnp.clip((jnp.asarray(step, jnp.float32) - self.begin) / (self.end - self.begin),
                        0.0, 1.0)
        return self.final + (self.initial - self.final) * (1.0 - frac) ** 3

    def is_update(self, step):
        """Whether the masks are recomputed at `step` (bool array)."""
        step = jnp.asarray(step, jnp.int32)
        if self.kind == "one_shot":
            return step == self.begin
        inside = (step >= self.begin) & (step <= self.end)
        return inside & (((step - self.begin) % self.every == 0) | (step == self.end))
