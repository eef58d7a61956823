"""`make demo-lm`'s three runs (teacher LM, student from scratch, distilled student) over seeds.

  python -m benchmarks.lm_demo_seeds --data-dir data/text --seeds 0 1 2

The corpus is `make demo-lm`'s: the top-level modules of the Python standard library, prepared
with `kdjax prepare text` (byte-level tokens, 128 positions a row) as the text dataset
"pystdlib" in --data-dir (prepared here when missing). Each seed trains its own teacher
(experiments/lm/teacher.py) and then both students (student_scratch.py, distill.py), whose
budget is identical (model, steps, batch, optimizer, data order): only the loss differs. Writes
benchmarks/results/lm_demo_seeds.{json,md}: per-seed held-out perplexity, next-token accuracy and
agreement with the teacher, mean ± std, train times, the device and the load average. Runs
that finished (their summary.json exists) are read, not trained again, so seeds can be trained
by parallel invocations (--no-report) and reported by a last one.
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
import time

import numpy as np

from benchmarks import common
from benchmarks.suite import _versions
from kdjax import config as config_lib, trainer
from kdjax.lm import data as text_data
from kdjax.prepare.text import prepare_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXP = os.path.join(ROOT, "experiments", "lm")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
RUNS = (("teacher", "teacher.py", False), ("student_scratch", "student_scratch.py", False),
        ("student_kd", "distill.py", True))


def corpus(data_dir: str) -> text_data.TextDataset:
    """The demo's dataset, prepared as the Makefile prepares it when not there yet."""
    try:
        return text_data.open_text("pystdlib", data_dir)
    except FileNotFoundError:
        stdlib = sysconfig.get_paths()["stdlib"]
        files = sorted(os.path.join(stdlib, f) for f in os.listdir(stdlib) if f.endswith(".py"))
        prepare_text(files, name="pystdlib", data_dir=data_dir, seq_len=128)
        return text_data.open_text("pystdlib", data_dir)


def mean_std(values) -> tuple[float, float]:
    x = np.asarray(values, np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "lm_seeds"))
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--note", default="", help="a sentence for the results (how they were run)")
    p.add_argument("--no-report", action="store_true",
                   help="train only (e.g. one seed per parallel invocation); a later invocation "
                        "with all the seeds reads the finished runs and writes the results")
    args = p.parse_args(argv)
    ds = corpus(args.data_dir)
    host_before = common.host_info()
    results: dict[str, list[dict]] = {name: [] for name, _, _ in RUNS}
    t0 = time.perf_counter()
    for seed in args.seeds:
        for name, path, distill in RUNS:
            overrides = [f"--config.seed={seed}", f"--config.data.data_dir={args.data_dir}"]
            if distill:
                overrides.append(f"--config.teacher.workdir={args.workdir}/seed{seed}/teacher")
            config = config_lib.load(os.path.join(EXP, path), overrides)
            workdir = f"{args.workdir}/seed{seed}/{name}"
            done = os.path.join(workdir, "summary.json")
            if os.path.isfile(done):  # finished by an earlier (or a parallel) invocation
                with open(done) as f:
                    s = json.load(f)
                load = s.get("load_average_1min_before")
            else:
                load = os.getloadavg()[0]
                s = trainer.train(config, workdir, distill=distill, progress=False)
                s["load_average_1min_before"] = load
                with open(done, "w") as f:
                    json.dump(s, f, indent=2)
            results[name].append({"seed": seed, **s})
            print(f"seed {seed} {name}: perplexity {s['eval/perplexity']:.3f}, next-token "
                  f"accuracy {s['eval/accuracy']:.4f} ({s['wall_time_s']:.0f} s, load "
                  f"{'-' if load is None else f'{load:.1f}'})", flush=True)
    if args.no_report:
        return 0
    meta = {"host_before": host_before, "host_after": common.host_info(),
            "versions": _versions(), "seeds": args.seeds, "total_s": time.perf_counter() - t0,
            "dataset": {"path": ds.path, "seq_len": ds.seq_len, "vocab_size": ds.vocab_size,
                        "splits": {k: {f: v[f] for f in ("sequences", "documents",
                                                          "target_tokens")}
                                   for k, v in ds.splits.items()},
                        "sources": ds.meta["sources"][:1] + ["..."]},
            "command": f"python -m benchmarks.lm_demo_seeds --data-dir DIR --seeds "
                       f"{' '.join(map(str, args.seeds))}", "note": args.note}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "lm_demo_seeds.json"), "w") as f:
        json.dump({"meta": meta, "runs": results}, f, indent=2)
    lines = ["| run | model | params | held-out perplexity, mean ± std | per seed | next-token "
             "accuracy | agreement with teacher | train time (s) |",
             "|---|---|---:|---|---|---:|---:|---:|"]
    for name, runs in results.items():
        ppl = [r["eval/perplexity"] for r in runs]
        mean, std = mean_std(ppl)
        acc = np.mean([r["eval/accuracy"] for r in runs]) * 100
        agree = [r.get("eval/teacher_agreement") for r in runs]
        agree_s = f"{np.mean(agree) * 100:.2f} %" if None not in agree else "-"
        lines.append(f"| {name} | {runs[0]['model']} | {runs[0]['num_params']:,} | "
                     f"{mean:.3f} ± {std:.3f} | {', '.join(f'{v:.3f}' for v in ppl)} | "
                     f"{acc:.2f} % | {agree_s} | "
                     f"{np.mean([r['wall_time_s'] for r in runs]):.0f} |")
    h0, h1 = meta["host_before"], meta["host_after"]
    lines.append(f"\nseeds {args.seeds}; CPU ({h0['cpu']}, {h0['cpu_count']} cores, shared: "
                 f"1-minute load average {h0['load_average_1min']:.1f} at the start, "
                 f"{h1['load_average_1min']:.1f} at the end); jax {meta['versions']['jax']}, "
                 f"Python {h0['python']} (whose standard library is the corpus); {h0['date']}. "
                 f"Perplexity is per byte-level token on the held-out split "
                 f"({ds.splits['validation']['target_tokens']:,} target tokens, "
                 f"{ds.splits['validation']['documents']} modules).")
    if args.note:
        lines.append(f"\n{args.note}")
    with open(os.path.join(args.out, "lm_demo_seeds.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
