"""`kdjax report`: accuracy, calibration, fidelity, size and speed of runs and exports side by side.

  kdjax report workdirs/demo/teacher workdirs/demo/student_scratch exports/kd --out reports/demo

For each model (a trained run, an imported teacher, an export; `artifacts.register_loader` adds
formats): top-1/top-5, NLL and Brier on the split; ECE (15 equal-width bins of the top-label
confidence, torchmetrics' convention: kdjax.calibration) and MCE, with the per-bin statistics;
temperature scaling fitted on held-out data (`evaluate.held_out_split`), ECE and NLL before and
after; top-1 agreement with and KL from its teacher when one is known; parameters, non-zero
parameters, bytes stored, FLOPs per example; latency at batch 1 and throughput at batch 256 on
this device. Writes report.json and report.md side by side, and with matplotlib (the `report`
extra) accuracy-vs-size, accuracy-vs-latency and one reliability diagram per model.

Language-model runs and exports get the same report per target token (kdjax.report.lm):
perplexity, next-token top-1/top-5, NLL, Brier, ECE/MCE, agreement with and KL from the teacher,
FLOPs per token, forward latency of one row and throughput in tokens/s.

`measure.size`, `measure.speed` and `measure.flops_per_example` take an Artifact
(`load_artifact(path)`), for code that wants the numbers without the report.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from kdjax import calibration, data as data_lib, plan
from kdjax.report import evaluate, lm, measure, render, runtime as runtime_lib
from kdjax.report.artifacts import Artifact, load_artifact, register_loader

__all__ = ["Artifact", "load_artifact", "register_loader", "make_report", "measure", "evaluate",
           "CONVENTIONS"]

FORMAT = "kdjax.report/1"
# Training images a W8A8 student's ONNX file is calibrated on (quant.calibration_examples'
# default).
CALIBRATION_IMAGES = 512
CONVENTIONS = {
    "ECE": f"expected calibration error of the top label, sum_b (n_b / N) |acc_b - conf_b| over "
           f"{calibration.NUM_BINS} equal-width confidence bins [b/15, (b+1)/15) (closed on the "
           f"left: a confidence on an edge counts in the bin above), plus a bin of its own for "
           f"confidence exactly 1.0: torchmetrics' CalibrationError(n_bins=15, norm='l1')",
    "MCE": "maximum calibration error, max_b |acc_b - conf_b| over the same bins (empty bins 0)",
    "NLL": "mean negative log-likelihood of the true label (natural log)",
    "Brier": "mean over examples of sum_c (p_c - onehot_c)^2 (in [0, 2]; not divided by C)",
    "T": "temperature scaling (Guo et al. 2017): the T minimising the NLL of softmax(logits / T) "
         "on the held-out split named in 'fitted on' (never the evaluated split), found by "
         "bisection on the convex NLL's slope; accuracy is unchanged by it",
    "fidelity": "top-1 agreement with the teacher's argmax and mean KL(p_teacher || p_student) "
                "at temperature 1 (nats), on the evaluated split",
    "size": "parameters: trainable scalars; non-zero: those not exactly 0; stored: bytes of the "
            "files holding the model's arrays on disk (Orbax compresses them: sparse or integer "
            "models count as stored); in memory: bytes of all arrays as loaded; FLOPs: XLA's "
            "cost analysis of the compiled batch-1 forward (preprocessing included)",
    "speed": "latency: median [quartiles] of separate batch-1 calls, each waited for; "
             "throughput: median [quartiles] over windows of back-to-back batch-256 calls; both "
             "warmed up, input already on the device. A measurement of this machine at this "
             "load, not a property of the model",
}


def _names(paths: Sequence[str]) -> list[str]:
    """Short distinct names: the paths relative to their common folder."""
    paths = [os.path.abspath(p) for p in paths]
    if len(paths) == 1:
        return [os.path.basename(paths[0])]
    common = os.path.commonpath(paths)
    names = [os.path.relpath(p, common) for p in paths]
    return [n if n != "." else os.path.basename(p) for n, p in zip(names, paths)]


class _Cache:
    """Each artifact loaded once and each (artifact, split)'s logits computed once, so a teacher
    listed among the models is evaluated once for both of its roles."""

    def __init__(self, *, step: str | int, dataset: str | None, data_dir: str | None,
                 batch_size: int):
        self.step, self.dataset, self.data_dir = step, dataset, data_dir
        self.batch_size = batch_size
        self._artifacts: dict[str, Artifact] = {}
        self._logits: dict[tuple[str, str], tuple[Any, Any]] = {}

    def artifact(self, path: str) -> Artifact:
        key = os.path.abspath(path)
        if key not in self._artifacts:
            self._artifacts[key] = load_artifact(key, step=self.step)
        return self._artifacts[key]

    def data(self, a: Artifact, split: str) -> plan.Data:
        return evaluate.data_config(a, split=split, dataset=self.dataset, data_dir=self.data_dir)

    def logits(self, a: Artifact, split: str):
        key = (a.path, split)
        if key not in self._logits:
            self._logits[key] = evaluate.split_logits(a, self.data(a, split),
                                                      batch_size=self.batch_size)
        return self._logits[key]


def make_report(paths: Sequence[str], *, out: str | None = None, split: str | None = None,
                calibration_split: str | None = None, teacher: str | None = None,
                dataset: str | None = None, data_dir: str | None = None,
                batch_size: int = 1000, speed: bool = True,
                speed_settings: dict[str, Any] | None = None, step: str | int = "latest",
                runtime: str | None = None, log=print) -> dict[str, Any]:
    """Measure every artifact in `paths` and write report.json, report.md (and charts) to `out`.

    Args:
      paths: runs, exports or any registered format.
      out: output folder (created; None writes nothing and only returns the report).
      split: the evaluated split (default: the first model's data.eval_split, else "test").
      calibration_split: held-out split for temperature scaling (default: `held_out_split`).
      teacher: the teacher for fidelity, for every model (default: the one each run records).
      dataset, data_dir: where the data is, when the artifacts do not record it.
      batch_size: evaluation batch size; speed: time latency/throughput (False: skip), with
        `speed_settings` for `measure.speed` (repeats, windows).
      step: which checkpoint of a run ("latest", "best" or a number).
      runtime: also time each model in this deployment runtime ("onnxruntime" or "litert")
        beside XLA over a batch sweep (kdjax.report.runtime); needs `speed`.

    Returns:
      the report dict written as report.json.
    """
    if not paths:
        raise ValueError("kdjax report needs at least one run or export")
    runtime_lib.check(runtime)
    if runtime and not speed:
        raise ValueError(f"--runtime {runtime} times the models: it cannot go with --no-speed")
    lm_paths = [p for p in paths if lm.is_lm_path(os.path.abspath(p))]
    if lm_paths:
        if runtime:
            raise ValueError(f"--runtime {runtime}: kdjax times image classifiers only in a "
                             f"deployment runtime (uint8 images in); report the language "
                             f"models {lm_paths} without --runtime")
        if len(lm_paths) != len(paths):
            images = [p for p in paths if p not in lm_paths]
            raise ValueError(f"kdjax report compares models of one kind: {lm_paths} are language "
                             f"models, {images} are not; report them separately")
        return _write(_lm_report(paths, split=split, calibration_split=calibration_split,
                                 teacher=teacher, dataset=dataset, data_dir=data_dir,
                                 speed=speed, speed_settings=speed_settings, step=step,
                                 log=log), out)
    env = measure.environment()
    cache = _Cache(step=step, dataset=dataset, data_dir=data_dir, batch_size=batch_size)
    names = dict(zip((os.path.abspath(p) for p in paths), _names(paths)))
    first = cache.artifact(paths[0])
    split = split or first.data.get("eval_split") or "test"
    models = []
    for path, name in names.items():
        log(f"kdjax report: {name}: evaluating on {split!r}", flush=True)
        models.append(_measure(cache.artifact(path), name, cache, split=split, names=names,
                               teacher=teacher, calibration_split=calibration_split,
                               speed=speed, speed_settings=speed_settings, runtime=runtime,
                               log=log))
    report = {"format": FORMAT, "dataset": dataset or first.data.get("name"), "split": split,
              "models": models, "environment": env, "load_average_after": os.getloadavg()[0],
              "conventions": CONVENTIONS,
              "speed_note": None if speed else "Speed not measured (--no-speed)."}
    return _write(report, out)


def _write(report: dict[str, Any], out: str | None) -> dict[str, Any]:
    if out:
        os.makedirs(out, exist_ok=True)
        report["charts"] = render.charts(report, out)
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(out, "report.md"), "w") as f:
            f.write(render.markdown(report))
    return report


def _measure(a: Artifact, name: str, cache: _Cache, *, split: str, names: dict[str, str],
             teacher: str | None, calibration_split: str | None, speed: bool,
             speed_settings: dict[str, Any] | None, runtime: str | None, log) -> dict[str, Any]:
    """One model's entry: evaluation, fidelity, temperature scaling, size, speed."""
    z, y = cache.logits(a, split)
    fidelity, teacher_z = None, None
    teacher_path = os.path.abspath(teacher) if teacher else a.teacher
    if teacher_path and teacher_path != a.path:
        fidelity = {"teacher": teacher_path, "teacher_name": names.get(teacher_path, teacher_path)}
        if os.path.exists(teacher_path):
            teacher_z, _ = cache.logits(cache.artifact(teacher_path), split)
        else:
            fidelity["skipped"] = "the teacher's path does not exist here"
    metrics = evaluate.metrics(z, y, teacher_logits=teacher_z)
    if teacher_z is not None:
        fidelity.update(agreement=metrics.pop("teacher_agreement"), kl=metrics.pop("teacher_kl"))
    entry = {"name": name, "path": a.path, "kind": a.kind,
             "model": a.spec.to_json() if a.spec else None, "details": a.details,
             "examples": int(len(y)), "metrics": metrics, "fidelity": fidelity,
             "temperature_scaling": _temperature(a, cache, split, calibration_split, z, y),
             "size": measure.size(a)}
    if speed:
        log(f"kdjax report: {name}: timing", flush=True)
        entry["speed"] = measure.speed(a, **(speed_settings or {}))
        if runtime:
            log(f"kdjax report: {name}: timing in {runtime} and XLA, batches "
                f"{runtime_lib.BATCHES}", flush=True)
            entry["runtime"] = runtime_lib.speed(
                a, runtime, calibration=lambda: _training_images(a, cache, split))
    return entry


def _training_images(a: Artifact, cache: _Cache, split: str) -> np.ndarray:
    """The first CALIBRATION_IMAGES images of the artifact's training split (for a W8A8
    student's ONNX file: kdjax.report.runtime)."""
    data = cache.data(a, split)
    train = a.data.get("train_split") or data.train_split
    return data_lib.load_arrays(data.name, train, data_dir=data.data_dir or None)["image"][
        :CALIBRATION_IMAGES]


def _temperature(a: Artifact, cache: _Cache, split: str, calibration_split: str | None,
                 z, y) -> dict[str, Any]:
    """Fit T on the held-out split, then the evaluated split's metrics at logits / T."""
    if calibration_split:
        held_out, why = calibration_split, "--calibration-split"
    else:
        data = cache.data(a, split)
        spec = data_lib.dataset_info(data.name, data_dir=data.data_dir or None)
        held_out, why = evaluate.held_out_split(a.data.get("train_split"), spec.splits, split)
    if held_out is None:
        return {"skipped": why}
    if held_out == split:
        raise ValueError(f"--calibration-split {held_out!r} is the evaluated split: fit the "
                         f"temperature on held-out data, never on the data it is judged on")
    zc, yc = cache.logits(a, held_out)
    t = float(calibration.fit_temperature(zc, yc))
    after = evaluate.metrics(z, y, temperature=t)
    return {"split": held_out, "why": why, "examples": int(len(yc)), "temperature": t,
            "after": {k: after[k] for k in ("loss", "brier", "ece", "mce", "bins")}}


LM_CONVENTIONS = {
    **CONVENTIONS,
    "tokens": "a language model is judged per target token: every position of the split's packed "
              "rows whose target is the next token of the same document (padding and "
              "cross-document targets are not counted); perplexity = exp(mean NLL per token); "
              "ECE, MCE and Brier of the top next token over the vocabulary",
    "T": CONVENTIONS["T"].replace("on the held-out split named in 'fitted on'",
                                  "on the --calibration-split's tokens (a text dataset has no "
                                  "third split: skipped without it)"),
    "size": CONVENTIONS["size"].replace("batch-1 forward (preprocessing included)",
                                        "forward pass of one row, divided by its seq_len tokens "
                                        "(FLOPs/token)"),
    "speed": "latency: median [quartiles] of separate forward passes of one row (batch 1, "
             "seq_len tokens), each waited for; throughput: tokens/s over windows of "
             "back-to-back forward passes of 32 rows; warmed up, input on the device; no "
             "generation (kdjax.lm.sampling). A measurement of this machine at this load",
}


def _lm_report(paths: Sequence[str], *, split: str | None, calibration_split: str | None,
               teacher: str | None, dataset: str | None, data_dir: str | None, speed: bool,
               speed_settings: dict[str, Any] | None, step: str | int, log) -> dict[str, Any]:
    """`make_report` of language models (kdjax.report.lm): the same report, per token."""
    env = measure.environment()
    names = dict(zip((os.path.abspath(p) for p in paths), _names(paths)))
    loaded: dict[str, dict[str, Any]] = {}

    def get(path: str) -> dict[str, Any]:
        if path not in loaded:
            loaded[path] = lm.load(path, step=step)
        return loaded[path]

    first = get(next(iter(names)))
    ds = lm.dataset(first, name=dataset, data_dir=data_dir)
    split = split or first["data"].get("eval_split") or "validation"
    # each split read once, whichever models use it: tokens, segments[, loss mask]
    rows = functools.cache(lambda name: tuple(ds.rows(name).values()))
    models = []
    for path, name in names.items():
        entry = get(path)
        log(f"kdjax report: {name}: evaluating on {split!r}", flush=True)
        teacher_path = os.path.abspath(teacher) if teacher else entry["teacher"]
        fidelity, teacher_forward = None, None
        if teacher_path and teacher_path != path:
            fidelity = {"teacher": teacher_path,
                        "teacher_name": names.get(teacher_path, teacher_path)}
            if os.path.exists(teacher_path):
                teacher_forward = get(teacher_path)["forward"]
            else:
                fidelity["skipped"] = "the teacher's path does not exist here"
        metrics = lm.evaluate(entry["forward"], *rows(split), teacher=teacher_forward)
        if teacher_forward is not None:
            fidelity.update(agreement=metrics.pop("teacher_agreement"),
                            kl=metrics.pop("teacher_kl"))
        if calibration_split == split:
            raise ValueError(f"--calibration-split {split!r} is the evaluated split: fit the "
                             f"temperature on other data, never on the data it is judged on")
        if calibration_split:
            t = lm.fit_temperature(entry["forward"], *rows(calibration_split))
            after = lm.evaluate(entry["forward"], *rows(split), temperature=t)
            scaling = {"split": calibration_split, "why": "--calibration-split",
                       "temperature": t,
                       "after": {k: after[k] for k in ("loss", "brier", "ece", "mce", "bins")}}
        else:
            scaling = {"skipped": "a text dataset has no third split; pass --calibration-split"}
        record = {"name": name, "path": path, "kind": entry["kind"],
                  "model": entry["spec"].to_json(), "details": entry["details"],
                  "examples": metrics["tokens"], "metrics": metrics, "fidelity": fidelity,
                  "temperature_scaling": scaling,
                  "size": lm.size(entry["model"], entry["stored_files"], ds.seq_len,
                                  entry["forward"])}
        if speed:
            log(f"kdjax report: {name}: timing", flush=True)
            record["speed"] = lm.speed(entry["forward"], ds.seq_len, ds.vocab_size,
                                       **(speed_settings or {}))
        models.append(record)
    return {"format": FORMAT, "unit": "tokens", "dataset": os.path.basename(ds.path),
            "split": split, "models": models, "environment": env,
            "load_average_after": os.getloadavg()[0], "conventions": LM_CONVENTIONS,
            "speed_note": None if speed else "Speed not measured (--no-speed)."}
