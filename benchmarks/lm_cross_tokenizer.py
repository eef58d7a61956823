"""Cross-tokenizer distillation on the LM demo: a BPE student from scratch against the same student
distilled from the byte-level demo teacher (experiments/lm/cross_tokenizer.py), over seeds.

  python -m benchmarks.lm_cross_tokenizer --data-dir data/text --seeds 0 1 2 \
      [--teacher workdirs/lm/teacher]

The corpus is `make demo-lm`'s (the Python standard library's top-level modules), prepared twice
in --data-dir when missing: byte-level, 128 positions a row ("pystdlib", the teacher's), and a
512-token BPE, 64 a row ("pystdlib_bpe", the students'). Both preparations hold out the same
documents, so the held-out text is the same; it is scored in bits per byte (a model's summed
next-token cross-entropy over the text's UTF-8 bytes), which compares models of any tokenizer, and
the students also in perplexity per BPE token. The teacher (experiments/lm/teacher.py, seed 0) is
trained once when --teacher has none, and teaches every seed's student; each seed's two students
share model, steps, batch, optimizer and data order, and differ only in the loss. Finished runs
(their summary.json) are read, not trained again. Writes
benchmarks/results/lm_cross_tokenizer.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sysconfig
import time

import numpy as np

from benchmarks import common
from benchmarks.lm_demo_seeds import corpus, mean_std
from benchmarks.suite import _versions
from kdjax import config as config_lib, trainer
from kdjax.lm import cross_tokenizer, data as text_data, packing
from kdjax.prepare.text import prepare_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXP = os.path.join(ROOT, "experiments", "lm")
BPE = dict(name="pystdlib_bpe", seq_len=64, vocab_size=512)


def bpe_corpus(data_dir: str) -> text_data.TextDataset:
    try:
        return text_data.open_text(BPE["name"], data_dir)
    except FileNotFoundError:
        stdlib = sysconfig.get_paths()["stdlib"]
        files = sorted(os.path.join(stdlib, f) for f in os.listdir(stdlib) if f.endswith(".py"))
        prepare_text(files, name=BPE["name"], data_dir=data_dir, seq_len=BPE["seq_len"],
                     tokenizer="bpe", vocab_size=BPE["vocab_size"])
        return text_data.open_text(BPE["name"], data_dir)


def held_out_text(ds: text_data.TextDataset) -> dict[str, int]:
    """The held-out split's scored targets: their count and the UTF-8 bytes they spell."""
    tokens, segments = ds.load("validation")
    mask = packing.model_inputs(tokens, segments)["loss_mask"]
    lengths = np.asarray([len(b) for b in cross_tokenizer.token_bytes(ds.tokenizer(),
                                                                       what="data")])
    targets = tokens[:, 1:][mask]
    return {"targets": int(mask.sum()), "bytes": int(lengths[targets].sum())}


def bits_per_byte(summary: dict, text: dict[str, int]) -> float:
    return summary["eval/loss"] * text["targets"] / text["bytes"] / math.log(2)


def run(config_path: str, workdir: str, overrides: list[str], *, distill: bool) -> dict:
    done = os.path.join(workdir, "summary.json")
    if os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    load = os.getloadavg()[0]
    s = trainer.train(config_lib.load(config_path, overrides), workdir, distill=distill,
                      progress=False)
    s["load_average_1min_before"] = load
    with open(done, "w") as f:
        json.dump(s, f, indent=2)
    return s


def markdown(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    lines = ["| run | tokenizer | params | held-out bits per byte, mean ± std | per seed | "
             "perplexity per BPE token | next-token accuracy | train time (s) |",
             "|---|---|---:|---|---|---|---:|---:|"]
    for name, runs in rows.items():
        bpb = [r["bits_per_byte"] for r in runs]
        mean, std = mean_std(bpb)
        ppl = (f"{mean_std([r['eval/perplexity'] for r in runs])[0]:.3f} ± "
               f"{mean_std([r['eval/perplexity'] for r in runs])[1]:.3f}"
               if name != "teacher" else "-")
        lines.append(f"| {name} | {runs[0]['tokenizer']} | {runs[0]['num_params']:,} | "
                     f"{mean:.4f} ± {std:.4f} | {', '.join(f'{v:.4f}' for v in bpb)} | {ppl} | "
                     f"{100 * np.mean([r['eval/accuracy'] for r in runs]):.2f} % | "
                     f"{np.mean([r['wall_time_s'] for r in runs]):.0f} |")
    h0, h1, text = meta["host_before"], meta["host_after"], meta["held_out"]
    kd = [r["bits_per_byte"] for r in rows["student_kd"]]
    scratch = [r["bits_per_byte"] for r in rows["student_scratch"]]
    wins = sum(k < s for k, s in zip(kd, scratch))
    lines.append(
        f"\nThe distilled student's held-out bits per byte are lower than the same seed's "
        f"scratch student's in {wins} of {len(kd)} seeds (mean difference "
        f"{np.mean(kd) - np.mean(scratch):+.4f} bits per byte). Teacher: byte-level, seed 0, one "
        f"for every seed. Students: lm_mini on a 512-token BPE, 64 tokens a row, 400 steps of 32 "
        f"rows; distilled: 0.5 CE + 0.5 forward KL of the next-byte distributions "
        f"(lm.cross_tokenizer='next_byte'), the teacher reading each row's text as "
        f"{meta['teacher_rows']} rows of {meta['teacher_window']} bytes; "
        f"{100 * meta['aligned']:.2f} % of the student's target positions aligned.")
    lines.append(
        f"\nHeld-out split: {text['bytes']:,} bytes of text ({text['byte_targets']:,} byte-level "
        f"targets, {text['bpe_targets']:,} BPE targets, each including one end-of-document per "
        f"module). Seeds {meta['seeds']}; CPU ({h0['cpu']}, {h0['cpu_count']} cores, shared: "
        f"1-minute load average {h0['load_average_1min']:.1f} at the start, "
        f"{h1['load_average_1min']:.1f} at the end); jax {meta['versions']['jax']}; {h0['date']}.")
    if meta["note"]:
        lines.append(f"\n{meta['note']}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "lm_cross_tokenizer"))
    p.add_argument("--teacher", default="", help="a trained byte-level teacher run (default: "
                                                 "trained in --workdir)")
    p.add_argument("--note", default="", help="a sentence for the results (how they were run)")
    args = p.parse_args(argv)
    byte_ds, bpe_ds = corpus(args.data_dir), bpe_corpus(args.data_dir)
    byte_text, bpe_text = held_out_text(byte_ds), held_out_text(bpe_ds)
    if byte_text["bytes"] != bpe_text["bytes"]:
        raise SystemExit(f"the two preparations hold out different text ({byte_text['bytes']} "
                         f"vs {bpe_text['bytes']} bytes): prepare both from the same files")
    host_before, t0 = common.host_info(), time.perf_counter()
    data = [f"--config.data.data_dir={args.data_dir}"]
    teacher = args.teacher or os.path.join(args.workdir, "teacher")
    t = run(os.path.join(EXP, "teacher.py"), teacher, [*data, "--config.seed=0"], distill=False)
    rows = {"teacher": [{**t, "seed": 0, "tokenizer": "byte",
                         "bits_per_byte": bits_per_byte(t, byte_text)}],
            "student_scratch": [], "student_kd": []}
    path = os.path.join(EXP, "cross_tokenizer.py")
    for seed in args.seeds:
        for name, arg in (("student_scratch", "scratch"), ("student_kd", "kd")):
            extra = [f"--config.teacher.workdir={teacher}"] if arg == "kd" else []
            s = run(f"{path}:{arg}", os.path.join(args.workdir, f"seed{seed}", name),
                    [*data, f"--config.seed={seed}", *extra], distill=arg == "kd")
            rows[name].append({**s, "seed": seed, "tokenizer": "bpe 512",
                               "bits_per_byte": bits_per_byte(s, bpe_text)})
            print(f"seed {seed} {name}: {rows[name][-1]['bits_per_byte']:.4f} bits per byte, "
                  f"perplexity {s['eval/perplexity']:.3f} ({s['wall_time_s']:.0f} s)", flush=True)
    cross = rows["student_kd"][0]["cross_tokenizer"]
    meta = {"host_before": host_before, "host_after": common.host_info(),
            "versions": _versions(), "seeds": args.seeds, "total_s": time.perf_counter() - t0,
            "held_out": {"bytes": bpe_text["bytes"], "byte_targets": byte_text["targets"],
                         "bpe_targets": bpe_text["targets"]},
            "teacher_rows": cross["teacher_rows"], "teacher_window": cross["teacher_window"],
            "aligned": cross["aligned"], "note": args.note,
            "command": f"python -m benchmarks.lm_cross_tokenizer --data-dir DIR --seeds "
                       f"{' '.join(map(str, args.seeds))}"}
    common.write_results("lm_cross_tokenizer", {"meta": meta, "rows": rows}, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
