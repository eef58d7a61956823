"""PATE on Fashion-MNIST: the student's accuracy against the privacy cost ε, for a few σ.

  python benchmarks/fashion_mnist_pate.py --data-dir /work/data/tfds --seeds 0 1 2

One teacher ensemble (experiments/fashion_mnist/pate_teachers.py: 100 MLPs on disjoint
600-example slices of the training split), trained once unless --ensemble names one. For each
seed (the aggregation noise and the student's initialisation) and each setting, a student
(experiments/fashion_mnist/pate_student.py) is taught through Confident-GNMax on the first 1000
images of test[:5000] and evaluated on test[5000:]:
  - Confident-GNMax, T=80 of 100 votes, σ₁=40, argmax noise σ in --sigmas;
  - the same ensemble's noise-free plurality vote on every query (not private: ε = ∞);
  - the same 1000 images with their true labels (no teachers: what the data alone gives).
Writes benchmarks/results/fashion_mnist_pate.{json,md}.
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


def _summary(workdir: str) -> dict:
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


def _run(args: list[str], workdir: str) -> dict:
    if not os.path.isfile(os.path.join(workdir, "summary.json")):
        assert cli.main([*args, "--workdir", workdir, "--no-progress"]) == 0
    return _summary(workdir)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sigmas", type=float, nargs="+", default=[10.0, 20.0, 40.0])
    p.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "pate"))
    p.add_argument("--ensemble", default="", help="a trained ensemble (default: train one)")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args()
    data = f"--config.data.data_dir={args.data_dir}"
    ensemble = args.ensemble or os.path.join(args.workdir, "teachers")
    teachers = _run(["train", "--config", os.path.join(EXP, "pate_teachers.py"), data], ensemble)

    student = ["distill", "--config", os.path.join(EXP, "pate_student.py"), data,
               f"--config.teacher.workdir={ensemble}"]
    settings = {f"confident_gnmax_sigma{s:g}": [f"--config.pate.sigma={s}"] for s in args.sigmas}
    settings["plurality_not_private"] = ["--config.teacher.aggregation=plurality"]
    rows: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for name, extra in settings.items():
            s = _run([*student, f"--config.seed={seed}", *extra],
                     os.path.join(args.workdir, f"seed{seed}", name))
            rows.setdefault(name, []).append({"seed": seed, **s})
            print(f"seed {seed} {name}: accuracy {s['eval/accuracy']:.4f}, epsilon "
                  f"{s.get('privacy/epsilon')}, answered {s['privacy/answered']}", flush=True)
        # the queried images with their true labels, no teachers: the data's own worth
        s = _run(["train", "--config", os.path.join(EXP, "pate_student.py"), data,
                  f"--config.seed={seed}", "--config.teacher.aggregation=",
                  "--config.data.train_split=test[:1000]"],
                 os.path.join(args.workdir, f"seed{seed}", "true_labels_not_private"))
        rows.setdefault("true_labels_not_private", []).append({"seed": seed, **s})

    where = os.path.relpath(os.getcwd(), ROOT)
    meta = {**machine(), "command": ("" if where == "." else f"cd {where} && ") + "python "
            + " ".join(shlex.quote(a) for a in sys.argv),
            "teachers": {k: teachers[k] for k in ("pate/teachers", "eval/accuracy")}}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fashion_mnist_pate.json"), "w") as f:
        json.dump({"meta": meta, "runs": rows}, f, indent=2)
    lines = ["| student taught by | σ | answered of 1000 | label accuracy | ε (δ=1e-5), "
             "data-independent | ε data-dependent (unsanitised) | top-1 accuracy, mean ± std "
             "| per seed |", "|---|---|---|---|---|---|---|---|"]
    for name, runs in rows.items():
        acc = np.array([r["eval/accuracy"] for r in runs]) * 100
        mean, std = mean_std(acc)

        def avg(key, fmt):
            vals = [r.get(key) for r in runs]
            return "-" if any(v is None for v in vals) else fmt.format(np.mean(vals))

        eps = "∞ (not private)" if "not_private" in name else avg("privacy/epsilon", "{:.2f}")
        sigma = runs[0].get("privacy/sigma")
        lines.append(
            f"| {name} | {'-' if sigma is None else f'{sigma:g}'} | "
            f"{avg('privacy/answered', '{:.0f}')} | "
            f"{avg('privacy/answered_label_accuracy', '{:.1%}')} | {eps} | "
            f"{avg('privacy/epsilon_data_dependent_unsanitized', '{:.2f}')} | "
            f"{mean:.2f} ± {std:.2f} % | {', '.join(f'{a:.2f}' for a in acc)} |")
    lines.append(f"\n{len(args.seeds)} seeds {args.seeds}; ensemble: {teachers['pate/teachers']} "
                 f"teachers, mean accuracy {100 * teachers['eval/accuracy']:.2f}%; "
                 f"{meta['device']}, jax {meta['jax']}, {meta['date']}, load average "
                 f"{meta['load_average_1min']:.1f} (shared machine)\n\n`{meta['command']}`")
    with open(os.path.join(args.out, "fashion_mnist_pate.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
