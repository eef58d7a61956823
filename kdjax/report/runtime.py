"""`kdjax report --runtime onnxruntime|litert`: each model's speed in the runtime it is deployed
in, beside XLA's own, over a batch sweep.

The model is converted as `kdjax export --format onnx` (kdjax.interop.onnx) or `--format litert`
(kdjax.interop.litert) converts it: the same file for a run or a kdjax export, the same check
against XLA's logits before anything is timed (onnx: other formats' inference functions as they
are, without BatchNorm folding). Then each batch size of `BATCHES` is timed in both runtimes the
same way: untimed warm-up calls, then `calls` separate calls each waited for (a uint8 batch
already in host memory for the runtime, already on the device for XLA; the LiteRT interpreter
resized to the batch once, before its warm-up). Latency is the median [quartiles] of those
calls, throughput the batch size over the median latency. `speedup` is XLA's median latency over
the runtime's: below 1 the runtime is slower than XLA for that model and batch, and the report
flags it.

Like every speed in the report: a measurement of this machine at this load, never a pass/fail
criterion.
"""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from kdjax.report.artifacts import Artifact
from kdjax.report.measure import spread

RUNTIMES = ("onnxruntime", "litert")
# The export format each runtime runs, and the package whose version the report names.
FORMAT = {"onnxruntime": "onnx", "litert": "litert"}
PACKAGE = {"onnxruntime": "onnxruntime", "litert": "ai-edge-litert"}
BATCHES = (1, 8, 64, 256)


def check(runtime: str | None) -> None:
    """Refuse an unknown --runtime, or one whose packages are missing, before any measurement."""
    if runtime is None:
        return
    if runtime not in RUNTIMES:
        raise ValueError(f"--runtime must be one of {RUNTIMES}, got {runtime!r}")
    from kdjax.interop import litert, onnx

    (litert if runtime == "litert" else onnx).require()


def _timed(fn: Callable[[], Any], *, calls: int, warmup_s: float) -> dict[str, float]:
    fn()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < warmup_s:
        fn()
    seconds = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return {k: v * 1e3 if k != "samples" else v for k, v in spread(seconds).items()}


def speed(artifact: Artifact, runtime: str = "onnxruntime", *,
          batches: Sequence[int] = BATCHES, calls: int = 20, warmup_s: float = 0.3,
          calibration: Callable[[], np.ndarray] | None = None) -> dict[str, Any]:
    """Latency (ms) and throughput (images/s) of `artifact` in `runtime` and in XLA at each of
    `batches`, and their ratio; or {"skipped": why} where the model cannot be converted.
    `calibration()`: uint8 training images, loaded only for a W8A8 student, whose ONNX file is
    calibrated and checked on them (kdjax.interop.onnx.build)."""
    check(runtime)
    if artifact.kind == FORMAT[runtime]:
        return _file_speed(artifact, runtime, batches=batches, calls=calls, warmup_s=warmup_s)
    if artifact.kind in ("onnx", "litert", "stablehlo"):
        return {"runtime": runtime, "skipped": f"a {artifact.kind} export is a file kdjax does "
                f"not convert to {FORMAT[runtime]}; pass the run or kdjax export it came from"}
    variables = artifact.variables

    def fn(images: jax.Array) -> jax.Array:
        return artifact.apply(variables, images).astype(np.float32)

    try:
        call, checked = _runner(artifact, runtime, fn, calibration)
    except Exception as e:  # a model the converter cannot follow is reported, not fatal
        return {"runtime": runtime, "skipped": f"{type(e).__name__}: {e}"}
    xla = jax.jit(fn)
    rows = []
    rng = np.random.default_rng(0)
    for batch in batches:
        images = rng.integers(0, 256, (batch, *artifact.input_shape), np.uint8)
        on_device = jax.device_put(images)
        x_ms = _timed(lambda: jax.block_until_ready(xla(on_device)), calls=calls,
                      warmup_s=warmup_s)
        r_ms = _timed(lambda: call(images), calls=calls, warmup_s=warmup_s)
        rows.append({"batch": batch, "xla_ms": x_ms, "runtime_ms": r_ms,
                     "xla_images_per_s": batch / (x_ms["median"] / 1e3),
                     "runtime_images_per_s": batch / (r_ms["median"] / 1e3),
                     "speedup": x_ms["median"] / r_ms["median"]})
    return {"runtime": runtime, "version": importlib.metadata.version(PACKAGE[runtime]),
            "threads": "default",
            "graph": {k: checked[k] for k in ("opset", "converter", "form", "max_abs_diff",
                                              "tolerance") if k in checked},
            "batches": rows, "slower_than_xla": [r["batch"] for r in rows if r["speedup"] < 1]}


def _runner(artifact: Artifact, runtime: str, fn: Callable[[jax.Array], jax.Array],
            calibration: Callable[[], np.ndarray] | None
            ) -> tuple[Callable[[np.ndarray], Any], dict[str, Any]]:
    """(a call of the converted, checked file on a uint8 batch in `runtime`; what was checked).
    """
    from kdjax.interop import litert, onnx

    if runtime == "litert":
        if artifact.module is not None and artifact.normalization is not None:
            model_bytes, checked = litert.build(artifact.module, artifact.spec,
                                                artifact.normalization)
        else:
            model_bytes, checked = litert.build_fn(fn, artifact.input_shape)
        interpreter = litert.interpreter(model_bytes)
        interpreter.allocate_tensors()
        return lambda images: litert.run(interpreter, images), checked
    if artifact.module is not None and artifact.normalization is not None:
        model_bytes, checked = onnx.build(
            artifact.module, artifact.spec, artifact.normalization,
            images=calibration() if calibration and onnx.is_w8a8(artifact.module) else None)
    else:
        model_bytes, checked = onnx.build_fn(
            fn, artifact.input_shape, artifact.spec.name if artifact.spec else "model")
    session = onnx.session(model_bytes)
    return lambda images: session.run(None, {onnx.INPUT: images}), checked


def _file_speed(artifact: Artifact, runtime: str, *, batches: Sequence[int], calls: int,
                warmup_s: float) -> dict[str, Any]:
    """An ONNX or LiteRT export timed as it is, in its runtime alone: the XLA student it came
    from is another artifact (its run or kdjax export), so no speedup is computed here."""
    from kdjax.interop import litert, onnx

    with open(artifact.stored_files[0], "rb") as f:
        model_bytes = f.read()
    if runtime == "litert":
        interpreter = litert.interpreter(model_bytes)
        interpreter.allocate_tensors()

        def call(images: np.ndarray) -> Any:
            return litert.run(interpreter, images)
    else:
        session = onnx.session(model_bytes)

        def call(images: np.ndarray) -> Any:
            return session.run(None, {onnx.INPUT: images})
    rows = []
    rng = np.random.default_rng(0)
    for batch in batches:
        images = rng.integers(0, 256, (batch, *artifact.input_shape), np.uint8)
        r_ms = _timed(lambda: call(images), calls=calls, warmup_s=warmup_s)
        rows.append({"batch": batch, "xla_ms": None, "runtime_ms": r_ms,
                     "xla_images_per_s": None,
                     "runtime_images_per_s": batch / (r_ms["median"] / 1e3), "speedup": None})
    return {"runtime": runtime, "version": importlib.metadata.version(PACKAGE[runtime]),
            "threads": "default", "graph": artifact.details.get(FORMAT[runtime]),
            "batches": rows, "slower_than_xla": []}


def markdown(models: Sequence[dict[str, Any]]) -> list[str]:
    """The report's table of runtime speed: one row per model and batch size."""
    rows = [m for m in models if m.get("runtime")]
    if not rows:
        return []
    name = rows[0]["runtime"]["runtime"]
    lines = ["", f"## Speed in {name} beside XLA", "",
             f"| model | batch | XLA latency (ms) | {name} latency (ms) | XLA images/s | "
             f"{name} images/s | speedup |", "|---|---:|---:|---:|---:|---:|---:|"]
    for m in rows:
        r = m["runtime"]
        if "skipped" in r:
            lines.append(f"| {m['name']} | – | – | – | – | – | skipped: {r['skipped']} |")
            continue
        for b in r["batches"]:
            x, o = b["xla_ms"], b["runtime_ms"]
            # an ONNX or LiteRT export has no XLA program of its own: its run or kdjax export
            # is the peer
            xla_ms = f"{x['median']:.3f} [{x['p25']:.3f}, {x['p75']:.3f}]" if x else "–"
            xla_ips = f"{b['xla_images_per_s']:,.0f}" if x else "–"
            speedup = "–" if b["speedup"] is None else f"{b['speedup']:.2f}x" + (
                " **< 1x: slower than XLA**" if b["speedup"] < 1 else "")
            lines.append(f"| {m['name']} | {b['batch']} | {xla_ms} | {o['median']:.3f} "
                         f"[{o['p25']:.3f}, {o['p75']:.3f}] | {xla_ips} | "
                         f"{b['runtime_images_per_s']:,.0f} | {speedup} |")
    lines += ["", f"Speedup: XLA's median latency over {name}'s at the same batch (the file is "
                  f"`kdjax export --format {FORMAT[name]}`'s, checked against XLA's logits first; "
                  f"its weights' form per model in report.json)."]
    return lines
