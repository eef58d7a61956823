"""The fused language-model distillation step: the frozen teacher's forward, the student's
forward and backward, the token loss and the optimizer update in ONE jit-compiled program, as
kdjax.step's image step (whose update, NaN policy and dispatch it shares: `apply_update`,
`compile_step`).

The training rows live on the devices (`kdjax.step.DeviceData` of "tokens" and "segments", and an
instruction dataset's per-token "loss_mask"); the step draws its own batch from the run's seed and
step, as device-resident image data does, so the data order is part of the TrainState and a resumed
run continues it exactly. A row's positions count in the loss only where the target is the next
token of the same document (kdjax.lm.packing): padding and cross-document positions (and an
instruction dataset's prompt tokens) are left out of the sums, not averaged in as zeros. The loss
is the token mean ``(ce_weight * sum CE + kd_weight * sum D) / tokens`` over the whole batch, its
micro-batches (train.grad_accum) included; metrics are (sum, count) pairs ("ce_sum", ..., "tokens")
so that averages over many steps weight each token once. With a teacher cache (kdjax.lm.cache) the
rows carry the teacher's top-k targets and no teacher runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from kdjax import losses
from kdjax import plan as plan_lib
from kdjax.lm import onpolicy, packing
from kdjax.lm.cache import Layout
from kdjax.lm.cross_tokenizer import Reading
from kdjax.lm.objective import TokenObjective
from kdjax.step import (DeviceData, FrozenModel, Step, StepParts, TrainState, compile_eval,
                        make_step)

#: The per-step sums an LM step reports; "tokens" is their count. "generated_sum" (the target
#: tokens a model generated, kdjax.lm.onpolicy) only with lm.on_policy.
SUM_METRICS = ("ce_sum", "kd_sum", "correct_sum", "agreement_sum", "generated_sum")


def _teacher_hidden(teacher: nnx.Module, inputs: dict[str, jax.Array]) -> jax.Array:
    return teacher.features(inputs["tokens"], segment_ids=inputs["segment_ids"],
                            logits=False)["hidden"]


def _teacher_bytes(teacher: nnx.Module, inputs: dict[str, jax.Array], reading: Reading
                   ) -> jax.Array:
    """A teacher of another tokenizer on the batch's text (its "teacher_tokens", read as
    `reading.chunks` rows of `reading.window`): its next-byte log-probabilities ``[B, T, 257]``
    at the positions aligned with the student's ("align"; any value where there is none)."""
    rows = inputs["teacher_tokens"].shape[0]
    flat = (rows * reading.chunks, reading.window)
    hidden = teacher.features(inputs["teacher_tokens"].reshape(flat),
                              segment_ids=inputs["teacher_segments"].reshape(flat),
                              logits=False)["hidden"]
    logits = teacher.logits(hidden).reshape(rows, reading.chunks * reading.window, -1)
    at = jnp.maximum(inputs["align"], 0)[..., None]
    # rows past the tokenizer's tokens (a padded embedding) are mass no text reaches
    tokens = len(reading.teacher_first_bytes)
    return losses.token_byte_log_probs(jnp.take_along_axis(logits[..., :tokens], at, axis=1),
                                       reading.teacher_first_bytes)


def _token_terms(objective: TokenObjective, student: nnx.Module, inputs: dict[str, jax.Array],
                 teacher: nnx.Module | None, teacher_hidden: jax.Array | None, mask: jax.Array,
                 *, train: bool, reading: Reading | None = None) -> dict[str, jax.Array]:
    """The objective's per-token ``[B, T]`` terms of the student on `inputs` (with a teacher
    cache's targets when `inputs` carries them, "teacher_topk"; with a `reading`, a teacher of
    another tokenizer, `teacher_hidden` is its `_teacher_bytes`)."""
    hidden = student.features(inputs["tokens"], segment_ids=inputs["segment_ids"], train=train,
                              logits=False)["hidden"]
    if reading is not None:
        return objective.byte_terms(student, hidden, teacher_hidden, reading.student_first_bytes,
                                    inputs["targets"], mask, inputs["align"] >= 0)
    return objective.terms(student, hidden, teacher, teacher_hidden, inputs["targets"], mask,
                           cached=inputs.get("teacher_topk"))


def lm_parts(objective: TokenObjective, cache: Layout | None = None,
             reading: Reading | None = None, on_policy: plan_lib.OnPolicy | None = None,
             eos: int | None = None) -> StepParts:
    """The language-model task's `StepParts`: packed rows ({"tokens", "segments"[,
    "loss_mask"]}) to model inputs, the teacher's last hidden states (its head is applied chunk
    by chunk inside the loss), and the token-mean objective over the batch's target tokens.

    With a teacher cache's `Layout`, the rows also carry their cached targets ("cache",
    ``[B, seq_len, token_bytes]`` uint8), decoded here on the device into the inputs'
    "teacher_topk"; the step then has no teacher to run, and the loss is the same. With a
    teacher of another tokenizer (its `Reading`), the rows carry the teacher's tokens of the same
    text ("teacher_tokens", "teacher_segments") and the alignment of the two ("align"), and the
    teacher is compared on the next byte (kdjax.lm.cross_tokenizer).

    With `on_policy` (lm.on_policy, λ > 0) a share λ of the batches are generated in the step
    (kdjax.lm.onpolicy; `eos`: the tokenizer's end-of-document id, after which generated tokens
    do not count; instruction rows, with "loss_mask", are continued from their conversations'
    prompts) and the metrics gain "generated_sum"."""
    rollout = None if on_policy is None else onpolicy.rollout(on_policy, eos)

    def inputs(batch, key):
        del key  # no augmentation
        out = packing.model_inputs(batch["tokens"], batch["segments"], batch.get("loss_mask"))
        if cache is not None:
            out["teacher_topk"] = cache.decode(batch["cache"])
        if reading is not None:
            out.update({k: batch[k] for k in ("teacher_tokens", "teacher_segments", "align")})
        if rollout is not None and "loss_mask" in batch:
            # instruction data: the rollout continues each conversation's own prompt
            out["response"] = batch["loss_mask"][..., :-1]
        return out

    def teach(models, inputs):
        if reading is not None:
            return tuple(_teacher_bytes(m, inputs, reading) for m in models)
        return tuple(_teacher_hidden(m, inputs) for m in models)

    def loss(model, inputs, frozen, teacher_hidden, step, key):
        mask = inputs["loss_mask"]
        terms = _token_terms(objective, model.student, inputs, frozen[0] if frozen else None,
                             teacher_hidden[0] if frozen else None, mask, train=True,
                             reading=reading)
        if rollout is None:
            return objective.loss(terms, mask, step)
        total, metrics = objective.loss(onpolicy.weigh_terms(terms, inputs, on_policy), mask,
                                        step)
        generated = (mask * inputs["generated"][:, None]).sum().astype(jnp.float32)
        return total, {**metrics, "generated_sum": generated}

    return StepParts(inputs=inputs, teach=teach, loss=loss,
                     weight=lambda inputs: inputs["loss_mask"].sum(),
                     summed=(*SUM_METRICS, "tokens"), rollout=rollout)


def make_lm_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    objective: TokenObjective,
    *,
    teacher: FrozenModel | None,
    data: DeviceData,
    mesh: Mesh,
    steps_per_call: int = 1,
    nan_policy: str = "stop",
    state_sharding: TrainState | None = None,
    teacher_sharding: Any = None,
    grad_accum: int = 1,
    cache: Layout | None = None,
    reading: Reading | None = None,
    on_policy: plan_lib.OnPolicy | None = None,
    eos: int | None = None,
) -> Step:
    """The LM train step (`make_step` with `lm_parts`); call it as ``state, metrics =
    step(state)`` (it samples its rows from `data`, {"tokens", "segments"}, with a teacher
    cache "cache", whose `Layout` is `cache`, and with a teacher of another tokenizer, read as
    `reading` says, its "teacher_tokens", "teacher_segments" and "align"); `on_policy`
    (lm.on_policy) generates a share of the batches in the step (kdjax.lm.onpolicy), counting
    the generated tokens up to the first `eos` (the tokenizer's end-of-document id).

    `graphdef` is the Distillee's (its student an LM of kdjax.lm.models), `teacher` a frozen LM
    with the same vocabulary, or None for supervised training or a cache. Metrics: the
    SUM_METRICS of the batch, "tokens" (target tokens counted), "loss" (the token-mean
    objective, over the whole batch's tokens whatever `grad_accum`) and "grad_norm".
    """
    return make_step(graphdef, tx, lm_parts(objective, cache, reading, on_policy, eos),
                     teachers=() if teacher is None else (teacher,), mesh=mesh, data=data,
                     steps_per_call=steps_per_call, nan_policy=nan_policy,
                     state_sharding=state_sharding, teacher_sharding=teacher_sharding,
                     grad_accum=grad_accum)


def make_lm_eval_step(graphdef: nnx.GraphDef, objective: TokenObjective, *,
                      teacher: FrozenModel | None, mesh: Mesh,
                      state_sharding: TrainState | None = None,
                      teacher_sharding: Any = None) -> Callable:
    """``eval_step(params, model_state, batch) -> sums`` over held-out rows.

    `batch` has "tokens" and "segments" ``[E, seq_len + 1]`` (and an instruction dataset's
    per-token "loss_mask": only response tokens count, in perplexity too) and "mask" ``[E]`` (1 for
    real rows: the last batch is padded, never dropped). Sums: "count" (target tokens), "loss" (the
    student's summed CE: perplexity is exp(loss / count)), "accuracy" (next-token top-1) and, with
    a teacher, "teacher_agreement" (top-1 equal to the teacher's) and "teacher_loss" (the teacher's
    own CE). A Distillee is evaluated by its student alone.
    """
    ce_only = dataclasses.replace(objective, divergence=None)

    def eval_fn(params, model_state, frozen, batch):
        inputs = packing.model_inputs(batch["tokens"], batch["segments"], batch.get("loss_mask"))
        mask = inputs["loss_mask"] & (batch["mask"][:, None] > 0)
        model = nnx.merge(graphdef, params, model_state)
        student = getattr(model, "student", model)
        teacher_model = frozen[0] if frozen else None
        t_hidden = _teacher_hidden(teacher_model, inputs) if frozen else None
        terms = _token_terms(ce_only, student, inputs, teacher_model, t_hidden, mask, train=False)
        out = {"count": mask.sum().astype(jnp.float32), "loss": terms["ce"].sum(),
               "accuracy": terms["correct"].sum()}
        if frozen:
            out["teacher_agreement"] = terms["agreement"].sum()
            out["teacher_loss"] = ce_only.terms(teacher_model, t_hidden, None, None,
                                                inputs["targets"], mask)["ce"].sum()
        return out

    return compile_eval(eval_fn, () if teacher is None else (teacher,), mesh=mesh,
                        state_sharding=state_sharding, teacher_sharding=teacher_sharding)
