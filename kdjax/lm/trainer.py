"""The loop behind `kdjax train|distill|eval|export` for language models (an LM run: model.name
is one of kdjax.lm.models'; kdjax.cli dispatches on it).

It is the image loop's contract with the image loop's machinery: Orbax checkpoints
(kdjax.checkpoint: resume from the newest readable one, bit-identical after a kill), SIGTERM/SIGINT
saves (kdjax.preemption), the NaN/Inf policy (checked where the loop syncs anyway), metrics.jsonl
and TensorBoard (kdjax.metrics), optimizers (kdjax.optim), meshes and FSDP placement
(kdjax.sharding) and the exit codes of kdjax.errors. What differs is the data (packed token rows
on the devices, kdjax.lm.data), the step (kdjax.lm.step) and the metrics: token-weighted, so
train/ce is the mean over every target token since the last log, and eval/perplexity is
exp(summed CE / target tokens) over the held-out split. The final summary adds generations
from the config's prompts.

A teacher is an LM run's workdir (teacher.workdir). It is refused before any training when its
vocabulary, or its tokenizer, differs from the student's data, with both named.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from kdjax import checkpoint, config as config_lib, distributed, export as export_lib
from kdjax import loop, methods, metrics as metrics_lib, models, optim, sharding
from kdjax import teacher as teacher_lib, trainer as image_trainer
from kdjax.lm import data as text_data, sampling, tokenizer as tokenizer_lib
from kdjax.lm.models import is_lm
from kdjax.lm.objective import TokenObjective
from kdjax.lm.step import SUM_METRICS, TokenData, make_lm_eval_step, make_lm_step
from kdjax.models import ModelSpec
from kdjax.distillee import Distillee
from kdjax.step import FrozenModel, compute_dtype, freeze, init_train_state

EVAL_METRICS = ("eval/loss", "eval/perplexity", "eval/accuracy", "eval/teacher_agreement")


def objective_from_config(config: ml_collections.ConfigDict) -> TokenObjective:
    return methods.get(config.loss.name, task="lm").objective(
        config.loss, chunk_size=config.lm.chunk_size)


def student_spec(config: ml_collections.ConfigDict, ds: text_data.TextDataset) -> ModelSpec:
    """The config's LM on dataset `ds`: its vocabulary (unless model.num_classes is larger) and
    sequence length."""
    vocab = config.model.num_classes or ds.vocab_size
    if vocab < ds.vocab_size:
        raise ValueError(f"model.num_classes={vocab} is smaller than the vocabulary of "
                         f"{config.data.name!r} ({ds.vocab_size} tokens); set it to 0 for the "
                         f"tokenizer's size")
    return ModelSpec(name=config.model.name, num_classes=vocab, input_shape=(ds.seq_len,),
                     kwargs=dict(config.model.kwargs), compute_dtype=config.model.compute_dtype)


def load_teacher(config: ml_collections.ConfigDict, ds: text_data.TextDataset,
                 student: ModelSpec, mesh, workdir: str) -> tuple[FrozenModel, dict[str, Any]]:
    """The latest checkpoint of the LM run `workdir`, checked against the student's vocabulary
    and tokenizer before its weights are read, and prepared for inference in
    teacher.compute_dtype (bfloat16 on accelerators)."""
    dtype = compute_dtype(config.teacher.compute_dtype)
    reader = checkpoint.RunReader(workdir, what="teacher.workdir")
    try:
        step = reader.resolve_step("latest")
        run = reader.run_meta(step)
        spec = ModelSpec.from_json(run["model"])
        if config.teacher.model.name:
            spec = dataclasses.replace(spec, name=config.teacher.model.name,
                                       kwargs=dict(config.teacher.model.kwargs))
        if not is_lm(spec.name):
            raise ValueError(f"the teacher in {workdir!r} is {spec.name!r}, not a language model "
                             f"of kdjax.lm.models; an LM student distils from an LM run")
        if spec.num_classes != student.num_classes:
            raise ValueError(
                f"the teacher in {workdir!r} has a vocabulary of {spec.num_classes} tokens but "
                f"the student's has {student.num_classes} (data.name={config.data.name!r}, "
                f"model.num_classes={config.model.num_classes}); token distributions are "
                f"compared token by token: distil on data tokenized with the teacher's "
                f"tokenizer")
        theirs, ours = run.get("tokenizer", {}), ds.meta["tokenizer"]
        if theirs and theirs.get("kind") != ours.get("kind"):
            raise ValueError(f"the teacher in {workdir!r} was trained with a {theirs.get('kind')!r} "
                             f"tokenizer, this run's data {config.data.name!r} has a "
                             f"{ours.get('kind')!r} one: the same token ids would mean "
                             f"different text; prepare the data with the teacher's tokenizer")
        reference = reader.load_model(
            step, dataclasses.replace(spec, compute_dtype="float32"),
            what=f"the teacher model recorded in {workdir!r}",
            shardings_for=image_trainer._shardings_for(config, mesh, config.teacher.sharding))
    finally:
        reader.close()
    prepared, preparation = teacher_lib.prepare(reference, spec, dtype=dtype,
                                                fold_batchnorm=False)
    record = {"workdir": workdir, "model": spec.name, "num_params": models.count_params(reference),
              **dataclasses.asdict(preparation)}
    print(f"kdjax: teacher {workdir}: {spec.name}, {record['num_params']:,} parameters, "
          f"{preparation.dtype} weights and compute", flush=True)
    return freeze(prepared), record


def _rows(ds: text_data.TextDataset, split: str, limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    tokens, segments = ds.load(split)
    if limit:
        tokens, segments = tokens[:limit], segments[:limit]
    if not len(tokens):
        raise ValueError(f"split {split!r} of the text dataset {ds.path} has no rows")
    return tokens, segments


def _eval_batches(tokens: np.ndarray, segments: np.ndarray, batch_size: int, mesh):
    """Fixed order; the last partial batch padded with empty rows and masked."""
    for start in range(0, len(tokens), batch_size):
        t, s = tokens[start:start + batch_size], segments[start:start + batch_size]
        n = len(t)
        pad = batch_size - n
        yield sharding.shard_batch({
            "tokens": np.concatenate([t, np.zeros((pad, t.shape[1]), t.dtype)]),
            "segments": np.concatenate([s, np.zeros((pad, s.shape[1]), s.dtype)]),
            "mask": (np.arange(batch_size) < n).astype(np.float32)}, mesh, "eval.batch_size")


def _evaluate(eval_step, params, model_state, batches) -> dict[str, float]:
    totals: dict[str, Any] = {}
    for batch in batches:
        sums = eval_step(params, model_state, batch)
        totals = sums if not totals else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = max(float(totals.pop("count")), 1.0)
    out = {f"eval/{k}": float(v) / count for k, v in totals.items()}
    out["eval/perplexity"] = math.exp(min(out["eval/loss"], 700.0))
    if "eval/teacher_loss" in out:
        out["eval/teacher_perplexity"] = math.exp(min(out["eval/teacher_loss"], 700.0))
    out["eval/tokens"] = count
    return out


def token_means(pending: list) -> dict[str, float]:
    """train/ metrics of the steps since the last log: sums divided by the tokens they count
    (each token weighs the same, however its batch was padded); loss and grad_norm averaged
    per step."""
    means = metrics_lib.mean_of(pending)  # means of sums and of counts: their ratio is exact
    tokens = means.pop("train/tokens", 0.0)
    out = {k: v for k, v in means.items() if not k.removeprefix("train/") in SUM_METRICS}
    for name in SUM_METRICS:
        if f"train/{name}" in means and tokens:
            out[f"train/{name.removesuffix('_sum')}"] = means[f"train/{name}"] / tokens
    if "train/correct" in out:
        out["train/accuracy"] = out.pop("train/correct")
    out["train/tokens_per_step"] = tokens
    return out


def generations(model: nnx.Module, tokenizer, config: ml_collections.ConfigDict
                ) -> list[dict[str, str]]:
    """The config's prompts continued by the model (lm.generate_tokens tokens each)."""
    prompts = list(config.lm.prompts)
    if not prompts or config.lm.generate_tokens < 1:
        return []
    new = sampling.generate(
        model, [[tokenizer.bos, *tokenizer.encode(p)] for p in prompts],
        max_new_tokens=config.lm.generate_tokens, temperature=config.lm.sample_temperature,
        top_k=config.lm.top_k, top_p=config.lm.top_p, seed=config.seed)
    out = []
    for prompt, ids in zip(prompts, new.tolist()):
        ids = ids[:ids.index(tokenizer.eos)] if tokenizer.eos in ids else ids
        out.append({"prompt": prompt, "completion": tokenizer.decode(ids)})
    return out


def _check(config: ml_collections.ConfigDict, distill: bool) -> None:
    if config.loss.name == "ce" and distill:
        raise ValueError("kdjax distill needs a token divergence (loss.name='forward_kl', "
                         "'reverse_kl', 'jsd', ...), got loss.name='ce'; use `kdjax train` for "
                         "supervised training")
    if config.loss.name != "ce" and not distill:
        raise ValueError(f"loss.name={config.loss.name!r} distils from a teacher: run it with "
                         f"`kdjax distill`, or set loss.name='ce' for supervised training")
    if distill and not config.teacher.workdir:
        raise ValueError("kdjax distill needs teacher.workdir, the workdir of the LM run that "
                         "trained the teacher, e.g. --config.teacher.workdir=workdirs/teacher")
    if config.teacher.workdirs:
        raise ValueError("language-model distillation takes one teacher (teacher.workdir); "
                         f"got teacher.workdirs={tuple(config.teacher.workdirs)}")
    valid = EVAL_METRICS if distill else EVAL_METRICS[:-1]
    if config.checkpoint.keep_best and config.checkpoint.best_metric not in valid:
        raise ValueError(f"checkpoint.best_metric={config.checkpoint.best_metric!r} is not an "
                         f"eval metric of this run; valid: {list(valid)}")
    objective_from_config(config)  # its own errors, before any work


def train(config: ml_collections.ConfigDict, workdir: str, *, distill: bool,
          progress: bool = True, fresh: bool = False) -> dict[str, Any]:
    """Train an LM (supervised, or distilled from teacher.workdir); return the run's summary."""
    _check(config, distill)
    ck = config.checkpoint
    checkpoint.ensure_writable(workdir)
    with checkpoint.Checkpointer(workdir, max_to_keep=ck.max_to_keep, keep_best=ck.keep_best,
                                 best_metric=ck.best_metric, best_mode=ck.best_mode) as ckpt:
        if fresh and ckpt.steps():
            raise ValueError(
                f"--fresh: {workdir!r} already has checkpoints (steps {ckpt.steps()} in "
                f"{ckpt.directory}) and kdjax never deletes a run's checkpoints; pick a new "
                f"--workdir, or delete {ckpt.directory} yourself to start over there")
        return _train(config, workdir, ckpt, distill=distill, progress=progress)


def _train(config: ml_collections.ConfigDict, workdir: str, ckpt: checkpoint.Checkpointer, *,
           distill: bool, progress: bool) -> dict[str, Any]:
    total, batch_size = config.train.steps, config.train.batch_size
    mesh = image_trainer._mesh(config, distill)
    ds = text_data.open_text(config.data.name, config.data.data_dir or None)
    train_tokens, train_segments = _rows(ds, config.data.train_split)
    eval_tokens, eval_segments = _rows(ds, config.data.eval_split, config.lm.eval_rows)
    if batch_size > len(train_tokens):
        raise ValueError(f"train.batch_size={batch_size} exceeds the {len(train_tokens)} "
                         f"training rows of {config.data.name!r}")
    sharding.check_batch_size(batch_size, mesh)
    sharding.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    student = student_spec(config, ds)
    objective = objective_from_config(config)
    teacher, teacher_record = (load_teacher(config, ds, student, mesh, config.teacher.workdir)
                               if distill else (None, None))
    teacher_sharding = (None if teacher is None else (image_trainer._shardings_for(
        config, mesh, config.teacher.sharding)(teacher.variables),))

    model = Distillee(student.build(config.seed))
    num_params = models.count_params(model.student)
    tx = optim.make_optimizer(config.optimizer, total)
    graphdef, state = init_train_state(model, tx, seed=config.seed,
                                       num_examples=len(train_tokens))
    state_sharding = sharding.state_shardings(state, mesh, config.model.sharding,
                                              min_bytes=config.mesh.fsdp_min_bytes)
    state = sharding.put(state, state_sharding)
    checkpoint.ensure_space(workdir, state, copies=config.checkpoint.max_to_keep
                            + config.checkpoint.keep_best + 1)
    data = TokenData(tokens=sharding.replicate(train_tokens, mesh),
                     segments=sharding.replicate(train_segments, mesh), batch_size=batch_size)
    pending: list = []
    last_train: dict[str, float] = {}
    restored = ckpt.restore(sharding.abstract(state, state_sharding))
    if restored is not None:
        state, run = restored
        pending = metrics_lib.pending_from_json(run["pending_train_metrics"])
        last_train = run["last_train"]
        print(image_trainer._resume_note(ckpt.path(int(state.step)), int(state.step), total,
                                         data.steps_per_epoch, run["config"], config), flush=True)
    start = int(jax.device_get(state.step))
    per_call = image_trainer.resolve_steps_per_call(config, mesh.devices.flat[0].platform, start)
    nan_policy = config.train.nan_policy
    step_fn = make_lm_step(graphdef, tx, objective, teacher=teacher, data=data, mesh=mesh,
                           steps_per_call=per_call, nan_policy=nan_policy,
                           state_sharding=state_sharding, teacher_sharding=teacher_sharding)
    eval_step = make_lm_eval_step(graphdef, objective, teacher=teacher, mesh=mesh,
                                  params_sharding=state_sharding.params,
                                  teacher_sharding=teacher_sharding)

    def eval_input():
        return _eval_batches(eval_tokens, eval_segments, config.eval.batch_size, mesh)

    primary = distributed.is_primary()
    if primary:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config_lib.to_json(config))

    hooks = loop.Hooks(
        step=step_fn,
        evaluate=lambda state: _evaluate(eval_step, state.params, state.model_state,
                                         eval_input()),
        # "preprocess" is the images' field of the record; an LM's input is token ids.
        record=loop.recorder(config, student, {"mean": [], "std": []},
                             tokenizer=ds.meta["tokenizer"], dataset=ds.path),
        means=token_means,
        items_per_step=float(batch_size * ds.seq_len),  # positions (targets are fewer)
        rate="tokens", postfix=("loss", "ce"))
    t_start = time.perf_counter()
    done = loop.run(config, state, hooks, ckpt=ckpt, workdir=workdir, per_call=per_call,
                    pending=pending, last_train=last_train, progress=progress)
    state, eval_metrics, last_train = done.state, done.eval_metrics, done.last_train

    final = nnx.merge(graphdef, state.params, state.model_state).student
    summary = {
        **eval_metrics,
        "train/loss": last_train.get("train/loss"),
        "train/ce": last_train.get("train/ce"),
        "train/kd": last_train.get("train/kd"),
        **loop.run_facts(done, start=start, per_call=per_call, mesh=mesh, t_start=t_start),
        "tokens_per_s": done.items_per_s,
        "teacher_bytes_per_device": (sharding.bytes_per_device(teacher.variables)
                                     if teacher is not None else None),
        "model": config.model.name,
        "num_params": num_params,
        "vocab_size": student.num_classes,
        "seq_len": ds.seq_len,
        "loss": config.loss.name,
        "chunk_size": config.lm.chunk_size,
        "teacher": config.teacher.workdir if distill else None,
        "teacher_preparation": teacher_record,
        "seed": config.seed,
        "generations": generations(final, ds.tokenizer(), config),
    }
    if primary:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(metrics_lib.json_safe(summary), f, indent=2)
    return summary


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """`kdjax eval` of an LM run: perplexity, next-token accuracy (and agreement with
    teacher.workdir when set) on data.eval_split, and the generations; writes eval.json."""
    mesh = image_trainer._mesh(config, bool(config.teacher.workdir))
    ds = text_data.open_text(config.data.name, config.data.data_dir or None)
    tokens, segments = _rows(ds, config.data.eval_split, config.lm.eval_rows)
    reader = checkpoint.RunReader(workdir)
    try:
        step = reader.resolve_step("latest")
        spec = reader.model_spec(step)
        model = reader.load_model(step, spec, shardings_for=image_trainer._shardings_for(
            config, mesh, config.model.sharding))
    finally:
        reader.close()
    teacher = (load_teacher(config, ds, spec, mesh, config.teacher.workdir)[0]
               if config.teacher.workdir else None)
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    eval_step = make_lm_eval_step(graphdef, objective_from_config(config), teacher=teacher,
                                  mesh=mesh)
    result: dict[str, Any] = _evaluate(eval_step, params, model_state, _eval_batches(
        tokens, segments, config.eval.batch_size, mesh))
    result["step"] = step
    result["generations"] = generations(model, ds.tokenizer(), config)
    if distributed.is_primary():
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(metrics_lib.json_safe(result), f, indent=2)
    return result


def export(workdir: str, out: str, *, step: str | int = "latest") -> str:
    """`kdjax export` of an LM run: kdjax.export's model directory, plus the tokenizer
    (kdjax_tokenizer.json and its files), so that the export tokenizes as the run did."""
    reader = checkpoint.RunReader(workdir)
    try:
        run = reader.run_meta(reader.resolve_step(step))
    finally:
        reader.close()
    path = export_lib.export(workdir, out, step=step)
    description = run["tokenizer"]
    if "file" in description:
        shutil.copy(os.path.join(run["dataset"], description["file"]),
                    os.path.join(path, description["file"]))
    with open(os.path.join(path, tokenizer_lib.DESCRIPTION_FILE), "w") as f:
        json.dump(description, f, indent=2)
    return path


#: How to use an LM export (printed by `kdjax export`).
SNIPPET = """\
from kdjax import export
from kdjax.lm import sampling, tokenizer
model, _ = export.load("{path}")  # the student LM (a Flax NNX module): model(tokens) -> logits
tok = tokenizer.from_directory("{path}")
new = sampling.generate(model, [[tok.bos, *tok.encode("def ")]], max_new_tokens=32)
print(tok.decode(new[0]))
"""


def is_lm_run(workdir: str) -> bool:
    """Whether `workdir`'s config.json names a language model (for `kdjax export`)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return is_lm(json.load(f).get("model", {}).get("name", ""))
