"""The LM demo's teacher pruned into a student (Minitron) and distilled, against the same shape
trained from scratch.

  python -m benchmarks.lm_minitron --teacher workdirs/lm/teacher --data-dir data/text

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

Writes benchmarks/results/lm_minitron.{json,md}: held-out perplexity, next-token accuracy,
agreement with the teacher, train time, the device and the load average. A finished run (its
summary.json) is read, not trained again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="a finished experiments/lm/teacher.py run")
    p.add_argument("--data-dir", required=True, help="where the text dataset 'pystdlib' is")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "lm_minitron"))
    args = p.parse_args(argv)
    shape = _shape()
    common_overrides = [f"--config.seed={args.seed}", f"--config.data.data_dir={args.data_dir}",
                        f"--config.train.steps={args.steps}",
                        f"--config.eval.every_steps={args.steps}",
                        f"--config.checkpoint.every_steps={args.steps}"]
    runs = {"minitron_kd": ("minitron.py", True,
                            [f"--config.init.workdir={args.teacher}",
                             f"--config.teacher.workdir={args.teacher}"]),
            "scratch": ("student_scratch.py", False,
                        ["--config.model.name=lm_small", f"--config.model.kwargs={shape}"]),
            "scratch_kd": ("distill.py", True,
                           ["--config.model.name=lm_small", f"--config.model.kwargs={shape}",
                            f"--config.teacher.workdir={args.teacher}"])}
    host_before, results = common.host_info(), {}
    for name, (path, distill, extra) in runs.items():
        workdir = os.path.join(args.workdir, f"seed{args.seed}", name)
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
        print(f"{name}: perplexity {s['eval/perplexity']:.3f}, accuracy "
              f"{s['eval/accuracy']:.4f}", flush=True)
    with open(os.path.join(args.teacher, "summary.json")) as f:
        teacher = json.load(f)
    before = _before_training(args.teacher, os.path.join(EXP, "minitron.py"),
                              common_overrides + runs["minitron_kd"][2])
    result = {"host_before": host_before, "host_after": common.host_info(),
              "versions": _versions(), "seed": args.seed, "steps": args.steps, "shape": shape,
              "teacher": {"workdir": args.teacher, **{k: teacher.get(k) for k in (
                  "eval/perplexity", "eval/accuracy", "num_params", "model")}},
              "runs": results, "before_training": before}
    common.write_results("lm_minitron", result, _markdown)
    return 0


def _markdown(r: dict) -> str:
    lines = [("| run | params | held-out perplexity | next-token accuracy | agreement with "
              "teacher | train time (s) | 1-min load before |"),
             "|---|---:|---:|---:|---:|---:|---:|"]
    t = r["teacher"]
    lines.append(f"| teacher ({t['model']}, unpruned) | {t['num_params'] or 0:,} | "
                 f"{t['eval/perplexity']:.3f} | {t['eval/accuracy'] * 100:.2f} % | - | - | - |")
    params = {"pruned, before training": r["runs"]["minitron_kd"]["num_params"],
              "teacher, evaluated here": t["num_params"] or 0}
    for name, s in r["before_training"].items():
        lines.append(f"| {name} | {params[name]:,} | {s['eval/perplexity']:.3f} | "
                     f"{s['eval/accuracy'] * 100:.2f} % | - | - | - |")
    for name, s in r["runs"].items():
        agree = s.get("eval/teacher_agreement")
        lines.append(f"| {name} | {s['num_params']:,} | {s['eval/perplexity']:.3f} | "
                     f"{s['eval/accuracy'] * 100:.2f} % | "
                     f"{'-' if agree is None else f'{agree * 100:.2f} %'} | "
                     f"{s['wall_time_s']:.0f} | {s['load_average_1min_before']:.1f} |")
    h0, h1 = r["host_before"], r["host_after"]
    lines.append(f"\nStudents of shape {r['shape']} (lm_small's class), {r['steps']} steps of "
                 f"32 rows x 128 byte-level tokens, seed {r['seed']}, one run each (no error "
                 f"bars). minitron_kd: the teacher pruned to that shape at step 0 (Minitron's "
                 f"activation importance for width, Block Influence for depth, 64 calibration "
                 f"rows), then 0.5 CE + 0.5 forward KL from the unpruned teacher; scratch: random "
                 f"init, CE only; scratch_kd: random init, minitron_kd's loss. Train times include "
                 f"the teacher's forward (the distilled runs) and compiles. Device: CPU "
                 f"({h0['cpu']}, {h0['cpu_count']} cores, shared with other jobs; 1-minute load "
                 f"average {h0['load_average_1min']:.1f} and {h1['load_average_1min']:.1f} around "
                 f"this report's evaluations); jax {r['versions']['jax']}; {h0['date']}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
