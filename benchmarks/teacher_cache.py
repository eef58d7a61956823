"""The teacher cache (kdjax.lm.cache): bytes per token and the student's loss error against the
exact top-k, for k in {8, 64, 128}, on the LM demo's kind of data.

  python -m benchmarks.teacher_cache --teacher RUN --data NAME --data-dir DIR \
      [--student RUN] [--rows 512] [--tag cpu]

For each k: `kdjax cache-teacher` of the whole train split (timed: positions/s), the cache's
verification before use (timed), its bytes a position (the layout's, and the shard files' on
disk: ArrayRecord compresses them further), and on the first `--rows` rows the top-k loss
(kdjax.losses.token_topk_kl, with the tail bucket and renormalised) of two students computed from
the decoded cache and from the teacher's exact top-k: the error of the loss (the difference of
the token means, what the optimizer sees), the mean and the largest per-token error, and the
largest log-probability error. The students: a fresh lm_mini (the demo's student at step 0) and
`--student`, a trained run.

Writes benchmarks/results/teacher_cache_<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from benchmarks import common
from benchmarks.suite import _versions
from kdjax import checkpoint, losses, models, sharding
from kdjax import plan as plan_lib
from kdjax.lm import cache as teacher_cache
from kdjax.lm.task import LanguageModelTask



def _student(workdir: str | None, vocab: int, seq_len: int):
    if workdir is None:
        return "lm_mini at init (seed 0)", models.ModelSpec("lm_mini", vocab, (seq_len,)).build(0)
    reader = checkpoint.RunReader(workdir)
    try:
        step = reader.resolve_step("latest")
        spec = reader.model_spec(step)
        return f"{spec.name} trained ({workdir}, step {step})", reader.load_model(step, spec)
    finally:
        reader.close()


def _errors(student, cached, exact, tokens, segments, batch: int) -> dict[str, dict]:
    out = {}
    forward = jax.jit(lambda t, s: student(t, segment_ids=s))
    for mode, tail in (("tail", True), ("renorm", False)):
        diffs, values = [], []
        for start in range(0, len(tokens), batch):
            sl = slice(start, start + batch)
            logits = forward(tokens[sl, :-1], segments[sl, :-1])
            mask = (segments[sl, :-1] != 0) & (segments[sl, 1:] == segments[sl, :-1])
            a = np.asarray(losses.token_topk_kl(logits, *[x[sl] for x in exact], tail=tail))
            b = np.asarray(losses.token_topk_kl(logits, *[x[sl] for x in cached], tail=tail))
            diffs.append((b - a)[mask])
            values.append(a[mask])
        d, v = np.concatenate(diffs).astype(np.float64), np.concatenate(values)
        out[mode] = {"exact_kl": float(v.mean()), "loss_error": float(abs(d.mean())),
                     "mean_abs_error": float(np.abs(d).mean()),
                     "max_abs_error": float(np.abs(d).max())}
    return out


def run(args) -> dict:
    plan = plan_lib.read_run(args.teacher).replace(data={"name": args.data,
                                                         "data_dir": args.data_dir})
    task = LanguageModelTask(plan)
    ds = task._dataset()
    tokens, segments = ds.load("train")
    model = task.load_teacher(args.teacher, task._student(), sharding.make_mesh()).model
    students = [_student(None, ds.vocab_size, ds.seq_len)]
    if args.student:
        students.append(_student(args.student, ds.vocab_size, ds.seq_len))
    rows = slice(0, args.rows)
    rows_out = []
    for k in args.k:
        out = os.path.join(args.caches, f"k{k}")
        if os.path.exists(out):
            raise SystemExit(f"{out} exists: remove it, or pass another --caches")
        t0 = time.perf_counter()
        teacher_cache.cache_teacher(args.teacher, args.data, out, top_k=k,
                                    data_dir=args.data_dir, batch_size=32)
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        found = teacher_cache.open_cache(out, ds, "train", tokens, segments)
        verify_s = time.perf_counter() - t0
        positions = len(tokens) * ds.seq_len
        disk = sum(os.path.getsize(os.path.join(out, s["file"]))
                   for s in found.manifest["shards"])
        targets = teacher_cache.teacher_targets(model, k)
        exact = [np.concatenate(x) for x in zip(*(
            jax.device_get(targets(model.variables, tokens[s:s + 32], segments[s:s + 32]))
            for s in range(0, args.rows, 32)))]
        cached = jax.device_get(found.layout.decode(found.records[rows]))
        order = np.argsort(exact[1], -1)
        lp_err = np.abs(cached[0] - np.take_along_axis(exact[0], order, -1)).max()
        rows_out.append({
            "k": k, "bytes_per_token": found.layout.token_bytes,
            "disk_bytes_per_token": disk / positions,
            "topk_mass": float(1 - np.exp(exact[2]).mean()),
            "max_logprob_error": float(lp_err),
            "write_positions_per_s": positions / write_s, "verify_s": verify_s,
            "students": {name: _errors(student, cached, exact, tokens[rows], segments[rows], 32)
                         for name, student in students}})
        print(json.dumps(rows_out[-1]), flush=True)
    return {"note": args.note, "teacher": args.teacher, "data": args.data,
            "train_rows": len(tokens),
            "seq_len": ds.seq_len, "vocab_size": ds.vocab_size, "rows_measured": args.rows,
            "value_bits": 9, "device": args.device, "versions": _versions(), "results": rows_out}


def markdown(result: dict) -> str:
    lines = [f"# Teacher cache: bytes per token and loss error ({result['device']})", "",
             f"Teacher {result['teacher']} on {result['data']} (train: {result['train_rows']:,} "
             f"rows of {result['seq_len']} positions, vocabulary {result['vocab_size']}); "
             f"`python -m benchmarks.teacher_cache`. Loss errors on the first "
             f"{result['rows_measured']} rows' target tokens: the decoded cache's top-k loss "
             f"against the exact top-k's, per token (nats).", "", result.get("note", ""), "",
             "| k | bytes/token (layout) | on disk | top-k mass | max log-prob error | "
             "write positions/s | verify (s) |", "|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        lines.append(f"| {r['k']} | {r['bytes_per_token']} | {r['disk_bytes_per_token']:.1f} | "
                     f"{r['topk_mass']:.4f} | {r['max_logprob_error']:.4f} | "
                     f"{r['write_positions_per_s']:,.0f} | {r['verify_s']:.1f} |")
    lines += ["", "| k | student | loss | exact KL | loss error | mean abs error | max abs error |",
              "|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        for name, modes in r["students"].items():
            for mode, e in modes.items():
                lines.append(f"| {r['k']} | {name} | {mode} | {e['exact_kl']:.4f} | "
                             f"{e['loss_error']:.1e} | {e['mean_abs_error']:.1e} | "
                             f"{e['max_abs_error']:.1e} |")
    return "\n".join(lines) + "\n"


def parser(doc: str) -> argparse.ArgumentParser:
    """The arguments both teacher-cache benchmarks take."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="the LM teacher's run")
    p.add_argument("--data", required=True, help="the prepared text dataset")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--caches", required=True, help="the caches' directory (k8, k64, k128)")
    p.add_argument("--device", default="CPU", help="the machine, as the results name it")
    p.add_argument("--tag", default="cpu", help="the results files' suffix")
    return p


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--student", default=None, help="a trained student run (optional)")
    p.add_argument("--k", type=int, nargs="+", default=[8, 64, 128])
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--note", default="", help="how the teacher, data and students were made")
    args = p.parse_args()
    common.write_results(f"teacher_cache_{args.tag}", run(args), markdown)


if __name__ == "__main__":
    main()
