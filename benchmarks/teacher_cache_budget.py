"""The student's held-out perplexity distilled from teacher caches of k = 8 and 64 and from the
online teacher's whole distribution, at the same number of steps, one seed.

  python -m benchmarks.teacher_cache_budget --teacher RUN --data NAME --data-dir DIR \
      --caches DIR --workdirs DIR [--steps 300] [--rounds 5] [--tag cpu]

Every run is `kdjax distill --config experiments/lm/distill.py` (0.5 CE + 0.5 forward KL, the
cache's runs the top-k loss with its tail bucket) with the same student, seed, optimizer and
data order; `--caches` holds `k8`, `k64` and `k128` from `python -m benchmarks.teacher_cache`.
The runs' wall times are of a shared 2-core CPU (other jobs ran beside them); the seconds per
step of each kind of target (caches k = 8, 64, 128, online top 64, online whole) are measured
apart, in interleaved windows, so that the machine's load falls on all of them alike.

Writes benchmarks/results/teacher_cache_budget_<tag>.{json,md}.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import jax

from benchmarks import common, teacher_cache
from benchmarks.suite import _versions
from kdjax import cli, config as config_lib, optim, sharding
from kdjax import plan as plan_lib
from kdjax.lm.task import LanguageModelTask
from kdjax.step import init_train_state

EXP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                   "lm")


def run(args) -> dict:
    rows = []
    variants = [(f"cache k={k}", [f"--config.teacher.cache={os.path.join(args.caches, f'k{k}')}",
                                  "--config.teacher.workdir="]) for k in (8, 64)]
    variants.append(("online, whole distribution", [f"--config.teacher.workdir={args.teacher}"]))
    for name, extra in variants:
        workdir = os.path.join(args.workdirs, name.split(",")[0].replace(" ", "_").replace("=",
                                                                                           ""))
        assert cli.main([
            "distill", "--config", f"{EXP}/distill.py", "--workdir", workdir, "--fresh",
            f"--config.data.name={args.data}", f"--config.data.data_dir={args.data_dir}",
            f"--config.model.name={args.student}", f"--config.train.steps={args.steps}",
            f"--config.eval.every_steps={args.steps}",
            f"--config.checkpoint.every_steps={args.steps}", "--config.lm.prompts=()",
            "--no-progress", *extra]) == 0
        with open(os.path.join(workdir, "summary.json")) as f:
            s = json.load(f)
        rows.append({"teacher": name, "eval/perplexity": s["eval/perplexity"],
                     "eval/accuracy": s["eval/accuracy"], "wall_time_s": s["wall_time_s"],
                     "tokens_per_s": s["tokens_per_s"]})
    return {"teacher": args.teacher, "data": args.data, "student": args.student,
            "steps": args.steps, "device": args.device, "versions": _versions(), "results": rows}


def step_times(args) -> list[dict]:
    """Seconds per train step of each kind of teacher target (the step alone, compiled; the
    variants' timed windows interleaved, so that the shared machine's load falls on all)."""
    base = plan_lib.as_plan(config_lib.load(f"{EXP}/distill.py", [
        f"--config.data.name={args.data}", f"--config.data.data_dir={args.data_dir}",
        f"--config.model.name={args.student}", f"--config.teacher.workdir={args.teacher}"]))
    variants = {f"cache k={k}": {"workdir": "", "cache": os.path.join(args.caches, f"k{k}")}
                for k in (8, 64, 128)}
    variants["online, top 64"] = {"top_k": 64}
    variants["online, whole distribution"] = {}
    mesh, steps = sharding.make_mesh(), {}
    for name, teacher in variants.items():
        plan = base.replace(teacher=teacher)
        task = LanguageModelTask(plan)
        data = task.open_data(mesh)
        loaded = tuple(task.load_teacher(w, data.student, mesh).model
                       for w in task.teacher_workdirs(distill=True))
        model, _ = task.build(data, loaded)
        tx = optim.make_optimizer(plan.optimizer, plan.train.steps)
        graphdef, state = init_train_state(model, tx, seed=0, num_examples=data.num_train)
        step = task.make_step(graphdef, tx, loaded, data, mesh=mesh)
        state = jax.block_until_ready(step(state)[0])  # compiled
        steps[name] = [step, state, []]
    for _ in range(args.rounds):
        for entry in steps.values():
            step, state, times = entry
            t0 = time.perf_counter()
            for _ in range(10):
                state, _metrics = step(state)
            jax.block_until_ready(state)
            times.append((time.perf_counter() - t0) / 10)
            entry[1] = state
    return [{"teacher": name, "seconds_per_step": statistics.median(times), "windows": times}
            for name, (_, _, times) in steps.items()]


def markdown(result: dict) -> str:
    lines = [f"# Student perplexity from a teacher cache vs the online teacher ({result['device']})",
             "", f"Student {result['student']}, {result['steps']} steps of "
             f"experiments/lm/distill.py on {result['data']}, teacher {result['teacher']}, "
             f"seed 0 (one seed: differences of a few hundredths are noise). The runs' wall "
             f"times are of a shared machine whose other jobs came and went: compare the "
             f"interleaved step times below instead.", "",
             "| teacher targets | held-out perplexity | next-token top-1 | wall time (s) | "
             "tokens/s |", "|---|---|---|---|---|"]
    for r in result["results"]:
        lines.append(f"| {r['teacher']} | {r['eval/perplexity']:.3f} | "
                     f"{100 * r['eval/accuracy']:.2f} % | {r['wall_time_s']:.0f} | "
                     f"{r['tokens_per_s']:,.0f} |")
    if result.get("step_times"):
        lines += ["", f"Seconds per train step (batch 32 x 128, the compiled step alone, median of "
                      f"{len(result['step_times'][0]['windows'])} interleaved windows of 10 "
                      f"steps; load average {result['load_average']}):", "",
                  "| teacher targets | s/step |", "|---|---|"]
        lines += [f"| {r['teacher']} | {r['seconds_per_step']:.3f} |"
                  for r in result["step_times"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = teacher_cache.parser(__doc__)
    p.add_argument("--workdirs", required=True, help="where the students' runs go")
    p.add_argument("--student", default="lm_tiny")
    p.add_argument("--steps", type=int, default=300, help="0: no training runs")
    p.add_argument("--rounds", type=int, default=5, help="timed windows per variant (0: none)")
    p.add_argument("--previous", default=None,
                   help="with --steps 0: the results .json whose training runs to keep")
    args = p.parse_args()
    if args.steps:
        result = run(args)
    else:
        with open(args.previous) as f:
            result = json.load(f)
    if args.rounds:
        load = os.getloadavg()[0]
        result["step_times"] = step_times(args)
        result["load_average"] = f"{load:.1f} before, {os.getloadavg()[0]:.1f} after"
    common.write_results(f"teacher_cache_budget_{args.tag}", result, markdown)


if __name__ == "__main__":
    main()
