"""Run outputs: metrics.jsonl (one JSON object per logged step or eval) and TensorBoard events.

TensorBoard files are written with tensorboardX, which needs no TensorFlow (flax.metrics and
clu's writers import it), keeping TensorFlow out of training processes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from kdjax.step import COUNTERS

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
    """Appends to metrics.jsonl and TensorBoard, after dropping what a killed run wrote past the
    step the run (re)starts from, so that a resumed run's records read as one uninterrupted run's.
    Writes in one process only (`active`): in a multi-process run every process computes the
    same global metrics, and process 0 records them."""

    def __init__(self, workdir: str, *, start_step: int = 0, active: bool = True):
        self.active = active
        if not active:
            return
        from tensorboardX import SummaryWriter  # heavy-ish import, only for a run

        path = os.path.join(workdir, METRICS_FILE)
        _keep_records_until(path, start_step)
        self._jsonl = open(path, "a", buffering=1)
        # TensorBoard hides the events at steps >= purge_step from the earlier event files.
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.active:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(json_safe(record)) + "\n")
        for k, v in scalars.items():
            self._tb.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        if not self.active:
            return
        self._jsonl.close()
        self._tb.close()


def json_safe(record: Mapping[str, Any]) -> dict[str, Any]:
    """NaN and Inf as null: json.dumps would write bare NaN, which strict JSON readers refuse.
    (Only a model that nan_policy="skip" kept training can evaluate to them.)"""
    return {k: None if isinstance(v, float) and not np.isfinite(v) else v
            for k, v in record.items()}


def _keep_records_until(path: str, step: int) -> None:
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the last line of a killed run may be cut short
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def mean_of(pending: Sequence[Mapping[str, Any]], prefix: str = "train/") -> dict[str, float]:
    """Fetch the on-device metrics of the steps since the last log (ONE host sync) and average.

    Counters (skipped_steps) report their latest value. Non-finite values, which only steps that
    nan_policy="skip" dropped produce, are left out of the averages.
    """
    host = jax.device_get(list(pending))
    out = {}
    for k in host[0]:
        values = [m[k] for m in host]
        if k in COUNTERS:
            out[prefix + k] = float(values[-1])
            continue
        finite = [v for v in values if np.isfinite(v)]
        if finite:
            out[prefix + k] = float(np.mean(finite))
    return out


def pending_to_json(pending: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The per-step metrics since the last log, for a checkpoint: exact values and their dtypes,
    so that the resumed run averages the same numbers the same way."""
    host = jax.device_get(list(pending))
    if not host:
        return {"dtypes": {}, "steps": []}
    return {"dtypes": {k: np.asarray(v).dtype.name for k, v in host[0].items()},
            "steps": [{k: np.asarray(v).item() for k, v in m.items()} for m in host]}


def pending_from_json(record: Mapping[str, Any]) -> list[dict[str, np.ndarray]]:
    dtypes = record["dtypes"]
    return [{k: np.asarray(v, dtypes[k]) for k, v in m.items()} for m in record["steps"]]
