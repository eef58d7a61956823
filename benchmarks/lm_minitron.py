"""The LM demo's teacher pruned into a student (Minitron) and distilled, against the same shape
trained from scratch.

  python -m benchmarks.lm_minitron --teacher workdirs/lm/teacher --data-dir data/text --seeds 0 1 2

--teacher is a run of experiments/lm/teacher.py (byte-level lm_small on "pystdlib", read only).
Two students of experiments/lm/minitron.py's SHAPE (2 blocks, d_model 64, 2 query heads in one
KV group of width 32, d_ff 192), with the same steps, batch, optimizer and data order:

- minitron_kd: the teacher pruned at step 0 by kdjax.compress.minitron (activation importance
  and Block Influence on 64 training rows), then distilled (distill.py's 0.5 CE + 0.5 forward KL);
- scratch: randomly initialised, next-token cross-entropy only (student_scratch.py);
- scratch_kd: randomly initialised and distilled with minitron_kd's loss (distill.py), which
  separates what the pruned initialisation adds from what distillation adds.

Also the pruned student before any training, and the teacher, evaluated by
kdjax.report.lm.evaluate on the same held-out split (the teacher's number checks that this
evaluation agrees with the runs' own).

Each seed varies the students' initialisation and data order (the teacher, and so the pruned
initialisation, is one). Writes benchmarks/results/lm_minitron.{json,md}: held-out perplexity,
next-token accuracy, agreement with the teacher (mean ± std over seeds, and per seed), train
time, the device and the load average. A finished run (its
summary.json) is read, not trained again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from flax import nnx

from benchmarks import common
from benchmarks.suite import _versions
from kdjax import checkpoint, config as config_lib, plan as plan_lib, trainer
from kdjax.compress import training
from kdjax.lm import data as text_data
from kdjax.models import ModelSpec
from kdjax.report import lm as report_lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXP = os.path.join(ROOT, "experiments", "lm")


def _shape() -> dict:
    sys.path.insert(0, EXP)
    try:
        import minitron
    finally:
        sys.path.remove(EXP)
    return dict(minitron.SHAPE)


def _held_out(model: nnx.Module, ds: text_data.TextDataset) -> dict:
    forward = nnx.jit(lambda m, t, s: m(t, segment_ids=s))
    rows = ds.rows("validation")
    out = report_lm.evaluate(lambda t, s: forward(model, t, s), rows["tokens"], rows["segments"])
    return {"eval/perplexity": out["perplexity"], "eval/accuracy": out["accuracy"]}


def _before_training(teacher: str, config_path: str, overrides: list[str]) -> dict:
    """The pruned student at step 0 and the teacher, on the held-out split."""
    plan = plan_lib.as_plan(config_lib.load(config_path, overrides))
    ds = text_data.open_text(plan.data.name, plan.data.data_dir or None)
    spec = ModelSpec(name=plan.model.name, num_classes=ds.vocab_size, input_shape=(ds.seq_len,))
    rows = ds.rows(plan.data.train_split)
    calibration = {k: v[:plan.prune.minitron.calibration_rows] for k, v in rows.items()}
    spec, pruned = training.initial_student(plan, spec, calibration)
    reader = checkpoint.RunReader(teacher, what="--teacher")
    try:
        step = reader.resolve_step("latest")
        full = reader.load_model(step, reader.model_spec(step))
    finally:
        reader.close()
    return {"pruned, before training": _held_out(pruned, ds),
            "teacher, evaluated here": _held_out(full, ds)}


def _train_seed(args, seed: int, shape: dict) -> dict:
    """The three students of one seed (module docstring), read where finished."""
    common_overrides = [f"--config.seed={seed}", f"--config.data.data_dir={args.data_dir}",
                        f"--config.train.steps={args.steps}",
                        f"--config.eval.every_steps={args.steps}",
                        f"--config.checkpoint.every_steps={args.steps}"]
    results = {}
    for name, (path, distill, extra) in _runs(args.teacher, shape).items():
        workdir = os.path.join(args.workdir, f"seed{seed}", name)
        done = os.path.join(workdir, "summary.json")
        if os.path.isfile(done):
            with open(done) as f:
                s = json.load(f)
        else:
            config = config_lib.load(os.path.join(EXP, path), common_overrides + extra)
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            s = trainer.train(config, workdir, distill=distill, progress=False)
            s["load_average_1min_before"], s["measured_s"] = load, time.perf_counter() - t0
            with open(done, "w") as f:
                json.dump(s, f, indent=2)
        results[name] = s
        print(f"seed {seed} {name}: perplexity {s['eval/perplexity']:.3f}, accuracy "
              f"{s['eval/accuracy']:.4f}", flush=True)
    return results


def _runs(teacher: str, shape: dict) -> dict[str, tuple[str, bool, list[str]]]:
    """{name: (experiment, distill, its overrides)}."""
    return {"minitron_kd": ("minitron.py", True,
                            [f"--config.init.workdir={teacher}",
                             f"--config.teacher.workdir={teacher}"]),
            "scratch": ("student_scratch.py", False,
                        ["--config.model.name=lm_small", f"--config.model.kwargs={shape}"]),
            "scratch_kd": ("distill.py", True,
                           ["--config.model.name=lm_small", f"--config.model.kwargs={shape}",
                            f"--config.teacher.workdir={teacher}"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="a finished experiments/lm/teacher.py run")
    p.add_argument("--data-dir", required=True, help="where the text dataset 'pystdlib' is")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="each seed varies the students' initialisation and data order; the "
                        "teacher (and so the pruned initialisation) is the same")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "lm_minitron"))
    args = p.parse_args(argv)
    shape = _shape()
    host_before = common.host_info()
    runs = {seed: _train_seed(args, seed, shape) for seed in args.seeds}
    with open(os.path.join(args.teacher, "summary.json")) as f:
        teacher = json.load(f)
    # The pruned initialisation depends on the teacher and the calibration rows only: the same
    # for every seed.
    before = _before_training(args.teacher, os.path.join(EXP, "minitron.py"), [
        f"--config.data.data_dir={args.data_dir}",
        *_runs(args.teacher, shape)["minitron_kd"][2]])
    result = {"host_before": host_before, "host_after": common.host_info(),
              "versions": _versions(), "seeds": args.seeds, "steps": args.steps, "shape": shape,
              "teacher": {"workdir": args.teacher, **{k: teacher.get(k) for k in (
                  "eval/perplexity", "eval/accuracy", "num_params", "model")}},
              "runs": {str(seed): r for seed, r in runs.items()}, "before_training": before}
    common.write_results("lm_minitron", result, _markdown)
    return 0


def _mean_std(values: list[float]) -> str:
    x = np.asarray(values, np.float64)
    return f"{x.mean():.3f} ± {x.std(ddof=1) if len(x) > 1 else 0.0:.3f}"


def _markdown(r: dict) -> str:
    seeds = list(r["runs"])
    by_name = {name: [r["runs"][s][name] for s in seeds] for name in r["runs"][seeds[0]]}
    lines = [("| run | params | held-out perplexity, mean ± std | per seed | next-token accuracy "
              "(%) | agreement with teacher (%) | train time (s), mean |"),
             "|---|---:|---:|---|---:|---:|---:|"]
    t = r["teacher"]
    lines.append(f"| teacher ({t['model']}, unpruned) | {t['num_params'] or 0:,} | "
                 f"{t['eval/perplexity']:.3f} | - | {t['eval/accuracy'] * 100:.2f} | - | - |")
    params = {"pruned, before training": by_name["minitron_kd"][0]["num_params"],
              "teacher, evaluated here": t["num_params"] or 0}
    for name, s in r["before_training"].items():
        lines.append(f"| {name} | {params[name]:,} | {s['eval/perplexity']:.3f} | - | "
                     f"{s['eval/accuracy'] * 100:.2f} | - | - |")
    for name, ss in by_name.items():
        agree = [s.get("eval/teacher_agreement") for s in ss]
        per_seed = [f"{s['eval/perplexity']:.3f}" for s in ss]
        lines.append(
            f"| {name} | {ss[0]['num_params']:,} | "
            f"{_mean_std([s['eval/perplexity'] for s in ss])} | "
            f"{', '.join(per_seed)} | "
            f"{_mean_std([s['eval/accuracy'] * 100 for s in ss])} | "
            f"{'-' if None in agree else _mean_std([a * 100 for a in agree])} | "
            f"{np.mean([s['wall_time_s'] for s in ss]):.0f} |")
    gap = [s["eval/perplexity"] - k["eval/perplexity"]
           for s, k in zip(by_name["scratch"], by_name["minitron_kd"])]
    h0, h1 = r["host_before"], r["host_after"]
    lines.append(
        f"\nminitron_kd against scratch, per seed: perplexity lower by "
        f"{', '.join(f'{g:.3f}' for g in gap)} (lower on {sum(g > 0 for g in gap)} of "
        f"{len(gap)} seeds).\n\nStudents of shape {r['shape']} (lm_small's class), "
        f"{r['steps']} steps of 32 rows x 128 byte-level tokens, seeds {r['seeds']} (each "
        f"varies the initialisation and data order; one teacher, so one pruned initialisation). "
        f"minitron_kd: the teacher pruned at step 0 (Minitron's activation importance for width, "
        f"Block Influence for depth, 64 calibration rows), then 0.5 CE + 0.5 forward KL from "
        f"the unpruned teacher; scratch: random init, CE only; scratch_kd: random init, "
        f"minitron_kd's loss. Train times include the teacher's forward (the distilled runs) and "
        f"compiles. Device: CPU ({h0['cpu']}, {h0['cpu_count']} cores, shared with other jobs; "
        f"1-minute load average {h0['load_average_1min']:.1f} and "
        f"{h1['load_average_1min']:.1f} around this report's evaluations; the runs' own loads "
        f"are in the .json); jax {r['versions']['jax']}; {h0['date']}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
