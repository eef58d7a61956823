"""Data-free distillation on Fashion-MNIST: students that never see a training image, beside the
student distilled on the training data and the student trained from its labels.

  python benchmarks/fashion_mnist_datafree.py --data-dir /work/data/tfds --seeds 0 1 2 \
      --teacher workdirs/datafree/teacher_cnn [--steps 1170]

One BatchNorm CNN teacher (experiments/fashion_mnist/teacher_cnn.py's cnn_small), trained once
unless --teacher names one (--teacher-steps). Per seed, four students of one architecture and
one budget (student_scratch.py's 784-128-10 MLP, --steps steps of batch 128, the same optimizer
and augmentation):
  - scratch: cross-entropy on the training split's labels (student_scratch.py);
  - kd: the teacher's soft targets on the training images (kd.py);
  - deepinversion: the teacher's soft targets on --images images synthesised from the teacher
    (datafree_deepinversion.py, --synthesis-steps Adam iterations per batch of 256);
  - zskt: a generator trained against the student (datafree_zskt.py).
Writes benchmarks/results/fashion_mnist_datafree.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import numpy as np

from fashion_mnist_common import EXP, RESULTS, ROOT, machine, mean_std
from kdjax import cli


def _run(args: list[str], workdir: str) -> dict:
    path = os.path.join(workdir, "summary.json")
    if not os.path.isfile(path):
        assert cli.main([*args, "--workdir", workdir, "--no-progress"]) == 0
    with open(path) as f:
        return json.load(f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1170, help="every student's train steps")
    p.add_argument("--images", type=int, default=1280, help="DeepInversion's images")
    p.add_argument("--synthesis-steps", type=int, default=100)
    p.add_argument("--teacher", default="", help="a trained BatchNorm teacher (default: train one)")
    p.add_argument("--teacher-steps", type=int, default=1404)
    p.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "datafree"))
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args()
    data = f"--config.data.data_dir={args.data_dir}"
    teacher = args.teacher or os.path.join(args.workdir, "teacher_cnn")
    t = _run(["train", "--config", os.path.join(EXP, "teacher_cnn.py"), data,
              f"--config.train.steps={args.teacher_steps}",
              f"--config.eval.every_steps={args.teacher_steps}"], teacher)
    budget = [data, f"--config.train.steps={args.steps}",
              f"--config.eval.every_steps={args.steps}",
              f"--config.checkpoint.every_steps={args.steps}"]
    runs = {
        "scratch": ["train", "--config", os.path.join(EXP, "student_scratch.py")],
        "kd": ["distill", "--config", os.path.join(EXP, "kd.py"),
               f"--config.teacher.workdir={teacher}"],
        "deepinversion": ["distill", "--config", os.path.join(EXP, "datafree_deepinversion.py"),
                          f"--config.teacher.workdir={teacher}",
                          f"--config.datafree.num_images={args.images}",
                          f"--config.datafree.synthesis_steps={args.synthesis_steps}"],
        "zskt": ["distill", "--config", os.path.join(EXP, "datafree_zskt.py"),
                 f"--config.teacher.workdir={teacher}"],
    }
    rows: dict[str, list[dict]] = {name: [] for name in runs}
    for seed in args.seeds:
        for name, cmd in runs.items():
            s = _run([*cmd, *budget, f"--config.seed={seed}"],
                     os.path.join(args.workdir, f"seed{seed}", name))
            rows[name].append({"seed": seed, **s})
            print(f"seed {seed} {name}: accuracy {s['eval/accuracy']:.4f}", flush=True)

    where = os.path.relpath(os.getcwd(), ROOT)
    meta = {**machine(), "command": ("" if where == "." else f"cd {where} && ") + "python "
            + " ".join(shlex.quote(a) for a in sys.argv),
            "teacher": {"workdir": teacher, "model": t.get("model"),
                        "eval/accuracy": t.get("eval/accuracy")}}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fashion_mnist_datafree.json"), "w") as f:
        json.dump({"meta": meta, "runs": rows}, f, indent=2)
    reads = {"scratch": "yes (labels)", "kd": "yes (images)", "deepinversion": "no",
             "zskt": "no"}
    lines = ["| student | reads the training data | top-1 accuracy, mean ± std | per seed "
             "| agreement with the teacher | wall time (s) |", "|---|---|---|---|---|---|"]
    for name, rs in rows.items():
        acc = np.array([r["eval/accuracy"] for r in rs]) * 100
        mean, std = mean_std(acc)
        agree = [r.get("eval/teacher_agreement") for r in rs]
        agree = "-" if None in agree else f"{100 * np.mean(agree):.1f}%"
        wall = np.mean([r.get("wall_time_s", 0.0) + r.get("datafree/synthesis_time_s", 0.0)
                        for r in rs])
        lines.append(f"| {name} | {reads[name]} | {mean:.2f} ± {std:.2f} % | "
                     f"{', '.join(f'{a:.2f}' for a in acc)} | {agree} | {wall:.0f} |")
    lines.append(f"\n{len(args.seeds)} seeds {args.seeds}, {args.steps} student steps each; "
                 f"teacher {t.get('model')} at {100 * t['eval/accuracy']:.2f}%; "
                 f"{meta['device']}, jax {meta['jax']}, {meta['date']}, load average "
                 f"{meta['load_average_1min']:.1f} (shared machine: wall times are inflated)"
                 f"\n\n`{meta['command']}`")
    with open(os.path.join(args.out, "fashion_mnist_datafree.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
