"""Throughput of the fused distillation step, and what fusing buys.

  python benchmarks/step_throughput.py --pairs resnet56:resnet20 --batches 64 256 --steps-per-call 1

For each (teacher:student, batch): images/s and ms/step of the fused kdjax step (teacher forward +
student forward/backward + SGD, one XLA program, data resident on the device, bf16 compute on
accelerators), the median of several timed windows after warm-up, synchronised with
block_until_ready; model FLOPs per step from XLA's cost analysis and MFU against a measured bf16
matmul peak; peak device memory where the backend reports it; and the fusion payoff,
time(fused step) / [time(teacher forward alone) + time(student train step alone)].
Results go to benchmarks/results/step_throughput_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kdjax import augment, models, objectives, sharding
from kdjax.step import DeviceData, compute_dtype, freeze, init_train_state, make_distill_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"resnet50:resnet18": ((224, 224, 3), 1000)}
DEFAULT_SHAPE = ((32, 32, 3), 100)


def _time(fn, state, *, windows: int, steps: int):
    """Median seconds per call over `windows` windows of `steps` calls (after one warm-up)."""
    state = fn(state)
    jax.block_until_ready(state)
    per_call = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(steps):
            state = fn(state)
        jax.block_until_ready(state)
        per_call.append((time.perf_counter() - t0) / steps)
    return statistics.median(per_call), state


def bf16_peak_flops() -> float:
    """Measured bf16 matmul throughput of device 0 (the MFU denominator)."""
    n = 8192 if jax.default_backend() != "cpu" else 1024
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda x: x @ x)
    dt, _ = _time(lambda x: f(x), a, windows=3, steps=10)
    return 2 * n**3 / dt


def bench_pair(pair: str, batch: int, *, steps_per_call: int, windows: int, steps: int,
               peak: float) -> dict:
    teacher_name, student_name = pair.split(":")
    shape, classes = SHAPES.get(pair, DEFAULT_SHAPE)
    dtype = compute_dtype("auto")
    mesh = sharding.make_mesh()
    n = batch * 8  # a small device-resident set: sampling cost is what real runs pay
    rng = np.random.default_rng(0)
    data = DeviceData(
        sharding.replicate(rng.integers(0, 256, (n, *shape), dtype=np.uint8), mesh),
        sharding.replicate(rng.integers(0, classes, n).astype(np.int32), mesh), batch)
    teacher = freeze(models.create_model(teacher_name, num_classes=classes, input_shape=shape,
                                         rngs=nnx.Rngs(0), dtype=dtype))
    student = models.create_model(student_name, num_classes=classes, input_shape=shape,
                                  rngs=nnx.Rngs(1), dtype=dtype)
    tx = optax.sgd(0.05, momentum=0.9, nesterov=True)
    recipe = augment.Preprocess(mean=(0.5,) * shape[-1], std=(0.25,) * shape[-1], flip=True)
    graphdef, state0 = init_train_state(student, tx, seed=0, num_examples=n)
    kd = objectives.logit_distillation("kd", ce_weight=0.1, kd_weight=0.9, temperature=4.0)

    def seconds_per_step(step, per_call=1):
        fresh = sharding.replicate(jax.tree.map(jnp.copy, state0), mesh)  # steps donate it
        dt, _ = _time(lambda s: step(s)[0], fresh, windows=windows, steps=max(1, steps // per_call))
        return dt / per_call

    fused = make_distill_step(graphdef, tx, kd, teachers=[teacher], preprocess=recipe, mesh=mesh,
                              data=data, steps_per_call=steps_per_call)
    cost = fused.lower(state0).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0)) / steps_per_call
    t_fused = seconds_per_step(fused, steps_per_call)
    alone = make_distill_step(graphdef, tx, objectives.supervised(), preprocess=recipe, mesh=mesh,
                              data=data)
    t_student = seconds_per_step(alone)
    t_graph, t_vars = teacher
    t_fwd = jax.jit(lambda v, x: nnx.merge(t_graph, v)(
        augment.preprocess(x, recipe, key=None, dtype=jnp.float32)))
    x = data.images[:batch]
    dt_teacher, _ = _time(lambda _: t_fwd(t_vars, x), None, windows=windows, steps=steps)
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "pair": pair, "batch": batch, "steps_per_call": steps_per_call,
        "images_per_s": batch / t_fused, "ms_per_step": t_fused * 1e3,
        "flops_per_step": flops, "mfu": flops / t_fused / peak if flops else None,
        "fusion_payoff": t_fused / (dt_teacher + t_student),
        "teacher_forward_ms": dt_teacher * 1e3, "student_step_ms": t_student * 1e3,
        "peak_bytes": stats.get("peak_bytes_in_use"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", nargs="+", default=["resnet56:resnet20", "resnet32x4:resnet8x4",
                                                  "wrn_40_2:wrn_16_2"])
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--steps-per-call", type=int, default=1)
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="steps per timed window")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args()

    device = jax.devices()[0]
    peak = bf16_peak_flops()
    rows = []
    for pair in args.pairs:
        for batch in args.batches:
            row = bench_pair(pair, batch, steps_per_call=args.steps_per_call,
                             windows=args.windows, steps=args.steps, peak=peak)
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"device_kind": device.device_kind, "platform": device.platform,
            "num_devices": jax.device_count(), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "python": platform.python_version(),
            "measured_bf16_peak_flops": peak, "compute_dtype": compute_dtype("auto").name,
            "date": datetime.date.today().isoformat()}
    os.makedirs(args.out, exist_ok=True)
    tag = device.device_kind.lower().replace(" ", "_")
    with open(os.path.join(args.out, f"step_throughput_{tag}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    lines = [f"Fused distillation step on {device.device_kind} ({device.platform}), jax "
             f"{meta['jax']}, compute {meta['compute_dtype']}, {meta['date']}", "",
             "| pair | batch | steps/call | images/s | ms/step | MFU | fusion payoff |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        lines.append(f"| {r['pair']} | {r['batch']} | {r['steps_per_call']} | "
                     f"{r['images_per_s']:,.0f} | {r['ms_per_step']:.2f} | {mfu} | "
                     f"{r['fusion_payoff']:.2f} |")
    with open(os.path.join(args.out, f"step_throughput_{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
