"""The demo's three runs (teacher, student from scratch, distilled student) over several seeds.

  python benchmarks/fashion_mnist_seeds.py --data-dir data/tfds --seeds 0 1 2

Each seed trains its own teacher and distils the student from it; the students' budget (model,
steps, optimizer, augmentation) is identical, only the loss differs. Writes
benchmarks/results/fashion_mnist_seeds.{json,md} with the per-seed numbers, mean ± std, and the
device and software they were measured on.
"""

from __future__ import annotations

import argparse
import json
import os


from fashion_mnist_common import RESULTS, ROOT, machine, run, seeds_row

RUNS = (("teacher", "teacher.py", False), ("student_scratch", "student_scratch.py", False),
        ("student_kd", "kd.py", True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "seeds"))
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args()

    results: dict[str, list[dict]] = {name: [] for name, _, _ in RUNS}
    for seed in args.seeds:
        for name, path, distill in RUNS:
            overrides = [f"--config.seed={seed}", f"--config.data.data_dir={args.data_dir}"]
            if distill:
                overrides.append(f"--config.teacher.workdir={args.workdir}/seed{seed}/teacher")
            s = run(path, f"{args.workdir}/seed{seed}/{name}", overrides)
            results[name].append({"seed": seed, **s})
            print(f"seed {seed} {name}: accuracy {s['eval/accuracy']:.4f}", flush=True)

    meta = machine()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fashion_mnist_seeds.json"), "w") as f:
        json.dump({"meta": meta, "runs": results}, f, indent=2)
    lines = ["| run | model | params | top-1 accuracy, mean ± std | per seed | train time (s) |",
             "|---|---|---|---|---|---|"]
    for name, runs in results.items():
        lines.append(seeds_row(name, runs))
    lines.append(f"\nseeds {args.seeds}; {meta['device_kind']} ({meta['cpu_count']} cores), jax "
                 f"{meta['jax']}, {meta['date']}")
    with open(os.path.join(args.out, "fashion_mnist_seeds.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
