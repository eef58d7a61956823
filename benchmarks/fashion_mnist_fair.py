"""The demo's claim, made fair: distillation against the student's best scratch recipe.

  nice -n 10 python benchmarks/fashion_mnist_fair.py --data-dir data/tfds --seeds 0 1 2

The protocol (issue 13):
1. The last 6,000 training images are a validation split no model trains on; the test set is
   touched only by the final runs. The setting is experiments/fashion_mnist/fair.py's: 6,000
   labelled images, a transfer set of 48,000 more whose labels the loss never reads.
2. The teacher (fair.py:teacher) is trained once per seed on the labelled images, with the
   crops and flips that cover every view a student is shown.
3. Sweep (seed 0): each student method, from scratch and distilled, trains with every recipe of
   the same small grid (`GRID`: the knobs both methods share), at the same budget (steps, batch,
   optimizer); each method's recipe is the one with the best validation accuracy.
4. Final: each method's chosen recipe on --seeds (seed 0's teacher is the sweep's: same seed,
   data and steps), evaluated on the test set.

Writes benchmarks/results/fashion_mnist_fair_sweep.{json,md} (step 3) and
fashion_mnist_fair.{json,md} (step 4). The calibration report of the final runs (`kdjax report`,
temperature fitted on the validation split) is benchmarks/calibration.py's:

  python benchmarks/calibration.py --runs workdirs/fair/final --seeds 0 1 2 --data-dir data/tfds
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import time
from typing import Any

import numpy as np

from fashion_mnist_common import RESULTS, ROOT, load_config, machine, mean_std, run
from kdjax import trainer

VALIDATION = "train[54000:]"  # the last 6,000 training images: no model trains on them
CONFIG = "fair.py"  # experiments/fashion_mnist/fair.py:{teacher,scratch,kd}
METHODS = ("scratch", "kd")
# The shared recipe knobs, as config overrides; the same grid for both methods (the teacher was
# trained with crops and flips, so it has seen every view a student is shown).
GRID = {
    "augmentation": {
        "none": ["--config.data.crop_padding=0", "--config.data.flip=False"],
        "flip": ["--config.data.crop_padding=0", "--config.data.flip=True"],
        "crop+flip": ["--config.data.crop_padding=2", "--config.data.flip=True"],
    },
}


def recipes() -> list[dict[str, str]]:
    keys = list(GRID)
    return [dict(zip(keys, values)) for values in itertools.product(*(GRID[k] for k in keys))]


def recipe_name(recipe: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in recipe.items())


def recipe_overrides(recipe: dict[str, str]) -> list[str]:
    return [o for k, v in recipe.items() for o in GRID[k][v]]


def _common(seed: int, data_dir: str, eval_split: str) -> list[str]:
    return [f"--config.seed={seed}", f"--config.data.data_dir={data_dir}",
            f"--config.data.eval_split={eval_split}"]


def teacher(seed: int, root: str, data_dir: str, eval_split: str) -> tuple[str, dict[str, Any]]:
    """Train the seed's teacher; one trained already is evaluated on `eval_split` instead (its
    summary keeps its train time)."""
    work = os.path.join(root, f"seed{seed}", "teacher")
    overrides = _common(seed, data_dir, eval_split)
    done = os.path.join(work, "summary.json")
    if os.path.isfile(done):
        with open(done) as f:
            summary = json.load(f)
        return work, {**summary, **trainer.evaluate(load_config(f"{CONFIG}:teacher", overrides),
                                                    work)}
    return work, run(f"{CONFIG}:teacher", work, overrides)


def student(method: str, recipe: dict[str, str], seed: int, work: str, teacher_dir: str,
            data_dir: str, eval_split: str) -> dict[str, Any]:
    overrides = _common(seed, data_dir, eval_split) + recipe_overrides(recipe)
    if method == "kd":
        overrides.append(f"--config.teacher.workdir={teacher_dir}")
    return run(f"{CONFIG}:{method}", work, overrides)


def sweep(args) -> dict[str, Any]:
    root = os.path.join(args.workdir, "sweep")
    start = time.perf_counter()
    teacher_dir, t = teacher(0, root, args.data_dir, VALIDATION)
    print(f"sweep teacher: validation accuracy {t['eval/accuracy']:.4f}", flush=True)
    rows = []
    for method in METHODS:
        for recipe in recipes():
            work = os.path.join(root, "seed0", method, recipe_name(recipe).replace(",", "_"))
            s = student(method, recipe, 0, work, teacher_dir, args.data_dir, VALIDATION)
            rows.append({"method": method, "recipe": recipe, "workdir": work,
                         "val_accuracy": s["eval/accuracy"], "val_loss": s["eval/loss"],
                         "val_ece": s.get("eval/ece"), "wall_time_s": s["wall_time_s"]})
            print(f"sweep {method} {recipe_name(recipe)}: validation accuracy "
                  f"{s['eval/accuracy']:.4f} ({s['wall_time_s']:.0f} s)", flush=True)
    best = {m: max((r for r in rows if r["method"] == m), key=lambda r: r["val_accuracy"])
            for m in METHODS}
    result = {"meta": {**machine(), "command": " ".join(sys.argv), "grid": GRID,
                       "validation_split": VALIDATION,
                       "total_wall_time_s": time.perf_counter() - start},
              "teacher": {"val_accuracy": t["eval/accuracy"], "val_ece": t.get("eval/ece"),
                          "wall_time_s": t["wall_time_s"]},
              "rows": rows, "best": {m: r["recipe"] for m, r in best.items()}}
    _write(args.out, "fashion_mnist_fair_sweep", result, sweep_markdown(result))
    return result


def sweep_markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = ["# Fashion-MNIST, fair demo: the recipe sweep (validation split)", "",
             f"`{meta['command']}`: seed 0, every model of experiments/fashion_mnist/fair.py "
             f"evaluated on `{meta['validation_split']}` (never the test set). {meta['device']}, "
             f"jax {meta['jax']}, {meta['date']}; load average {meta['load_average_1min']:.1f} at "
             f"the end; {meta['total_wall_time_s'] / 60:.0f} min in all.", "",
             f"Teacher (`fair.py:teacher`): validation accuracy "
             f"{100 * result['teacher']['val_accuracy']:.2f} %.", "",
             "| method | recipe | validation top-1 (%) | validation ECE (%) | train (s) | chosen |",
             "|---|---|---:|---:|---:|---|"]
    for r in result["rows"]:
        chosen = "**yes**" if r["recipe"] == result["best"][r["method"]] else ""
        ece = "–" if r["val_ece"] is None else f"{100 * r['val_ece']:.2f}"
        lines.append(f"| {r['method']} | {recipe_name(r['recipe'])} | "
                     f"{100 * r['val_accuracy']:.2f} | {ece} | {r['wall_time_s']:.0f} | {chosen} |")
    return "\n".join(lines) + "\n"


def final(args, best: dict[str, dict[str, str]]) -> dict[str, Any]:
    root = os.path.join(args.workdir, "final")
    start = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {"teacher": [], **{m: [] for m in METHODS}}
    sweep_teacher = os.path.join(args.workdir, "sweep", "seed0", "teacher")
    for seed in args.seeds:
        reused = os.path.join(root, f"seed{seed}", "teacher")
        if (seed == 0 and not os.path.exists(reused)
                and os.path.isfile(os.path.join(sweep_teacher, "summary.json"))):
            # The sweep's teacher is seed 0's (same seed, data and steps: the same model), so
            # it is copied and only evaluated on the test set.
            shutil.copytree(sweep_teacher, reused)
        teacher_dir, t = teacher(seed, root, args.data_dir, "test")
        results["teacher"].append({"seed": seed, "workdir": teacher_dir, **t})
        for method in METHODS:
            work = os.path.join(root, f"seed{seed}", f"student_{method}")
            s = student(method, best[method], seed, work, teacher_dir, args.data_dir, "test")
            results[method].append({"seed": seed, "workdir": work, **s})
            print(f"final seed {seed} {method}: test accuracy {s['eval/accuracy']:.4f}",
                  flush=True)
    gains = [100 * (k["eval/accuracy"] - s["eval/accuracy"])
             for k, s in zip(results["kd"], results["scratch"], strict=True)]
    result = {"meta": {**machine(), "command": " ".join(sys.argv), "seeds": args.seeds,
                       "recipes": best,
                       "total_wall_time_s": time.perf_counter() - start},
              "runs": results, "gain": {"per_seed": gains, "mean_std": mean_std(gains),
                                        "seeds_above": sum(g > 0 for g in gains)}}
    _write(args.out, "fashion_mnist_fair", result, final_markdown(result))
    return result


def final_markdown(result: dict[str, Any]) -> str:
    meta, runs = result["meta"], result["runs"]
    lines = ["# Fashion-MNIST, fair demo: chosen recipes on the test set", "",
             f"`{meta['command']}`: seeds {meta['seeds']}, experiments/fashion_mnist/fair.py; "
             f"{meta['device']}, jax {meta['jax']}, {meta['date']}; load average "
             f"{meta['load_average_1min']:.1f} at the end (train times are of a shared machine).",
             "", "| run | recipe | model | params | top-1 (%), mean ± std | per seed | "
                 "ECE (%) | train (s) |", "|---|---|---|---:|---:|---|---:|---:|"]
    for name, rs in runs.items():
        acc = [100 * r["eval/accuracy"] for r in rs]
        ece = [100 * r["eval/ece"] for r in rs if r.get("eval/ece") is not None]
        m, s = mean_std(acc)
        recipe = recipe_name(meta["recipes"][name]) if name in meta["recipes"] else "fair.py"
        ece_text = f"{np.mean(ece):.2f}" if ece else "–"
        lines.append(f"| {name} | {recipe} | {rs[0]['model']} | {rs[0]['num_params']:,} | "
                     f"{m:.2f} ± {s:.2f} | {', '.join(f'{a:.2f}' for a in acc)} | {ece_text} | "
                     f"{np.mean([r['wall_time_s'] for r in rs]):.0f} |")
    g = result["gain"]
    per_seed = ", ".join(f"{x:+.2f}" for x in g["per_seed"])
    lines += ["", f"Distilled minus scratch, per seed: {per_seed}"
                  f" points (mean {g['mean_std'][0]:+.2f} ± {g['mean_std'][1]:.2f}); distillation "
                  f"ahead in {g['seeds_above']} of {len(g['per_seed'])} seeds."]
    return "\n".join(lines) + "\n"


def _write(out: str, name: str, result: dict[str, Any], markdown: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(markdown)
    print(markdown)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "fair"))
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--phase", choices=("sweep", "final", "all"), default="all",
                   help="final alone reads the chosen recipes from the sweep's JSON")
    args = p.parse_args()
    if args.phase in ("sweep", "all"):
        best = sweep(args)["best"]
    else:
        with open(os.path.join(args.out, "fashion_mnist_fair_sweep.json")) as f:
            best = json.load(f)["best"]
    if args.phase in ("final", "all"):
        final(args, best)


if __name__ == "__main__":
    main()
