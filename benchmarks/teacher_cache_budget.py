"""The student's held-out perplexity distilled from teacher caches of k = 8 and 64 and from the
online teacher's whole distribution, at the same number of steps, one seed.

  python -m benchmarks.teacher_cache_budget --teacher RUN --data NAME --data-dir DIR \
      --caches DIR [--steps 300] [--tag cpu]

Every run is `kdjax distill --config experiments/lm/distill.py` (0.5 CE + 0.5 forward KL, the
cache's runs the top-k loss with its tail bucket) with the same student, seed, optimizer and
data order; `--caches` holds `k8` and `k64` from `python -m benchmarks.teacher_cache`. Wall
times are of a shared 2-core CPU: compare them with care.

Writes benchmarks/results/teacher_cache_budget_<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os

from benchmarks.suite import _versions
from kdjax import cli

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
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


def markdown(result: dict) -> str:
    lines = [f"# Student perplexity from a teacher cache vs the online teacher ({result['device']})",
             "", f"Student {result['student']}, {result['steps']} steps of "
             f"experiments/lm/distill.py on {result['data']}, teacher {result['teacher']}, "
             f"seed 0 (one seed: differences of a few hundredths are noise).", "",
             "| teacher targets | held-out perplexity | next-token top-1 | wall time (s) | "
             "tokens/s |", "|---|---|---|---|---|"]
    for r in result["results"]:
        lines.append(f"| {r['teacher']} | {r['eval/perplexity']:.3f} | "
                     f"{100 * r['eval/accuracy']:.2f} % | {r['wall_time_s']:.0f} | "
                     f"{r['tokens_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--caches", required=True)
    p.add_argument("--workdirs", required=True, help="where the students' runs go")
    p.add_argument("--student", default="lm_tiny")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--device", default="CPU")
    p.add_argument("--tag", default="cpu")
    args = p.parse_args()
    result = run(args)
    base = os.path.join(RESULTS, f"teacher_cache_budget_{args.tag}")
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(base + ".md", "w") as f:
        f.write(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
