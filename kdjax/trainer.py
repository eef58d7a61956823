"""The training loop behind `kdjax train`, `kdjax distill` and `kdjax eval`.

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
  labels outside the model's classes, a teacher whose classes differ from the student's or whose
  checkpoint does not match its configured architecture, a checkpoint of another model.
- a failing save: `errors.CheckpointError`; the previous checkpoint stays intact.

Scale-out (docs/scaling.md): the mesh of `config.mesh` spans every device of every process; the
state is placed by the `model.sharding` rule, the teacher by `teacher.sharding`. With several
processes and device-resident input, each one loads the whole (small) dataset into device memory,
replicated, and the step gathers on each device only that device's rows of the global batch (the
gather is local, no example crosses hosts); streamed input reads a disjoint slice of each global
batch per process (kdjax.input). Every process computes the same global metrics, process 0 writes the
run's files, and all of them write the checkpoint collectively.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from kdjax import augment, calibration, checkpoint, config as config_lib, data, distributed
from kdjax import input as input_lib
from kdjax import loop, methods, metrics as metrics_lib, models, objectives, optim, sharding
from kdjax import taps as taps_lib
from kdjax import teacher as teacher_lib
from kdjax.compress import training as compress
from kdjax.models import ModelSpec
from kdjax.distillee import Distillee
from kdjax.step import (DeviceData, FrozenModel, compute_dtype, freeze, init_train_state,
                        make_distill_step, make_eval_step)

EVAL_METRICS = ("eval/accuracy", "eval/loss", "eval/top5_accuracy", "eval/teacher_agreement")


def _preprocess(config: ml_collections.ConfigDict, channels: int) -> augment.Preprocess:
    mean, std = config.data.mean, config.data.std
    if not mean or not std:
        mean, std = data.NORMALIZATION.get(config.data.name.partition("/")[0].partition(":")[0],
                                           ((0.5,) * channels, (0.5,) * channels))
    return augment.Preprocess(mean=tuple(mean), std=tuple(std),
                              crop_padding=config.data.crop_padding, flip=config.data.flip,
                              mixup_alpha=config.data.mixup_alpha,
                              cutmix_alpha=config.data.cutmix_alpha,
                              teacher_view=config.data.teacher_view)


def _data_dir(config: ml_collections.ConfigDict) -> str | None:
    return config.data.data_dir or None


def _mesh(config: ml_collections.ConfigDict, with_teacher: bool) -> jax.sharding.Mesh:
    """The run's mesh over every device of every process, after checking the sharding rules."""
    sharding.check_rule(config.model.sharding, config.mesh, "model.sharding")
    if with_teacher:
        sharding.check_rule(config.teacher.sharding, config.mesh, "teacher.sharding")
    return sharding.mesh_from_config(config.mesh)


def model_spec(config: ml_collections.ConfigDict, spec: data.DatasetSpec) -> ModelSpec:
    """The config's model on the dataset `spec` (whose classes it has unless model.num_classes)."""
    return ModelSpec(name=config.model.name,
                     num_classes=config.model.num_classes or spec.num_classes,
                     input_shape=tuple(spec.image_shape), kwargs=dict(config.model.kwargs),
                     compute_dtype=config.model.compute_dtype)


def _check_labels(config: ml_collections.ConfigDict, spec: data.DatasetSpec, num_classes: int,
                  splits: dict[str, dict[str, np.ndarray]]) -> None:
    for split, arrays in splits.items():
        lo, hi = int(arrays["label"].min()), int(arrays["label"].max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"the labels of {config.data.name} split {split!r} range over {lo}..{hi} but the "
                f"model has {num_classes} classes (model.num_classes={config.model.num_classes}); "
                f"set model.num_classes to at least {hi + 1}, or to 0 for the dataset's "
                f"{spec.num_classes}")


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {workdir!r} is not a kdjax workdir (train a "
                                f"model there first with `kdjax train`)")
    with open(path) as f:
        return config_lib.from_json(f.read())


def _shardings_for(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   rule: str) -> Callable[[Any], Any]:
    return lambda tree: sharding.tree_shardings(tree, mesh, rule,
                                                min_bytes=config.mesh.fsdp_min_bytes)


def teacher_workdirs(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """teacher.workdir, or the several teachers of teacher.workdirs (not both)."""
    one, several = config.teacher.workdir, tuple(config.teacher.workdirs)
    if one and several:
        raise ValueError(f"set teacher.workdir (one teacher) or teacher.workdirs (several), not "
                         f"both; got {one!r} and {several}")
    return several or ((one,) if one else ())


class Teacher(NamedTuple):
    """A loaded teacher: `model` as the step runs it (kdjax.teacher.prepare), `reference` as it
    was trained, in float32, kept for the agreement check (None when preparing changed nothing)."""

    workdir: str
    model: FrozenModel
    reference: FrozenModel | None
    preparation: teacher_lib.Preparation


def load_teachers(config: ml_collections.ConfigDict, spec: data.DatasetSpec, num_classes: int,
                  mesh) -> tuple[Teacher, ...]:
    workdirs = teacher_workdirs(config)
    if not workdirs:
        raise ValueError("kdjax distill needs teacher.workdir, the workdir of the run that trained "
                         "the teacher, e.g. --config.teacher.workdir=workdirs/teacher")
    return tuple(load_teacher(config, spec, num_classes, mesh, w) for w in workdirs)


def check_teachers(config: ml_collections.ConfigDict, teachers: Sequence[Teacher],
                   eval_batches: Callable[[], Any], preprocess: augment.Preprocess
                   ) -> list[dict[str, Any]]:
    """Compare each prepared teacher with its float32 self on the first
    `teacher.agreement_examples` eval examples; report it, and refuse one below
    `teacher.min_agreement`. Returns the per-teacher record for summary.json."""
    records = []
    for t in teachers:
        record = {"workdir": t.workdir, **dataclasses.asdict(t.preparation)}
        line = f"kdjax: teacher {t.workdir}: {t.preparation.describe()}"
        if t.reference is not None and config.teacher.agreement_examples > 0:
            agree = teacher_lib.agreement(t.reference, t.model, eval_batches(), preprocess,
                                          max_examples=config.teacher.agreement_examples)
            record.update(dataclasses.asdict(agree))
            line += f"; {agree.describe()}"
            if agree.top1 < config.teacher.min_agreement:
                raise ValueError(
                    f"the teacher in {t.workdir!r}, prepared for inference "
                    f"({t.preparation.describe()}), agrees with its float32 self on only "
                    f"{100 * agree.top1:.2f}% of {agree.examples} eval examples, below "
                    f"teacher.min_agreement={config.teacher.min_agreement}; run it as trained "
                    f"with --config.teacher.compute_dtype=float32 "
                    f"--config.teacher.fold_batchnorm=False, or lower teacher.min_agreement")
        print(line, flush=True)
        records.append(record)
    return records


def build_distillee(config: ml_collections.ConfigDict, spec: data.DatasetSpec, student: ModelSpec,
                    teachers: tuple[FrozenModel, ...], train_labels: np.ndarray | None,
                    initial: nnx.Module | None = None) -> Distillee:
    """The student (`initial`, or `student` built afresh) with the parts its method trains
    alongside it (kdjax.methods.build_distillee); model.peers are each a registry model with its
    defaults, or model.kwargs when it is the student's architecture."""
    peers = [dataclasses.replace(student, name=name, kwargs=dict(
        config.model.kwargs) if name == config.model.name else {})
             for name in config.model.peers]
    model = methods.build_distillee(
        config.loss, student.build(config.seed) if initial is None else initial, student,
        teachers, image_shape=spec.image_shape, seed=config.seed, dataset_labels=train_labels,
        dtype=compute_dtype(config.model.compute_dtype), peers=peers)
    for name, m in ((config.model.name, model.student), *zip(config.model.peers, model.peers)):
        check_logits(m, student.num_classes, spec.image_shape, f"model.name={name!r}")
    return model


def check_self_teacher(config: ml_collections.ConfigDict) -> None:
    """A method whose teacher is a trained copy of the student (Tf-KD's self-teacher,
    `Method.teacher_is_student`): refuse a teacher.workdir whose model is another architecture
    (plain KD distils from any teacher)."""
    if not methods.get(config.loss.name).teacher_is_student(config.loss.kwargs):
        return
    student = json.dumps([config.model.name, dict(config.model.kwargs)], sort_keys=True)
    for workdir in teacher_workdirs(config):
        run = read_run_config(workdir)
        model = (config.teacher.model if config.teacher.model.name else run.model)
        if json.dumps([model.name, dict(model.kwargs)], sort_keys=True) != student:
            raise ValueError(
                f"loss.name={config.loss.name!r} with loss.kwargs={dict(config.loss.kwargs)} "
                f"distils from a trained copy of the "
                f"student ({config.model.name} {dict(config.model.kwargs)}), but teacher.workdir="
                f"{workdir!r} trained {model.name} {dict(model.kwargs)}; point teacher.workdir at "
                f"a run of the student's architecture (kdjax train with the student's config), "
                f"or use loss.name='kd' for another teacher")


def load_teacher(config: ml_collections.ConfigDict, spec: data.DatasetSpec, num_classes: int,
                 mesh, workdir: str) -> Teacher:
    """The latest checkpoint of `teacher.workdir`, rebuilt from the ModelSpec saved with it (or
    teacher.model.name/kwargs when set), checked against the student's `num_classes`, and
    prepared for inference as teacher.compute_dtype / teacher.fold_batchnorm say."""
    try:
        dtype = compute_dtype(config.teacher.compute_dtype)
    except ValueError:
        raise ValueError(f"teacher.compute_dtype must be 'auto', 'float32' or 'bfloat16', got "
                         f"{config.teacher.compute_dtype!r}") from None
    if not 0.0 <= config.teacher.min_agreement <= 1.0:
        raise ValueError(f"teacher.min_agreement is a fraction of examples, in [0, 1]; got "
                         f"{config.teacher.min_agreement}")
    reader = checkpoint.RunReader(workdir, what="teacher.workdir")
    try:
        step = reader.resolve_step("latest")
        run = reader.run_meta(step)
        teacher = ModelSpec.from_json(run["model"])
        if config.teacher.model.name:
            teacher = dataclasses.replace(teacher, name=config.teacher.model.name,
                                          kwargs=dict(config.teacher.model.kwargs))
        if teacher.num_classes != num_classes:
            raise ValueError(
                f"the teacher in {workdir!r} has {teacher.num_classes} classes but the student has "
                f"{num_classes} (model.num_classes={config.model.num_classes}, 0 = the "
                f"{spec.num_classes} of {config.data.name}); distillation compares their outputs "
                f"class by class: give the student the teacher's {teacher.num_classes} classes")
        what = ("the teacher model teacher.model.name="
                f"{config.teacher.model.name!r}" if config.teacher.model.name else
                "the teacher model recorded with it")
        reference = reader.load_model(
            step, dataclasses.replace(teacher, compute_dtype="float32"), what=what,
            shardings_for=_shardings_for(config, mesh, config.teacher.sharding))
    finally:
        reader.close()
    check_logits(reference, teacher.num_classes, spec.image_shape,
                 f"of teacher {workdir!r} ({teacher.name})")
    trained_on = run["config"]["data"]["name"]
    if trained_on != config.data.name:
        # Accepted on the class count alone: the class order is the user's to keep the same.
        print(f"kdjax: note: the teacher in {workdir!r} was trained on {trained_on!r}, this run "
              f"distils on {config.data.name!r}; both have {num_classes} classes, which must be "
              f"the same classes in the same order", flush=True)
    prepared, preparation = teacher_lib.prepare(reference, teacher, dtype=dtype,
                                                fold_batchnorm=config.teacher.fold_batchnorm)
    # Each teacher sees the student's augmented view in its own training normalisation (a run
    # that recorded none is taken to share the student's).
    recorded = run.get("preprocess")
    normalization = (tuple(recorded["mean"]), tuple(recorded["std"])) if recorded else None
    frozen = {"taps": tuple(config.loss.teacher_taps), "normalization": normalization}
    return Teacher(workdir, freeze(prepared, **frozen),
                   freeze(reference, **frozen) if preparation.changed else None, preparation)


def check_logits(model: nnx.Module, num_classes: int, image_shape, what: str) -> None:
    """Refuse a model whose output on a batch of images is not [batch, num_classes] logits
    (traced abstractly: nothing is computed). `what` names the model in the message."""
    graphdef, variables = nnx.split(model)
    out = jax.eval_shape(lambda v, x: taps_lib.call(nnx.merge(graphdef, v), x, train=False),
                         variables, jax.ShapeDtypeStruct((2, *image_shape), jnp.float32))
    taps_lib.check_logits(getattr(out, "shape", ()), num_classes, model=what, batch=2)


def _input(config: ml_collections.ConfigDict, spec: data.DatasetSpec, split: str
           ) -> tuple[str, data.DatasetSpec]:
    """The input mode for `split` and the spec with the image shape the model sees."""
    mode, why = input_lib.choose_mode(config.data, spec, split=split)
    print(f"kdjax: {'device-resident' if mode == 'device' else 'streamed'} input ({why})")
    return mode, dataclasses.replace(
        spec, image_shape=input_lib.model_input_shape(config.data, spec))


def _eval_input(config: ml_collections.ConfigDict, mesh, arrays: dict[str, np.ndarray] | None):
    """A function returning a fresh pass over the eval split: padded, masked device batches,
    from `arrays` when the split is in memory, else streamed."""
    if arrays is not None:
        return lambda: input_lib.array_eval_batches(arrays, config.eval.batch_size, mesh)
    return lambda: input_lib.eval_batches(config.data, batch_size=config.eval.batch_size,
                                          mesh=mesh)


def _load(config: ml_collections.ConfigDict, split: str) -> dict[str, np.ndarray]:
    return data.load_arrays(config.data.name, split, data_dir=_data_dir(config))


def _evaluate(eval_step, params, model_state, batches) -> dict[str, float]:
    """Fixed order, no augmentation; the last partial batch is padded and masked, never dropped."""
    totals: dict[str, Any] = {}
    for batch in batches:
        sums = eval_step(params, model_state, batch)
        totals = sums if not totals else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = totals.pop("count")
    # calibration bins (the student's, and "peer<i>/calibration" of mutual learning) -> ECE
    bins = {k: totals.pop(k) for k in [k for k in totals if k.endswith("calibration")]}
    out = {f"eval/{k}": float(v / count) for k, v in totals.items()}
    for key, b in bins.items():
        out[f"eval/{key.removesuffix('calibration')}ece"] = float(calibration.ece_from_bins(b))
    return out


def _resume_note(path: str, step: int, total: int, steps_per_epoch: int,
                 saved_config: dict, config: ml_collections.ConfigDict) -> str:
    epoch, batch = divmod(step, steps_per_epoch)
    note = (f"kdjax: resumed from {path} at step {step} of {total} (data order: epoch {epoch}, "
            f"batch {batch} of {steps_per_epoch}; same PRNG stream)")
    changed = config_lib.diff(saved_config, config)
    if changed:
        note += "\nkdjax: config changed since that checkpoint: " + "; ".join(changed)
    return note


#: Steps per dispatch that train.steps_per_call=0 (auto) aims for on accelerators: where the
#: host's dispatch cost dominates small models' steps, 20 per call gave ~1.5x images/s on a GPU
#: (benchmarks/results/perf_notes.md).
AUTO_STEPS_PER_CALL = 20


def resolve_steps_per_call(config: ml_collections.ConfigDict, platform: str,
                           resume_step: int = 0) -> int:
    """The train steps each dispatch runs: train.steps_per_call, or for 0 (auto) 1 on the CPU and
    on accelerators the largest k <= AUTO_STEPS_PER_CALL dividing train.steps and `resume_step`.

    Auto on an accelerator prints the value, and a note when it is below AUTO_STEPS_PER_CALL
    (why, and how to get it) or when it does not divide a nonzero train.log_every_steps,
    eval.every_steps or checkpoint.every_steps (those fire at the first call boundary after
    their step). Raises ValueError for a negative value, and for an explicit one that does not
    divide train.steps or a `resume_step` short of it (the run would step past train.steps).

    Args:
      config: the run's config.
      platform: the mesh's device platform ("cpu", "gpu", "tpu").
      resume_step: the step of the checkpoint the run resumes from (0 for a new run).
    """
    total, asked = config.train.steps, config.train.steps_per_call
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
    cadences = (("train.log_every_steps", config.train.log_every_steps),
                ("eval.every_steps", config.eval.every_steps),
                ("checkpoint.every_steps", config.checkpoint.every_steps))
    inexact = [f"{name}={every}" for name, every in cadences if every > 0 and every % per_call]
    if inexact:
        notes.append(f"{', '.join(inexact)} {'is' if len(inexact) == 1 else 'are'} not a "
                     f"multiple of the {per_call} steps per dispatch, so each fires at the first "
                     f"call boundary after its step; make it a multiple of {per_call} to land on "
                     f"it exactly")
    if notes:
        print(f"kdjax: note: {'; '.join(notes)}", flush=True)
    return per_call


def train(config: ml_collections.ConfigDict, workdir: str, *, distill: bool,
          progress: bool = True, fresh: bool = False,
          train_arrays: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Train (supervised, or distil from `teacher.workdir`) and return the run's summary.

    Resumes from the workdir's newest readable checkpoint; with `fresh`, a workdir that has
    checkpoints is refused instead (kdjax never deletes a run's checkpoints). `train_arrays`
    ({"image": uint8 [N, H, W, C], "label": int32 [N]}, device-resident) replaces
    data.train_split, which is then never opened: PATE's answered queries, data-free inputs.
    """
    if config.loss.name == "ce" and distill:
        raise ValueError("kdjax distill needs a distillation loss (loss.name='kd', 'dkd', ...), "
                         "got loss.name='ce'; use `kdjax train` for supervised training")
    if (distill and not objectives.needs_teacher(config.loss.name, config.loss.kwargs)
            and teacher_workdirs(config)):
        raise ValueError(f"loss.name={config.loss.name!r} learns "
                         f"{methods.get(config.loss.name).learns_from or 'without'}, not a "
                         f"teacher: clear teacher.workdir and teacher.workdirs")
    if config.loss.name != "ce" and not distill:
        raise ValueError(f"loss.name={config.loss.name!r} distils from a teacher: run it with "
                         f"`kdjax distill`, or set loss.name='ce' for supervised training")
    ck = config.checkpoint
    valid_metrics = EVAL_METRICS if distill else EVAL_METRICS[:-1]
    if ck.keep_best and ck.best_metric not in valid_metrics:
        raise ValueError(f"checkpoint.best_metric={ck.best_metric!r} is not an eval metric of "
                         f"this run; valid: {list(valid_metrics)}")
    checkpoint.ensure_writable(workdir)
    with checkpoint.Checkpointer(workdir, max_to_keep=ck.max_to_keep, keep_best=ck.keep_best,
                                 best_metric=ck.best_metric, best_mode=ck.best_mode) as ckpt:
        if fresh and ckpt.steps():
            raise ValueError(
                f"--fresh: {workdir!r} already has checkpoints (steps {ckpt.steps()} in "
                f"{ckpt.directory}) and kdjax never deletes a run's checkpoints; pick a new "
                f"--workdir, or delete {ckpt.directory} yourself to start over there")
        return _train(config, workdir, ckpt, distill=distill, progress=progress,
                      given=train_arrays)


def _given_input(config: ml_collections.ConfigDict, spec: data.DatasetSpec,
                 arrays: dict[str, np.ndarray]) -> tuple[str, data.DatasetSpec]:
    """`_input` for training arrays given in memory: device-resident, the dataset's image shape."""
    if tuple(arrays["image"].shape[1:]) != tuple(spec.image_shape):
        raise ValueError(f"the given training images have shape {arrays['image'].shape[1:]}, "
                         f"{config.data.name}'s are {spec.image_shape}")
    print(f"kdjax: device-resident input ({len(arrays['label'])} given examples; "
          f"data.train_split={config.data.train_split!r} not read)")
    return "device", spec


def _train(config: ml_collections.ConfigDict, workdir: str, ckpt: checkpoint.Checkpointer, *,
           distill: bool, progress: bool, given: dict[str, np.ndarray] | None = None
           ) -> dict[str, Any]:

    total = config.train.steps
    mesh = _mesh(config, distill)
    spec = data.dataset_info(config.data.name, data_dir=_data_dir(config))
    mode, spec = (_input(config, spec, config.data.train_split) if given is None
                  else _given_input(config, spec, given))
    batch_size = config.train.batch_size
    student = model_spec(config, spec)
    train_arrays = eval_arrays = None
    if mode == "device":
        train_arrays = _load(config, config.data.train_split) if given is None else given
        eval_arrays = _load(config, config.data.eval_split)
        _check_labels(config, spec, student.num_classes, {config.data.train_split: train_arrays,
                                                          config.data.eval_split: eval_arrays})
    num_train = (len(train_arrays["label"]) if train_arrays is not None
                 else spec.num_examples(config.data.train_split))
    if batch_size > num_train:
        raise ValueError(f"train.batch_size={batch_size} exceeds the {num_train} training "
                         f"examples of {config.data.name}")
    sharding.check_batch_size(batch_size, mesh)
    sharding.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    eval_input = _eval_input(config, mesh, eval_arrays)
    preprocess = _preprocess(config, spec.image_shape[-1])
    with_teacher = distill and objectives.needs_teacher(config.loss.name, config.loss.kwargs)
    if with_teacher:
        check_self_teacher(config)
    loaded = load_teachers(config, spec, student.num_classes, mesh) if with_teacher else ()
    teacher_report = check_teachers(config, loaded, eval_input, preprocess)
    teachers = tuple(t.model for t in loaded)
    del loaded  # the float32 references: only the agreement check needed them
    teacher_sharding = tuple(_shardings_for(config, mesh, config.teacher.sharding)(t.variables)
                             for t in teachers)

    train_labels = None if train_arrays is None else train_arrays["label"]
    if train_labels is None and objectives.needs_dataset_labels(config.loss.name):
        train_labels = data.open_split(config.data.name, config.data.train_split,
                                       data_dir=_data_dir(config)).labels()
    # init.workdir, prune.schedule="init" and quant.mode="qat" change the student it starts as.
    student, initial = compress.initial_student(config, student)
    model = build_distillee(config, spec, student, teachers, train_labels, initial)
    num_params = models.count_params(model.student)
    tx = compress.wrap_optimizer(optim.make_optimizer(config.optimizer, total), config,
                                 model.student, spec.image_shape)
    graphdef, state = init_train_state(model, tx, seed=config.seed,
                                       num_examples=num_train if mode == "device" else 0)
    state_sharding = sharding.state_shardings(state, mesh, config.model.sharding,
                                              min_bytes=config.mesh.fsdp_min_bytes)
    state = sharding.put(state, state_sharding)
    checkpoint.ensure_space(workdir, state, copies=config.checkpoint.max_to_keep
                            + config.checkpoint.keep_best + 1)
    device_data = None if train_arrays is None else DeviceData(
        images=sharding.replicate(train_arrays["image"], mesh),
        labels=sharding.replicate(train_arrays["label"], mesh), batch_size=batch_size)
    pending: list = []  # on-device metrics of the steps since the last log line
    last_train: dict[str, float] = {}
    # Onto this run's shardings, whatever device count wrote the checkpoint. Restored before the
    # step is built: the steps per call must divide the step the run resumes from.
    restored = ckpt.restore(sharding.abstract(state, state_sharding))
    if restored is not None:
        state, run = restored
        pending = metrics_lib.pending_from_json(run["pending_train_metrics"])
        last_train = run["last_train"]
        print(_resume_note(ckpt.path(int(state.step)), int(state.step), total,
                           num_train // batch_size, run["config"], config), flush=True)
    step = start = int(jax.device_get(state.step))
    per_call = resolve_steps_per_call(config, mesh.devices.flat[0].platform, start)
    nan_policy = config.train.nan_policy
    objective = objectives.from_config(config.loss, config.teacher, total_steps=total)
    step_fn = make_distill_step(graphdef, tx, objective,
                                teachers=teachers, preprocess=preprocess, mesh=mesh,
                                data=device_data, steps_per_call=per_call, nan_policy=nan_policy,
                                state_sharding=state_sharding, teacher_sharding=teacher_sharding)
    eval_step = make_eval_step(graphdef, teachers=teachers, preprocess=preprocess, mesh=mesh,
                               state_sharding=state_sharding, teacher_sharding=teacher_sharding,
                               calibration_bins=calibration.NUM_BINS)

    primary = distributed.is_primary()
    if primary:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config_lib.to_json(config))

    # Streamed batches are a function of the step: resuming at `step` resumes the input exactly.
    stream = (input_lib.train_stream(config.data, seed=config.seed, batch_size=batch_size,
                                     mesh=mesh, steps_per_call=per_call, start_step=step)
              if mode == "stream" and step < total else None)
    hooks = loop.Hooks(
        step=lambda state: step_fn(state, next(stream) if stream is not None else None),
        evaluate=lambda state: _evaluate(eval_step, state.params, state.model_state,
                                         eval_input()),
        record=loop.recorder(config, student, {"mean": list(preprocess.mean),
                                                "std": list(preprocess.std)}),
        means=metrics_lib.mean_of, items_per_step=batch_size,
        rate="images", postfix=("loss", "accuracy"),
        on_log=loop.skipped_steps_warning(int(jax.device_get(state.skipped_steps))))
    t_start = time.perf_counter()
    try:
        done = loop.run(config, state, hooks, ckpt=ckpt, workdir=workdir, per_call=per_call,
                        pending=pending, last_train=last_train, progress=progress)
    finally:
        if stream is not None:
            stream.close()
    state, eval_metrics, last_train = done.state, done.eval_metrics, done.last_train

    summary = {
        **eval_metrics,
        "train/loss": last_train.get("train/loss"),
        "train/accuracy": last_train.get("train/accuracy"),
        **loop.run_facts(done, start=start, per_call=per_call, mesh=mesh, t_start=t_start),
        "images_per_s": done.items_per_s,
        "teacher_bytes_per_device": sharding.bytes_per_device(
            [t.variables for t in teachers]) if teachers else None,
        "model": config.model.name,
        "num_params": num_params,
        "teacher": (", ".join(teacher_workdirs(config)) or None) if with_teacher else None,
        "teacher_preparation": teacher_report or None,
        "seed": config.seed,
    }
    if distributed.is_primary():
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(metrics_lib.json_safe(summary), f, indent=2)
    return summary


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Evaluate the latest checkpoint of `workdir` on `data.eval_split` (and agreement with the
    teacher when `teacher.workdir` is set); writes eval.json in the workdir."""
    mesh = _mesh(config, bool(config.teacher.workdir))
    spec = data.dataset_info(config.data.name, data_dir=_data_dir(config))
    mode, spec = _input(config, spec, config.data.eval_split)
    arrays = _load(config, config.data.eval_split) if mode == "device" else None
    reader = checkpoint.RunReader(workdir)
    try:
        step = reader.resolve_step("latest")
        student = reader.model_spec(step)
        if arrays is not None:
            _check_labels(config, spec, student.num_classes, {config.data.eval_split: arrays})
        model = reader.load_model(step, student, shardings_for=_shardings_for(
            config, mesh, config.model.sharding))
    finally:
        reader.close()
    workdirs = teacher_workdirs(config)
    teachers = (load_teacher(config, spec, student.num_classes, mesh, workdirs[0]).model,
                ) if workdirs else ()
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    eval_step = make_eval_step(
        graphdef, teachers=teachers, preprocess=_preprocess(config, spec.image_shape[-1]),
        mesh=mesh, calibration_bins=calibration.NUM_BINS, teacher_sharding=tuple(
            _shardings_for(config, mesh, config.teacher.sharding)(t.variables) for t in teachers))
    result = _evaluate(eval_step, params, model_state, _eval_input(config, mesh, arrays)())
    if distributed.is_primary():
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result


def train_generations(config: ml_collections.ConfigDict, workdir: str, generations: int, *,
                      progress: bool = True, fresh: bool = False) -> dict[str, Any]:
    """Born-again networks (Furlanello et al., 2018): `generations` distillations in a row.

    Generation 1 distils from the config's teacher(s) into `workdir/gen_1`; generation k from
    generation k-1's student into `workdir/gen_k` (each generation a full run with its own
    config.json and checkpoints, usable as a teacher). `workdir/summary.json` is the last
    generation's summary plus every generation's accuracy under "generations".
    """
    if generations < 1:
        raise ValueError(f"--generations must be >= 1, got {generations}")
    if not objectives.needs_teacher(config.loss.name, config.loss.kwargs):
        raise ValueError(f"born-again generations distil each student into the next; "
                         f"loss.name={config.loss.name!r} has no teacher")
    history, previous = [], None
    for k in range(1, generations + 1):
        gen_config = ml_collections.ConfigDict(config.to_dict())
        if previous is not None:
            gen_config.teacher.update(workdir=previous, workdirs=(), weights=())
        gen_workdir = os.path.join(workdir, f"gen_{k}")
        summary = train(config_lib.validate(gen_config), gen_workdir, distill=True,
                        progress=progress, fresh=fresh)
        history.append({"generation": k, "workdir": gen_workdir,
                        "eval/accuracy": summary.get("eval/accuracy")})
        previous = gen_workdir
    summary = {**summary, "generations": history}
    if distributed.is_primary():
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(metrics_lib.json_safe(summary), f, indent=2)
    return summary
