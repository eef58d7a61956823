"""What the Fashion-MNIST benchmarks share: running an experiment file with overrides, the
machine they ran on, and mean ± std over seeds."""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from kdjax import config as config_lib, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXP = os.path.join(ROOT, "experiments", "fashion_mnist")
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def load_config(path: str, overrides: Sequence[str] = ()):
    """experiments/fashion_mnist/`path` (`FILE.py` or `FILE.py:ARG`) with `--config.*` overrides."""
    return config_lib.load(os.path.join(EXP, path), list(overrides))


def run(path: str, workdir: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Train (loss "ce") or distil the experiment `path` into `workdir`; its summary."""
    config = load_config(path, overrides)
    return trainer.train(config, workdir, distill=config.loss.name != "ce", progress=False)


def machine() -> dict[str, Any]:
    """The device and software the numbers were measured on, and the load on the machine now."""
    device = jax.devices()[0]
    name = (f"CPU, {os.cpu_count()} cores" if device.platform == "cpu"
            else f"{jax.device_count()} x {device.device_kind}")
    return {"device": name, "device_kind": device.device_kind, "num_devices": jax.device_count(),
            "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "python": platform.python_version(), "date": datetime.date.today().isoformat(),
            "load_average_1min": os.getloadavg()[0]}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    x = np.asarray(values, np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0


def seeds_row(name: str, runs: Sequence[dict[str, Any]], *columns: str) -> str:
    """A markdown row of one run over seeds: name, model, parameters, the summary `columns` of
    the first run, top-1 accuracy mean ± std, per seed, and the mean train time (s)."""
    acc = np.array([r["eval/accuracy"] for r in runs]) * 100
    mean, std = mean_std(acc)
    extra = "".join(f"{runs[0][c]} | " for c in columns)
    return (f"| {name} | {runs[0]['model']} | {runs[0]['num_params']:,} | {extra}"
            f"{mean:.2f} ± {std:.2f} % | {', '.join(f'{a:.2f}' for a in acc)} | "
            f"{np.mean([r['wall_time_s'] for r in runs]):.0f} |")
