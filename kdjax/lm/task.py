"""The language-modelling task (kdjax.task): packed token rows of a `kdjax prepare text` dataset,
a Llama-style student of kdjax.lm.models, teachers that are LM runs of the same vocabulary and
tokenizer, the token objective (kdjax.lm.step), token-weighted metrics and perplexity.

Train metrics are token-weighted: train/ce is the mean over every target token since the last
log, and eval/perplexity is exp(summed CE / target tokens) over the held-out split. The final
summary and `kdjax eval` add generations from the config's prompts; `export` writes the
tokenizer beside the model, so that the export tokenizes as the run did.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
from flax import nnx

import kdjax

from kdjax import export as export_lib, methods, metrics as metrics_lib, models, sharding
from kdjax import plan as plan_lib
from kdjax import teacher as teacher_lib
from kdjax.checkpoint import RunReader
from kdjax.compress import training as compress
from kdjax.lm import cache as teacher_cache, cross_tokenizer, data as text_data, hf, onpolicy
from kdjax.lm import packing, sampling
from kdjax.lm import models as lm_models
from kdjax.lm import tokenizer as tokenizer_lib
from kdjax.lm.models import TORCH_CAUSAL_LM, is_lm
from kdjax.lm.objective import TokenObjective
from kdjax.lm.step import SUM_METRICS, make_lm_eval_step, make_lm_step
from kdjax.models import ModelSpec
from kdjax.distillee import Distillee
from kdjax.step import DeviceData, FrozenModel, Step, compute_dtype, freeze
from kdjax.task import RunData, Task, Teacher, register

EVAL_METRICS = ("eval/loss", "eval/perplexity", "eval/accuracy", "eval/teacher_agreement")


TOP_K_LOSSES = ("tail", "renorm")


def objective_from_plan(plan: plan_lib.RunPlan, top_k: int | None = None) -> TokenObjective:
    """The token objective of loss.name ("ce" or a token divergence), lm.chunk_size and
    teacher.top_k / top_k_loss (`top_k`: a teacher cache's k instead)."""
    if plan.teacher.top_k_loss not in TOP_K_LOSSES:
        raise ValueError(f"teacher.top_k_loss must be one of {TOP_K_LOSSES}, got "
                         f"{plan.teacher.top_k_loss!r}")
    return methods.get(plan.loss.name, task="lm").objective(
        plan.loss, chunk_size=plan.lm.chunk_size,
        top_k=plan.teacher.top_k if top_k is None else top_k,
        tail=plan.teacher.top_k_loss == "tail")


def _rows(ds: text_data.TextDataset, split: str, limit: int = 0) -> dict[str, np.ndarray]:
    rows = ds.rows(split)
    if limit:
        rows = {k: v[:limit] for k, v in rows.items()}
    if not len(rows["tokens"]):
        raise ValueError(f"split {split!r} of the text dataset {ds.path} has no rows")
    return rows


def _eval_batches(rows: dict[str, np.ndarray], batch_size: int, mesh):
    """Fixed order; the last partial batch padded with empty rows and masked ("mask": which
    rows are real; an instruction dataset's per-token "loss_mask" travels alongside)."""
    count = len(rows["tokens"])
    for start in range(0, count, batch_size):
        part = {k: packing.pad_rows(v[start:start + batch_size], batch_size)
                for k, v in rows.items()}
        real = min(batch_size, count - start)
        yield sharding.shard_batch({**part, "mask": (np.arange(batch_size) < real).astype(
            np.float32)}, mesh, "eval.batch_size")


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


def generations(model: nnx.Module, tokenizer, lm: plan_lib.Lm, seed: int
                ) -> list[dict[str, str]]:
    """lm.prompts continued by the model (lm.generate_tokens tokens each)."""
    prompts = list(lm.prompts)
    if not prompts or lm.generate_tokens < 1:
        return []
    new = sampling.generate(
        model, [[tokenizer.bos, *tokenizer.encode(p)] for p in prompts],
        max_new_tokens=lm.generate_tokens, temperature=lm.sample_temperature,
        top_k=lm.top_k, top_p=lm.top_p, seed=seed)
    out = []
    for prompt, ids in zip(prompts, new.tolist()):
        ids = ids[:ids.index(tokenizer.eos)] if tokenizer.eos in ids else ids
        out.append({"prompt": prompt, "completion": tokenizer.decode(ids)})
    return out


@register
class LanguageModelTask(Task):
    kind = "lm"
    rate = "tokens"
    postfix = ("loss", "ce")
    best_metrics = EVAL_METRICS

    def __init__(self, plan: plan_lib.RunPlan):
        super().__init__(plan)
        self.ds: text_data.TextDataset | None = None
        self.cache: teacher_cache.TeacherCache | None = None
        self.alignment: cross_tokenizer.Alignment | None = None
        self._init: dict[str, Any] | None = None

    def check(self, *, distill: bool) -> None:
        plan = self.plan
        if plan.loss.name == "ce" and distill:
            raise ValueError("kdjax distill needs a token divergence (loss.name='forward_kl', "
                             "'reverse_kl', 'jsd', ...), got loss.name='ce'; use `kdjax train` "
                             "for supervised training")
        if plan.loss.name != "ce" and not distill:
            raise ValueError(f"loss.name={plan.loss.name!r} distils from a teacher: run it with "
                             f"`kdjax distill`, or set loss.name='ce' for supervised training")
        cache = plan.teacher.cache
        if distill and not (plan.teacher.workdir or cache):
            raise ValueError("kdjax distill needs teacher.workdir, the workdir of the LM run that "
                             "trained the teacher, e.g. --config.teacher.workdir=workdirs/teacher"
                             ", or teacher.cache, a `kdjax cache-teacher` directory")
        if cache and not distill:
            raise ValueError(f"teacher.cache={cache!r} holds a teacher's targets for `kdjax "
                             f"distill`; `kdjax train` has no teacher: set teacher.cache=''")
        if plan.teacher.workdirs:
            raise ValueError("language-model distillation takes one teacher (teacher.workdir); "
                             f"got teacher.workdirs={tuple(plan.teacher.workdirs)}")
        # its own errors, before any work (a cache's top-k loss: a forward KL)
        objective_from_plan(plan, top_k=max(plan.teacher.top_k, 1) if cache else None)
        self._check_cross_tokenizer(distill=distill)
        if plan.lm.on_policy.fraction:
            onpolicy.check(plan.lm.on_policy, seq_len=self._dataset().seq_len,
                           loss_name=plan.loss.name, distill=distill, cache=cache,
                           data_name=plan.data.name, cross_tokenizer=plan.lm.cross_tokenizer)

    def _check_cross_tokenizer(self, *, distill: bool) -> None:
        """lm.cross_tokenizer's settings, and what it cannot serve."""
        plan, mode = self.plan, self.plan.lm.cross_tokenizer
        if mode not in cross_tokenizer.MODES:
            raise ValueError(f"lm.cross_tokenizer must be one of {cross_tokenizer.MODES} ('' = "
                             f"teacher and student share a tokenizer), got {mode!r}")
        if not mode:
            return
        refusals = [
            (not distill, "distils from a teacher: run it with `kdjax distill`"),
            (plan.teacher.cache, f"compares the teacher's next-byte distribution, which a top-k "
                                 f"teacher cache (teacher.cache={plan.teacher.cache!r}) does not "
                                 f"hold: set teacher.cache=''"),
            (plan.teacher.top_k, f"compares whole next-byte distributions: set teacher.top_k=0 "
                                 f"(got {plan.teacher.top_k})"),
            (plan.lm.chunk_size, f"needs both models' whole logits to marginalise them onto "
                                 f"bytes: set lm.chunk_size=0 (got {plan.lm.chunk_size})"),
        ]
        for refused, why in refusals:
            if refused:
                raise ValueError(f"lm.cross_tokenizer={mode!r} {why}")

    def teacher_workdirs(self, *, distill: bool) -> tuple[str, ...]:
        """The online teacher, none when its targets come from teacher.cache."""
        return () if self.plan.teacher.cache else super().teacher_workdirs(distill=distill)

    def eval_metric_names(self, *, distill: bool) -> tuple[str, ...]:
        # a cache has no teacher to evaluate; one of another tokenizer predicts other tokens
        return super().eval_metric_names(distill=distill and not self.plan.teacher.cache
                                         and not self.plan.lm.cross_tokenizer)

    def _open_cache(self, ds: text_data.TextDataset, tokens: np.ndarray,
                    segments: np.ndarray) -> teacher_cache.TeacherCache:
        """teacher.cache verified for this run's training rows and teacher settings."""
        t = self.plan.teacher
        found = teacher_cache.open_cache(t.cache, ds, self.plan.data.train_split, tokens,
                                         segments)
        made_by, k = found.manifest["teacher"], found.layout.k
        if t.workdir and os.path.realpath(t.workdir) != made_by["workdir"]:
            raise ValueError(f"teacher.cache={t.cache!r} holds the targets of the teacher "
                             f"{made_by['workdir']!r}, not of teacher.workdir={t.workdir!r}; set "
                             f"teacher.workdir='' (the cache is the teacher) or to "
                             f"{made_by['workdir']!r}")
        if t.workdir:
            reader = RunReader(t.workdir, what="teacher.workdir")
            try:
                step = reader.resolve_step("latest")
            finally:
                reader.close()
            if step != made_by["step"]:
                raise ValueError(f"teacher.cache={t.cache!r} holds the targets of step "
                                 f"{made_by['step']} of {t.workdir!r}, whose latest checkpoint "
                                 f"is now step {step}; make the cache again, or set "
                                 f"teacher.workdir='' to distil from the cached step")
        if t.top_k not in (0, k):
            raise ValueError(f"teacher.top_k={t.top_k} but teacher.cache={t.cache!r} holds the "
                             f"teacher's top {k}; set teacher.top_k=0 (the cache's k) or make a "
                             f"cache of top {t.top_k}")
        print(f"kdjax: teacher cache {t.cache}: top {k} of teacher {made_by['workdir']} (step "
              f"{made_by['step']}), {found.layout.token_bytes} bytes a position, "
              f"{len(found.records):,} rows verified; no teacher runs", flush=True)
        return found

    def _dataset(self) -> text_data.TextDataset:
        if self.ds is None:
            self.ds = text_data.open_text(self.plan.data.name, self.plan.data.data_dir or None)
        return self.ds

    def _student(self) -> ModelSpec:
        """The configured LM on the dataset: its vocabulary (unless model.num_classes is
        larger) and sequence length."""
        ds, model = self._dataset(), self.plan.model
        if model.name == TORCH_CAUSAL_LM:
            raise ValueError(f"model.name={model.name!r}: a PyTorch causal LM teaches (teacher."
                             f"workdir of a `kdjax import --torch` run) but does not train here, "
                             f"having no KV-cached decoding in kdjax; train one of "
                             f"kdjax.lm.models' students")
        vocab = model.num_classes or self._init_record().get("vocab") or ds.vocab_size
        if vocab < ds.vocab_size:
            raise ValueError(f"model.num_classes={vocab} is smaller than the vocabulary of "
                             f"{self.plan.data.name!r} ({ds.vocab_size} tokens); set it to 0 for "
                             f"the tokenizer's size")
        return ModelSpec(name=model.name, num_classes=vocab, input_shape=(ds.seq_len,),
                         kwargs=dict(model.kwargs), compute_dtype=model.compute_dtype)

    def _init_record(self) -> dict[str, Any]:
        """What the student takes from init.workdir's run: its vocabulary rows (an imported
        model's embedding may have more than its tokenizer has tokens) and its Hugging Face
        record (the folder's config and tokenizer files, for `kdjax export --format hf`)."""
        workdir = self.plan.init.workdir
        if not workdir:
            return {}
        if self._init is not None:
            return self._init
        reader = RunReader(workdir, what="init.workdir")
        try:
            run = reader.run_meta(reader.resolve_step("latest"))
        finally:
            reader.close()
        out: dict[str, Any] = {"vocab": ModelSpec.from_json(run["model"]).num_classes}
        directory, config = hf.tokenizer_source(workdir, run)
        if run.get("hf") and directory is not None:
            out["hf"] = {"dir": os.path.abspath(directory), "config": config}
        self._init = out
        return out

    def open_eval(self, mesh) -> Callable[[], Iterable[dict[str, jax.Array]]]:
        rows = _rows(self._dataset(), self.plan.data.eval_split, self.plan.lm.eval_rows)
        return lambda: _eval_batches(rows, self.plan.eval.batch_size, mesh)

    def open_data(self, mesh, *, given: dict[str, np.ndarray] | None = None) -> RunData:
        if given is not None:
            raise ValueError("a language-model run reads its rows from data.train_split; "
                             "training arrays cannot be given in memory")
        ds, batch_size = self._dataset(), self.plan.train.batch_size
        arrays = _rows(ds, self.plan.data.train_split)
        tokens = arrays["tokens"]
        if self.plan.lm.on_policy.fraction:
            onpolicy.check_prompts(arrays, self.plan.lm.on_policy, data_name=self.plan.data.name,
                                   split=self.plan.data.train_split)
        eval_batches = self.open_eval(mesh)
        if batch_size > len(tokens):
            raise ValueError(f"train.batch_size={batch_size} exceeds the {len(tokens)} "
                             f"training rows of {self.plan.data.name!r}")
        if self.plan.teacher.cache:
            # the cache holds every position's targets; the loss mask only picks which count
            self.cache = self._open_cache(ds, tokens, arrays["segments"])
            arrays["cache"] = self.cache.records
        if self.plan.lm.cross_tokenizer:
            self.alignment = self._align(ds, tokens, arrays["segments"])
            arrays.update(self.alignment.arrays())
        device = DeviceData({k: sharding.replicate(v, mesh) for k, v in arrays.items()},
                            batch_size=batch_size)
        return RunData(student=self._student(), num_train=len(tokens), batch_size=batch_size,
                       # positions (targets are fewer)
                       items_per_step=float(batch_size * ds.seq_len), device=device, stream=None,
                       eval_batches=eval_batches)

    def _align(self, ds: text_data.TextDataset, tokens: np.ndarray, segments: np.ndarray
               ) -> cross_tokenizer.Alignment:
        """The training rows as teacher.workdir's tokenizer reads them, aligned with the
        student's (kdjax.lm.cross_tokenizer), in windows of the teacher's own sequence length."""
        workdir = self.plan.teacher.workdir
        reader = RunReader(workdir, what="teacher.workdir")
        try:
            run = reader.run_meta(reader.resolve_step("latest"))
        finally:
            reader.close()
        spec = ModelSpec.from_json(run["model"])
        if spec.name == TORCH_CAUSAL_LM or not is_lm(spec.name):
            raise ValueError(f"lm.cross_tokenizer: the teacher in {workdir!r} is {spec.name!r}; "
                             f"a teacher of another tokenizer must be an LM of kdjax.lm.models "
                             f"(a kdjax run, or a `kdjax import --hf` one)")
        teacher_tok = _run_tokenizer(workdir, run)
        found = cross_tokenizer.align_rows(tokens, segments, student=ds.tokenizer(),
                                           teacher=teacher_tok, window=spec.input_shape[0])
        if found.aligned == 0.0:
            raise ValueError(f"lm.cross_tokenizer: no position of {self.plan.data.name!r} reads "
                             f"the same text in the teacher's tokenizer ({workdir!r}): the two "
                             f"tokenizers do not spell their tokens alike")
        r = found.reading
        print(f"kdjax: cross-tokenizer distillation: the teacher reads each row as {r.chunks} "
              f"row(s) of {r.window} of its own tokens; {100 * found.aligned:.2f} % of the "
              f"student's target positions are aligned with one of its positions (byte offsets)",
              flush=True)
        return found

    def load_teacher(self, workdir: str, student: ModelSpec, mesh) -> Teacher:
        """The latest checkpoint of the LM run `workdir`, checked against the student's
        vocabulary and tokenizer before its weights are read, and prepared for inference in
        teacher.compute_dtype (bfloat16 on accelerators)."""
        plan, ours = self.plan, self._dataset().meta["tokenizer"]

        def check(spec: ModelSpec, run: dict) -> None:
            if not is_lm(spec.name):
                raise ValueError(f"the teacher in {workdir!r} is {spec.name!r}, not a language "
                                 f"model of kdjax.lm.models; an LM student distils from an LM "
                                 f"run")
            if spec.name == TORCH_CAUSAL_LM and plan.lm.chunk_size:
                raise ValueError(f"the teacher in {workdir!r} is a PyTorch causal LM, whose "
                                 f"head is applied inside its own forward, so its logits are "
                                 f"whole: set lm.chunk_size=0 (got {plan.lm.chunk_size})")
            on_policy = plan.lm.on_policy
            if spec.name == TORCH_CAUSAL_LM and on_policy.fraction and (
                    on_policy.generator == "teacher"):
                raise ValueError(f"the teacher in {workdir!r} is a PyTorch causal LM, which has "
                                 f"no KV-cached decoding in kdjax, so it cannot generate "
                                 f"(lm.on_policy.generator='teacher'); set "
                                 f"lm.on_policy.generator='student'")
            theirs = run.get("tokenizer", {})
            if plan.lm.cross_tokenizer:
                return  # another vocabulary is the point (`_align` has read its tokenizer)
            if (spec.name in lm_models.LM_MODELS and spec.num_classes > student.num_classes
                    and theirs.get("kind") == ours.get("kind")
                    and theirs.get("vocab_size") == ours.get("vocab_size") <= student.num_classes):
                return  # padding rows beyond the shared tokenizer's tokens: sliced off below
            if spec.num_classes != student.num_classes:
                raise ValueError(
                    f"the teacher in {workdir!r} has a vocabulary of {spec.num_classes} tokens "
                    f"but the student's has {student.num_classes} (data.name="
                    f"{plan.data.name!r}, model.num_classes={plan.model.num_classes}); token "
                    f"distributions are compared token by token: distil on data tokenized with "
                    f"the teacher's tokenizer, or across tokenizers with "
                    f"lm.cross_tokenizer='next_byte'")
            if theirs and theirs.get("kind") != ours.get("kind"):
                raise ValueError(
                    f"the teacher in {workdir!r} was trained with a {theirs.get('kind')!r} "
                    f"tokenizer, this run's data {plan.data.name!r} has a {ours.get('kind')!r} "
                    f"one: the same token ids would mean different text; prepare the data with "
                    f"the teacher's tokenizer, or distil across tokenizers with "
                    f"lm.cross_tokenizer='next_byte'")

        reference, spec, _ = self.read_teacher(workdir, mesh, check)
        if spec.num_classes > student.num_classes and not plan.lm.cross_tokenizer:
            print(f"kdjax: note: the teacher in {workdir} has {spec.num_classes} vocabulary rows, "
                  f"the student {student.num_classes}, with the same tokenizer of "
                  f"{ours['vocab_size']} tokens: the teacher's rows {student.num_classes}.."
                  f"{spec.num_classes - 1} are padding no token reaches, sliced off", flush=True)
            spec, reference = lm_models.slice_vocab(reference, spec, student.num_classes)
        prepared, preparation = teacher_lib.prepare(
            reference, spec, dtype=compute_dtype(plan.teacher.compute_dtype), fold_batchnorm=False)
        record = {"workdir": workdir, "model": spec.name,
                  "num_params": models.count_params(reference), **dataclasses.asdict(preparation)}
        print(f"kdjax: teacher {workdir}: {spec.name}, {record['num_params']:,} parameters, "
              f"{preparation.dtype} weights and compute", flush=True)
        return Teacher(workdir, freeze(prepared), None, preparation, record)

    def build(self, data: RunData, teachers: tuple[FrozenModel, ...]
              ) -> tuple[Distillee, ModelSpec]:
        # init.workdir (an imported model, init.layers of its blocks) or a fresh student.
        calibration = None
        if self.plan.prune.method == "minitron":
            calibration = _rows(self._dataset(), self.plan.data.train_split,
                                self.plan.prune.minitron.calibration_rows)
        student, model = compress.initial_student(self.plan, data.student, calibration)
        return Distillee(model), student

    def make_step(self, graphdef, tx, teachers, data: RunData, **compile_args: Any) -> Step:
        layout = None if self.cache is None else self.cache.layout
        return make_lm_step(graphdef, tx, objective_from_plan(
            self.plan, top_k=None if layout is None else layout.k),
            teacher=teachers[0] if teachers else None, data=data.device, cache=layout,
            reading=None if self.alignment is None else self.alignment.reading,
            on_policy=self.plan.lm.on_policy if self.plan.lm.on_policy.fraction else None,
            eos=self._dataset().tokenizer().eos, **compile_args)

    def make_eval_step(self, graphdef, teachers, **compile_args: Any) -> Callable:
        # a teacher of another tokenizer has no next-token agreement or perplexity to compare
        teacher = teachers[0] if teachers and not self.plan.lm.cross_tokenizer else None
        return make_lm_eval_step(graphdef, objective_from_plan(self.plan), teacher=teacher,
                                 **compile_args)

    def eval_metrics(self, totals: dict[str, Any]) -> dict[str, float]:
        count = max(float(totals.pop("count")), 1.0)
        out = {f"eval/{k}": float(v) / count for k, v in totals.items()}
        out["eval/perplexity"] = math.exp(min(out["eval/loss"], 700.0))
        if "eval/teacher_loss" in out:
            out["eval/teacher_perplexity"] = math.exp(min(out["eval/teacher_loss"], 700.0))
        out["eval/tokens"] = count
        return out

    def train_means(self, pending: list) -> dict[str, float]:
        return token_means(pending)

    def record(self) -> dict[str, Any]:
        ds = self._dataset()
        # "preprocess" is the images' field of the record; an LM's input is token ids.
        # "hf": the Hugging Face folder a student started from (kdjax export --format hf).
        hf_record = {k: v for k, v in self._init_record().items() if k == "hf"}
        return {"preprocess": {"mean": [], "std": []}, "tokenizer": ds.meta["tokenizer"],
                "dataset": ds.path, **hf_record}

    def summary(self, last_train: dict[str, float], model: nnx.Module, student: ModelSpec
                ) -> dict[str, Any]:
        ds, plan = self._dataset(), self.plan
        cache = None if self.cache is None else {
            "path": self.cache.path, "k": self.cache.layout.k,
            "teacher": self.cache.manifest["teacher"]}
        cross = None if self.alignment is None else {
            "mode": plan.lm.cross_tokenizer, "aligned": self.alignment.aligned,
            "teacher_rows": self.alignment.reading.chunks,
            "teacher_window": self.alignment.reading.window}
        return {"train/ce": last_train.get("train/ce"), "train/kd": last_train.get("train/kd"),
                "teacher_cache": cache, "cross_tokenizer": cross, "vocab_size": student.num_classes,
                "seq_len": ds.seq_len, "loss": plan.loss.name, "chunk_size": plan.lm.chunk_size,
                "generations": generations(model, ds.tokenizer(), plan.lm, plan.seed)}

    def eval_extras(self, model: nnx.Module, step: int) -> dict[str, Any]:
        return {"step": step, "generations": generations(model, self._dataset().tokenizer(),
                                                         self.plan.lm, self.plan.seed)}


def _run_tokenizer(workdir: str, run: dict[str, Any]) -> tokenizer_lib.Tokenizer:
    """The tokenizer the LM run `workdir` (its record `run`) was trained or imported with."""
    description = run.get("tokenizer") or {}
    if description.get("kind") == "byte":
        return tokenizer_lib.ByteTokenizer()
    directory, _ = hf.tokenizer_source(workdir, run)
    path = None if directory is None else os.path.join(directory, tokenizer_lib.TOKENIZER_FILE)
    if description.get("kind") != "hf" or path is None or not os.path.isfile(path):
        raise ValueError(f"the LM run {workdir!r} records no tokenizer kdjax can read "
                         f"({description or 'none'}; looked for {path}); cross-tokenizer "
                         f"distillation needs the teacher's tokenizer")
    return tokenizer_lib.HFTokenizer.from_file(path)


def export(workdir: str, out: str, *, step: str | int = "latest") -> str:
    """`kdjax export` of an LM run: kdjax.export's model directory, plus the tokenizer
    (kdjax_tokenizer.json and its files), so that the export tokenizes as the run did."""
    reader = RunReader(workdir)
    try:
        run = reader.run_meta(reader.resolve_step(step))
    finally:
        reader.close()
    path = export_lib.export(workdir, out, step=step)
    description = run["tokenizer"]
    if "file" in description:
        directory, _ = hf.tokenizer_source(workdir, run)
        shutil.copy(os.path.join(directory, description["file"]),
                    os.path.join(path, description["file"]))
    with open(os.path.join(path, tokenizer_lib.DESCRIPTION_FILE), "w") as f:
        json.dump(description, f, indent=2)
    return path


def export_onnx(workdir: str, out: str, *, step: str | int = "latest") -> str:
    """`kdjax export --format onnx` of an LM run: model.onnx (int32 token ids [N, seq_len] in,
    N dynamic, float32 logits [N, seq_len, vocab] out; checked in ONNX Runtime against kdjax's
    forward before it is written, kdjax.interop.onnx), kdjax_model.json and the tokenizer."""
    from kdjax import checkpoint
    from kdjax.interop import formats, onnx

    onnx.require()
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise ValueError(f"--out {out!r} already exists; pick a new path (an export never "
                         f"overwrites anything)")
    n, _, run, spec, model = checkpoint.read_model(workdir, step)
    model.eval()
    graphdef, state = nnx.split(model)

    def forward(tokens: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state)(tokens).astype(np.float32)

    model_bytes, checked = onnx.build_fn(forward, spec.input_shape, spec.name,
                                         inputs=onnx.tokens(spec.num_classes))
    description = run["tokenizer"]
    meta = {"format": "kdjax.export.onnx/1", "kdjax_version": kdjax.__version__,
            "model": spec.to_json(), "onnx": checked, "tokenizer": description,
            "source": f"{os.path.abspath(workdir)} step {n}"}
    with formats.new_directory(out) as tmp:
        with open(os.path.join(tmp, onnx.FILE), "wb") as f:
            f.write(model_bytes)
        if "file" in description:
            shutil.copy(os.path.join(run["dataset"], description["file"]),
                        os.path.join(tmp, description["file"]))
        with open(os.path.join(tmp, tokenizer_lib.DESCRIPTION_FILE), "w") as f:
            json.dump(description, f, indent=2)
        with open(os.path.join(tmp, export_lib.META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(f"# kdjax export (onnx): {spec.name}, vocabulary {spec.num_classes}\n\n"
                    f"`{onnx.FILE}`: int32 token ids \"tokens\" [N, {spec.input_shape[0]}] in "
                    f"(any N; a shorter text padded at its end: the model is causal, so the "
                    f"logits before the padding are unchanged), float32 \"logits\" [N, "
                    f"{spec.input_shape[0]}, {spec.num_classes}] out. {onnx.describe(checked)} "
                    f"The tokenizer is `{tokenizer_lib.DESCRIPTION_FILE}` "
                    f"(`kdjax.lm.tokenizer.from_directory`).\n")
    return out


#: How to use an LM export (printed by `kdjax export`).
SNIPPET = """\
from kdjax import export
from kdjax.lm import sampling, tokenizer
model, _ = export.load("{path}")  # the student LM (a Flax NNX module): model(tokens) -> logits
tok = tokenizer.from_directory("{path}")
new = sampling.generate(model, [[tok.bos, *tok.encode("def ")]], max_new_tokens=32)
print(tok.decode(new[0]))
"""
