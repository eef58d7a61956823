"""`kdjax report` of language models: the same four axes, per target token.

An LM run or LM export is judged on its text dataset's held-out rows, every position whose target
is the next token of the same document (kdjax.lm.packing.model_inputs: padding and
cross-document targets neither summed nor counted): perplexity and NLL per token, next-token
top-1/top-5, Brier, ECE/MCE of the top token (the image report's bins and `kdjax.step.eval_sums`,
applied to [tokens, vocabulary] logits), agreement with and KL from its teacher per token; size
as for images, FLOPs per token; speed as the latency of one row's forward pass (seq_len tokens,
batch 1) and the throughput of batches of rows in tokens per second.

Temperature scaling needs held-out data other than the evaluated split: a text dataset has train
and validation, so it is fitted only on a split named with --calibration-split (and its rows are
scored as they are, e.g. "train" rows the model has seen will understate the temperature).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import calibration, checkpoint, export
from kdjax.lm import data as text_data, packing
from kdjax import task
from kdjax.models import ModelSpec, count_params
from kdjax.report.artifacts import array_leaves, stored_bytes
from kdjax.report.measure import spread, time_calls
from kdjax.step import eval_sums


def _export_meta(path: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(path, export.META_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _run_config(path: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_lm_path(path: str) -> bool:
    """Whether `path` is a language-model run (its config.json) or export (its ModelSpec)."""
    if os.path.isdir(os.path.join(path, checkpoint.CHECKPOINT_DIR)):
        return task.run_kind(path) == "lm"
    meta = _export_meta(path)
    return bool(meta) and task.task_kind((meta.get("model") or {}).get("name", "")) == "lm"


Forward = Callable[[jax.Array, jax.Array], jax.Array]


def forward(model: nnx.Module) -> Forward:
    """`forward(tokens, segment_ids) -> float32 logits [B, T, V]`, jitted once for the model:
    every evaluation, fit and timing of it reuses the compiled program."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def logits(state, tokens, segment_ids):
        return nnx.merge(graphdef, state)(tokens, segment_ids=segment_ids).astype(jnp.float32)

    return lambda tokens, segments: logits(state, tokens, segments)


def load(path: str, *, step: str | int = "latest") -> dict[str, Any]:
    """An LM run or export: {"model", "forward" (its compiled `forward`), "spec", "kind", "data"
    (name, data_dir, eval_split), "teacher" (the run that taught it, or None), "stored_files",
    "details"}."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, checkpoint.CHECKPOINT_DIR)):
        n, saved, run, spec, model = checkpoint.read_model(path, step, what="the run")
        config = run["config"]
        return {"model": model, "forward": forward(model), "spec": spec, "kind": "lm run",
                "data": dict(config["data"]), "teacher": _teacher(config),
                "stored_files": (os.path.join(saved, "model"),),
                "details": {"step": n, "checkpoint": saved}}
    meta = _export_meta(path) or {}
    model, _ = export.load(path)
    data, teacher = dict(meta.get("data", {})), None
    config = _run_config(meta.get("source", {}).get("workdir", ""))
    if config:  # the run it came from, when it is still there: its data_dir and teacher
        data = {**config["data"], **data}
        teacher = _teacher(config)
    return {"model": model, "forward": forward(model), "spec": ModelSpec.from_json(meta["model"]),
            "kind": "lm export", "data": data, "teacher": teacher,
            "stored_files": (os.path.join(path, export.MODEL_DIR),),
            "details": {"source": meta.get("source")}}


def _teacher(config: dict[str, Any]) -> str | None:
    if config.get("loss", {}).get("name", "ce") == "ce":
        return None
    workdir = config.get("teacher", {}).get("workdir")
    return os.path.abspath(workdir) if workdir and os.path.exists(workdir) else workdir or None


def dataset(entry: dict[str, Any], *, name: str | None, data_dir: str | None
            ) -> text_data.TextDataset:
    """The text dataset `entry` was trained on (or `name` / `data_dir` when given)."""
    name = name or entry["data"].get("name")
    if not name:
        raise ValueError("the language model does not record its text dataset; pass --dataset")
    return text_data.open_text(name, data_dir or entry["data"].get("data_dir") or None)


def _token_sums(logits, targets, mask, teacher_logits):
    """eval_sums over the positions: [B, T, V] logits as [B*T, V] examples weighted by mask."""
    flat = lambda a: a.reshape(-1, *a.shape[2:])  # noqa: E731
    return eval_sums(flat(logits), flat(targets), flat(mask).astype(jnp.float32),
                     teacher_logits=None if teacher_logits is None else flat(teacher_logits),
                     calibration_bins=calibration.NUM_BINS)


_sums = jax.jit(_token_sums)


def evaluate(student: Forward, tokens: np.ndarray, segments: np.ndarray,
             loss_mask: np.ndarray | None = None, *, teacher: Forward | None = None,
             batch_size: int = 32, temperature: float = 1.0) -> dict[str, Any]:
    """Per-token metrics of the model `student` computes on packed rows (tokens and segment ids
    ``[N, seq_len + 1]``, and an instruction dataset's per-token `loss_mask`: a split's
    `TextDataset.rows`), with the `teacher`'s agreement and KL(teacher || student), of logits /
    `temperature`."""
    if not len(tokens):
        raise ValueError("the split to evaluate has no rows")
    totals: dict[str, Any] = {}
    for start in range(0, len(tokens), batch_size):
        t, s, m = (None if a is None else packing.pad_rows(a[start:start + batch_size], batch_size)
                   for a in (tokens, segments, loss_mask))
        inputs = packing.model_inputs(t, s, m)
        z = student(inputs["tokens"], inputs["segment_ids"]) / temperature
        tz = None if teacher is None else teacher(inputs["tokens"], inputs["segment_ids"])
        sums = _sums(z, jnp.asarray(inputs["targets"]), jnp.asarray(inputs["loss_mask"]), tz)
        sums["count"] = float(inputs["loss_mask"].sum())
        totals = sums if not totals else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals.pop("count"))
    if not count:
        raise ValueError("the split to evaluate has no target tokens")
    bins = calibration.CalibrationBins(*(np.asarray(x) for x in totals.pop("calibration")))
    accuracy, confidence, _ = (np.asarray(x) for x in calibration.bin_statistics(bins))
    out = {k: float(v) / count for k, v in totals.items()}
    out["perplexity"] = float(np.exp(min(out["loss"], 700.0)))
    out["tokens"] = int(count)
    out["ece"] = float(calibration.ece_from_bins(bins))
    out["mce"] = float(calibration.mce_from_bins(bins))
    out["bins"] = {"edges": calibration.bin_edges().tolist(),
                   "count": bins.count.astype(int).tolist(), "accuracy": accuracy.tolist(),
                   "confidence": confidence.tolist()}
    return out


def fit_temperature(student: Forward, tokens: np.ndarray, segments: np.ndarray,
                    loss_mask: np.ndarray | None = None, *, batch_size: int = 32) -> float:
    """Temperature scaling's T on the rows' target tokens (kdjax.calibration.fit_temperature)."""
    logits, targets = [], []
    for start in range(0, len(tokens), batch_size):
        inputs = packing.model_inputs(
            tokens[start:start + batch_size], segments[start:start + batch_size],
            None if loss_mask is None else loss_mask[start:start + batch_size])
        keep = np.asarray(inputs["loss_mask"])
        logits.append(np.asarray(student(inputs["tokens"], inputs["segment_ids"]))[keep])
        targets.append(np.asarray(inputs["targets"])[keep])
    return float(calibration.fit_temperature(np.concatenate(logits), np.concatenate(targets)))


def size(model: nnx.Module, stored_files: tuple[str, ...], seq_len: int,
         fn: Forward) -> dict[str, Any]:
    """The image report's size fields, FLOPs per token of one row's compiled forward pass
    (`fn`, the model's `forward`)."""
    params = array_leaves(nnx.state(model, nnx.Param))
    row = jnp.zeros((1, seq_len), jnp.int32)
    cost = jax.jit(lambda t: fn(t, jnp.ones_like(t))).lower(row).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return {"parameters": count_params(model),
            "nonzero_parameters": int(sum(int(np.count_nonzero(np.asarray(p))) for p in params)),
            "stored_bytes": stored_bytes(stored_files), "stored_files": list(stored_files),
            "memory_bytes": int(sum(np.asarray(v).nbytes
                                    for v in array_leaves(nnx.state(model)))),
            "flops_per_token": float(flops) / seq_len if flops is not None and flops >= 0
            else None}


def speed(fn: Forward, seq_len: int, vocab_size: int, *, latency_calls: int = 50,
          throughput_batch: int = 32, throughput_windows: int = 5, warmup_s: float = 0.5,
          window_s: float = 0.2) -> dict[str, Any]:
    """Latency of one row's forward pass (batch 1, seq_len tokens) and throughput in tokens/s
    of `throughput_batch` rows of the model's `forward` `fn`, warmed up, median and spread
    (kdjax.report.measure.time_calls)."""
    rng = np.random.default_rng(0)

    def rows(n):
        t = jnp.asarray(rng.integers(0, vocab_size, (n, seq_len)), jnp.int32)
        return t, jnp.ones_like(t)

    timed = time_calls(lambda x: fn(*x), rows(1), rows(throughput_batch),
                       latency_calls=latency_calls, throughput_windows=throughput_windows,
                       warmup_s=warmup_s, window_s=window_s)
    return {"latency_batch1_ms": timed["latency_ms"],
            "throughput": {"batch_size": throughput_batch, "seq_len": seq_len,
                           "calls_per_window": timed["calls"],
                           "tokens_per_s": spread([throughput_batch * seq_len / s
                                                    for s in timed["per_call_s"]])}}
