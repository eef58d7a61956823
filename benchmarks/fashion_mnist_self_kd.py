"""Temperature schedules, CTKD, Tf-KD and BYOT on Fashion-MNIST against the scratch student and
plain KD, one student budget, over several seeds.

  python benchmarks/fashion_mnist_self_kd.py --data-dir data/tfds --seeds 0 1 2 \
      --epochs 1 --teacher-epochs 1.5

For each seed: the teachers (teacher.py's MLP, teacher_cnn.py's CNN) are trained, then every
student, all with the same budget (--epochs of the experiment files' optimizer, batch size and
augmentation; only the loss differs): the MLP student from scratch, with kd.py, kd_tempsched.py,
ctkd.py, tfkd_virtual.py (no teacher) and tfkd_self.py (its teacher is this seed's scratch
student: a trained copy of itself), and the CNN student (cnn_tiny) from scratch, with kd_cnn.py
and with byot.py (no teacher; each exit's accuracy is reported too). The hyperparameters are the
experiment files'; the script overrides the seed, the steps, the workdirs and, for CTKD, the
curriculum's length (1/24 of the steps, as the file's). Gain: accuracy minus the scratch student
of the same architecture, per seed. Agreement is always with the MLP teacher (the CNN teacher for
the CNN students), also for the runs that distil from none or from another teacher.

Writes benchmarks/results/fashion_mnist_self_kd_<platform>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax

import fashion_mnist_methods as methods
from fashion_mnist_common import RESULTS, ROOT, load_config, mean_std, run
from kdjax import data, trainer


# methods.Row, whose `teachers` may also name an earlier row (tfkd_self's scratch student).
Row = methods.Row


ROWS = (
    Row("scratch", "student_scratch.py", (), None),
    Row("kd", "kd.py"),
    Row("kd_tempsched", "kd_tempsched.py"),
    Row("ctkd", "ctkd.py"),
    Row("tfkd_virtual", "tfkd_virtual.py", ()),
    Row("tfkd_self", "tfkd_self.py", ("scratch",)),
    Row("scratch_cnn", "student_scratch.py:cnn_tiny", (), None, "teacher_cnn"),
    Row("kd_cnn", "kd_cnn.py", ("teacher_cnn",), "scratch_cnn", "teacher_cnn"),
    Row("byot", "byot.py", (), "scratch_cnn", "teacher_cnn"),
)


def _extra(row: Row, steps: int) -> list[str]:
    if row.name == "ctkd":
        return [f"--config.loss.learned_temperature.curriculum_steps={max(1, steps // 24)}"]
    return []


def _steps(overrides: Sequence[str]) -> int:
    return int(next(o for o in overrides if o.startswith("--config.train.steps=")).split("=")[1])


def _last_train(workdir: str, key: str) -> float | None:
    """The last logged value of `key` (e.g. train/temperature) in a run's metrics.jsonl."""
    value = None
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            value = json.loads(line).get(key, value)
    return value


def run_seed(seed: int, rows: Sequence[Row], *, data_dir: str, workdir: str, epochs: float,
             teacher_epochs: float) -> dict[str, dict[str, Any]]:
    """The teachers, then each row's student, in order; {name: summary}."""
    num_train = data.dataset_info("fashion_mnist", data_dir=data_dir).num_examples("train")
    root, out = os.path.join(workdir, f"seed{seed}"), {}
    needed = {t for r in rows for t in (*r.teachers, r.reference)}
    for name in (t for t in methods.TEACHERS if t in needed):
        path, start = methods.TEACHERS[name], time.perf_counter()
        out[name] = run(path, os.path.join(root, name),
                        methods._budget(path, teacher_epochs, num_train, seed, data_dir))
        out[name]["elapsed_s"] = time.perf_counter() - start
    for row in rows:
        work, start = os.path.join(root, row.name), time.perf_counter()
        budget = methods._budget(row.config, epochs, num_train, seed, data_dir)
        s = run(row.config, work, budget + _extra(row, _steps(budget)) + methods._teacher_overrides(
            [os.path.join(root, t) for t in row.teachers]))
        if row.teachers != (row.reference,):  # agreement with the reference teacher, always
            config = load_config(row.config, budget + methods._teacher_overrides(
                [os.path.join(root, row.reference)]))
            s["eval/teacher_agreement"] = trainer.evaluate(config, work)["eval/teacher_agreement"]
        s["final_temperature"] = _last_train(work, "train/temperature")
        out[row.name] = {**s, "elapsed_s": time.perf_counter() - start}
    for name, s in out.items():
        print(f"seed {seed} {name}: {s['eval/accuracy']:.4f} ({s['elapsed_s']:.0f} s)", flush=True)
    return out


def _exits(runs: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Each BYOT exit's eval accuracy (%), mean ± std over seeds."""
    names = sorted(k for k in runs[0] if k.startswith("eval/exit_") and k.endswith("/accuracy")
                   and "top5" not in k)
    return {k.split("/")[1]: mean_std([100 * r[k] for r in runs]) for k in names}


def markdown(entries: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    n = len(meta["seeds"])
    lines = [
        f"# Fashion-MNIST: temperature schedules, CTKD, Tf-KD, BYOT ({meta['device']})", "",
        f"Produced by `{meta['command']}` in {meta['total_wall_time_s'] / 60:.0f} min: seeds "
        f"{meta['seeds']}, students {meta['epochs']:g} epoch(s) ({meta['student_steps']} steps "
        f"of batch 128, the experiment files' SGD, cosine schedule, 2-px crop and flip), teachers "
        f"{meta['teacher_epochs']:g} epoch(s). {meta['device']} shared with other jobs (nice 10),"
        f" jax {meta['jax']}, {meta['date']}; 1-minute load average {meta['load_before']:.1f} at "
        f"the start, {meta['load_after']:.1f} at the end (wall times are noisy).", "",
        f"Top-1 accuracy on the {meta['num_test']:,} test images, mean ± std over seeds. Gain: "
        "accuracy minus the scratch student of the same architecture, per seed (points). "
        "Agreement: top-1 agreement with the teacher in the last column (for tfkd_self, whose "
        "teacher is the scratch student, and for the runs without a teacher, too). Notes: the "
        "last logged train temperature (mean of the last log window) and BYOT's exits' accuracy.",
        "",
        "| method | config | student | params | top-1 (%) | gain over scratch | seeds above "
        "scratch | teacher agreement (%) | train (s) | agreement with | notes |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for e in entries:
        gain = methods._pm(e["gain"], sign=True) if "gain" in e else "–"
        above = f"{e['seeds_above']}/{n}" if "gain" in e else "–"
        agree = methods._pm(e["teacher_agreement"]) if "teacher_agreement" in e else "–"
        lines.append(f"| {e['name']} | `{e['config']}` | {e['model']} | {e['num_params']:,} | "
                     f"{methods._pm(e['accuracy'])} | {gain} | {above} | {agree} | "
                     f"{e['train_time_s']:.0f} | {e.get('reference', '–')} | "
                     f"{e.get('notes', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=float, default=1.0, help="every student's budget")
    p.add_argument("--teacher-epochs", type=float, default=1.5)
    p.add_argument("--methods", nargs="+", default=[r.name for r in ROWS],
                   help="a subset of the rows (their baselines and teachers are added)")
    p.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "self_kd"))
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    unknown = sorted(set(args.methods) - {r.name for r in ROWS})
    if unknown:
        raise SystemExit(f"--methods {unknown} are not rows of this table; choose from "
                         f"{[r.name for r in ROWS]}")
    wanted = set(args.methods)
    wanted |= {r.baseline for r in ROWS if r.name in wanted} | {
        t for r in ROWS if r.name in wanted for t in r.teachers}
    rows = [r for r in ROWS if r.name in wanted]

    results, meta = methods.run_seeds(
        run_seed, rows, args, command="nice -n 10 python benchmarks/fashion_mnist_self_kd.py")
    entries = methods.table(results, rows)
    for e in entries:
        runs, notes = results[e["name"]], []
        temps = [r["final_temperature"] for r in runs if r.get("final_temperature") is not None]
        if temps:
            notes.append(f"final T {methods._pm(mean_std(temps))}")
        notes += [f"{name} {methods._pm(ms)} %" for name, ms in _exits(runs).items()]
        e["notes"] = "; ".join(notes)
    stem = os.path.join(args.out, f"fashion_mnist_self_kd_{jax.devices()[0].platform}")
    os.makedirs(args.out, exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "table": entries, "runs": results}, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(markdown(entries, meta))
    print(markdown(entries, meta))
    return {"meta": meta, "table": entries}


if __name__ == "__main__":
    main()
