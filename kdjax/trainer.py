"""The training loop behind `kdjax train`, `kdjax distill` and `kdjax eval`.

The loop only dispatches: the data is on the device, the step samples and augments its own batch,
and metrics stay on the device until a log step fetches them all in one transfer. So the host
does no per-step work and never waits on the device between logs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from kdjax import augment, checkpoint, config as config_lib, data, input as input_lib
from kdjax import metrics as metrics_lib
from kdjax import models, objectives, optim, sharding
from kdjax.step import (DeviceData, FrozenModel, TrainState, compute_dtype, freeze,
                        init_train_state, make_distill_step, make_eval_step)


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


def build_model(config: ml_collections.ConfigDict, spec: data.DatasetSpec) -> nnx.Module:
    return models.create_model(config.model.name, num_classes=spec.num_classes,
                               input_shape=spec.image_shape, rngs=nnx.Rngs(config.seed),
                               dtype=compute_dtype(config.model.compute_dtype),
                               **config.model.kwargs)


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {workdir!r} is not a kdjax workdir (train a "
                                f"model there first with `kdjax train`)")
    with open(path) as f:
        return config_lib.from_json(f.read())


def load_teacher(config: ml_collections.ConfigDict, spec: data.DatasetSpec) -> FrozenModel:
    """Rebuild the teacher from its own run's config.json and load its latest checkpoint."""
    workdir = config.teacher.workdir
    if not workdir:
        raise ValueError("kdjax distill needs teacher.workdir, the workdir of the run that trained "
                         "the teacher, e.g. --config.teacher.workdir=workdirs/teacher")
    teacher_config = read_run_config(workdir)
    if teacher_config.data.name != config.data.name:
        raise ValueError(f"the teacher in {workdir!r} was trained on data.name="
                         f"{teacher_config.data.name!r} but this run uses data.name="
                         f"{config.data.name!r}; distil on the teacher's dataset")
    return freeze(checkpoint.load_model(workdir, build_model(teacher_config, spec)))


def _input(config: ml_collections.ConfigDict, spec: data.DatasetSpec, split: str
           ) -> tuple[str, data.DatasetSpec]:
    """The input mode for `split` and the spec with the image shape the model sees."""
    mode, why = input_lib.choose_mode(config.data, spec, split=split)
    print(f"kdjax: {'device-resident' if mode == 'device' else 'streamed'} input ({why})")
    return mode, dataclasses.replace(
        spec, image_shape=input_lib.model_input_shape(config.data, spec))


def _eval_input(config: ml_collections.ConfigDict, mode: str, mesh):
    """A function returning a fresh pass over the eval split: padded, masked device batches."""
    if mode == "device":
        arrays = data.load_arrays(config.data.name, config.data.eval_split,
                                  data_dir=_data_dir(config))
        return lambda: input_lib.array_eval_batches(arrays, config.eval.batch_size, mesh)
    return lambda: input_lib.eval_batches(config.data, batch_size=config.eval.batch_size,
                                          mesh=mesh)


def _evaluate(eval_step, state: TrainState, batches) -> dict[str, float]:
    """Fixed order, no augmentation; the last partial batch is padded and masked, never dropped."""
    totals: dict[str, Any] = {}
    for batch in batches:
        sums = eval_step(state.params, state.model_state, batch)
        totals = sums if not totals else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = totals.pop("count")
    return {f"eval/{k}": float(v / count) for k, v in totals.items()}


def train(config: ml_collections.ConfigDict, workdir: str, *, distill: bool,
          progress: bool = True) -> dict[str, Any]:
    """Train (supervised, or distil from `teacher.workdir`) and return the run's summary."""
    from tqdm import tqdm

    if config.loss.name == "ce" and distill:
        raise ValueError("kdjax distill needs a distillation loss (loss.name='kd', 'dkd', ...), "
                         "got loss.name='ce'; use `kdjax train` for supervised training")
    if config.loss.name != "ce" and not distill:
        raise ValueError(f"loss.name={config.loss.name!r} distils from a teacher: run it with "
                         f"`kdjax distill`, or set loss.name='ce' for supervised training")
    total, per_call = config.train.steps, config.train.steps_per_call
    if total % per_call:
        raise ValueError(f"train.steps={total} must be a multiple of train.steps_per_call="
                         f"{per_call}")
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config_lib.to_json(config))

    mesh = sharding.make_mesh()
    spec = data.dataset_info(config.data.name, data_dir=_data_dir(config))
    mode, spec = _input(config, spec, config.data.train_split)
    batch_size = config.train.batch_size
    num_train = 0
    if mode == "device":
        train_arrays = data.load_arrays(config.data.name, config.data.train_split,
                                        data_dir=_data_dir(config))
        num_train = len(train_arrays["label"])
        if batch_size > num_train:
            raise ValueError(f"train.batch_size={batch_size} exceeds the {num_train} "
                             f"training examples of {config.data.name}")
    eval_input = _eval_input(config, mode, mesh)
    preprocess = _preprocess(config, spec.image_shape[-1])
    teachers = (load_teacher(config, spec),) if distill else ()

    model = build_model(config, spec)
    num_params = models.count_params(model)
    tx = optim.make_optimizer(config.optimizer, total)
    graphdef, state = init_train_state(model, tx, seed=config.seed, num_examples=num_train)
    state = sharding.replicate(state, mesh)
    device_data = None
    if mode == "device":
        device_data = DeviceData(images=sharding.replicate(train_arrays["image"], mesh),
                                 labels=sharding.replicate(train_arrays["label"], mesh),
                                 batch_size=batch_size)
    step_fn = make_distill_step(graphdef, tx, objectives.from_config(config.loss),
                                teachers=teachers, preprocess=preprocess, mesh=mesh,
                                data=device_data, steps_per_call=per_call)
    eval_step = make_eval_step(graphdef, teachers=teachers, preprocess=preprocess, mesh=mesh)

    ckpt = checkpoint.Checkpointer(workdir, every_steps=config.checkpoint.every_steps,
                                   max_to_keep=config.checkpoint.max_to_keep)
    if ckpt.latest_step() is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                               sharding=x.sharding), state)
        state = ckpt.restore(abstract)
        print(f"kdjax: resumed from {ckpt.directory} at step {int(state.step)}")

    writer = metrics_lib.MetricWriter(workdir)
    step = start = int(jax.device_get(state.step))
    # Streamed batches are a function of the step: resuming at `step` resumes the input exactly.
    stream = (input_lib.train_stream(config.data, seed=config.seed, batch_size=batch_size,
                                     mesh=mesh, steps_per_call=per_call, start_step=step)
              if mode == "stream" and step < total else None)
    pending, last_train, eval_metrics = [], {}, {}
    bar = tqdm(total=total, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    t_start = time.perf_counter()
    t_train = 0.0  # device-bound training time, excluding the first call's compile and evals
    t_mark, images_timed = None, 0

    def crossed(every: int, before: int, after: int) -> bool:
        return every > 0 and after // every > before // every

    while step < total:
        state, m = step_fn(state, next(stream) if stream is not None else None)
        pending.append(m)
        before, step = step, step + per_call
        if t_mark is None:  # compile + first call: excluded from throughput
            jax.block_until_ready(state)
            t_mark = time.perf_counter()
        else:
            images_timed += per_call * batch_size
        if crossed(config.train.log_every_steps, before, step) or step == total:
            last_train = metrics_lib.mean_of(pending)  # the one host sync per log period
            pending = []
            now = time.perf_counter()
            t_train, t_mark = t_train + (now - t_mark), now
            ips = images_timed / t_train if t_train > 0 else 0.0
            writer.write(step, {**last_train, "train/images_per_s": ips})
            bar.set_postfix(loss=f"{last_train['train/loss']:.4f}",
                            acc=f"{last_train['train/accuracy']:.3f}", img_s=f"{ips:,.0f}")
        if crossed(config.eval.every_steps, before, step) or step == total:
            eval_metrics = _evaluate(eval_step, state, eval_input())
            writer.write(step, eval_metrics)
            t_mark = time.perf_counter()
        if crossed(config.checkpoint.every_steps, before, step):
            ckpt.save(state)
        bar.update(per_call)
    bar.close()
    if stream is not None:
        stream.close()
    if not eval_metrics:  # resumed at the end: still report the model's quality
        eval_metrics = _evaluate(eval_step, state, eval_input())
    ckpt.save(state, force=True)
    ckpt.close()
    writer.close()

    summary = {
        **eval_metrics,
        "train/loss": last_train.get("train/loss"),
        "train/accuracy": last_train.get("train/accuracy"),
        "steps": step,
        "steps_this_run": step - start,
        "wall_time_s": time.perf_counter() - t_start,
        "images_per_s": images_timed / t_train if t_train > 0 else None,
        "device_kind": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
        "model": config.model.name,
        "num_params": num_params,
        "teacher": config.teacher.workdir if distill else None,
        "seed": config.seed,
    }
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Evaluate the latest checkpoint of `workdir` on `data.eval_split` (and agreement with the
    teacher when `teacher.workdir` is set); writes eval.json in the workdir."""
    mesh = sharding.make_mesh()
    spec = data.dataset_info(config.data.name, data_dir=_data_dir(config))
    mode, spec = _input(config, spec, config.data.eval_split)
    model = checkpoint.load_model(workdir, build_model(config, spec))
    teachers = (load_teacher(config, spec),) if config.teacher.workdir else ()
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    eval_step = make_eval_step(graphdef, teachers=teachers,
                               preprocess=_preprocess(config, spec.image_shape[-1]), mesh=mesh)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                       opt_state=(), rng=jnp.zeros((2,), jnp.uint32),
                       perm=jnp.zeros((0,), jnp.int32))
    result = _evaluate(eval_step, sharding.replicate(state, mesh),
                       _eval_input(config, mode, mesh)())
    with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result
