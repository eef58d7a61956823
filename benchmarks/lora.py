"""LoRA students (kdjax.lora) against full fine-tuning: the bytes of what trains (parameters and
Adam's state) and training steps per second.

  python -m benchmarks.lora [--tag cpu] [--windows 5] [--steps 4]

For each model, the same fused LM step (kdjax.lm.step, next-token cross-entropy; a distillation
adds the same teacher forward to both variants) trains either every weight or rank-8 adapters
(alpha 16) on the attention q/k/v/o and MLP gate/up/down projections of the frozen model. Bytes
are counted from the train state's arrays, FLOPs and step temporaries are XLA's cost and memory
analyses of the compiled step; steps/s is the median of timed windows
(benchmarks.common.seconds_per_step) with the two variants' windows interleaved, and the load
average before and after, since the machine may be shared.

Writes benchmarks/results/lora_<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from benchmarks.suite import _versions
from kdjax import lora, models, plan as plan_lib, sharding
from kdjax.lm.objective import TokenObjective
from kdjax.lm.step import make_lm_step
from kdjax.step import DeviceData, init_train_state

RANK, ALPHA = 8, 16.0
# lm_small as registered, and a 4x wider sibling (d_model 512) where the projections dominate
MODELS = (("lm_small", {}), ("lm_small", {"d_model": 512, "d_ff": 1536, "num_heads": 8,
                                          "num_kv_heads": 4}))
VOCAB, SEQ_LEN, BATCH = 4096, 128, 8


def _bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _variant(spec: models.ModelSpec, rank: int):
    model = spec.build(0)
    if rank:
        lora.apply(model, plan_lib.as_plan({"model": {"lora": {"rank": rank, "alpha": ALPHA}}}
                                           ).model.lora, seed=0)
    tx = optax.adam(1e-3)
    rng = np.random.default_rng(0)
    data = DeviceData({"tokens": jnp.asarray(rng.integers(1, VOCAB, (4 * BATCH, SEQ_LEN + 1)),
                                             jnp.int32),
                       "segments": jnp.ones((4 * BATCH, SEQ_LEN + 1), jnp.int32)},
                      batch_size=BATCH)
    graphdef, state = init_train_state(model, tx, seed=0, num_examples=4 * BATCH)
    step = make_lm_step(graphdef, tx, TokenObjective(), teacher=None, data=data,
                        mesh=sharding.make_mesh())
    compiled = step.lower(state).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    sizes = {"trainable_param_bytes": _bytes(state.params),
             "frozen_bytes": _bytes(lora.split_frozen(state.model_state)[1]),
             "opt_state_bytes": _bytes(state.opt_state),
             # XLA's own account of the compiled step: deterministic, unlike the clock
             "flops_per_step": float(cost.get("flops", 0.0)),
             "temp_bytes": int(memory.temp_size_in_bytes)}
    return step, state, sizes


def measure(name: str, kwargs: dict, *, windows: int, steps: int) -> dict:
    spec = models.ModelSpec(name, VOCAB, (SEQ_LEN,), kwargs=kwargs)
    runs, row = {}, {"model": name, "kwargs": kwargs, "num_params": models.count_params(
        spec.abstract())}
    for label, rank in (("full", 0), ("lora", RANK)):
        step, state, sizes = _variant(spec, rank)
        holder = {"state": state}

        def run(n, step=step, holder=holder):
            for _ in range(n):
                holder["state"], metrics = step(holder["state"])
            return metrics["loss"]

        runs[label] = run
        row[label] = sizes
        run(2)  # compile and warm up
    # interleaved windows: a load change on the shared machine hits both variants alike
    times = {label: [] for label in runs}
    for _ in range(windows):
        for label, run in runs.items():
            median, _ = common.seconds_per_step(run, jax.block_until_ready, warmup=0, windows=1,
                                                steps=steps)
            times[label].append(median)
    for label in runs:
        row[label]["seconds_per_step"] = float(np.median(times[label]))
        row[label]["steps_per_s"] = 1.0 / row[label]["seconds_per_step"]
        row[label]["windows_s"] = times[label]
    return row


def markdown(result: dict) -> str:
    host = result["host"]
    lines = [
        "# LoRA students vs full fine-tuning",
        "",
        f"Device: {result['device']} ({host['cpu']}, {host['cpu_count']} cores; load average "
        f"{host['load_average_1min']:.1f} before, {result['load_after']:.1f} after; shared "
        f"machine). jax {result['versions']['jax']}, flax {result['versions']['flax']}. "
        f"Produced by `python -m benchmarks.lora` on {host['date']}.",
        "",
        f"Same fused LM step (next-token CE, Adam, float32), batch {BATCH} x {SEQ_LEN} tokens, "
        f"vocabulary {VOCAB}. LoRA: rank {RANK}, alpha {ALPHA:g}, on q/k/v/o and gate/up/down; "
        f"every other weight frozen (model.lora). Trainable = what gets gradients; optimizer "
        f"state = Adam's mu and nu (and its count); frozen = the base weights the LoRA step "
        f"reads but neither updates nor checkpoints. Steps/s: median of {result['windows']} "
        f"interleaved windows of {result['steps']} steps.",
        "",
        "| model | params | variant | trainable | optimizer state | frozen | step temporaries "
        "| GFLOP/step | steps/s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    mib = 2 ** 20
    for row in result["rows"]:
        name = f"{row['model']} {row['kwargs'] or ''}".strip()
        for label in ("full", "lora"):
            r = row[label]
            lines.append(f"| {name} | {row['num_params']:,} | {label} | "
                         f"{r['trainable_param_bytes'] / mib:.2f} MiB | "
                         f"{r['opt_state_bytes'] / mib:.2f} MiB | {r['frozen_bytes'] / mib:.2f} "
                         f"MiB | {r['temp_bytes'] / mib:.1f} MiB | "
                         f"{r['flops_per_step'] / 1e9:.2f} | {r['steps_per_s']:.2f} |")
    lines += ["", "Ratios (LoRA / full):", ""]
    for row in result["rows"]:
        full, low = row["full"], row["lora"]
        lines.append(f"- {row['model']} {row['kwargs'] or ''}: optimizer state "
                     f"{low['opt_state_bytes'] / full['opt_state_bytes']:.3f}x, trainable + "
                     f"optimizer bytes {(low['trainable_param_bytes'] + low['opt_state_bytes']) / (full['trainable_param_bytes'] + full['opt_state_bytes']):.3f}x, "
                     f"FLOP/step {low['flops_per_step'] / full['flops_per_step']:.2f}x, "
                     f"steps/s {low['steps_per_s'] / full['steps_per_s']:.2f}x")
    lines += ["", "Where the time goes: LoRA still runs the forward and back-propagates through "
              "every layer to reach the adapters, but computes no weight gradient for the frozen "
              "matrices (a third of a full step's matmul work), none for the embedding and the "
              "output head (whole [B, T, V] logits here: TokenObjective's chunk_size 0), and no "
              "Adam update of the frozen weights; it adds the rank-8 matmuls. The "
              "timings are from a shared 2-core CPU under the load average shown, so steps/s is "
              "noisy (each window is in the JSON); XLA's FLOP count and temporaries of the "
              "compiled step are exact. The memory saved is what an accelerator's budget is spent on: "
              "Adam's two copies of every trained weight.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    host = common.host_info()
    rows = [measure(name, kwargs, windows=args.windows, steps=args.steps)
            for name, kwargs in MODELS]
    result = {"host": host, "device": jax.devices()[0].device_kind, "versions": _versions(),
              "windows": args.windows, "steps": args.steps, "rows": rows,
              "load_after": os.getloadavg()[0]}
    common.write_results(f"lora_{args.tag}", result, markdown)


if __name__ == "__main__":
    main()
