"""`kdjax distill` with datafree.method: a student distilled without the training data.

The phases:
  1. check the config (`check_config`);
  2. load the teacher with its BatchNorms unfolded (their running statistics are what the
     synthesis matches);
  3. deepinversion: synthesise datafree.num_images images (kdjax.datafree.deepinversion), saved
     to WORKDIR/synthetic.npz (a rerun resumes with the same images), then train the student on
     them with the configured logit loss, the teacher inside the fused step (kdjax.trainer, the
     images as its training set: data.train_split is never opened);
     zskt: play the generator/student game for train.steps student steps
     (kdjax.datafree.generator), evaluate, save the student as a kdjax checkpoint (so `kdjax
     eval` and `kdjax export` read it) and 64 generated images to WORKDIR/generated.npz;
  4. summary.json: the student's eval metrics (on data.eval_split, the only data read) and the
     method's synthesis metrics.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from kdjax import augment, checkpoint, data, distributed, metrics, models
from kdjax import classification, loop, objectives, optim
from kdjax import plan as plan_lib
from kdjax import input as input_lib, sharding
from kdjax.datafree import deepinversion, generator
from kdjax.step import init_train_state, make_eval_step, sum_batches

METHODS = ("deepinversion", "zskt")
POOL = "synthetic.npz"


def check_config(config: plan_lib.RunPlan) -> None:
    """Refuse what a data-free run cannot do (ValueError naming the keys)."""
    d = config.datafree
    if d.method not in METHODS:
        raise ValueError(f"datafree.method={d.method!r}: valid values are '' (train on "
                         f"data.train_split) and {list(METHODS)}")
    if config.teacher.aggregation:
        raise ValueError(f"datafree.method={d.method!r} and teacher.aggregation="
                         f"{config.teacher.aggregation!r} do not combine: a PATE student learns "
                         f"from public data, a data-free one from synthesised inputs")
    if config.teacher.workdirs or not config.teacher.workdir:
        raise ValueError(f"datafree.method={d.method!r} synthesises inputs from one teacher: set "
                         f"teacher.workdir (and leave teacher.workdirs empty)")
    if d.method == "deepinversion" and config.loss.name not in objectives.LOGIT_LOSSES:
        raise ValueError(f"datafree.method='deepinversion' trains the student on the teacher's "
                         f"outputs for the synthesised images: loss.name must be a logit loss "
                         f"{sorted(objectives.LOGIT_LOSSES)}, got {config.loss.name!r}")
    if d.method == "zskt":
        if config.loss.name != "kd":
            raise ValueError(f"datafree.method='zskt' plays its game on the KL between teacher "
                             f"and student (loss.name='kd', loss.kwargs temperature), got "
                             f"loss.name={config.loss.name!r}")
        unknown = sorted(set(config.loss.kwargs) - {"temperature"})
        if unknown:
            raise ValueError(f"datafree.method='zskt' takes only 'temperature' in loss.kwargs, "
                             f"got {unknown}")
        if d.student_steps < 1 or config.train.steps % d.student_steps:
            raise ValueError(f"train.steps={config.train.steps} must be a positive multiple of "
                             f"datafree.student_steps={d.student_steps} (student steps per "
                             f"generator step)")
        if d.balance_weight < 0 or d.bn_weight < 0:
            raise ValueError(f"datafree.bn_weight={d.bn_weight} and datafree.balance_weight="
                             f"{d.balance_weight} must be >= 0")


def recipe(d: plan_lib.Datafree, platform: str) -> deepinversion.Recipe:
    """DeepInversion's synthesis recipe of the datafree section (steps per call 0 = auto: one
    compiled loop on accelerators, 1 on the CPU)."""
    per_call = d.synthesis_steps_per_call or (1 if platform == "cpu" else 0)
    return deepinversion.Recipe(steps=d.synthesis_steps, learning_rate=d.synthesis_lr,
                                bn_weight=d.bn_weight, tv_weight=d.tv_weight,
                                l2_weight=d.l2_weight, jitter=d.jitter, flip=d.flip,
                                steps_per_call=per_call)


def distill(config: plan_lib.RunPlan, workdir: str, *, progress: bool = True,
            fresh: bool = False) -> dict[str, Any]:
    """Run the phases of the module docstring; returns the summary (also in summary.json)."""
    from kdjax import trainer

    config = plan_lib.as_plan(config)
    check_config(config)
    spec = data.dataset_info(config.data.name, data_dir=config.data.data_dir or None)
    mesh = sharding.mesh_from_config(config.mesh)
    unfolded = config.replace(teacher={"fold_batchnorm": False})
    student = classification.model_spec(config.model, spec)
    num_classes = student.num_classes
    teacher = classification.ImageTask(unfolded).load_teacher(
        config.teacher.workdir, student, mesh).model
    if teacher.input_shape is not None:
        raise ValueError(f"datafree.method={config.datafree.method!r} synthesises images of the "
                         f"data's shape {tuple(spec.image_shape)} for the teacher in "
                         f"{config.teacher.workdir!r}, which takes {teacher.input_shape}; "
                         f"data-free distillation needs a teacher of the data's image shape")
    preprocess = classification.preprocess_of(config.data, spec.image_shape[-1])
    # Inputs are synthesised in the teacher's normalised space, and quantised back to pixels
    # through the teacher's own normalisation when it has one.
    if teacher.normalization is not None:
        mean, std = teacher.normalization
        if config.datafree.method == "zskt" and (tuple(mean), tuple(std)) != (
                tuple(preprocess.mean), tuple(preprocess.std)):
            raise ValueError(
                f"datafree.method='zskt' feeds the generator's images to the teacher and the "
                f"student alike, but the teacher in {config.teacher.workdir!r} was trained on "
                f"normalisation mean={mean}, std={std} and the student's is data.mean="
                f"{preprocess.mean}, data.std={preprocess.std}; set data.mean and data.std to "
                f"the teacher's")
        pixels = augment.Preprocess(mean=tuple(mean), std=tuple(std))
    else:
        pixels = preprocess
    platform = mesh.devices.flat[0].platform
    checkpoint.ensure_writable(workdir)
    if config.datafree.method == "zskt":
        summary = _zskt(config, workdir, teacher, spec, mesh, preprocess, progress)
    else:
        pool_path = os.path.join(workdir, POOL)
        t0 = time.perf_counter()
        if os.path.isfile(pool_path):
            with np.load(pool_path) as f:
                pool = {"image": f["image"], "label": f["label"]}
            print(f"kdjax: DeepInversion: reusing the {len(pool['label'])} images of {pool_path}")
            synthesis = {}
        else:
            out = deepinversion.synthesize(
                teacher, key=jax.random.fold_in(jax.random.key(config.seed), 0xD1),
                num_images=config.datafree.num_images,
                batch_size=config.datafree.synthesis_batch_size, num_classes=num_classes,
                image_shape=tuple(spec.image_shape), recipe=recipe(config.datafree, platform),
                preprocess=pixels, mesh=mesh)
            pool = {"image": out["image"], "label": out["label"]}
            last = out["metrics"][-1]
            synthesis = {"datafree/synthesis_time_s": time.perf_counter() - t0,
                         **{f"datafree/synthesis_{k}": np.mean([m[k] for m in out["metrics"]])
                            for k in last}}
            if distributed.is_primary():
                np.savez(pool_path, **pool)
        summary = trainer.train(config, workdir, distill=True, progress=progress, fresh=fresh,
                                train_arrays=pool)
        summary = {**summary, **{k: float(v) for k, v in synthesis.items()},
                   "datafree/images": len(pool["label"])}
    summary = {**summary, "datafree/method": config.datafree.method,
               "datafree/training_data_read": False}
    if distributed.is_primary():
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(metrics.json_safe(summary), f, indent=2)
    return summary


def _zskt(config, workdir, teacher, spec, mesh, preprocess, progress: bool) -> dict[str, Any]:
    """The generator/student game, its evaluation and the student's checkpoint (a workdir with
    checkpoints is refused: the game does not resume, `--fresh` or not)."""
    d, total, plan = config.datafree, config.train.steps, config
    student_spec = classification.model_spec(config.model, spec)
    tx = optim.make_optimizer(config.optimizer, total)
    graphdef, state = init_train_state(student_spec.build(config.seed), tx, seed=config.seed)
    rounds = total // d.student_steps
    g_tx = optax.adam(optax.cosine_decay_schedule(d.generator_lr, rounds))
    g_def, g_params, g_stats, g_opt = generator.init_generator(
        generator.Generator(d.latent_dim, spec.image_shape, tuple(d.generator_channels),
                            rngs=nnx.Rngs(config.seed + 0x6E)), g_tx)
    game = sharding.replicate(generator.GameState(state, g_params, g_stats, g_opt), mesh)
    step = generator.make_game_step(
        graphdef, tx, g_def, g_tx, teacher, batch_size=config.train.batch_size,
        latent_dim=d.latent_dim, student_steps=d.student_steps,
        temperature=float(config.loss.kwargs.get("temperature", 1.0)), bn_weight=d.bn_weight,
        balance_weight=d.balance_weight, mesh=mesh)
    eval_arrays = data.load_arrays(config.data.name, config.data.eval_split,
                                   data_dir=config.data.data_dir or None)
    eval_step = make_eval_step(graphdef, teachers=(teacher,), preprocess=preprocess, mesh=mesh)

    def evaluate(st):
        return classification.eval_metrics(sum_batches(
            eval_step, st.params, st.model_state,
            input_lib.array_eval_batches(eval_arrays, config.eval.batch_size, mesh)))

    ck = config.checkpoint
    with checkpoint.Checkpointer(workdir, max_to_keep=ck.max_to_keep) as ckpt:
        if ckpt.steps():
            raise ValueError(f"{workdir!r} already has checkpoints (steps {ckpt.steps()}): a "
                             f"datafree.method='zskt' run does not resume (its generator is not "
                             f"checkpointed); pick a new --workdir")
        if distributed.is_primary():
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(plan.to_json())
        # One call of the game is one generator step and datafree.student_steps student steps;
        # the student's TrainState inside the game is what is checked and checkpointed.
        hooks = loop.Hooks(
            step=lambda g: step(g, teacher.variables), evaluate=lambda g: evaluate(g.student),
            record=loop.recorder(plan, student_spec, preprocess={
                "mean": list(preprocess.mean), "std": list(preprocess.std)}),
            means=metrics.mean_of, items_per_step=config.train.batch_size, rate="images",
            postfix=("kd",), checkpointed=lambda g: g.student)
        t0 = time.perf_counter()
        done = loop.run(plan, game, hooks, ckpt=ckpt, workdir=workdir, per_call=d.student_steps,
                        pending=[], last_train={}, progress=progress)
        wall = time.perf_counter() - t0
    game, evals, last = done.state, done.eval_metrics, done.last_train
    images = generator.sample_images(g_def, game, jax.random.key(config.seed), 64, d.latent_dim)
    if distributed.is_primary():
        np.savez(os.path.join(workdir, "generated.npz"),
                 image=deepinversion.to_uint8(jax.device_get(images), preprocess))
    return {**evals, **last, "steps": total, "wall_time_s": wall,
            "device_kind": jax.devices()[0].device_kind, "model": config.model.name,
            "num_params": models.count_params(game.student.params),
            "teacher": config.teacher.workdir, "seed": config.seed,
            "datafree/generator_steps": rounds}
