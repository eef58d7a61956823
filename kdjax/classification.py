"""The image-classification task (kdjax.task): images and labels, a zoo or user NNX classifier,
teachers that are image runs (their BatchNorms folded and cast for inference, checked against
their float32 selves), on-device augmentation in the step, accuracy/top-5/ECE evaluation.

Input comes device-resident (the whole split in device memory, batches gathered in the step) or
streamed (host decoding, prefetched), as kdjax.input chooses; PATE and data-free runs hand their
training arrays in (`given`), and data.train_split is then never opened.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kdjax import augment, calibration, data as data_lib, input as input_lib, metrics
from kdjax import methods, objectives, sharding
from kdjax import plan as plan_lib
from kdjax import taps as taps_lib
from kdjax import teacher as teacher_lib
from kdjax.compress import training as compress
from kdjax.models import ModelSpec
from kdjax.distillee import Distillee
from kdjax.step import (DeviceData, FrozenModel, Step, compute_dtype, freeze, make_distill_step,
                        make_eval_step)
from kdjax.task import RunData, Task, Teacher, configured_teachers, register

EVAL_METRICS = ("eval/accuracy", "eval/loss", "eval/top5_accuracy", "eval/teacher_agreement")


def preprocess_of(data: plan_lib.Data, channels: int) -> augment.Preprocess:
    """The run's on-device normalisation and augmentation recipe (data.mean/std, or the
    dataset's known statistics, or 0.5/0.5 per channel)."""
    mean, std = data.mean, data.std
    if not mean or not std:
        mean, std = data_lib.NORMALIZATION.get(data.name.partition("/")[0].partition(":")[0],
                                               ((0.5,) * channels, (0.5,) * channels))
    return augment.Preprocess(mean=tuple(mean), std=tuple(std), crop_padding=data.crop_padding,
                              flip=data.flip, mixup_alpha=data.mixup_alpha,
                              cutmix_alpha=data.cutmix_alpha, teacher_view=data.teacher_view)


def model_spec(model: plan_lib.Model, spec: data_lib.DatasetSpec) -> ModelSpec:
    """The configured model on the dataset `spec` (whose classes it has unless
    model.num_classes)."""
    return ModelSpec(name=model.name, num_classes=model.num_classes or spec.num_classes,
                     input_shape=tuple(spec.image_shape), kwargs=dict(model.kwargs),
                     compute_dtype=model.compute_dtype)


def check_logits(model: nnx.Module, num_classes: int, image_shape, what: str) -> None:
    """Refuse a model whose output on a batch of images is not [batch, num_classes] logits
    (traced abstractly: nothing is computed). `what` names the model in the message."""
    graphdef, variables = nnx.split(model)
    out = jax.eval_shape(lambda v, x: taps_lib.call(nnx.merge(graphdef, v), x, train=False),
                         variables, jax.ShapeDtypeStruct((2, *image_shape), jnp.float32))
    taps_lib.check_logits(getattr(out, "shape", ()), num_classes, model=what, batch=2)


def check_self_teacher(plan: plan_lib.RunPlan) -> None:
    """Tf-KD's self-teacher is a trained copy of the student: refuse a teacher.workdir whose
    model is another architecture (plain KD distils from any teacher)."""
    loss, model = plan.loss, plan.model
    if not methods.get(loss.name).teacher_is_student(loss.kwargs):
        return
    student = json.dumps([model.name, dict(model.kwargs)], sort_keys=True)
    for workdir in configured_teachers(plan.teacher):
        trained = (plan.teacher.model if plan.teacher.model.name
                   else plan_lib.read_run(workdir).model)
        if json.dumps([trained.name, dict(trained.kwargs)], sort_keys=True) != student:
            raise ValueError(
                f"loss.name={loss.name!r} with loss.kwargs={dict(loss.kwargs)} distils from a "
                f"trained copy of the student ({model.name} {dict(model.kwargs)}), but "
                f"teacher.workdir={workdir!r} trained {trained.name} {dict(trained.kwargs)}; point "
                f"teacher.workdir at a run of the student's architecture (kdjax train with the "
                f"student's config), or use loss.name='kd' for another teacher")


def eval_metrics(totals: dict[str, Any]) -> dict[str, float]:
    """The eval/ metrics of `make_eval_step`'s sums over a split: means, and the ECE of each
    model's calibration bins (the student's, and "peer<i>/" of mutual learning)."""
    count = totals.pop("count")
    bins = {k: totals.pop(k) for k in [k for k in totals if k.endswith("calibration")]}
    out = {f"eval/{k}": float(v / count) for k, v in totals.items()}
    for key, b in bins.items():
        out[f"eval/{key.removesuffix('calibration')}ece"] = float(calibration.ece_from_bins(b))
    return out


@register
class ImageTask(Task):
    kind = "image"
    rate = "images"
    postfix = ("loss", "accuracy")
    best_metrics = EVAL_METRICS

    def __init__(self, plan: plan_lib.RunPlan):
        super().__init__(plan)
        self.spec: data_lib.DatasetSpec | None = None
        self.preprocess: augment.Preprocess | None = None
        self.train_labels: np.ndarray | None = None
        self.eval_arrays: dict[str, np.ndarray] | None = None  # `kdjax eval`'s, when in memory
        self.eval_input_shape: tuple[int, ...] | None = None  # `kdjax eval`'s model's, if other

    # -- checks ----------------------------------------------------------------------------
    def check(self, *, distill: bool) -> None:
        loss = self.plan.loss
        if loss.name == "ce" and distill:
            raise ValueError("kdjax distill needs a distillation loss (loss.name='kd', 'dkd', "
                             "...), got loss.name='ce'; use `kdjax train` for supervised "
                             "training")
        if loss.name != "ce" and not distill:
            raise ValueError(f"loss.name={loss.name!r} distils from a teacher: run it with "
                             f"`kdjax distill`, or set loss.name='ce' for supervised training")
        one, several = self.plan.teacher.workdir, tuple(self.plan.teacher.workdirs)
        if one and several:
            raise ValueError(f"set teacher.workdir (one teacher) or teacher.workdirs (several), "
                             f"not both; got {one!r} and {several}")
        if distill and not objectives.needs_teacher(loss.name, loss.kwargs) and (one or several):
            raise ValueError(f"loss.name={loss.name!r} learns "
                             f"{methods.get(loss.name).learns_from or 'without'}, not a "
                             f"teacher: clear teacher.workdir and teacher.workdirs")
        if distill and objectives.needs_teacher(loss.name, loss.kwargs) and not (one or several):
            raise ValueError("kdjax distill needs teacher.workdir, the workdir of the run that "
                             "trained the teacher, e.g. --config.teacher.workdir=workdirs/teacher")
        try:
            compute_dtype(self.plan.teacher.compute_dtype)
        except ValueError:
            raise ValueError(f"teacher.compute_dtype must be 'auto', 'float32' or 'bfloat16', got "
                             f"{self.plan.teacher.compute_dtype!r}") from None
        if not 0.0 <= self.plan.teacher.min_agreement <= 1.0:
            raise ValueError(f"teacher.min_agreement is a fraction of examples, in [0, 1]; got "
                             f"{self.plan.teacher.min_agreement}")
        # The objective's own errors (unknown loss, bad kwargs), before any work.
        objectives.from_config(loss, self.plan.teacher, total_steps=self.plan.train.steps)
        if distill:
            check_self_teacher(self.plan)

    def teacher_workdirs(self, *, distill: bool) -> tuple[str, ...]:
        loss = self.plan.loss
        if not (distill and objectives.needs_teacher(loss.name, loss.kwargs)):
            return ()
        return super().teacher_workdirs(distill=True)

    # -- data ------------------------------------------------------------------------------
    def _dataset(self) -> data_lib.DatasetSpec:
        if self.spec is None:
            self.spec = data_lib.dataset_info(self.plan.data.name,
                                              data_dir=self.plan.data.data_dir or None)
        return self.spec

    def _input(self, split: str) -> str:
        """The input mode for `split`; the spec gains the image shape the model sees."""
        mode, why = input_lib.choose_mode(self.plan.data, self._dataset(), split=split)
        print(f"kdjax: {'device-resident' if mode == 'device' else 'streamed'} input ({why})")
        self.spec = dataclasses.replace(
            self.spec, image_shape=input_lib.model_input_shape(self.plan.data, self.spec))
        self.preprocess = preprocess_of(self.plan.data, self.spec.image_shape[-1])
        return mode

    def _load(self, split: str) -> dict[str, np.ndarray]:
        return data_lib.load_arrays(self.plan.data.name, split,
                                    data_dir=self.plan.data.data_dir or None)

    def _check_labels(self, num_classes: int, splits: dict[str, dict[str, np.ndarray]]) -> None:
        for split, arrays in splits.items():
            lo, hi = int(arrays["label"].min()), int(arrays["label"].max())
            if lo < 0 or hi >= num_classes:
                raise ValueError(
                    f"the labels of {self.plan.data.name} split {split!r} range over {lo}..{hi} "
                    f"but the model has {num_classes} classes (model.num_classes="
                    f"{self.plan.model.num_classes}); set model.num_classes to at least "
                    f"{hi + 1}, or to 0 for the dataset's {self.spec.num_classes}")

    def eval_input(self, mesh, arrays: dict[str, np.ndarray] | None
                    ) -> Callable[[], Iterable[dict[str, jax.Array]]]:
        batch_size = self.plan.eval.batch_size
        if arrays is not None:
            return lambda: input_lib.array_eval_batches(arrays, batch_size, mesh)
        return lambda: input_lib.eval_batches(self.plan.data, batch_size=batch_size, mesh=mesh)

    def open_data(self, mesh, *, given: dict[str, np.ndarray] | None = None) -> RunData:
        d = self.plan.data
        if given is None:
            mode = self._input(d.train_split)
        else:
            self._dataset()
            self.preprocess = preprocess_of(d, self.spec.image_shape[-1])
            if tuple(given["image"].shape[1:]) != tuple(self.spec.image_shape):
                raise ValueError(f"the given training images have shape "
                                 f"{given['image'].shape[1:]}, {d.name}'s are "
                                 f"{self.spec.image_shape}")
            print(f"kdjax: device-resident input ({len(given['label'])} given examples; "
                  f"data.train_split={d.train_split!r} not read)")
            mode = "device"
        student = model_spec(self.plan.model, self.spec)
        batch_size = self.plan.train.batch_size
        train_arrays = eval_arrays = None
        if mode == "device":
            train_arrays = self._load(d.train_split) if given is None else given
            eval_arrays = self._load(d.eval_split)
            self._check_labels(student.num_classes, {d.train_split: train_arrays,
                                                     d.eval_split: eval_arrays})
            self.train_labels = train_arrays["label"]
        num_train = (len(train_arrays["label"]) if train_arrays is not None
                     else self.spec.num_examples(d.train_split))
        if batch_size > num_train:
            raise ValueError(f"train.batch_size={batch_size} exceeds the {num_train} training "
                             f"examples of {d.name}")
        device = None if train_arrays is None else DeviceData(
            {"image": sharding.replicate(train_arrays["image"], mesh),
             "label": sharding.replicate(train_arrays["label"], mesh)}, batch_size=batch_size)
        stream = None if mode == "device" else (
            lambda start, per_call: input_lib.train_stream(
                d, seed=self.plan.seed, batch_size=batch_size, mesh=mesh,
                steps_per_call=per_call, start_step=start))
        return RunData(student=student, num_train=num_train, batch_size=batch_size,
                       items_per_step=batch_size, device=device, stream=stream,
                       eval_batches=self.eval_input(mesh, eval_arrays))

    def open_eval(self, mesh) -> Callable[[], Iterable[dict[str, jax.Array]]]:
        split = self.plan.data.eval_split
        self.eval_arrays = self._load(split) if self._input(split) == "device" else None
        return self.eval_input(mesh, self.eval_arrays)

    def check_student(self, student: ModelSpec) -> None:
        if tuple(student.input_shape) != tuple(self.spec.image_shape):
            # a model imported for other images (a colour teacher of grayscale data): scored
            # on the data as a teacher sees it
            self.eval_input_shape = tuple(student.input_shape)
        if self.eval_arrays is not None:
            self._check_labels(student.num_classes, {self.plan.data.eval_split: self.eval_arrays})

    # -- teachers --------------------------------------------------------------------------
    def load_teacher(self, workdir: str, student: ModelSpec, mesh) -> Teacher:
        """The latest checkpoint of `workdir`, rebuilt from the ModelSpec saved with it (or
        teacher.model.name/kwargs when set), checked against the student's classes, and
        prepared for inference as teacher.compute_dtype / teacher.fold_batchnorm say."""
        plan, num_classes = self.plan, student.num_classes

        def check(teacher: ModelSpec, run: dict) -> None:
            if teacher.num_classes != num_classes:
                raise ValueError(
                    f"the teacher in {workdir!r} has {teacher.num_classes} classes but the "
                    f"student has {num_classes} (model.num_classes={plan.model.num_classes}, "
                    f"0 = the {self._dataset().num_classes} of {plan.data.name}); distillation "
                    f"compares their outputs class by class: give the student the teacher's "
                    f"{teacher.num_classes} classes")

        reference, spec, run = self.read_teacher(workdir, mesh, check)
        input_shape = self._teacher_input_shape(workdir, spec)
        check_logits(reference, spec.num_classes, spec.input_shape,
                     f"of teacher {workdir!r} ({spec.name})")
        trained_on = run["config"]["data"]["name"]
        if trained_on != plan.data.name:
            # Accepted on the class count alone: the class order is the user's to keep the same.
            print(f"kdjax: note: the teacher in {workdir!r} was trained on {trained_on!r}, this "
                  f"run distils on {plan.data.name!r}; both have {num_classes} classes, which "
                  f"must be the same classes in the same order", flush=True)
        prepared, preparation = teacher_lib.prepare(
            reference, spec, dtype=compute_dtype(plan.teacher.compute_dtype),
            fold_batchnorm=plan.teacher.fold_batchnorm)
        # Each teacher sees the student's augmented view in its own training normalisation (a
        # run that recorded none is taken to share the student's).
        recorded = run.get("preprocess")
        normalization = ((tuple(recorded["mean"]), tuple(recorded["std"]))
                         if recorded and recorded.get("mean") else None)
        frozen = {"taps": tuple(plan.loss.teacher_taps), "normalization": normalization,
                  "input_shape": input_shape}
        return Teacher(workdir, freeze(prepared, **frozen),
                       freeze(reference, **frozen) if preparation.changed else None,
                       preparation, {"workdir": workdir, **dataclasses.asdict(preparation)})

    def _teacher_input_shape(self, workdir: str, spec: ModelSpec) -> tuple[int, ...] | None:
        """The teacher's own input shape when the data's differs (None when it is the same):
        grayscale images are replicated to a colour teacher's channels and any size is resized
        to its resolution (`augment.teacher_view`); said once, refused when it cannot work."""
        own, data = tuple(spec.input_shape), tuple(self._dataset().image_shape)
        if own == data:
            return None
        if own[-1] != data[-1] and data[-1] != 1:
            raise ValueError(
                f"the teacher in {workdir!r} takes {'x'.join(map(str, own))} images, "
                f"{self.plan.data.name}'s are {'x'.join(map(str, data))}: kdjax replicates "
                f"1-channel images to a teacher's channels, but cannot turn {data[-1]} channels "
                f"into {own[-1]}; distil from a teacher of {data[-1]}-channel images")
        how = [f"replicated to {own[-1]} channels"] if own[-1] != data[-1] else []
        if own[:2] != data[:2]:
            how.append(f"resized (bilinear) to {own[0]}x{own[1]}")
        print(f"kdjax: note: the teacher in {workdir!r} takes {'x'.join(map(str, own))} images "
              f"and this run's are {'x'.join(map(str, data))}: it sees each image "
              f"{' and '.join(how)}, in its own normalisation, inside the step", flush=True)
        return own

    def check_teachers(self, teachers: tuple[Teacher, ...], data: RunData) -> list[dict]:
        """Compare each prepared teacher with its float32 self on the first
        `teacher.agreement_examples` eval examples; report it, and refuse one below
        `teacher.min_agreement`."""
        t_plan = self.plan.teacher
        records = []
        for t in teachers:
            record, line = dict(t.record), f"kdjax: teacher {t.workdir}: {t.preparation.describe()}"
            if t.reference is not None and t_plan.agreement_examples > 0:
                agree = teacher_lib.agreement(t.reference, t.model, data.eval_batches(),
                                              self.preprocess,
                                              max_examples=t_plan.agreement_examples)
                record.update(dataclasses.asdict(agree))
                line += f"; {agree.describe()}"
                if agree.top1 < t_plan.min_agreement:
                    raise ValueError(
                        f"the teacher in {t.workdir!r}, prepared for inference "
                        f"({t.preparation.describe()}), agrees with its float32 self on only "
                        f"{100 * agree.top1:.2f}% of {agree.examples} eval examples, below "
                        f"teacher.min_agreement={t_plan.min_agreement}; run it as trained "
                        f"with --config.teacher.compute_dtype=float32 "
                        f"--config.teacher.fold_batchnorm=False, or lower teacher.min_agreement")
            print(line, flush=True)
            records.append(record)
        return records

    # -- model and step --------------------------------------------------------------------
    def build(self, data: RunData, teachers: tuple[FrozenModel, ...]
              ) -> tuple[Distillee, ModelSpec]:
        """The student (init.workdir's, pruned or quantized as configured, or built afresh)
        with what trains alongside it: the loss's connectors, model.peers, BYOT's exits and
        CTKD's temperature module."""
        plan, image_shape = self.plan, self.spec.image_shape
        labels = self.train_labels
        if labels is None and objectives.needs_dataset_labels(plan.loss.name):
            labels = data_lib.open_split(plan.data.name, plan.data.train_split,
                                         data_dir=plan.data.data_dir or None).labels()
        # init.workdir, prune.schedule="init" and quant.mode="qat" change the student it starts as.
        student, initial = compress.initial_student(plan, data.student)
        # model.peers: each a registry model with its defaults, or model.kwargs when it is the
        # student's architecture.
        peers = [dataclasses.replace(student, name=name, kwargs=dict(
            plan.model.kwargs) if name == plan.model.name else {}) for name in plan.model.peers]
        model = methods.build_distillee(
            plan.loss, student.build(plan.seed) if initial is None else initial, student,
            teachers, image_shape=image_shape, seed=plan.seed, dataset_labels=labels,
            dtype=compute_dtype(plan.model.compute_dtype), peers=peers)
        for name, m in ((plan.model.name, model.student), *zip(plan.model.peers, model.peers)):
            check_logits(m, student.num_classes, image_shape, f"model.name={name!r}")
        return model, student

    def optimizer(self, tx: optax.GradientTransformation, model: Distillee,
                  student: ModelSpec) -> optax.GradientTransformation:
        return compress.wrap_optimizer(tx, self.plan.prune, model.student, self.spec.image_shape,
                                       total_steps=self.plan.train.steps, seed=self.plan.seed)

    def make_step(self, graphdef, tx, teachers, data: RunData, **compile_args: Any) -> Step:
        objective = objectives.from_config(self.plan.loss, self.plan.teacher,
                                           total_steps=self.plan.train.steps)
        return make_distill_step(graphdef, tx, objective, teachers=teachers,
                                 preprocess=self.preprocess, data=data.device, **compile_args)

    def make_eval_step(self, graphdef, teachers, **compile_args: Any) -> Callable:
        return make_eval_step(graphdef, teachers=teachers, preprocess=self.preprocess,
                              calibration_bins=calibration.NUM_BINS,
                              input_shape=self.eval_input_shape, **compile_args)

    # -- metrics ---------------------------------------------------------------------------
    def eval_metrics(self, totals: dict[str, Any]) -> dict[str, float]:
        return eval_metrics(totals)

    def train_means(self, pending: list) -> dict[str, float]:
        return metrics.mean_of(pending)

    def record(self) -> dict[str, Any]:
        return {"preprocess": {"mean": list(self.preprocess.mean),
                               "std": list(self.preprocess.std)}}

    def summary(self, last_train: dict[str, float], model: nnx.Module, student: ModelSpec
                ) -> dict[str, Any]:
        return {"train/accuracy": last_train.get("train/accuracy")}
