"""What a training run's `init`, `prune` and `quant` sections change: the student it starts from
and the optimizer that carries the pruning masks. Called by kdjax.trainer before the step is
built; with the defaults (no init.workdir, prune.method="none", quant.mode="none") both are the
identity.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

import numpy as np

import optax
from flax import nnx

from kdjax import checkpoint, lora, plan as plan_lib
from kdjax.compress import minitron, prune, quantize, structured
from kdjax.lm import models as lm_models
from kdjax.models import ModelSpec


def initial_student(run: plan_lib.RunPlan, spec: ModelSpec,
                    calibration: Mapping[str, np.ndarray] | None = None
                    ) -> tuple[ModelSpec, nnx.Module]:
    """The student the run trains and its spec (recorded in its checkpoints).

    It takes the whole plan because it orchestrates three sections and the seed: init.workdir:
    that run's latest student, as its spec records it. prune.schedule="init": its channels
    pruned by prune.criterion to prune.sparsity and physically removed (the spec records the new
    widths), or, with prune.method="minitron", a transformer pruned to prune.minitron's sizes by
    the activations of `calibration` ({"tokens", "segments"} training rows, an LM task's).
    quant.mode="qat": its forward fake-quantized (Qwix). Otherwise `spec` built with the run's
    seed. (A config is turned into a plan first: `kdjax.plan.as_plan`.)
    """
    run = plan_lib.as_plan(run)
    prune.check_config(run.prune, run.train.steps)
    init_once = run.prune.schedule == "init" and run.prune.method in ("structured", "minitron")
    if run.init.layers and not run.init.workdir:
        raise ValueError(f"init.layers={list(run.init.layers)} picks blocks of init.workdir's "
                         f"model, and init.workdir is not set: set it to the run to start from "
                         f"(e.g. the teacher's workdir)")
    if run.init.workdir:
        spec, model = _load_initial(run.init, spec)
    else:
        if init_once:
            raise ValueError("prune.schedule='init' prunes the initial weights, and with no "
                             "init.workdir they are random; set init.workdir to the trained run "
                             "to prune (e.g. the teacher's workdir), or use "
                             "prune.schedule='one_shot'/'cubic' to prune during training")
        model = spec.build(run.seed)
    if init_once and run.prune.method == "minitron":
        spec, model = _minitron(model, spec, run.prune.minitron, calibration)
        print(f"kdjax: Minitron pruning of {run.init.workdir}'s student before training: "
              f"{spec.name} with {dict(spec.kwargs)}", flush=True)
    elif init_once:
        model, spec = prune_once(model, spec, run.prune)
        print(f"kdjax: structured pruning of {run.init.workdir}'s student before training: "
              f"{spec.name} with {dict(spec.kwargs)}", flush=True)
    quantize.check_config(run.quant)
    if run.model.lora.rank:
        chosen = lora.apply(model, run.model.lora, seed=run.seed)
        print(f"kdjax: LoRA rank {run.model.lora.rank} (alpha {run.model.lora.alpha:g}) on "
              f"{len(chosen)} layer(s) of the frozen init.workdir student: "
              f"{', '.join(chosen)}", flush=True)
    if run.quant.mode == "qat":
        model = quantize.for_training(
            model, run.quant, spec.input_shape,
            batch_sizes=(("train.batch_size", run.train.batch_size),
                         ("eval.batch_size", run.eval.batch_size)))
    return spec, model


def check_lora(run: plan_lib.RunPlan) -> None:
    """Refuse model.lora before any directory is made: its rank and alpha, a missing
    init.workdir, pruning or quantization beside it, and targets that match no nnx.Linear of
    init.workdir's model (read from its spec, no weights)."""
    lora.check(run.model.lora)
    if not run.init.workdir:
        raise ValueError(f"model.lora.rank={run.model.lora.rank} trains adapters on a frozen "
                         f"student, and init.workdir is not set: set it to the run or imported "
                         f"model to adapt (e.g. a `kdjax import --hf` workdir)")
    others = [f"{k}={v!r}" for k, v, off in (("prune.method", run.prune.method, "none"),
                                             ("quant.mode", run.quant.mode, "none"))
              if v != off]
    if others:
        raise ValueError(f"model.lora.rank={run.model.lora.rank} with {', '.join(others)}: the "
                         f"frozen base is neither pruned nor quantized here; set "
                         f"model.lora.rank=0, or prune.method='none' and quant.mode='none'")
    reader = checkpoint.RunReader(run.init.workdir, what="init.workdir")
    try:
        spec = reader.model_spec(reader.resolve_step("latest"))
    finally:
        reader.close()
    if run.init.layers:
        spec = dataclasses.replace(spec, kwargs={**spec.kwargs, "num_layers": len(run.init.layers)})
    lora.match(spec.abstract(), run.model.lora)


def _load_initial(init: plan_lib.Init, spec: ModelSpec) -> tuple[ModelSpec, nnx.Module]:
    reader = checkpoint.RunReader(init.workdir, what="init.workdir")
    try:
        step = reader.resolve_step("latest")
        saved = reader.model_spec(step)
        if saved.name != spec.name:
            raise ValueError(f"init.workdir={init.workdir!r} holds a {saved.name!r} student "
                             f"but model.name={spec.name!r}; set model.name={saved.name!r} (the "
                             f"student starts from that run's weights and architecture)")
        if saved.num_classes != spec.num_classes:
            raise ValueError(f"init.workdir={init.workdir!r} holds a model with "
                             f"{saved.num_classes} classes but this run's has {spec.num_classes}")
        if spec.kwargs and _json(spec.kwargs) != _json(saved.kwargs):  # tuples were saved as lists
            raise ValueError(f"model.kwargs={dict(spec.kwargs)} differ from the architecture "
                             f"init.workdir={init.workdir!r} records, {dict(saved.kwargs)}; "
                             f"leave model.kwargs empty to take that run's")
        # A structured-pruned user model's shrunk shapes come with it (ModelSpec.shrunk).
        spec = dataclasses.replace(spec, kwargs=dict(saved.kwargs), shrunk=dict(saved.shrunk))
        model = reader.load_model(step, spec, what=f"the student of init.workdir "
                                                   f"{init.workdir!r}")
    finally:
        reader.close()
    print(f"kdjax: the student starts from {reader.path(step)}", flush=True)
    if init.layers:
        total = getattr(model, "num_layers", None)
        spec, model = lm_models.keep_layers(model, spec, init.layers)
        print(f"kdjax: the student keeps blocks {list(init.layers)} of init.workdir's {total} "
              f"(init.layers)", flush=True)
    return spec, model


def _json(value):
    return json.loads(json.dumps(value))


def prune_once(model: nnx.Module, spec: ModelSpec, prune_section: plan_lib.Prune
               ) -> tuple[nnx.Module, ModelSpec]:
    """Structured pruning of `model`'s weights, now, and the physically smaller model."""
    now = dataclasses.replace(prune_section, schedule="one_shot", begin_step=0)
    plan = prune.make_plan(now, model, spec.input_shape, 1)
    prune.apply_masks(model, plan)
    small, small_spec, _ = structured.shrink(model, spec)
    return small, small_spec


def _minitron(model: nnx.Module, spec: ModelSpec, targets: plan_lib.Minitron,
              calibration: Mapping[str, np.ndarray] | None) -> tuple[ModelSpec, nnx.Module]:
    sizes = {k: getattr(targets, k) for k in minitron.TARGETS}
    minitron.check_targets(model, sizes)
    if calibration is None:
        raise ValueError("prune.method='minitron' ranks a language model's channels on training "
                         "rows, and this run has none to give (it is not an LM run); use "
                         "prune.method='structured'")
    rows = slice(0, targets.calibration_rows)
    spec, model, _ = minitron.prune(model, spec, sizes, calibration["tokens"][rows],
                                    calibration["segments"][rows])
    return spec, model


def wrap_optimizer(tx: optax.GradientTransformation, pruning: plan_lib.Prune,
                   student: nnx.Module, input_shape, *, total_steps: int, seed: int
                   ) -> optax.GradientTransformation:
    """`tx` with the prune section's masks in its state (kdjax.compress.prune.wrap), or `tx`
    when it prunes nothing; schedules end by `total_steps` (train.steps)."""
    plan = prune.make_plan(pruning, student, input_shape, total_steps, seed=seed)
    if plan is None:
        return tx
    print(f"kdjax: pruning {len(plan.targets)} layer(s) ({pruning.method}, "
          f"{pruning.scope}, {pruning.schedule} to {plan.targets[0].schedule.final:.3g}"
          f"): {', '.join(t.name for t in plan.targets)}", flush=True)
    return prune.wrap(tx, plan)
