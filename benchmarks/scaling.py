"""Throughput of the fused distillation step on 1, 2, 4, 8 devices, and the efficiency per device.

  python benchmarks/scaling.py                      # CPU: simulated devices (XLA flag)
  python benchmarks/scaling.py --platform gpu       # a multi-GPU machine: the first n GPUs

Each device count runs in its own process (on CPU the simulated device count must be set before
JAX starts). Weak scaling, as data-parallel throughput is usually reported: the per-device batch
is fixed, so the global batch grows with the devices; efficiency per device =
throughput(n) / (n * throughput(1)), 1.0 being perfect scaling. Two layouts: "dp" (teacher and
student replicated) and "fsdp" (both split over all devices). The workload is the demo's pair:
Hinton's 784-1200-1200-10 MLP teacher, a 784-128-10 student, KD loss, SGD, device-resident
28x28 uint8 data with crop+flip on device.

Simulated CPU devices share the machine's cores, so on CPU the numbers measure the partitioning
and collective overhead of the multi-device program, not a speedup. (kdjax also waits for each
step there before dispatching the next: kdjax.sharding.serial_dispatch.) Writes
benchmarks/results/scaling_<platform>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(n: int, layout: str, per_device_batch: int, steps: int, repeats: int) -> dict:
    """One measurement on the first `n` devices of this process."""
    import jax
    import numpy as np
    import optax
    from flax import nnx

    from kdjax import augment, models, objectives, sharding
    from kdjax.step import DeviceData, freeze, init_train_state, make_distill_step

    devices = jax.devices()[:n]
    assert len(devices) == n, f"asked for {n} devices, the process has {jax.device_count()}"
    mesh = sharding.make_mesh(data=1, fsdp=-1, devices=devices) if layout == "fsdp" else \
        sharding.make_mesh(data=-1, fsdp=1, devices=devices)
    rule = "fsdp" if layout == "fsdp" else "replicated"
    rng = np.random.default_rng(0)
    num_examples = 8192
    images = rng.integers(0, 256, (num_examples, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, num_examples).astype(np.int32)
    teacher = freeze(models.create_model("mlp_1200", num_classes=10, rngs=nnx.Rngs(1)))
    student = models.create_model("mlp", hidden=(128,), num_classes=10, rngs=nnx.Rngs(0))
    tx = optax.sgd(0.05, momentum=0.9)
    graphdef, state = init_train_state(student, tx, seed=0, num_examples=num_examples)
    state_sharding = sharding.state_shardings(state, mesh, rule, min_bytes=0)
    teacher_sharding = (sharding.tree_shardings(teacher.variables, mesh, rule, min_bytes=0),)
    batch = per_device_batch * n
    data = DeviceData(sharding.replicate({"image": images, "label": labels}, mesh),
                      batch_size=batch)
    step = make_distill_step(
        graphdef, tx, objectives.logit_distillation("kd", ce_weight=0.1, kd_weight=0.9,
                                                    temperature=4.0),
        teachers=(teacher,), preprocess=augment.Preprocess(crop_padding=2, flip=True),
        mesh=mesh, data=data, state_sharding=state_sharding, teacher_sharding=teacher_sharding)
    state = sharding.put(state, state_sharding)
    for _ in range(3):  # compile and warm up
        state, metrics = step(state)
    jax.block_until_ready(metrics)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state)
        jax.block_until_ready(metrics)
        rates.append(steps * batch / (time.perf_counter() - t0))
    return {"devices": n, "layout": layout, "global_batch": batch,
            # Best of the repeats: the one least disturbed by other work on a shared machine.
            "images_per_s": max(rates), "images_per_s_median": statistics.median(rates),
            "images_per_s_runs": rates,
            "student_param_bytes_per_device": sharding.bytes_per_device(state.params),
            "teacher_bytes_per_device": sharding.bytes_per_device(step.teachers),
            "device_kind": devices[0].device_kind, "platform": devices[0].platform}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--platform", default="cpu", choices=["cpu", "gpu", "tpu"])
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--layouts", nargs="+", default=["dp", "fsdp"], choices=["dp", "fsdp"])
    p.add_argument("--per-device-batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # internal: one measurement
    args = p.parse_args()

    if args.worker:
        (layout,) = args.layouts
        print(json.dumps(worker(args.worker, layout, args.per_device_batch, args.steps,
                                args.repeats)))
        return

    if 1 not in args.devices:
        p.error("--devices must include 1: efficiency is relative to one device")
    load_before = os.getloadavg()[0]
    rows = []
    for layout in args.layouts:
        for n in sorted(args.devices):
            env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": args.platform}
            if args.platform == "cpu":
                env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
            r = subprocess.run(
                [sys.executable, __file__, "--worker", str(n), "--layouts", layout,
                 "--per-device-batch", str(args.per_device_batch), "--steps", str(args.steps),
                 "--repeats", str(args.repeats)], env=env, capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"{layout} on {n} devices failed:\n{r.stderr[-3000:]}")
            row = json.loads(r.stdout.strip().splitlines()[-1])
            base = next((x for x in rows if x["layout"] == layout and x["devices"] == 1), row)
            row["efficiency_per_device"] = row["images_per_s"] / (n * base["images_per_s"])
            rows.append(row)
            print(f"{layout:5s} {n} devices: {row['images_per_s']:,.0f} images/s, efficiency "
                  f"{row['efficiency_per_device']:.2f}", flush=True)

    import jax

    simulated = args.platform == "cpu"
    meta = {"platform": args.platform, "device_kind": rows[0]["device_kind"],
            "simulated_devices": simulated, "cpu_count": os.cpu_count(),
            # other work on a shared machine skews throughput: record how busy it was
            "load_average_1min": [load_before, os.getloadavg()[0]],
            "per_device_batch": args.per_device_batch, "steps": args.steps,
            "repeats": args.repeats, "jax": jax.__version__,
            "python": platform.python_version(), "date": datetime.date.today().isoformat()}
    os.makedirs(args.out, exist_ok=True)
    name = f"scaling_{args.platform}"
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    device = (f"{rows[0]['device_kind']} (simulated devices: "
              f"--xla_force_host_platform_device_count, all sharing {os.cpu_count()} CPU cores)"
              if simulated else rows[0]["device_kind"])
    lines = [f"# Scaling: {device}", "",
             f"Distillation step (MLP 784-1200-1200-10 teacher -> 784-128-10 student, KD), "
             f"{args.per_device_batch} images per device per step (weak scaling), best of "
             f"{args.repeats} x {args.steps} steps (median in the JSON). jax {jax.__version__}, "
             f"{meta['date']}. 1-minute load average {load_before:.1f} before, "
             f"{meta['load_average_1min'][1]:.1f} after (other work on the machine adds noise).",
             ""]
    if simulated:
        lines += ["**Simulated devices share the same CPU cores: the total compute is fixed, so "
                  "the efficiency here measures the overhead of the partitioned program and its "
                  "collectives (ideal: 1/n of the cores per device, i.e. efficiency about 1/n), "
                  "not a speedup.** Real scaling needs real devices: run "
                  "`python benchmarks/scaling.py --platform gpu` on a multi-GPU machine.", ""]
    lines += ["| layout | devices | global batch | images/s | efficiency per device | "
              "student param bytes/device | teacher bytes/device |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['devices']} | {r['global_batch']} | "
                     f"{r['images_per_s']:,.0f} | {r['efficiency_per_device']:.2f} | "
                     f"{r['student_param_bytes_per_device']:,} | "
                     f"{r['teacher_bytes_per_device']:,} |")
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
