"""A PyTorch-defined teacher (kdjax.torchbridge: torchvision's module run by torchax) against the
same architecture as kdjax's native NNX teacher, in the same fused distillation step.

    python -m benchmarks.torch_teacher                        (resnet18 at 64 px, on this machine)
    python -m benchmarks.torch_teacher --rows resnet18@64:256,resnet50@224:128   (GPU rows)

A row is TEACHER@PIXELS[:BATCH]: the teacher is the zoo's `TEACHER` (torchvision's layout, so the
same function) and `torchvision.models:TEACHER` through the bridge, each prepared as `kdjax
distill` prepares a teacher (kdjax.teacher.prepare: BatchNorm folded into the convolutions where
kdjax can see them, the compute dtype of the device); the student, optimizer and loss are the same
(cnn_tiny, SGD, KD at T=4). Both teachers hold the same weights (the native one's, written into
the torch module in torchvision's names). Reported per teacher: the step's compile time (lowering
and XLA compilation), median ms/step and images/s over interleaved windows, and the ratio
torch/native. Results go to benchmarks/results/torch_teacher_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from kdjax import models, objectives, sharding, step as step_lib, teacher as teacher_lib
from kdjax.interop import layouts
from kdjax.step import DeviceData, freeze, init_train_state, make_distill_step
from kdjax.torchbridge import importer as torch_importer


def _teachers(name: str, pixels: int, dtype) -> dict[str, step_lib.FrozenModel]:
    """The native teacher and the torch-defined one, with the same weights, both prepared."""
    shape = (pixels, pixels, 3)
    native_spec = models.ModelSpec(name, 10, shape)
    native = native_spec.build(0)
    torch_spec = torch_importer.torch_spec(f"torchvision.models:{name}", {"num_classes": 10},
                                           num_classes=10, input_shape=shape)
    bridged = torch_spec.build(0)
    weights = layouts.to_state_dict(native, "torchvision")
    torch_importer.load_state(bridged, weights)
    out = {}
    for kind, model, spec in (("native", native, native_spec), ("torch", bridged, torch_spec)):
        prepared, _ = teacher_lib.prepare(model, spec, dtype=dtype)
        out[kind] = freeze(prepared)
    return out


def bench_row(row: str, *, windows: int, steps: int) -> dict:
    name, _, rest = row.partition("@")
    pixels, _, batch = rest.partition(":")
    pixels, batch = int(pixels), int(batch or 64)
    dtype = step_lib.compute_dtype("auto")
    mesh = sharding.make_mesh()
    rng = np.random.default_rng(0)
    n = batch * 8
    data = DeviceData({"image": jnp.asarray(rng.integers(0, 256, (n, pixels, pixels, 3),
                                                         dtype=np.uint8)),
                       "label": jnp.asarray(rng.integers(0, 10, n).astype(np.int32))}, batch)
    objective = objectives.logit_distillation("kd", ce_weight=0.1, kd_weight=0.9,
                                              temperature=4.0)
    runs, result = {}, {"row": row, "teacher": name, "pixels": pixels, "batch": batch,
                        "dtype": jnp.dtype(dtype).name}
    for kind, teacher in _teachers(name, pixels, dtype).items():
        tx = optax.sgd(0.01, momentum=0.9)
        student = models.ModelSpec("cnn_tiny", 10, (pixels, pixels, 3)).build(1)
        graphdef, state = init_train_state(student, tx, seed=0, num_examples=n)
        step = make_distill_step(graphdef, tx, objective, teachers=(teacher,), data=data,
                                 mesh=mesh)
        t0 = time.perf_counter()
        compiled = step.lower(state).compile()
        compile_s = time.perf_counter() - t0
        del compiled  # the step compiles its own program on the first call (timed as warm-up)
        state, _ = step(state)
        jax.block_until_ready(state)
        runs[kind] = [step, state]
        result[kind] = {"compile_s": round(compile_s, 2), "windows_ms": []}
    for _ in range(windows):  # interleaved: a load change on a shared machine hits both
        for kind, (step, state) in runs.items():
            def run(k, step=step, kind=kind):
                st = runs[kind][1]
                for _ in range(k):
                    st, _ = step(st)
                runs[kind][1] = st
                return st
            median, _ = common.seconds_per_step(run, jax.block_until_ready, warmup=0,
                                                windows=1, steps=steps)
            result[kind]["windows_ms"].append(round(median * 1e3, 2))
    for kind in runs:
        ms = float(np.median(result[kind]["windows_ms"]))
        result[kind]["ms_per_step"] = round(ms, 2)
        result[kind]["images_per_s"] = round(batch / ms * 1e3, 1)
    result["torch_over_native_images_per_s"] = round(
        result["torch"]["images_per_s"] / result["native"]["images_per_s"], 3)
    result["torch_over_native_compile_s"] = round(
        result["torch"]["compile_s"] / result["native"]["compile_s"], 3)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="resnet18@64:32",
                        help="TEACHER@PIXELS[:BATCH],... (default: resnet18@64:32)")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed window")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    result = {"device": device.device_kind, "platform": device.platform,
              "command": f"python -m benchmarks.torch_teacher --rows {args.rows}",
              "host_before": common.host_info()}
    result["rows"] = [bench_row(r, windows=args.windows, steps=args.steps)
                      for r in args.rows.split(",")]
    result["host_after"] = common.host_info()
    common.write_results(f"torch_teacher_{device.platform}", result, markdown)


def markdown(result: dict) -> str:
    """The results file's table of `main`'s result."""
    before, after = result["host_before"], result["host_after"]
    lines = ["# A torch-defined teacher against the native one, in the same fused step",
             "", f"Device: {result['device']} ({result['platform']}); host {before['cpu']}, "
             f"{before['cpu_count']} cores; load {before['load_average_1min']:.1f} before, "
             f"{after['load_average_1min']:.1f} after; {before['date']}. Student cnn_tiny, SGD, "
             f"KD at T=4; `{result['command']}`.", "",
             "| teacher | px | batch | dtype | native img/s | torch img/s | ratio | native "
             "compile s | torch compile s | ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['teacher']} | {r['pixels']} | {r['batch']} | {r['dtype']} | "
                     f"{r['native']['images_per_s']} | {r['torch']['images_per_s']} | "
                     f"{r['torch_over_native_images_per_s']} | {r['native']['compile_s']} | "
                     f"{r['torch']['compile_s']} | {r['torch_over_native_compile_s']} |")
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    main()
