"""The classic claim, measured: does distillation improve the student's calibration?

  python benchmarks/calibration.py --runs workdirs/fair/final --seeds 0 1 2

Runs `kdjax report` on the teacher, the scratch student and the distilled student of each seed
(the final runs of benchmarks/fashion_mnist_fair.py; none trained on the last 6,000 training
images, which are held out for temperature scaling) on the test set, with the seed's teacher as
the reference for both students' fidelity, and aggregates the seeds: mean ± std of every metric,
the per-seed differences distilled minus scratch, and one reliability diagram per role with the
bins summed over the seeds. Speed is measured on the first seed only (it does not depend on it).

Writes benchmarks/results/calibration_fashion_mnist.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

from fashion_mnist_common import RESULTS, mean_std
from kdjax import report

ROLES = ("teacher", "student_scratch", "student_kd")
METRICS = (("top-1 (%)", lambda m: 100 * m["metrics"]["accuracy"]),
           ("NLL", lambda m: m["metrics"]["loss"]),
           ("Brier", lambda m: m["metrics"]["brier"]),
           ("ECE (%)", lambda m: 100 * m["metrics"]["ece"]),
           ("MCE (%)", lambda m: 100 * m["metrics"]["mce"]),
           ("T", lambda m: m["temperature_scaling"].get("temperature")),
           ("ECE after T (%)",
            lambda m: 100 * m["temperature_scaling"]["after"]["ece"]
            if "after" in m["temperature_scaling"] else None),
           ("NLL after T", lambda m: m["temperature_scaling"]["after"]["loss"]
            if "after" in m["temperature_scaling"] else None),
           ("agreement with teacher (%)",
            lambda m: 100 * m["fidelity"]["agreement"] if m.get("fidelity") else None),
           ("KL(teacher ‖ model)", lambda m: m["fidelity"]["kl"] if m.get("fidelity") else None))


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """{role: {metric: [per-seed values]}} and the distilled-minus-scratch differences."""
    table: dict[str, dict[str, list]] = {}
    for rep in per_seed:
        for m in rep["models"]:
            role = os.path.basename(m["name"])
            for name, get in METRICS:
                v = get(m)
                if v is not None:
                    table.setdefault(role, {}).setdefault(name, []).append(float(v))
    diffs = {name: [k - s for k, s in zip(table["student_kd"][name],
                                          table["student_scratch"][name], strict=True)]
             for name, _ in METRICS if name in table["student_kd"]
             and name in table["student_scratch"]}
    return {"per_role": table, "kd_minus_scratch": diffs}


def markdown(result: dict[str, Any]) -> str:
    agg, meta = result["aggregate"], result["meta"]
    names = [n for n, _ in METRICS]
    lines = ["# Does distillation improve the student's calibration? (Fashion-MNIST, test set)", "",
             f"`{meta['command']}` ({meta['minutes']:.0f} min): `kdjax report` of the teacher, the "
             f"scratch student and the distilled student of seeds {meta['seeds']} "
             f"(benchmarks/fashion_mnist_fair.py's final runs, recipes of "
             f"experiments/fashion_mnist/fair.py), mean ± std over the seeds. Temperature scaling "
             f"fitted on `{meta['calibration_split']}`, which no model trained on. ECE: "
             f"{report.CONVENTIONS['ECE']}.", "",
             "| metric | " + " | ".join(ROLES) + " | distilled − scratch, per seed |",
             "|---|" + "---:|" * len(ROLES) + "---|"]
    for name in names:
        cells = []
        for role in ROLES:
            values = agg["per_role"].get(role, {}).get(name)
            cells.append("–" if not values else "{:.4g} ± {:.2g}".format(*mean_std(values)))
        diff = agg["kd_minus_scratch"].get(name)
        lines.append(f"| {name} | " + " | ".join(cells) + " | "
                     + ("–" if not diff else ", ".join(f"{d:+.3g}" for d in diff)) + " |")
    lines += ["", "Reading (from the numbers above):", ""] + [f"- {n}" for n in result["notes"]]
    lines += ["", "![reliability](calibration_fashion_mnist.png)", "",
              f"Device: {meta['environment']['platform']} ({meta['environment']['cpu']}, "
              f"{meta['environment']['cpu_count']} cores), jax {meta['environment']['jax']}; "
              f"speed of each model in the first seed's report (`report_seed*.md` are not kept: "
              f"rerun the command)."]
    return "\n".join(lines) + "\n"


def notes(agg: dict[str, Any]) -> list[str]:
    d = agg["kd_minus_scratch"]
    out = []
    for name, better in (("ECE (%)", "lower"), ("NLL", "lower"), ("Brier", "lower"),
                         ("ECE after T (%)", "lower"), ("top-1 (%)", "higher")):
        if name not in d:
            continue
        diff = np.asarray(d[name])
        wins = int(np.sum(diff < 0) if better == "lower" else np.sum(diff > 0))
        out.append(f"{name}: distilled minus scratch {np.mean(diff):+.3g} on average; the "
                   f"distilled student is {better} in {wins} of {len(diff)} seeds.")
    return out


def reliability_figure(per_seed: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ROLES), figsize=(4 * len(ROLES), 4), sharey=True)
    for ax, role in zip(axes, ROLES):
        entries = [m for rep in per_seed for m in rep["models"]
                   if os.path.basename(m["name"]) == role]
        count = np.sum([m["metrics"]["bins"]["count"] for m in entries], axis=0)
        # summed bins: accuracy and confidence weighted by each seed's counts
        acc = np.sum([np.multiply(m["metrics"]["bins"]["accuracy"], m["metrics"]["bins"]["count"])
                      for m in entries], axis=0) / np.maximum(count, 1)
        edges = np.asarray(entries[0]["metrics"]["bins"]["edges"])
        width = edges[1] - edges[0]
        shown = count[:-1] > 0
        ax.bar(edges[:-1][shown], acc[:-1][shown], width=width, align="edge", alpha=0.7,
               edgecolor="black", linewidth=0.4)
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ece = np.mean([m["metrics"]["ece"] for m in entries])
        ax.set_title(f"{role}: ECE {100 * ece:.2f} % (mean of {len(entries)} seeds)", fontsize=9)
        ax.set_xlabel("top-label confidence")
        ax.set_xlim(0, 1)
    axes[0].set_ylabel("accuracy in bin")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", required=True, help="folder with seed<N>/{teacher,student_*}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--calibration-split", default="train[54000:]",
                   help="held out from every model (fair.py: the validation split)")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--reports", default=None, help="where the per-seed reports go (default: "
                                                   "RUNS/report_seed<N>)")
    args = p.parse_args()
    start = time.perf_counter()
    per_seed = []
    for i, seed in enumerate(args.seeds):
        root = os.path.join(args.runs, f"seed{seed}")
        paths = [os.path.join(root, r) for r in ROLES]
        out = os.path.join(args.reports or args.runs, f"report_seed{seed}")
        per_seed.append(report.make_report(paths, out=out, split="test",
                                           calibration_split=args.calibration_split,
                                           teacher=paths[0], data_dir=args.data_dir,
                                           speed=i == 0))
    agg = aggregate(per_seed)
    ts = per_seed[0]["models"][1]["temperature_scaling"]
    result = {"meta": {"command": "python " + " ".join(sys.argv), "seeds": args.seeds,
                       "calibration_split": ts.get("split"),
                       "environment": per_seed[0]["environment"],
                       "minutes": (time.perf_counter() - start) / 60},
              "aggregate": agg, "notes": notes(agg), "reports": per_seed}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "calibration_fashion_mnist.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.out, "calibration_fashion_mnist.md"), "w") as f:
        f.write(markdown(result))
    try:
        reliability_figure(per_seed, os.path.join(args.out, "calibration_fashion_mnist.png"))
    except ImportError:
        print("matplotlib is not installed: calibration_fashion_mnist.png skipped")
    print(markdown(result))


if __name__ == "__main__":
    main()
