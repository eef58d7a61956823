"""Size and speed of a model, as numbers other code can call for: `size`, `flops_per_example`,
`speed` and `environment` (the device and software a measurement was made on).

Speed is a measurement of this process on this device, never a pass/fail criterion: the numbers
move with the machine's load, which `environment` records next to them.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.host import cpu_name
from kdjax.report.artifacts import Artifact, array_leaves, stored_bytes


def size(artifact: Artifact) -> dict[str, Any]:
    """Parameters, non-zero parameters, bytes as stored on disk and in memory, FLOPs/example.

    `parameters` counts the scalars of `artifact.params` (trainable parameters, not BatchNorm
    statistics); `nonzero_parameters` those that are not exactly 0 (what pruning removes; None
    where the format holds no readable values); `stored_bytes` the bytes of the files holding
    the model's arrays (`artifact.stored_files`): compressed, sparse or integer formats count as
    stored; `memory_bytes` the bytes of all its arrays as loaded for inference
    (`artifact.variables`).
    """
    params = array_leaves(artifact.params)
    # abstract parameters (shapes only: weights compiled into a StableHLO export) have no values
    concrete = not any(isinstance(p, jax.ShapeDtypeStruct) for p in params)
    return {
        "parameters": int(sum(math.prod(np.shape(p)) for p in params)),
        "nonzero_parameters": int(sum(int(np.count_nonzero(np.asarray(p))) for p in params))
        if concrete else None,
        "stored_bytes": stored_bytes(artifact.stored_files),
        "stored_files": list(artifact.stored_files),
        "memory_bytes": int(sum(np.asarray(v).nbytes for v in array_leaves(artifact.variables))),
        "flops_per_example": flops_per_example(artifact),
    }


def _example(artifact: Artifact, batch: int) -> jax.Array:
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.integers(0, 256, (batch, *artifact.input_shape), dtype=np.uint8))


def flops_per_example(artifact: Artifact) -> float | None:
    """FLOPs of one example's forward pass (preprocessing included) from XLA's cost analysis of
    the compiled batch-1 program; None where the backend reports none."""
    if artifact.kind in ("onnx", "litert"):  # XLA sees a host callback, not the file it runs
        return None
    compiled = jax.jit(artifact.apply).lower(artifact.variables, _example(artifact, 1)).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops >= 0 else None


def spread(seconds: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and range of timings."""
    s = np.asarray(seconds, np.float64)
    return {"median": float(np.median(s)), "p25": float(np.percentile(s, 25)),
            "p75": float(np.percentile(s, 75)), "min": float(s.min()), "max": float(s.max()),
            "samples": int(s.size)}


def speed(artifact: Artifact, *, latency_calls: int = 200, throughput_batch: int = 256,
          throughput_windows: int = 10, warmup_s: float = 0.5,
          window_s: float = 0.2) -> dict[str, Any]:
    """Latency at batch 1 and throughput at `throughput_batch`, warmed up, on the default device.

    Latency: `latency_calls` separate batch-1 calls, each timed from the call to its result on
    the host's clock (`block_until_ready`), after `warmup_s` seconds of untimed calls (compile,
    caches). Throughput: `throughput_windows` windows of back-to-back calls (dispatch overlaps
    compute, as in a serving loop), each about `window_s` long and waited for at its end. Both
    give the median and spread (quartiles, min, max) of their samples; the input is a uint8 batch
    already on the device, preprocessing included.
    """
    fn = jax.jit(artifact.apply)
    variables = artifact.variables
    timed = time_calls(lambda x: fn(variables, x), _example(artifact, 1),
                       _example(artifact, throughput_batch), latency_calls=latency_calls,
                       throughput_windows=throughput_windows, warmup_s=warmup_s,
                       window_s=window_s)
    return {"latency_batch1_ms": timed["latency_ms"],
            "throughput": {"batch_size": throughput_batch, "calls_per_window": timed["calls"],
                           "images_per_s": spread([throughput_batch / s
                                                    for s in timed["per_call_s"]])}}


def time_calls(fn: Callable[[Any], Any], one: Any, batch: Any, *, latency_calls: int,
               throughput_windows: int, warmup_s: float, window_s: float) -> dict[str, Any]:
    """The timings behind `speed`: `fn(one)` called and waited for `latency_calls` times
    (latency, ms: median and spread), then windows of back-to-back `fn(batch)` calls (seconds
    per call in each window); both after `warmup_s` of untimed calls."""
    def warm(x):
        jax.block_until_ready(fn(x))  # compile
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < warmup_s:
            jax.block_until_ready(fn(x))

    warm(one)
    latencies = []
    for _ in range(latency_calls):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(one))
        latencies.append(time.perf_counter() - t0)
    warm(batch)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(batch))
    calls = max(1, int(window_s / max(time.perf_counter() - t0, 1e-6)))
    per_call = []
    for _ in range(throughput_windows):
        t0 = time.perf_counter()
        out = None
        for _ in range(calls):
            out = fn(batch)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t0) / calls)
    return {"latency_ms": {k: v * 1e3 if k != "samples" else v
                           for k, v in spread(latencies).items()},
            "calls": calls, "per_call_s": per_call}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """The device and software of this process, and the machine's load now (1-minute average)."""
    device = jax.devices()[0]
    return {"platform": device.platform, "device_kind": device.device_kind,
            "device_count": jax.device_count(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            **{name: _version(name) for name in ("jax", "jaxlib", "flax", "kdjax")},
            "load_average_1min": os.getloadavg()[0]}
