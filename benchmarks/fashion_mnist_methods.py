"""Every distillation method of kdjax on Fashion-MNIST, one student budget, over several seeds.

  python benchmarks/fashion_mnist_methods.py --data-dir data/tfds --seeds 0 1 2 \
      --epochs 0.5 --teacher-epochs 1.5

For each seed: the teachers (teacher.py's MLP, teacher_cnn.py's CNN) are trained once, then every
student of experiments/fashion_mnist: from scratch (student_scratch.py, and student_scratch.py:ARCH
for the CNN and born-again students' architectures) and with each method, all with the same
budget (--epochs of the configs' optimizer, batch size and augmentation: only the loss differs).
The hyperparameters are the experiment files'; this script overrides only the seed, the number of
steps and the workdirs. A student's gain is its accuracy minus its own architecture's scratch
accuracy, per seed; teacher agreement is with the MLP teacher (the CNN teacher for CNN students),
measured by `kdjax.trainer.evaluate` for the runs that have no teacher.

Writes benchmarks/results/fashion_mnist_methods_<platform>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from fashion_mnist_common import RESULTS, ROOT, load_config, machine, mean_std, run
from kdjax import data, trainer

TEACHERS = {"teacher": "teacher.py", "teacher_cnn": "teacher_cnn.py"}


@dataclasses.dataclass(frozen=True)
class Row:
    """One student: its experiment file, the teachers it distils from (names in TEACHERS), the
    scratch row of its architecture (None for a scratch row) and the teacher it is compared to."""

    name: str
    config: str
    teachers: tuple[str, ...] = ("teacher",)
    baseline: str | None = "scratch"
    reference: str = "teacher"


ROWS = (
    Row("scratch", "student_scratch.py", (), None),
    *(Row(m, f"{m}.py") for m in ("kd", "dkd", "lskd", "fitnet", "sp", "rkd", "pkt", "vid", "cc",
                                  "crd")),
    Row("dml", "dml.py", ()),
    Row("multi_teacher", "multi_teacher.py", ("teacher", "teacher_cnn")),
    Row("scratch_cnn", "student_scratch.py:cnn_tiny", (), None, "teacher_cnn"),
    *(Row(m, f"{m}.py", ("teacher_cnn",), "scratch_cnn", "teacher_cnn")
      for m in ("kd_cnn", "at", "nst")),
    Row("scratch_mlp_1200", "student_scratch.py:mlp_1200", (), None),
    Row("born_again", "born_again.py", baseline="scratch_mlp_1200"),
)


def _budget(path: str, epochs: float, num_train: int, seed: int, data_dir: str) -> list[str]:
    """Overrides giving `path` `epochs` epochs of its own batch size, evaluated at the end."""
    batch = load_config(path).train.batch_size
    steps = max(1, round(epochs * num_train / batch))
    return [f"--config.seed={seed}", f"--config.data.data_dir={data_dir}",
            f"--config.train.steps={steps}", f"--config.train.log_every_steps={max(1, steps // 4)}",
            f"--config.eval.every_steps={steps}", f"--config.checkpoint.every_steps={steps}"]


def _teacher_overrides(workdirs: Sequence[str]) -> list[str]:
    if not workdirs:
        return []
    if len(workdirs) == 1:
        return [f"--config.teacher.workdir={workdirs[0]}"]
    return [f"--config.teacher.workdirs=({', '.join(repr(w) for w in workdirs)},)"]


def run_seed(seed: int, rows: Sequence[Row], *, data_dir: str, workdir: str, epochs: float,
             teacher_epochs: float) -> dict[str, dict[str, Any]]:
    """Train the teachers `rows` need, then each row's student; {name: summary}."""
    num_train = data.dataset_info("fashion_mnist", data_dir=data_dir).num_examples("train")
    out: dict[str, dict[str, Any]] = {}
    root = os.path.join(workdir, f"seed{seed}")
    needed = {t for r in rows for t in (*r.teachers, r.reference)}
    for name in (t for t in TEACHERS if t in needed):
        path, start = TEACHERS[name], time.perf_counter()
        out[name] = run(path, os.path.join(root, name),
                        _budget(path, teacher_epochs, num_train, seed, data_dir))
        out[name]["elapsed_s"] = time.perf_counter() - start
    for row in rows:
        work, start = os.path.join(root, row.name), time.perf_counter()
        budget = _budget(row.config, epochs, num_train, seed, data_dir)
        s = run(row.config, work, budget + _teacher_overrides(
            [os.path.join(root, t) for t in row.teachers]))
        if "eval/teacher_agreement" not in s:
            # Runs without a teacher: agreement with the reference teacher, on the same test set.
            config = load_config(row.config, budget + _teacher_overrides(
                [os.path.join(root, row.reference)]))
            s["eval/teacher_agreement"] = trainer.evaluate(config, work)["eval/teacher_agreement"]
        out[row.name] = {**s, "elapsed_s": time.perf_counter() - start}
    for name, s in out.items():
        print(f"seed {seed} {name}: {s['eval/accuracy']:.4f} ({s['elapsed_s']:.0f} s)", flush=True)
    return out


def table(results: dict[str, list[dict[str, Any]]], rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Per row: accuracy, gain over its scratch baseline and agreement, mean ± std over seeds."""
    out = []
    for name in [t for t in TEACHERS if t in results] + [r.name for r in rows]:
        runs = results[name]
        row = next((r for r in rows if r.name == name), None)
        acc = [100 * r["eval/accuracy"] for r in runs]
        entry = {"name": name, "config": row.config if row else TEACHERS[name],
                 "model": runs[0]["model"], "num_params": runs[0]["num_params"],
                 "accuracy": mean_std(acc), "per_seed": acc,
                 "train_time_s": float(np.mean([r["wall_time_s"] for r in runs])),
                 "run_time_s": float(np.mean([r["elapsed_s"] for r in runs]))}
        if row is not None:
            entry["teacher_agreement"] = mean_std(
                [100 * r["eval/teacher_agreement"] for r in runs])
            entry["reference"] = row.reference
        if row is not None and row.baseline is not None:
            base = [100 * r["eval/accuracy"] for r in results[row.baseline]]
            gains = [a - b for a, b in zip(acc, base, strict=True)]
            entry.update(baseline=row.baseline, gain=mean_std(gains),
                         seeds_above=sum(g > 0 for g in gains))
        out.append(entry)
    return out


def _pm(ms: tuple[float, float], sign: bool = False) -> str:
    return f"{ms[0]:{'+' if sign else ''}.2f} ± {ms[1]:.2f}"


def markdown(entries: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    n = len(meta["seeds"])
    lines = [
        f"# Fashion-MNIST: every method, one student budget ({meta['device']})", "",
        f"Produced by `{meta['command']}` in {meta['total_wall_time_s'] / 60:.0f} min: seeds "
        f"{meta['seeds']}, students {meta['epochs']:g} epoch(s) ({meta['student_steps']} steps "
        f"of batch 128, the experiment files' SGD, cosine schedule, 2-px crop and flip), teachers "
        f"{meta['teacher_epochs']:g} epoch(s). {meta['device']} shared with other jobs, jax "
        f"{meta['jax']}, {meta['date']}; 1-minute load average {meta['load_before']:.1f} at the "
        f"start, {meta['load_after']:.1f} at the end (wall times are noisy).", "",
        f"Top-1 accuracy on the {meta['num_test']:,} test images, mean ± std over seeds. Gain: "
        "accuracy minus "
        "the scratch student of the same architecture, per seed (points). Agreement: top-1 "
        "agreement with the teacher named in the last column. Time per run, mean over seeds: "
        "training (the trainer's wall time: steps, compilation, evaluation) and the whole run "
        "(also loading the data and teachers, building the model, and for the runs without a "
        "teacher the agreement evaluation).", "",
        "| method | config | student | params | top-1 (%) | gain over scratch | seeds above "
        "scratch | teacher agreement (%) | train (s) | run (s) | agreement with |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for e in entries:
        gain = _pm(e["gain"], sign=True) if "gain" in e else "–"
        above = f"{e['seeds_above']}/{n}" if "gain" in e else "–"
        agree = _pm(e["teacher_agreement"]) if "teacher_agreement" in e else "–"
        lines.append(f"| {e['name']} | `{e['config']}` | {e['model']} | {e['num_params']:,} | "
                     f"{_pm(e['accuracy'])} | {gain} | {above} | {agree} | "
                     f"{e['train_time_s']:.0f} | {e['run_time_s']:.0f} | "
                     f"{e.get('reference', '–')} |")
    lines += ["", "Reading notes (computed from the table above):", ""] + [
        f"- {note}" for note in reading_notes(entries, n)]
    return "\n".join(lines) + "\n"


def reading_notes(entries: list[dict[str, Any]], seeds: int) -> list[str]:
    """Plain statements of what the measured numbers say, including the methods that lose."""
    students = [e for e in entries if "gain" in e]
    by_name = {e["name"]: e for e in entries}
    notes = []
    every = [e["name"] for e in students if e["seeds_above"] == seeds]
    losing = [e["name"] for e in students if e["gain"][0] < 0]
    mixed = [e["name"] for e in students if e["name"] not in every + losing]
    notes.append(f"Above their scratch baseline in all {seeds} seeds: {', '.join(every) or 'none'}.")
    notes.append(f"Below their scratch baseline on average: {', '.join(losing) or 'none'}.")
    if mixed:
        notes.append(f"Not below on average, but not above in every seed: {', '.join(mixed)}.")
    best = max(students, key=lambda e: e["gain"][0])
    notes.append(f"Largest mean gain: {best['name']} ({_pm(best['gain'], sign=True)} points).")
    for kd, family in (("kd", "teacher"), ("kd_cnn", "teacher_cnn")):
        if kd not in by_name:
            continue
        ref = by_name[kd]["accuracy"][0]
        same = [e for e in students if e["name"] != kd and e.get("reference") == family
                and e["name"] not in ("dml", "multi_teacher", "born_again")]
        ahead = [e["name"] for e in same if e["accuracy"][0] > ref]
        if same:
            notes.append(f"Feature/logit variants of {kd} (which all keep or replace its KD term) "
                         f"with a higher mean accuracy than {kd} itself: "
                         f"{', '.join(ahead) or 'none'}.")
    for teacher in TEACHERS:
        if teacher in by_name:
            notes.append(f"{teacher} ({by_name[teacher]['model']}): "
                         f"{_pm(by_name[teacher]['accuracy'])} %.")
    return notes


def chart(entries: list[dict[str, Any]], path: str, title: str) -> None:
    """Accuracy (mean ± std) against student parameters, log scale; teachers as stars."""
    import matplotlib  # noqa: PLC0415 - the `bench` extra, only needed here

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(10, 7))
    for e in entries:
        teacher = e["name"] in TEACHERS
        scratch = "gain" not in e and not teacher
        (mean, std), x = e["accuracy"], e["num_params"]
        ax.errorbar(x, mean, yerr=std, fmt="*" if teacher else ("s" if scratch else "o"),
                    color="black" if teacher else ("tab:gray" if scratch else "tab:blue"),
                    markersize=10 if teacher else 6, capsize=3, alpha=0.8)
    # Students of one size share an x: their labels go to the right, pushed apart vertically.
    accuracies = [e["accuracy"][0] for e in entries]
    gap = (max(accuracies) - min(accuracies)) / 40
    for x in sorted({e["num_params"] for e in entries}):
        label_y = -np.inf
        for e in sorted((e for e in entries if e["num_params"] == x),
                        key=lambda e: e["accuracy"][0]):
            label_y = max(e["accuracy"][0], label_y + gap)
            ax.annotate(e["name"], (x, e["accuracy"][0]), xytext=(x * 1.3, label_y),
                        fontsize=7, va="center",
                        arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5})
    ax.set_xscale("log")
    ax.set_xlabel("parameters (student; teachers as stars)")
    ax.set_ylabel("Fashion-MNIST top-1 accuracy (%), mean ± std over seeds")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_seeds(run_seed: Callable[..., dict[str, dict[str, Any]]], rows: Sequence[Any],
              args: argparse.Namespace, *, command: str
              ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Every seed's runs of `rows` through `run_seed` ({row name: [summary per seed]}), and the
    table's provenance: machine, budget, load before and after, wall time, the `command` line."""
    load_before, start = os.getloadavg()[0], time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {}
    for seed in args.seeds:
        for name, summary in run_seed(seed, rows, data_dir=args.data_dir, workdir=args.workdir,
                                      epochs=args.epochs,
                                      teacher_epochs=args.teacher_epochs).items():
            results.setdefault(name, []).append({"seed": seed, **summary})
    meta = {**machine(), "seeds": args.seeds, "epochs": args.epochs,
            "num_test": data.dataset_info("fashion_mnist", data_dir=args.data_dir
                                          ).num_examples("test"),
            "teacher_epochs": args.teacher_epochs,
            "student_steps": results[rows[0].name][0]["steps"],
            "load_before": load_before, "load_after": os.getloadavg()[0],
            "total_wall_time_s": time.perf_counter() - start,
            "command": (f"{command} --data-dir DATA_DIR --seeds "
                        f"{' '.join(map(str, args.seeds))} --epochs {args.epochs:g} "
                        f"--teacher-epochs {args.teacher_epochs:g}")}
    return results, meta


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=float, default=0.5, help="every student's budget")
    p.add_argument("--teacher-epochs", type=float, default=1.5)
    p.add_argument("--methods", nargs="+", default=[r.name for r in ROWS],
                   help="a subset of the rows (their scratch baselines are added)")
    p.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "methods"))
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--no-chart", action="store_true", help="skip the PNG (needs matplotlib)")
    args = p.parse_args(argv)
    names = {r.name for r in ROWS}
    unknown = sorted(set(args.methods) - names)
    if unknown:
        raise SystemExit(f"--methods {unknown} are not rows of this table; choose from "
                         f"{[r.name for r in ROWS]}")
    wanted = set(args.methods) | {r.baseline for r in ROWS if r.name in args.methods}
    rows = [r for r in ROWS if r.name in wanted]

    results, meta = run_seeds(run_seed, rows, args,
                              command="python benchmarks/fashion_mnist_methods.py")
    entries = table(results, rows)
    stem = os.path.join(args.out, f"fashion_mnist_methods_{jax.devices()[0].platform}")
    os.makedirs(args.out, exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "table": entries, "runs": results}, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(markdown(entries, meta))
    if not args.no_chart:
        chart(entries, stem + ".png", f"{meta['device']}; students {args.epochs:g} epoch(s), "
                                      f"seeds {args.seeds}; jax {meta['jax']}, {meta['date']}")
    print(markdown(entries, meta))
    return {"meta": meta, "table": entries}


if __name__ == "__main__":
    main()
