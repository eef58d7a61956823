"""The training loop behind `kdjax train`, `kdjax distill` and `kdjax eval`.

The loop only dispatches: the data is on the device, the step samples and augments its own batch,
and metrics stay on the device until a log step fetches them all in one transfer. So the host
does no per-step work and never waits on the device between logs.

Scale-out (docs/scaling.md): the mesh of `config.mesh` spans every device of every process; the
state is placed by the `model.sharding` rule, the teacher by `teacher.sharding`. With several
processes each one loads the whole (small) dataset into device memory, replicated, and the step
gathers on each device only that device's rows of the global batch (the gather is local, no
example crosses hosts); every process computes the same global metrics, process 0 writes the
run's files, and all of them write the checkpoint collectively.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from kdjax import augment, checkpoint, config as config_lib, data, distributed
from kdjax import metrics as metrics_lib, models, objectives, optim, sharding
from kdjax.step import (DeviceData, FrozenModel, TrainState, compute_dtype, freeze,
                        init_train_state, make_distill_step, make_eval_step, pad_batch)


def _preprocess(config: ml_collections.ConfigDict, channels: int) -> augment.Preprocess:
    mean, std = config.data.mean, config.data.std
    if not mean or not std:
        mean, std = data.NORMALIZATION.get(config.data.name, ((0.5,) * channels, (0.5,) * channels))
    return augment.Preprocess(mean=tuple(mean), std=tuple(std),
                              crop_padding=config.data.crop_padding, flip=config.data.flip)


def _data_dir(config: ml_collections.ConfigDict) -> str | None:
    return config.data.data_dir or None


def _mesh(config: ml_collections.ConfigDict, with_teacher: bool) -> jax.sharding.Mesh:
    """The run's mesh over every device of every process, after checking the sharding rules."""
    sharding.check_rule(config.model.sharding, config.mesh, "model.sharding")
    if with_teacher:
        sharding.check_rule(config.teacher.sharding, config.mesh, "teacher.sharding")
    return sharding.mesh_from_config(config.mesh)


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


def _shardings_for(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   rule: str) -> Callable[[Any], Any]:
    return lambda tree: sharding.tree_shardings(tree, mesh, rule,
                                                min_bytes=config.mesh.fsdp_min_bytes)


def load_teacher(config: ml_collections.ConfigDict, spec: data.DatasetSpec,
                 mesh: jax.sharding.Mesh) -> FrozenModel:
    """Rebuild the teacher from its own run's config.json and load its latest checkpoint, each
    array straight onto its `teacher.sharding` placement on `mesh`."""
    workdir = config.teacher.workdir
    if not workdir:
        raise ValueError("kdjax distill needs teacher.workdir, the workdir of the run that trained "
                         "the teacher, e.g. --config.teacher.workdir=workdirs/teacher")
    teacher_config = read_run_config(workdir)
    if teacher_config.data.name != config.data.name:
        raise ValueError(f"the teacher in {workdir!r} was trained on data.name="
                         f"{teacher_config.data.name!r} but this run uses data.name="
                         f"{config.data.name!r}; distil on the teacher's dataset")
    # Abstract model: the architecture without allocating its weights on one device.
    model = nnx.eval_shape(lambda: build_model(teacher_config, spec))
    return freeze(checkpoint.load_model(
        workdir, model, shardings_for=_shardings_for(config, mesh, config.teacher.sharding)))


def _evaluate(eval_step, state: TrainState, arrays: dict[str, np.ndarray], batch_size: int,
              mesh) -> dict[str, float]:
    """Fixed order, no augmentation; the last partial batch is padded and masked, never dropped."""
    totals: dict[str, Any] = {}
    n = len(arrays["label"])
    for start in range(0, n, batch_size):
        batch = pad_batch({k: v[start:start + batch_size] for k, v in arrays.items()}, batch_size)
        sums = eval_step(state.params, state.model_state,
                         sharding.shard_batch(batch, mesh, "eval.batch_size"))
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
    mesh = _mesh(config, distill)
    primary = distributed.is_primary()
    os.makedirs(workdir, exist_ok=True)
    if primary:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config_lib.to_json(config))

    spec = data.dataset_info(config.data.name, data_dir=_data_dir(config))
    train_arrays = data.load_arrays(config.data.name, config.data.train_split,
                                    data_dir=_data_dir(config))
    eval_arrays = data.load_arrays(config.data.name, config.data.eval_split,
                                   data_dir=_data_dir(config))
    batch_size = config.train.batch_size
    if batch_size > len(train_arrays["label"]):
        raise ValueError(f"train.batch_size={batch_size} exceeds the {len(train_arrays['label'])} "
                         f"training examples of {config.data.name}")
    sharding.check_batch_size(batch_size, mesh)
    preprocess = _preprocess(config, spec.image_shape[-1])
    teachers = (load_teacher(config, spec, mesh),) if distill else ()
    teacher_sharding = tuple(_shardings_for(config, mesh, config.teacher.sharding)(t.variables)
                             for t in teachers)

    model = build_model(config, spec)
    num_params = models.count_params(model)
    tx = optim.make_optimizer(config.optimizer, total)
    graphdef, state = init_train_state(model, tx, seed=config.seed,
                                       num_examples=len(train_arrays["label"]))
    state_sharding = sharding.state_shardings(state, mesh, config.model.sharding,
                                              min_bytes=config.mesh.fsdp_min_bytes)
    state = sharding.put(state, state_sharding)
    device_data = DeviceData(images=sharding.replicate(train_arrays["image"], mesh),
                             labels=sharding.replicate(train_arrays["label"], mesh),
                             batch_size=batch_size)
    step_fn = make_distill_step(graphdef, tx, objectives.from_config(config.loss),
                                teachers=teachers, preprocess=preprocess, mesh=mesh,
                                data=device_data, steps_per_call=per_call,
                                state_sharding=state_sharding, teacher_sharding=teacher_sharding)
    eval_step = make_eval_step(graphdef, teachers=teachers,
                               preprocess=preprocess, mesh=mesh, state_sharding=state_sharding,
                               teacher_sharding=teacher_sharding)

    ckpt = checkpoint.Checkpointer(workdir, every_steps=config.checkpoint.every_steps,
                                   max_to_keep=config.checkpoint.max_to_keep)
    if ckpt.latest_step() is not None:
        # Onto this run's shardings, whatever device count wrote the checkpoint.
        state = ckpt.restore(sharding.abstract(state, state_sharding))
        print(f"kdjax: resumed from {ckpt.directory} at step {int(state.step)}")

    writer = metrics_lib.MetricWriter(workdir, active=primary)
    step = start = int(jax.device_get(state.step))
    pending, last_train, eval_metrics = [], {}, {}
    bar = tqdm(total=total, initial=step, disable=not (progress and primary), unit="step",
               dynamic_ncols=True)
    t_start = time.perf_counter()
    t_train = 0.0  # device-bound training time, excluding the first call's compile and evals
    t_mark, images_timed = None, 0

    def crossed(every: int, before: int, after: int) -> bool:
        return every > 0 and after // every > before // every

    while step < total:
        state, m = step_fn(state)
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
            eval_metrics = _evaluate(eval_step, state, eval_arrays, config.eval.batch_size, mesh)
            writer.write(step, eval_metrics)
            t_mark = time.perf_counter()
        if crossed(config.checkpoint.every_steps, before, step):
            ckpt.save(state)
        bar.update(per_call)
    bar.close()
    if not eval_metrics:  # resumed at the end: still report the model's quality
        eval_metrics = _evaluate(eval_step, state, eval_arrays, config.eval.batch_size, mesh)
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
        "num_processes": jax.process_count(),
        "mesh": dict(mesh.shape),
        # What sharding buys: bytes one device holds (the largest over devices).
        "param_bytes_per_device": sharding.bytes_per_device(state.params),
        "opt_state_bytes_per_device": sharding.bytes_per_device(state.opt_state),
        "teacher_bytes_per_device": sharding.bytes_per_device(
            [t.variables for t in teachers]) if teachers else None,
        "model": config.model.name,
        "num_params": num_params,
        "teacher": config.teacher.workdir if distill else None,
        "seed": config.seed,
    }
    if primary:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Evaluate the latest checkpoint of `workdir` on `data.eval_split` (and agreement with the
    teacher when `teacher.workdir` is set); writes eval.json in the workdir."""
    mesh = _mesh(config, bool(config.teacher.workdir))
    spec = data.dataset_info(config.data.name, data_dir=_data_dir(config))
    arrays = data.load_arrays(config.data.name, config.data.eval_split,
                              data_dir=_data_dir(config))
    model = checkpoint.load_model(
        workdir, nnx.eval_shape(lambda: build_model(config, spec)),
        shardings_for=_shardings_for(config, mesh, config.model.sharding))
    teachers = (load_teacher(config, spec, mesh),) if config.teacher.workdir else ()
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                       opt_state=(), rng=jnp.zeros((2,), jnp.uint32),
                       perm=jnp.zeros((0,), jnp.int32))
    state_sharding = sharding.state_shardings(state, mesh, config.model.sharding,
                                              min_bytes=config.mesh.fsdp_min_bytes)
    eval_step = make_eval_step(
        graphdef, teachers=teachers, preprocess=_preprocess(config, spec.image_shape[-1]),
        mesh=mesh, state_sharding=state_sharding,
        teacher_sharding=tuple(_shardings_for(config, mesh, config.teacher.sharding)(t.variables)
                               for t in teachers))
    result = _evaluate(eval_step, sharding.put(state, state_sharding), arrays,
                       config.eval.batch_size, mesh)
    if distributed.is_primary():
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result
