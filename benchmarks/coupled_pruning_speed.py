"""What coupled-channel structured pruning saves where the student is deployed: ONNX Runtime on CPU.

    python -m benchmarks.coupled_pruning_speed   (writes results/coupled_pruning_speed_cpu.md)

resnet20 at Fashion-MNIST's shape (28x28x1, 10 classes), pruned by coupled groups
(kdjax.compress.coupling: the residual width of each stage and every block's inner width,
DepGraph's group L2 importance) at several sparsities, with and without `prune.round_to=8`,
shrunk (kdjax.compress.structured.shrink) and exported with kdjax's ONNX export (which checks
ONNX Runtime's logits against kdjax's). Per row: parameters, XLA's FLOP count of one image's
forward, the ONNX file's size, and ONNX Runtime's latency at batch 1 and 64 on one thread
(median over interleaved rounds, each row timed in every round, so that a shared machine's load
falls on all rows alike).

Speed does not depend on the weights' values: the network is randomly initialised (BatchNorm
statistics randomised) and pruned by its importances; accuracy after distillation is the
Fashion-MNIST pipeline's business (benchmarks/compress_pipeline.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import common
from kdjax import models
from kdjax import plan as plan_lib
from kdjax.compress import prune, structured
from kdjax.interop import onnx as kdjax_onnx
from kdjax.models import ModelSpec

SHAPE = (28, 28, 1)
PREPROCESS = {"mean": (0.286,), "std": (0.353,)}
ROWS = ((0.3, 1), (0.3, 8), (0.5, 1), (0.5, 8), (0.75, 8))  # (prune.sparsity, prune.round_to)
BATCHES = (1, 64)


def _randomized(spec: ModelSpec) -> nnx.Module:
    model = nnx.jit(lambda: spec.build(0))()
    rng = np.random.default_rng(0)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.BatchNorm):
            c = node.mean.shape[-1]
            node.mean[...] = jnp.asarray(rng.normal(0, 0.2, c), jnp.float32)
            node.var[...] = jnp.asarray(rng.uniform(0.3, 2.0, c), jnp.float32)
            node.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
    return model


def _flops(model: nnx.Module) -> float:
    fn = kdjax_onnx.inference_fn(model, PREPROCESS)
    compiled = jax.jit(fn).lower(jnp.zeros((1, *SHAPE), jnp.uint8)).compile()
    return float(compiled.cost_analysis()["flops"])


def run(rounds: int) -> dict:
    spec = ModelSpec("resnet20", 10, SHAPE, {}, "float32")
    base = _randomized(spec)
    variants = [("resnet20", base, spec, None)]
    for sparsity, round_to in ROWS:
        model = nnx.clone(base)
        config = dataclasses.replace(plan_lib.as_plan({}).prune, method="structured",
                                     sparsity=sparsity, criterion="group_l2", round_to=round_to)
        prune.apply_masks(model, prune.make_plan(config, model, SHAPE, 10))
        small, small_spec, _ = structured.shrink(model, spec)
        variants.append((f"coupled {sparsity:g}, round_to {round_to}", small, small_spec,
                         dict(sparsity=sparsity, round_to=round_to)))
    rows, sessions = [], []
    for name, model, model_spec, pruning in variants:
        model_bytes, checked = kdjax_onnx.build(model, model_spec, PREPROCESS)
        sessions.append(kdjax_onnx.session(model_bytes, threads=1))
        rows.append({"name": name, "pruning": pruning, "kwargs": dict(model_spec.kwargs),
                     "params": models.count_params(model), "flops": _flops(model),
                     "onnx_bytes": len(model_bytes),
                     "onnx_max_abs_diff": checked["max_abs_diff"],
                     "ms": {b: [] for b in BATCHES}})
    before = common.host_info()
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        for row, session in zip(rows, sessions):
            for b in BATCHES:
                images = rng.integers(0, 256, (b, *SHAPE), np.uint8)
                seconds, _ = common.seconds_per_step(
                    lambda n, s=session, x=images: [s.run(None, {"images": x}) for _ in range(n)],
                    lambda _: None, warmup=1, windows=1, steps=20 if b == 1 else 3)
                row["ms"][b].append(seconds * 1e3)
    for row in rows:
        row["median_ms"] = {str(b): statistics.median(v) for b, v in row["ms"].items()}
        row["ms"] = {str(b): v for b, v in row["ms"].items()}
    return {"model": "resnet20", "input_shape": list(SHAPE), "runtime": "onnxruntime, 1 thread",
            "rounds": rounds, "host_before": before, "host_after": common.host_info(),
            "rows": rows}


def markdown(result: dict) -> str:
    base = result["rows"][0]
    lines = [
        "# Coupled-channel structured pruning: speed in ONNX Runtime (CPU)", "",
        f"`python -m benchmarks.coupled_pruning_speed`: {result['model']} at "
        f"{'x'.join(map(str, result['input_shape']))}, random weights, pruned by coupled groups "
        f"(group L2), shrunk and exported to ONNX; {result['runtime']}, median of "
        f"{result['rounds']} interleaved rounds. Host: {result['host_before']['cpu']}, "
        f"{result['host_before']['cpu_count']} cores, load "
        f"{result['host_before']['load_average_1min']:.1f} before, "
        f"{result['host_after']['load_average_1min']:.1f} after "
        f"({result['host_before']['date']}). A speedup below 1x is marked **slower**.", "",
        "| student | widths (stem, stages) | params | MFLOPs/image | fewer FLOPs | ONNX kB "
        "| batch 1 ms | speedup | batch 64 ms | speedup |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        cells = []
        for b in map(str, BATCHES):
            ms = row["median_ms"][b]
            speedup = base["median_ms"][b] / ms
            flag = " **slower**" if speedup < 1 else ""
            cells += [f"{ms:.3f}", f"{speedup:.2f}x{flag}"]
        widths = row["kwargs"].get("channels", (16, 16, 32, 64))
        lines.append(f"| {row['name']} | {', '.join(map(str, widths))} | {row['params']:,} | "
                     f"{row['flops'] / 1e6:.2f} | {base['flops'] / row['flops']:.2f}x | "
                     f"{row['onnx_bytes'] / 1e3:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    common.write_results("coupled_pruning_speed_cpu", run(args.rounds), markdown)


if __name__ == "__main__":
    main()
