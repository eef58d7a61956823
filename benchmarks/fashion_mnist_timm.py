"""The fair demo's comparison with timm models through the PyTorch bridge, over seeds
(experiments/fashion_mnist/timm_fair.py): a timm teacher, the timm student from scratch (its
augmentation chosen on the validation split), and the same student distilled.

  python benchmarks/fashion_mnist_timm.py --data-dir data/tfds --seeds 0 1 2

First the scratch student's grid (fair.AUGMENTATION) on the validation split train[54000:] with
seed 0; then, per seed, a teacher, the scratch student with the chosen augmentation and the
distilled student, evaluated on the test split. Writes benchmarks/results/fashion_mnist_timm.
{json,md}: per-seed test accuracy, mean ± std, wall times and the device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


from fashion_mnist_common import EXP, RESULTS, ROOT, machine, run, seeds_row

sys.path.insert(0, EXP)
import fair  # noqa: E402  (experiments/fashion_mnist/fair.py: the grid)

EXPERIMENT = "timm_fair.py"
VALIDATION = "train[54000:]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "timm"))
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--scratch-augmentation", choices=sorted(fair.AUGMENTATION), default=None,
                   help="skip the grid and give the scratch student this augmentation")
    args = p.parse_args()
    data = f"--config.data.data_dir={args.data_dir}"

    grid = {}
    for name, aug in fair.AUGMENTATION.items():
        if args.scratch_augmentation:
            break
        s = run(f"{EXPERIMENT}:scratch", f"{args.workdir}/grid/{name}",
                [data, f"--config.data.eval_split={VALIDATION}",
                 f"--config.data.crop_padding={aug['crop_padding']}",
                 f"--config.data.flip={aug['flip']}"])
        grid[name] = s["eval/accuracy"]
        print(f"scratch grid {name}: validation accuracy {grid[name]:.4f}", flush=True)
    chosen = args.scratch_augmentation or max(grid, key=grid.get)
    aug = fair.AUGMENTATION[chosen]

    results: dict[str, list[dict]] = {"teacher": [], "scratch": [], "kd": []}
    for seed in args.seeds:
        base = [data, f"--config.seed={seed}"]
        extra = {"teacher": [], "kd": [f"--config.teacher.workdir={args.workdir}/seed{seed}/teacher"],
                 "scratch": [f"--config.data.crop_padding={aug['crop_padding']}",
                             f"--config.data.flip={aug['flip']}"]}
        for role in results:
            s = run(f"{EXPERIMENT}:{role}", f"{args.workdir}/seed{seed}/{role}",
                    base + extra[role])
            results[role].append({"seed": seed, **s})
            print(f"seed {seed} {role}: test accuracy {s['eval/accuracy']:.4f}", flush=True)

    meta = machine()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fashion_mnist_timm.json"), "w") as f:
        json.dump({"meta": meta, "grid": grid, "chosen": chosen, "runs": results}, f, indent=2,
                  default=str)
    lines = ["# timm teacher and student through the PyTorch bridge, the fair demo's setting",
             "", ("Scratch student's augmentation on the validation split (seed 0): "
                  + ", ".join(f"{k} {v * 100:.2f} %" for k, v in grid.items())
                  + f" -> {chosen}." if grid else
                  f"Scratch student's augmentation given (--scratch-augmentation {chosen}), "
                  f"not swept."), "",
             "| run | model | params | steps | test top-1, mean ± std | per seed | train time (s) |",
             "|---|---|---|---|---|---|---|"]
    for role, runs in results.items():
        lines.append(seeds_row(role, runs, "steps"))
    lines.append(f"\nseeds {args.seeds}; {meta['device']}, jax {meta['jax']}, {meta['date']}, "
                 f"load {meta['load_average_1min']:.1f} at the end")
    with open(os.path.join(args.out, "fashion_mnist_timm.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
