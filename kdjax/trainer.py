"""The training loop behind `kdjax train`, `kdjax distill` and `kdjax eval`.

The loop only dispatches: the data is on the device, the step samples and augments its own batch,
and metrics stay on the device until a log step fetches them all in one transfer. So the host
does no per-step work and never waits on the device between logs.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from kdjax import augment, checkpoint, config as config_lib, data, metrics as metrics_lib
from kdjax import models, objectives, optim, sharding
from kdjax.step import (DeviceData, Distillee, FrozenModel, TrainState, compute_dtype, freeze,
                        init_train_state, make_distill_step, make_eval_step, pad_batch)


def _preprocess(config: ml_collections.ConfigDict, channels: int) -> augment.Preprocess:
    mean, std = config.data.mean, config.data.std
    if not mean or not std:
        mean, std = data.NORMALIZATION.get(config.data.name, ((0.5,) * channels, (0.5,) * channels))
    return augment.Preprocess(mean=tuple(mean), std=tuple(std),
                              crop_padding=config.data.crop_padding, flip=config.data.flip)


def _data_dir(config: ml_collections.ConfigDict) -> str | None:
    return config.data.data_dir or None


def build_model(config: ml_collections.ConfigDict, spec: data.DatasetSpec, *,
                name: str | None = None, seed: int | None = None) -> nnx.Module:
    """The config's model (or another registry `name`: a peer, with its defaults)."""
    name = name or config.model.name
    return models.create_model(name, num_classes=spec.num_classes,
                               input_shape=spec.image_shape,
                               rngs=nnx.Rngs(config.seed if seed is None else seed),
                               dtype=compute_dtype(config.model.compute_dtype),
                               **(config.model.kwargs if name == config.model.name else {}))


def build_distillee(config: ml_collections.ConfigDict, spec: data.DatasetSpec,
                    teachers: tuple[FrozenModel, ...], train_labels: np.ndarray) -> Distillee:
    """The student with what trains alongside it: the loss's connectors and model.peers."""
    student = build_model(config, spec)
    peers = [build_model(config, spec, name=name, seed=config.seed + i)
             for i, name in enumerate(config.model.peers, start=1)]
    connectors = objectives.build_connectors(
        config.loss, student, teachers, image_shape=spec.image_shape,
        rngs=nnx.Rngs(config.seed + 0xC0), dataset_labels=train_labels,
        dtype=compute_dtype(config.model.compute_dtype))
    return Distillee(student, connectors=connectors, peers=peers)


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {workdir!r} is not a kdjax workdir (train a "
                                f"model there first with `kdjax train`)")
    with open(path) as f:
        return config_lib.from_json(f.read())


def teacher_workdirs(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """teacher.workdir, or the several teachers of teacher.workdirs (not both)."""
    one, several = config.teacher.workdir, tuple(config.teacher.workdirs)
    if one and several:
        raise ValueError(f"set teacher.workdir (one teacher) or teacher.workdirs (several), not "
                         f"both; got {one!r} and {several}")
    return several or ((one,) if one else ())


def load_teacher(config: ml_collections.ConfigDict, spec: data.DatasetSpec,
                 workdir: str) -> FrozenModel:
    """Rebuild a teacher from its own run's config.json and load its latest checkpoint."""
    teacher_config = read_run_config(workdir)
    if teacher_config.data.name != config.data.name:
        raise ValueError(f"the teacher in {workdir!r} was trained on data.name="
                         f"{teacher_config.data.name!r} but this run uses data.name="
                         f"{config.data.name!r}; distil on the teacher's dataset")
    return freeze(checkpoint.load_model(workdir, build_model(teacher_config, spec)))


def load_teachers(config: ml_collections.ConfigDict,
                  spec: data.DatasetSpec) -> tuple[FrozenModel, ...]:
    workdirs = teacher_workdirs(config)
    if not workdirs:
        raise ValueError("kdjax distill needs teacher.workdir, the workdir of the run that trained "
                         "the teacher, e.g. --config.teacher.workdir=workdirs/teacher")
    return tuple(load_teacher(config, spec, w) for w in workdirs)


def _evaluate(eval_step, state: TrainState, arrays: dict[str, np.ndarray], batch_size: int,
              mesh) -> dict[str, float]:
    """Fixed order, no augmentation; the last partial batch is padded and masked, never dropped."""
    totals: dict[str, Any] = {}
    n = len(arrays["label"])
    for start in range(0, n, batch_size):
        batch = pad_batch({k: v[start:start + batch_size] for k, v in arrays.items()}, batch_size)
        sums = eval_step(state.params, state.model_state, sharding.shard_batch(batch, mesh))
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
    train_arrays = data.load_arrays(config.data.name, config.data.train_split,
                                    data_dir=_data_dir(config))
    eval_arrays = data.load_arrays(config.data.name, config.data.eval_split,
                                   data_dir=_data_dir(config))
    batch_size = config.train.batch_size
    if batch_size > len(train_arrays["label"]):
        raise ValueError(f"train.batch_size={batch_size} exceeds the {len(train_arrays['label'])} "
                         f"training examples of {config.data.name}")
    preprocess = _preprocess(config, spec.image_shape[-1])
    with_teacher = distill and objectives.needs_teacher(config.loss.name)
    if distill and not with_teacher and teacher_workdirs(config):
        raise ValueError(f"loss.name={config.loss.name!r} learns from peer students, not a "
                         f"teacher: clear teacher.workdir and teacher.workdirs")
    teachers = load_teachers(config, spec) if with_teacher else ()

    model = build_distillee(config, spec, teachers, train_arrays["label"])
    num_params = models.count_params(model.student)
    tx = optim.make_optimizer(config.optimizer, total)
    graphdef, state = init_train_state(model, tx, seed=config.seed,
                                       num_examples=len(train_arrays["label"]))
    state = sharding.place_state(state, mesh)
    device_data = DeviceData(images=sharding.replicate(train_arrays["image"], mesh),
                             labels=sharding.replicate(train_arrays["label"], mesh),
                             batch_size=batch_size)
    step_fn = make_distill_step(graphdef, tx, objectives.from_config(config.loss, config.teacher),
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
    pending, last_train, eval_metrics = [], {}, {}
    bar = tqdm(total=total, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
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
        "model": config.model.name,
        "num_params": num_params,
        "teacher": (", ".join(teacher_workdirs(config)) or None) if with_teacher else None,
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
    arrays = data.load_arrays(config.data.name, config.data.eval_split,
                              data_dir=_data_dir(config))
    model = checkpoint.load_model(workdir, build_model(config, spec))
    workdirs = teacher_workdirs(config)
    teachers = (load_teacher(config, spec, workdirs[0]),) if workdirs else ()
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    eval_step = make_eval_step(graphdef, teachers=teachers,
                               preprocess=_preprocess(config, spec.image_shape[-1]), mesh=mesh)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                       opt_state=(), rng=jnp.zeros((2,), jnp.uint32),
                       perm=jnp.zeros((0,), jnp.int32))
    result = _evaluate(eval_step, sharding.replicate(state, mesh), arrays,
                       config.eval.batch_size, mesh)
    with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def train_generations(config: ml_collections.ConfigDict, workdir: str, generations: int, *,
                      progress: bool = True) -> dict[str, Any]:
    """Born-again networks (Furlanello et al., 2018): `generations` distillations in a row.

    Generation 1 distils from the config's teacher(s) into `workdir/gen_1`; generation k from
    generation k-1's student into `workdir/gen_k` (each generation a full run with its own
    config.json and checkpoints, usable as a teacher). `workdir/summary.json` is the last
    generation's summary plus every generation's accuracy under "generations".
    """
    if generations < 1:
        raise ValueError(f"--generations must be >= 1, got {generations}")
    if not objectives.needs_teacher(config.loss.name):
        raise ValueError(f"born-again generations distil each student into the next; "
                         f"loss.name={config.loss.name!r} has no teacher")
    history, previous = [], None
    for k in range(1, generations + 1):
        gen_config = ml_collections.ConfigDict(config.to_dict())
        if previous is not None:
            gen_config.teacher.update(workdir=previous, workdirs=(), weights=())
        gen_workdir = os.path.join(workdir, f"gen_{k}")
        summary = train(config_lib.validate(gen_config), gen_workdir, distill=True,
                        progress=progress)
        history.append({"generation": k, "workdir": gen_workdir,
                        "eval/accuracy": summary.get("eval/accuracy")})
        previous = gen_workdir
    summary = {**summary, "generations": history}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
