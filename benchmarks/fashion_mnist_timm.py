"""The fair demo's comparison with timm models through the PyTorch bridge, over seeds
(experiments/fashion_mnist/timm_fair.py): a timm teacher, the timm student from scratch and the
same student distilled, each student with its own best augmentation.

  python benchmarks/fashion_mnist_timm.py --data-dir data/tfds --seeds 0 1 2

As benchmarks/fashion_mnist_fair.py does for the demo: seed 0's teacher first; then each
student's augmentation (fair.AUGMENTATION) chosen on the validation split train[54000:] with seed
0 (the distilled one from seed 0's teacher); then, per seed, a teacher, the scratch student and
the distilled student with the chosen augmentations, evaluated on the test split. Writes
benchmarks/results/fashion_mnist_timm.{json,md}: the grids, per-seed test accuracy, mean ± std,
wall times and the device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from fashion_mnist_common import EXP, RESULTS, ROOT, machine, run, seeds_row

sys.path.insert(0, EXP)
import fair  # noqa: E402  (experiments/fashion_mnist/fair.py: the grid)
import timm_fair  # noqa: E402  (the models)

EXPERIMENT = "timm_fair.py"
VALIDATION = "train[54000:]"


def _augmentation(name: str) -> list[str]:
    aug = fair.AUGMENTATION[name]
    return [f"--config.data.crop_padding={aug['crop_padding']}",
            f"--config.data.flip={aug['flip']}"]


def _run(path: str, workdir: str, overrides: list[str]) -> dict:
    """`run`, or the summary of a run that already finished there: an interrupted sweep is
    started again with the same command and redoes only what it had not finished."""
    summary = os.path.join(workdir, "summary.json")
    if os.path.isfile(summary):
        with open(summary) as f:
            return json.load(f)
    return run(path, workdir, overrides)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "timm"))
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args()
    data = f"--config.data.data_dir={args.data_dir}"
    teacher = lambda seed: f"{args.workdir}/seed{seed}/teacher"  # noqa: E731

    results: dict[str, list[dict]] = {"teacher": [], "scratch": [], "kd": []}
    results["teacher"].append({"seed": 0, **_run(f"{EXPERIMENT}:teacher", teacher(0),
                                                [data, "--config.seed=0"])})
    grids: dict[str, dict[str, float]] = {"scratch": {}, "kd": {}}
    for role, grid in grids.items():
        extra = [f"--config.teacher.workdir={teacher(0)}"] if role == "kd" else []
        for name in fair.AUGMENTATION:
            s = _run(f"{EXPERIMENT}:{role}", f"{args.workdir}/grid/{role}_{name}",
                    [data, f"--config.data.eval_split={VALIDATION}", *extra,
                     *_augmentation(name)])
            grid[name] = s["eval/accuracy"]
            print(f"{role} grid {name}: validation accuracy {grid[name]:.4f}", flush=True)
    chosen = {role: max(grid, key=grid.get) for role, grid in grids.items()}

    for seed in args.seeds:
        base = [data, f"--config.seed={seed}"]
        if seed != 0:
            results["teacher"].append({"seed": seed, **_run(f"{EXPERIMENT}:teacher",
                                                           teacher(seed), base)})
        for role in ("scratch", "kd"):
            extra = [f"--config.teacher.workdir={teacher(seed)}"] if role == "kd" else []
            s = _run(f"{EXPERIMENT}:{role}", f"{args.workdir}/seed{seed}/{role}",
                    base + extra + _augmentation(chosen[role]))
            results[role].append({"seed": seed, **s})
            print(f"seed {seed} {role}: test accuracy {s['eval/accuracy']:.4f}", flush=True)

    meta = machine()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fashion_mnist_timm.json"), "w") as f:
        json.dump({"meta": meta, "grids": grids, "chosen": chosen, "runs": results}, f,
                  indent=2, default=str)
    lines = ["# timm teacher and student through the PyTorch bridge, the fair demo's setting",
             "", f"experiments/fashion_mnist/{EXPERIMENT}: teacher `timm:create_model"
             f"(**{json.dumps(timm_fair.TEACHER)})`, student `{timm_fair.STUDENT_FACTORY}"
             f"(**{json.dumps(timm_fair.STUDENT)})`, both PyTorch-defined "
             f"(kdjax.torchbridge:TorchModel) and trained in kdjax's fused step.", "",
             "Each student's augmentation on the validation split (seed 0): " + "; ".join(
                 f"{role}: " + ", ".join(f"{k} {v * 100:.2f} %" for k, v in grid.items())
                 + f" -> {chosen[role]}" for role, grid in grids.items()) + ".", "",
             "| run | model | params | steps | test top-1, mean ± std | per seed | train time (s) |",
             "|---|---|---|---|---|---|---|"]
    for role, runs in results.items():
        lines.append(seeds_row(role, runs, "steps"))
    diff = [100 * (k["eval/accuracy"] - s["eval/accuracy"])
            for k, s in zip(results["kd"], results["scratch"], strict=True)]
    lines.append(f"\nDistilled minus scratch, per seed: {', '.join(f'{d:+.2f}' for d in diff)} "
                 f"points (mean {sum(diff) / len(diff):+.2f}); distillation ahead in "
                 f"{sum(d > 0 for d in diff)} of {len(diff)} seeds.")
    lines.append(f"\nseeds {args.seeds}; {meta['device']}, jax {meta['jax']}, {meta['date']}, "
                 f"load {meta['load_average_1min']:.1f} at the end")
    with open(os.path.join(args.out, "fashion_mnist_timm.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
