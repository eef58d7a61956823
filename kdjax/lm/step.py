"""The fused language-model distillation step: the frozen teacher's forward, the student's
forward and backward, the token loss and the optimizer update in ONE jit-compiled program, as
kdjax.step's image step (whose update, NaN policy and dispatch it shares: `apply_update`,
`compile_step`).

The training rows live on the devices (`TokenData`); the step draws its own batch from the
run's seed and step, as device-resident image data does, so the data order is part of the
TrainState and a resumed run continues it exactly. A row's positions count in the loss only
where the target is the next token of the same document (kdjax.lm.packing): padding and
cross-document positions are left out of the sums, not averaged in as zeros. The loss is the
token mean ``(ce_weight * sum CE + kd_weight * sum D) / tokens`` over the batch; metrics are
(sum, count) pairs ("ce_sum", ..., "tokens") so that averages over many steps weight each token
once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from kdjax import sharding
from kdjax.lm import packing
from kdjax.lm.objective import TokenObjective
from kdjax.step import (FrozenModel, Step, TrainState, _epoch_key, apply_update, compile_step)

#: The per-step sums an LM step reports; "tokens" is their count.
SUM_METRICS = ("ce_sum", "kd_sum", "correct_sum", "agreement_sum")


class TokenData(flax.struct.PyTreeNode):
    """Packed training rows on the devices: tokens and segment ids ``[N, seq_len + 1]``."""

    tokens: jax.Array
    segments: jax.Array
    batch_size: int = flax.struct.field(pytree_node=False)

    @property
    def steps_per_epoch(self) -> int:
        return self.tokens.shape[0] // self.batch_size  # the last partial batch is dropped


def _sample_rows(state: TrainState, data: TokenData, mesh: Mesh
                 ) -> tuple[TrainState, dict[str, jax.Array]]:
    """This step's rows, from the epoch's permutation (redrawn at each epoch's first step)."""
    spe = data.steps_per_epoch
    pos = state.step % spe
    perm = jax.lax.cond(
        pos == 0,
        lambda: jax.random.permutation(_epoch_key(state.rng, state.step // spe),
                                       data.tokens.shape[0]).astype(jnp.int32),
        lambda: state.perm)
    idx = jax.lax.dynamic_slice_in_dim(perm, pos * data.batch_size, data.batch_size)
    batch = {"tokens": data.tokens[idx], "segments": data.segments[idx]}
    if mesh.size > 1:  # each device computes on its rows of the batch (nothing to do on one)
        batch = jax.lax.with_sharding_constraint(batch, sharding.batch_sharded(mesh))
    return state.replace(perm=perm), batch


def _teacher_hidden(teacher: nnx.Module, inputs: dict[str, jax.Array]) -> jax.Array:
    out = teacher.features(inputs["tokens"], segment_ids=inputs["segment_ids"], logits=False)
    return jax.lax.stop_gradient(out["hidden"])


def _place_teachers(teachers, teacher_sharding, mesh: Mesh) -> tuple[tuple, tuple]:
    """(shardings, variables) of the teachers on the mesh. On one device they stay as they are:
    on XLA:CPU the program compiled for NamedSharding-placed teacher variables ran 2.7x slower
    (0.76 vs 0.28 CPU-s per lm_mini step with an lm_mini teacher), for nothing to partition."""
    if mesh.size == 1:
        return (None,) * len(teachers), tuple(t.variables for t in teachers)
    shardings = tuple(teacher_sharding or (sharding.replicated(mesh),) * len(teachers))
    return shardings, tuple(sharding.put(t.variables, s) for t, s in zip(teachers, shardings))


def make_lm_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    objective: TokenObjective,
    *,
    teacher: FrozenModel | None,
    data: TokenData,
    mesh: Mesh,
    steps_per_call: int = 1,
    nan_policy: str = "stop",
    state_sharding: TrainState | None = None,
    teacher_sharding: Any = None,
) -> Step:
    """The LM train step; call it as ``state, metrics = step(state)`` (it samples its rows).

    Args mirror kdjax.step.make_distill_step: `graphdef` is the Distillee's (its student an
    LM of kdjax.lm.models), `teacher` a frozen LM with the same vocabulary, or None for
    supervised training. Metrics: the SUM_METRICS of the batch, "tokens" (target tokens
    counted), "loss" (the token-mean objective) and "grad_norm".
    """
    teachers = () if teacher is None else (teacher,)
    teacher_sharding, teacher_vars = _place_teachers(teachers, teacher_sharding, mesh)
    teacher_defs = tuple(t.graphdef for t in teachers)

    def one_step(state: TrainState, teacher_vars, data: TokenData, batch):
        del batch  # the rows are on the device: the step samples its own
        state, rows = _sample_rows(state, data, mesh)
        inputs = packing.model_inputs(rows["tokens"], rows["segments"])
        mask = inputs["loss_mask"]
        frozen = [nnx.merge(g, v) for g, v in zip(teacher_defs, teacher_vars)]
        t_hidden = _teacher_hidden(frozen[0], inputs) if frozen else None

        def loss_fn(params):
            model = nnx.merge(graphdef, params, state.model_state, copy=True)
            student = model.student
            hidden = student.features(inputs["tokens"], segment_ids=inputs["segment_ids"],
                                      train=True, logits=False)["hidden"]
            loss, metrics = objective.loss(objective.terms(
                student, hidden, frozen[0] if frozen else None, t_hidden, inputs["targets"],
                mask), mask, state.step)
            return loss, (metrics, nnx.state(model, nnx.Not(nnx.Param)))

        (loss, (metrics, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        return apply_update(state, grads, loss, metrics, model_state, tx=tx,
                            nan_policy=nan_policy, mesh=mesh, state_sharding=state_sharding)

    return compile_step(one_step, teacher_vars, data, mesh=mesh, steps_per_call=steps_per_call,
                        state_sharding=state_sharding, teacher_sharding=teacher_sharding)


def make_lm_eval_step(graphdef: nnx.GraphDef, objective: TokenObjective, *,
                      teacher: FrozenModel | None, mesh: Mesh, params_sharding: Any = None,
                      teacher_sharding: Any = None) -> Callable:
    """``eval_step(params, model_state, batch) -> sums`` over held-out rows.

    `batch` has "tokens" and "segments" ``[E, seq_len + 1]`` and "mask" ``[E]`` (1 for real
    rows: the last batch is padded, never dropped). Sums: "count" (target tokens), "loss" (the
    student's summed CE: perplexity is exp(loss / count)), "accuracy" (next-token top-1) and,
    with a teacher, "teacher_agreement" (top-1 equal to the teacher's) and "teacher_loss" (the
    teacher's own CE). A Distillee is evaluated by its student alone.
    """
    rep = sharding.replicated(mesh)
    teachers = () if teacher is None else (teacher,)
    teacher_sharding, teacher_vars = _place_teachers(teachers, teacher_sharding, mesh)
    teacher_defs = tuple(t.graphdef for t in teachers)
    ce_only = dataclasses.replace(objective, divergence=None)

    def eval_step(params, model_state, teacher_vars, batch):
        inputs = packing.model_inputs(batch["tokens"], batch["segments"])
        mask = inputs["loss_mask"] & (batch["mask"][:, None] > 0)
        model = nnx.merge(graphdef, params, model_state)
        student = getattr(model, "student", model)
        hidden = student.features(inputs["tokens"], segment_ids=inputs["segment_ids"],
                                  logits=False)["hidden"]
        frozen = [nnx.merge(g, v) for g, v in zip(teacher_defs, teacher_vars)]
        t_hidden = _teacher_hidden(frozen[0], inputs) if frozen else None
        terms = ce_only.terms(student, hidden, frozen[0] if frozen else None, t_hidden,
                              inputs["targets"], mask)
        sums = {"count": mask.sum().astype(jnp.float32), "loss": terms["ce"].sum(),
                "accuracy": terms["correct"].sum()}
        if frozen:
            sums["teacher_agreement"] = terms["agreement"].sum()
            sums["teacher_loss"] = ce_only.terms(frozen[0], t_hidden, None, None,
                                                 inputs["targets"], mask)["ce"].sum()
        return sums

    fn = (jax.jit(eval_step) if mesh.size == 1 else  # (see kdjax.step.compile_step)
          jax.jit(eval_step, out_shardings=rep, in_shardings=(
              params_sharding, None, teacher_sharding, sharding.batch_sharded(mesh))))

    def run(params, model_state, batch):
        return fn(params, model_state, teacher_vars, batch)

    return run
