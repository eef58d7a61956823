"""Run outputs: metrics.jsonl (one JSON object per logged step or eval) and TensorBoard events.

TensorBoard files are written with tensorboardX, which needs no TensorFlow (flax.metrics and
clu's writers import it), keeping TensorFlow out of training processes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np


class MetricWriter:
    """Writes in one process only (`active`): in a multi-process run every process computes the
    same global metrics, and process 0 records them."""

    def __init__(self, workdir: str, *, active: bool = True):
        self.active = active
        if not active:
            return
        from tensorboardX import SummaryWriter  # heavy-ish import, only for a run

        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.active:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        for k, v in scalars.items():
            self._tb.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        if not self.active:
            return
        self._jsonl.close()
        self._tb.close()


def mean_of(pending: Sequence[Mapping[str, jax.Array]], prefix: str = "train/") -> dict[str, float]:
    """Fetch the on-device metrics of the steps since the last log (ONE host sync) and average."""
    host = jax.device_get(list(pending))
    return {prefix + k: float(np.mean([m[k] for m in host])) for k in host[0]}
