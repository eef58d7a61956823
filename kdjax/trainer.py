"""The one run skeleton behind `kdjax train`, `kdjax distill` and `kdjax eval`, for every task.

A run's task (kdjax.task: image classification, language modelling) owns its data, model spec,
teachers, step parts, metrics and summary extras; this module owns everything shared, as a
sequence of phases: check the plan (before any I/O), open the checkpointer (`--fresh`), build the
mesh, open the data, load and check the teachers, build the state, restore it, build the step,
write the run files, run the loop (kdjax.loop), write the summary.

The loop only dispatches: the data is on the device, the step samples and augments its own batch,
and metrics stay on the device until a log step fetches them all in one transfer. So the host
does no per-step work and never waits on the device between logs.

What a run does when something goes wrong (kdjax.errors lists the exit codes):
- a workdir with checkpoints is resumed from the newest readable one, which is said on stdout
  (`fresh=True` refuses such a workdir instead); an unreadable checkpoint is moved aside and the
  one before it is used. Resuming is exact: the same data order, PRNG stream and logged averages.
- SIGTERM/SIGINT: a checkpoint at the next step boundary, then `errors.Interrupted`.
- NaN/Inf (train.nan_policy="stop"): `errors.NonFiniteError` naming the first bad step and its
  terms, found at the next log, eval or checkpoint boundary (no per-step host sync); nothing
  non-finite is ever saved. nan_policy="skip" drops such steps inside the compiled step instead.
- refused before training: an unwritable workdir, too little disk for the checkpoints kept,
  labels outside the model's classes, a teacher whose classes (vocabulary) differ from the
  student's or whose checkpoint does not match its configured architecture, a checkpoint of
  another model.
- a failing save: `errors.CheckpointError`; the previous checkpoint stays intact.

Scale-out (docs/scaling.md): the mesh of `config.mesh` spans every device of every process; the
state is placed by the `model.sharding` rule, the teacher by `teacher.sharding`. With several
processes and device-resident input, each one loads the whole (small) dataset into device memory,
replicated, and the step gathers on each device only that device's rows of the global batch (the
gather is local, no example crosses hosts); streamed input reads a disjoint slice of each global
batch per process (kdjax.input). Every process computes the same global metrics, process 0 writes
the run's files, and all of them write the checkpoint collectively.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from kdjax import checkpoint, distributed, lora, loop, metrics as metrics_lib, models, objectives
from kdjax import optim, sharding
from kdjax.compress import training as compress
from kdjax import plan as plan_lib
from kdjax.step import init_train_state, sum_batches
from kdjax.task import RunData, Task, Teacher, configured_teachers, for_plan


def make_mesh(plan: plan_lib.RunPlan, with_teacher: bool) -> jax.sharding.Mesh:
    """The run's mesh over every device of every process, after checking the sharding rules."""
    sharding.check_rule(plan.model.sharding, plan.mesh, "model.sharding")
    if with_teacher:
        sharding.check_rule(plan.teacher.sharding, plan.mesh, "teacher.sharding")
    return sharding.mesh_from_config(plan.mesh)


def resume_note(path: str, step: int, total: int, steps_per_epoch: int,
                saved_config: dict, plan: plan_lib.RunPlan) -> str:
    """The line a resumed run prints: where, at which step and epoch, and what changed since."""
    epoch, batch = divmod(step, steps_per_epoch)
    note = (f"kdjax: resumed from {path} at step {step} of {total} (data order: epoch {epoch}, "
            f"batch {batch} of {steps_per_epoch}; same PRNG stream)")
    changed = plan_lib.diff(saved_config, plan)
    if changed:
        note += "\nkdjax: config changed since that checkpoint: " + "; ".join(changed)
    return note


#: Steps per dispatch that train.steps_per_call=0 (auto) aims for on accelerators: where the
#: host's dispatch cost dominates small models' steps, 20 per call gave ~1.5x images/s on a GPU
#: (benchmarks/results/perf_notes.md).
AUTO_STEPS_PER_CALL = 20


def resolve_steps_per_call(plan: plan_lib.RunPlan, platform: str,
                           resume_step: int = 0) -> int:
    """The train steps each dispatch runs: train.steps_per_call, or for 0 (auto) 1 on the CPU and
    on accelerators the largest k <= AUTO_STEPS_PER_CALL dividing train.steps and `resume_step`.

    Auto on an accelerator prints the value, and a note when it is below AUTO_STEPS_PER_CALL
    (why, and how to get it) or when it does not divide a nonzero train.log_every_steps,
    eval.every_steps or checkpoint.every_steps (those fire at the first call boundary after
    their step). Raises ValueError for a negative value, and for an explicit one that does not
    divide train.steps or a `resume_step` short of it (the run would step past train.steps).

    Args:
      plan: the run's plan.
      platform: the mesh's device platform ("cpu", "gpu", "tpu").
      resume_step: the step of the checkpoint the run resumes from (0 for a new run).
    """
    total, asked = plan.train.steps, plan.train.steps_per_call
    if asked < 0:
        raise ValueError(f"train.steps_per_call={asked} must be >= 1 (train steps per dispatch) "
                         f"or 0 for auto ({AUTO_STEPS_PER_CALL} on accelerators when train.steps "
                         f"allows, 1 on the CPU)")
    if asked:
        if total % asked:
            raise ValueError(f"train.steps={total} must be a multiple of train.steps_per_call="
                             f"{asked}; set train.steps to a multiple of {asked}, or "
                             f"train.steps_per_call to a divisor of {total} or to 0 for auto")
        if resume_step % asked and resume_step < total:
            raise ValueError(
                f"this run resumes from the checkpoint of step {resume_step}, which is not a "
                f"multiple of train.steps_per_call={asked}: its calls would end past "
                f"train.steps={total}; set train.steps_per_call to a divisor of "
                f"{math.gcd(resume_step, total)} (which divides both {resume_step} and {total}), "
                f"or to 0 for auto")
        return asked
    if platform == "cpu":
        return 1
    target = AUTO_STEPS_PER_CALL
    common = math.gcd(total, resume_step)
    per_call = max(k for k in range(1, target + 1) if common % k == 0)
    print(f"kdjax: train steps per dispatch: {per_call} (train.steps_per_call=0: auto on "
          f"{platform})", flush=True)
    notes = []
    if per_call < target:
        why, fix = [], []
        if total % target:
            why.append(f"train.steps={total}")
            fix.append(f"make train.steps a multiple of {target} (e.g. "
                       f"{-(-total // target) * target}) to get {target}")
        if resume_step % target:
            why.append(f"the step this run resumes from, {resume_step},")
            fix.append(f"a run resumed from a multiple of {target}, or started afresh, gets "
                       f"{target}")
        notes.append(f"steps per dispatch {per_call}, not {target}, because {' and '.join(why)} "
                     f"{'is' if len(why) == 1 else 'are'} not a multiple of {target}; "
                     + "; ".join(fix))
    cadences = (("train.log_every_steps", plan.train.log_every_steps),
                ("eval.every_steps", plan.eval.every_steps),
                ("checkpoint.every_steps", plan.checkpoint.every_steps))
    inexact = [f"{name}={every}" for name, every in cadences if every > 0 and every % per_call]
    if inexact:
        notes.append(f"{', '.join(inexact)} {'is' if len(inexact) == 1 else 'are'} not a "
                     f"multiple of the {per_call} steps per dispatch, so each fires at the first "
                     f"call boundary after its step; make it a multiple of {per_call} to land on "
                     f"it exactly")
    if notes:
        print(f"kdjax: note: {'; '.join(notes)}", flush=True)
    return per_call


def _check_run(task: Task, plan: plan_lib.RunPlan, *, distill: bool) -> None:
    """Everything that can be refused before a directory is made or a teacher is loaded: the
    task's config checks, the model's constructor (its module imports), the teachers' and
    init.workdir's runs (each has a checkpoint), the checkpoint policy."""
    task.check(distill=distill)
    models.resolve(plan.model.name)
    for workdir in task.teacher_workdirs(distill=distill):
        checkpoint.RunReader(workdir, what="teacher.workdir").close()
    if plan.init.workdir:
        checkpoint.RunReader(plan.init.workdir, what="init.workdir").close()
    if plan.model.lora.rank:
        compress.check_lora(plan)
    ck = plan.checkpoint
    valid = task.eval_metric_names(distill=distill)
    if ck.keep_best and ck.best_metric not in valid:
        raise ValueError(f"checkpoint.best_metric={ck.best_metric!r} is not an eval metric of "
                         f"this run; valid: {list(valid)}")


def _write(workdir: str, name: str, text: str) -> None:
    if distributed.is_primary():
        with open(os.path.join(workdir, name), "w") as f:
            f.write(text)


def _write_json(workdir: str, name: str, record: dict[str, Any]) -> None:
    _write(workdir, name, json.dumps(metrics_lib.json_safe(record), indent=2))


def train(config: Any, workdir: str, *, distill: bool, progress: bool = True,
          fresh: bool = False, train_arrays: dict[str, np.ndarray] | None = None
          ) -> dict[str, Any]:
    """Train (supervised, or distil from the configured teachers) and return the run's summary.

    `config` is a RunPlan or a config (validated here). Resumes from the workdir's newest
    readable checkpoint; with `fresh`, a workdir that has checkpoints is refused instead (kdjax
    never deletes a run's checkpoints). `train_arrays` ({"image": uint8 [N, H, W, C], "label":
    int32 [N]}, device-resident) replaces data.train_split, which is then never opened: PATE's
    answered queries, data-free inputs.
    """
    plan = plan_lib.as_plan(config)
    task = for_plan(plan)
    _check_run(task, plan, distill=distill)
    ck = plan.checkpoint
    new = not os.path.exists(workdir)
    try:
        checkpoint.ensure_writable(workdir)
        with checkpoint.Checkpointer(workdir, max_to_keep=ck.max_to_keep,
                                     keep_best=ck.keep_best, best_metric=ck.best_metric,
                                     best_mode=ck.best_mode) as ckpt:
            if fresh and ckpt.steps():
                raise ValueError(
                    f"--fresh: {workdir!r} already has checkpoints (steps {ckpt.steps()} in "
                    f"{ckpt.directory}) and kdjax never deletes a run's checkpoints; pick a new "
                    f"--workdir, or delete {ckpt.directory} yourself to start over there")
            return _train(task, plan, workdir, ckpt, distill=distill, progress=progress,
                          given=train_arrays)
    except BaseException:
        if new:
            _remove_if_nothing_saved(workdir)
        raise


def _remove_if_nothing_saved(workdir: str) -> None:
    """Remove the workdir a failed run made when the run saved nothing a user could want: no
    checkpoint and no logged metrics (a run that failed before its first step)."""
    saved = [d for d in os.listdir(checkpoint.checkpoint_dir(workdir)) if d.isdigit()] if (
        os.path.isdir(checkpoint.checkpoint_dir(workdir))) else []
    logged = os.path.join(workdir, metrics_lib.METRICS_FILE)
    if not saved and not (os.path.exists(logged) and os.path.getsize(logged)):
        shutil.rmtree(workdir, ignore_errors=True)


def _load_teachers(task: Task, plan: plan_lib.RunPlan, data: RunData, mesh, *,
                   distill: bool) -> tuple[tuple[Teacher, ...], list[dict]]:
    loaded = tuple(task.load_teacher(w, data.student, mesh)
                   for w in task.teacher_workdirs(distill=distill))
    return loaded, task.check_teachers(loaded, data)


def _train(task: Task, plan: plan_lib.RunPlan, workdir: str, ckpt: checkpoint.Checkpointer, *,
           distill: bool, progress: bool, given: dict[str, np.ndarray] | None
           ) -> dict[str, Any]:
    total = plan.train.steps
    workdirs = task.teacher_workdirs(distill=distill)
    mesh = make_mesh(plan, bool(workdirs))
    data = task.open_data(mesh, given=given)
    sharding.check_batch_size(plan.train.batch_size, mesh)
    sharding.check_batch_size(plan.eval.batch_size, mesh, "eval.batch_size")
    loaded, teacher_records = _load_teachers(task, plan, data, mesh, distill=distill)
    teachers = tuple(t.model for t in loaded)
    del loaded  # the float32 references: only the agreement check needed them
    teacher_sharding = tuple(task.shardings_for(mesh, plan.teacher.sharding)(t.variables)
                             for t in teachers)

    model, student = task.build(data, teachers)
    # the frozen base's provenance, which the checkpoints (holding the adapters alone) name
    lora_record = {"lora": lora.record(model.student, plan)} if plan.model.lora.rank else {}
    num_params = models.count_params(model.student)
    tx = task.optimizer(optim.make_optimizer(plan.optimizer, total), model, student)
    graphdef, state = init_train_state(model, tx, seed=plan.seed, num_examples=(
        data.num_train if data.device is not None else 0))
    state_sharding = sharding.state_shardings(state, mesh, plan.model.sharding,
                                              min_bytes=plan.mesh.fsdp_min_bytes)
    state = sharding.put(state, state_sharding)
    checkpoint.ensure_space(workdir, state, copies=ck_copies(plan))
    pending: list = []  # on-device metrics of the steps since the last log line
    last_train: dict[str, float] = {}
    # Onto this run's shardings, whatever device count wrote the checkpoint. Restored before the
    # step is built: the steps per call must divide the step the run resumes from.
    restored = ckpt.restore(sharding.abstract(state, state_sharding))
    if restored is not None:
        _, base = lora.split_frozen(state.model_state)  # not in checkpoints: init.workdir's
        state, run = restored
        state = state.replace(model_state=lora.join_frozen(state.model_state, base))
        if lora_record:
            lora.check_base(run["lora"], lora_record["lora"], ckpt.path(int(state.step)))
        pending = metrics_lib.pending_from_json(run["pending_train_metrics"])
        last_train = run["last_train"]
        print(resume_note(ckpt.path(int(state.step)), int(state.step), total,
                          data.steps_per_epoch, run["config"], plan), flush=True)
    start = int(jax.device_get(state.step))
    per_call = resolve_steps_per_call(plan, mesh.devices.flat[0].platform, start)
    compile_args = dict(mesh=mesh, state_sharding=state_sharding,
                        teacher_sharding=teacher_sharding)
    step_fn = task.make_step(graphdef, tx, teachers, data, steps_per_call=per_call,
                             nan_policy=plan.train.nan_policy, grad_accum=plan.train.grad_accum,
                             **compile_args)
    eval_step = task.make_eval_step(graphdef, teachers, **compile_args)
    _write(workdir, "config.json", plan.to_json())

    # Streamed batches are a function of the step: resuming at `start` resumes the input exactly.
    stream = (data.stream(start, per_call) if data.stream is not None and start < total
              else None)
    hooks = loop.Hooks(
        step=lambda state: step_fn(state, next(stream) if stream is not None else None),
        evaluate=lambda state: task.eval_metrics(sum_batches(
            eval_step, state.params, state.model_state, data.eval_batches())),
        record=loop.recorder(plan, student, **task.record(), **lora_record),
        means=task.train_means, items_per_step=data.items_per_step, rate=task.rate,
        postfix=task.postfix,
        on_log=loop.skipped_steps_warning(int(jax.device_get(state.skipped_steps))))
    t_start = time.perf_counter()
    try:
        done = loop.run(plan, state, hooks, ckpt=ckpt, workdir=workdir, per_call=per_call,
                        pending=pending, last_train=last_train, progress=progress)
    finally:
        if stream is not None and hasattr(stream, "close"):
            stream.close()

    final = nnx.merge(graphdef, done.state.params, done.state.model_state).student
    summary = {
        **done.eval_metrics,
        "train/loss": done.last_train.get("train/loss"),
        **task.summary(done.last_train, final, student),
        **loop.run_facts(done, start=start, per_call=per_call, mesh=mesh, t_start=t_start),
        f"{task.rate}_per_s": done.items_per_s,
        "teacher_bytes_per_device": sharding.bytes_per_device(
            [t.variables for t in teachers]) if teachers else None,
        "model": plan.model.name,
        "num_params": num_params,  # of a LoRA student: its adapters'
        **lora_record,
        "teacher": ", ".join(workdirs) or None,
        "teacher_preparation": teacher_records or None,
        "seed": plan.seed,
    }
    _write_json(workdir, "summary.json", summary)
    return summary


def ck_copies(plan: plan_lib.RunPlan) -> int:
    """Checkpoints that may be on disk at once: the kept ones, the best ones and one in flight."""
    return plan.checkpoint.max_to_keep + plan.checkpoint.keep_best + 1


def evaluate(config: Any, workdir: str) -> dict[str, Any]:
    """Evaluate the latest checkpoint of `workdir` on `data.eval_split` (and agreement with the
    first teacher when teacher.workdir(s) is set); writes eval.json in the workdir."""
    plan = plan_lib.as_plan(config)
    task = for_plan(plan)
    workdirs = configured_teachers(plan.teacher)
    mesh = make_mesh(plan, bool(workdirs))
    eval_batches = task.open_eval(mesh)
    reader = checkpoint.RunReader(workdir)
    try:
        step = reader.resolve_step("latest")
        student = reader.model_spec(step)
        task.check_student(student)
        model = reader.load_model(step, student,
                                  shardings_for=task.shardings_for(mesh, plan.model.sharding))
    finally:
        reader.close()
    teachers = (task.load_teacher(workdirs[0], student, mesh).model,) if workdirs else ()
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    eval_step = task.make_eval_step(graphdef, teachers, mesh=mesh, teacher_sharding=tuple(
        task.shardings_for(mesh, plan.teacher.sharding)(t.variables) for t in teachers))
    result = {**task.eval_metrics(sum_batches(eval_step, params, model_state, eval_batches())),
              **task.eval_extras(model, step)}
    _write_json(workdir, "eval.json", result)
    return result


def train_generations(config: Any, workdir: str, generations: int, *,
                      progress: bool = True, fresh: bool = False) -> dict[str, Any]:
    """Born-again networks (Furlanello et al., 2018): `generations` distillations in a row.

    Generation 1 distils from the config's teacher(s) into `workdir/gen_1`; generation k from
    generation k-1's student into `workdir/gen_k` (each generation a full run with its own
    config.json and checkpoints, usable as a teacher). `workdir/summary.json` is the last
    generation's summary plus every generation's accuracy under "generations".
    """
    plan = plan_lib.as_plan(config)
    if generations < 1:
        raise ValueError(f"--generations must be >= 1, got {generations}")
    if not objectives.needs_teacher(plan.loss.name, plan.loss.kwargs):
        raise ValueError(f"born-again generations distil each student into the next; "
                         f"loss.name={plan.loss.name!r} has no teacher")
    history, gen_plan = [], plan
    for k in range(1, generations + 1):
        gen_workdir = os.path.join(workdir, f"gen_{k}")
        summary = train(gen_plan, gen_workdir, distill=True, progress=progress, fresh=fresh)
        history.append({"generation": k, "workdir": gen_workdir,
                        "eval/accuracy": summary.get("eval/accuracy")})
        gen_plan = plan.replace(teacher={"workdir": gen_workdir, "workdirs": (), "weights": ()})
    summary = {**summary, "generations": history}
    _write_json(workdir, "summary.json", summary)
    return summary
