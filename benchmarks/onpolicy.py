"""On-policy distillation (kdjax.lm.onpolicy): sampling tokens/s in the fused step, the share of
the step spent generating, and (with --compare) what each mode buys on the demo corpus.

  python -m benchmarks.onpolicy [--tag cpu] [--windows 5] [--steps 2]
  python -m benchmarks.onpolicy --compare --data-dir DIR --teacher RUN [--seeds 0 1 2]
      [--budget-s 90]

Speed: `make demo-lm`'s shapes (the lm_mini student, the lm_small teacher, the byte vocabulary,
32 rows of 128 positions, prompts of 64 tokens continued by 64), random weights (the time does
not depend on them). Timed: the student's KV-cached decode loop alone (kdjax.lm.sampling.decode,
jitted), and the fused train step with λ = 0 (supervised distillation), λ = 1 with the student
generating (on-policy) and λ = 1 with the teacher generating (sequence-level KD). The share of
the on-policy step spent generating is decode / step. Windows are interleaved (a load change on
the shared machine hits every variant alike) and the load average is recorded before and after.

--compare: per seed, four students distilled from the teacher run RUN (its dataset "pystdlib"
in DIR, as `make demo-lm` prepares it) with experiments/lm/onpolicy.py's loss (generalized JSD,
β = 0.5) at equal train-step wall time: each mode's steps are --budget-s divided by its step
time measured here first. Modes: supervised (λ = 0), on-policy λ = 0.5, λ = 1, and
sequence-level KD (the teacher generates, λ = 1); all sample at temperature 1. Reported:
held-out perplexity, and the teacher's NLL per token of the student's own continuations of the
first 64 tokens of held-out rows (64 new tokens at temperature 1: how plausible the teacher
finds what the student writes).

Writes benchmarks/results/onpolicy_<tag>.{json,md} (the comparison in the same files).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import common
from benchmarks.suite import _versions
from kdjax import checkpoint, config as config_lib, models, plan as plan_lib, sharding, trainer
from kdjax.lm import data as text_data, sampling
from kdjax.lm.objective import TokenObjective
from kdjax.lm.step import make_lm_step
from kdjax.step import DeviceData, freeze, init_train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, SEQ_LEN, BATCH, PROMPT, NEW = 259, 128, 32, 64, 64
MODES = {"supervised": dict(fraction=0.0),
         "on-policy λ=0.5": dict(fraction=0.5),
         "on-policy λ=1": dict(fraction=1.0),
         "sequence-level KD": dict(fraction=1.0, generator="teacher")}


def _on_policy(**changes) -> plan_lib.OnPolicy:
    return plan_lib.OnPolicy(**{**dict(fraction=1.0, generator="student", prompt_tokens=PROMPT,
                                       max_new_tokens=NEW, temperature=1.0), **changes})


def _timers() -> dict:
    """`run(n)` closures of the decode loop and of the three steps, each compiled and warm."""
    student = models.ModelSpec("lm_mini", VOCAB, (SEQ_LEN,)).build(0)
    teacher = freeze(models.ModelSpec("lm_small", VOCAB, (SEQ_LEN,)).build(1))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, VOCAB, (4 * BATCH, SEQ_LEN + 1)), jnp.int32)
    data = DeviceData({"tokens": tokens, "segments": jnp.ones_like(tokens)}, batch_size=BATCH)
    objective = TokenObjective(divergence="jsd", kwargs={"beta": 0.5}, ce_weight=0.5,
                               kd_weight=0.5)
    tx = optax.adamw(1e-3)
    runs = {}
    config = sampling.SamplingConfig(temperature=1.0)
    graphdef, params = nnx.split(student)
    prompts, pad = tokens[:BATCH, :PROMPT], jnp.zeros((BATCH,), jnp.int32)
    decode = jax.jit(lambda params, key: sampling.decode(
        nnx.merge(graphdef, params), prompts, pad, key, max_new_tokens=NEW, config=config)[0])

    def run_decode(n):
        for i in range(n):
            out = decode(params, jax.random.key(i))
        return out

    runs["decode"] = run_decode
    for label, on_policy in (("step λ=0", None), ("step λ=1 (student)", _on_policy()),
                             ("step λ=1 (teacher, seq-KD)", _on_policy(generator="teacher"))):
        g, state = init_train_state(models.ModelSpec("lm_mini", VOCAB, (SEQ_LEN,)).build(0), tx,
                                    seed=0, num_examples=4 * BATCH)
        step = make_lm_step(g, tx, objective, teacher=teacher, data=data,
                            mesh=sharding.make_mesh(), on_policy=on_policy)
        holder = {"state": state}

        def run(n, step=step, holder=holder):
            for _ in range(n):
                holder["state"], metrics = step(holder["state"])
            return metrics["loss"]

        runs[label] = run
    for run in runs.values():
        jax.block_until_ready(run(2))  # compile and warm up
    return runs


def speed(windows: int, steps: int) -> dict:
    runs = _timers()
    times = {label: [] for label in runs}
    for _ in range(windows):
        for label, run in runs.items():
            median, _ = common.seconds_per_step(run, jax.block_until_ready, warmup=0,
                                                windows=1, steps=steps)
            times[label].append(median)
    seconds = {label: float(np.median(t)) for label, t in times.items()}
    return {"seconds": seconds, "windows_s": times,
            "sampling_tokens_per_s": BATCH * NEW / seconds["decode"],
            "generating_share": seconds["decode"] / seconds["step λ=1 (student)"]}


def teacher_nll_of_samples(student_dir: str, teacher_dir: str, rows: np.ndarray,
                           seed: int) -> float:
    """The teacher's mean NLL per token of the student's continuations (NEW tokens at
    temperature 1) of the rows' first PROMPT tokens."""
    student = checkpoint.read_model(student_dir).model
    teacher = checkpoint.read_model(teacher_dir, what="--teacher").model
    prompts = rows[:, :PROMPT]
    new = sampling.generate(student, prompts.tolist(), max_new_tokens=NEW, temperature=1.0,
                            seed=seed)
    full = jnp.asarray(np.concatenate([prompts, new], 1))
    log_p = jax.nn.log_softmax(jax.jit(lambda t: teacher(t))(full[:, :-1])[:, PROMPT - 1:])
    return float(-jnp.take_along_axis(log_p, full[:, PROMPT:, None], -1).mean())


def compare(args, seconds: dict) -> dict:
    ds = text_data.open_text("pystdlib", args.data_dir)
    held_out = ds.rows("validation")["tokens"][:args.sample_rows]
    step_s = {"supervised": seconds["step λ=0"],
              "on-policy λ=1": seconds["step λ=1 (student)"],
              "sequence-level KD": seconds["step λ=1 (teacher, seq-KD)"]}
    step_s["on-policy λ=0.5"] = (step_s["supervised"] + step_s["on-policy λ=1"]) / 2
    runs = {mode: [] for mode in MODES}
    for seed in args.seeds:
        for mode, changes in MODES.items():
            steps = max(1, int(args.budget_s / step_s[mode]))
            workdir = os.path.join(args.workdir, f"seed{seed}", mode.replace(" ", "_")
                                   .replace("=", "").replace("λ", "l"))
            on_policy = {**dict(fraction=0.0, generator="student", prompt_tokens=PROMPT,
                                max_new_tokens=NEW, temperature=1.0), **changes}
            config = config_lib.load(os.path.join(ROOT, "experiments", "lm", "onpolicy.py"), [
                f"--config.seed={seed}", f"--config.data.data_dir={args.data_dir}",
                f"--config.teacher.workdir={args.teacher}", f"--config.train.steps={steps}",
                f"--config.eval.every_steps={steps}", f"--config.checkpoint.every_steps={steps}",
                "--config.lm.prompts=()", f"--config.lm.eval_rows={args.eval_rows}",
                f"--config.optimizer.warmup_steps={min(100, steps // 10)}",
                *(f"--config.lm.on_policy.{k}={v}" for k, v in on_policy.items())])
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            s = trainer.train(config, workdir, distill=True, progress=False)
            row = {"seed": seed, "steps": steps, "wall_s": time.perf_counter() - t0,
                   "load_before": load, "perplexity": s["eval/perplexity"],
                   "teacher_nll_of_samples": teacher_nll_of_samples(workdir, args.teacher,
                                                                    held_out, seed)}
            runs[mode].append(row)
            print(f"seed {seed} {mode}: {row}", flush=True)
    return {"runs": runs, "budget_s": args.budget_s, "step_s": step_s, "seeds": args.seeds,
            "eval_rows": args.eval_rows, "sample_rows": int(len(held_out)),
            "teacher": os.path.abspath(args.teacher)}


def markdown(result: dict) -> str:
    host, sp = result["host"], result["speed"]
    lines = [
        "# On-policy distillation: sampling speed and the share of the step spent generating",
        "",
        f"Device: {result['device']} ({host['cpu']}, {host['cpu_count']} cores; load average "
        f"{host['load_average_1min']:.1f} before, {result['load_after']:.1f} after; shared "
        f"machine). jax {result['versions']['jax']}, flax {result['versions']['flax']}. "
        f"Produced by `python -m benchmarks.onpolicy` on {host['date']}.",
        "",
        f"`make demo-lm`'s shapes: lm_mini student, lm_small teacher, vocabulary {VOCAB}, "
        f"{BATCH} rows of {SEQ_LEN} positions; generated batches continue prompts of {PROMPT} "
        f"tokens by {NEW} (temperature 1), KV-cached, inside the fused step. Loss: generalized "
        f"JSD (β = 0.5). Median of {result['windows']} interleaved windows of "
        f"{result['steps']} calls.",
        "",
        "| what | ms per call |",
        "|---|---:|",
    ]
    for label, s in sp["seconds"].items():
        name = {"decode": f"student decode alone ({BATCH} x {NEW} tokens)"}.get(label, label)
        lines.append(f"| {name} | {s * 1e3:.1f} |")
    lines += ["", f"Sampling: {sp['sampling_tokens_per_s']:,.0f} tokens/s (student, {BATCH} "
              f"sequences at once). Generating is {sp['generating_share'] * 100:.0f} % of the "
              f"on-policy (λ = 1) step; the rest is the teacher's and the student's forward on "
              f"the generated rows and the update. The decode loop is {NEW} dependent steps of "
              f"a batch of {BATCH} single tokens: on a CPU each is small matrix-vector work "
              f"whose cost is dominated by per-step overhead, not FLOPs.", ""]
    if "compare" in result:
        c = result["compare"]
        lines += [f"## Equal train-step wall time ({c['budget_s']:g} s a run), seeds "
                  f"{c['seeds']}", "",
                  f"Teacher: {c['teacher']}. Held-out perplexity over {c['eval_rows'] or 'all'} "
                  f"held-out rows; teacher NLL per token of the student's samples ({NEW} "
                  f"tokens at temperature 1 after the first {PROMPT} tokens of "
                  f"{c['sample_rows']} held-out rows). Lower is better for both.", "",
                  "| mode | steps | held-out perplexity | teacher NLL of samples |",
                  "|---|---:|---|---|"]
        for mode, runs in c["runs"].items():
            ppl = np.array([r["perplexity"] for r in runs])
            nll = np.array([r["teacher_nll_of_samples"] for r in runs])
            sd = (lambda x: x.std(ddof=1) if len(x) > 1 else 0.0)
            lines.append(f"| {mode} | {runs[0]['steps']} | {ppl.mean():.3f} ± {sd(ppl):.3f} | "
                         f"{nll.mean():.3f} ± {sd(nll):.3f} |")
        every = [r for runs in c["runs"].values() for r in runs]
        steps = [r["steps"] for r in every]
        best = {key: min(c["runs"], key=lambda m: np.mean([r[key] for r in c["runs"][m]]))
                for key in ("perplexity", "teacher_nll_of_samples")}
        lines += ["", f"Each mode's steps are the budget over its step time above. The runs' "
                  f"whole wall times, compile and eval included, were "
                  f"{min(r['wall_s'] for r in every):.0f}-{max(r['wall_s'] for r in every):.0f} "
                  f"s, at load averages {min(r['load_before'] for r in every):.1f}-"
                  f"{max(r['load_before'] for r in every):.1f} when they started. The students "
                  f"start from random weights and train {min(steps)}-{max(steps)} steps; at "
                  f"this budget the best mean perplexity is {best['perplexity']}'s and the best "
                  f"teacher NLL of samples {best['teacher_nll_of_samples']}'s. A student "
                  f"that samples from nearly random weights is trained on continuations no "
                  f"corpus holds, and sequence-level KD pays for the teacher's decoding with "
                  f"fewer steps. On-policy distillation is usually started from a student "
                  f"already trained (GKD's setting: init.workdir here); that comparison was not "
                  f"run.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--teacher", default="")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget-s", type=float, default=90.0)
    parser.add_argument("--eval-rows", type=int, default=256)
    parser.add_argument("--sample-rows", type=int, default=64)
    parser.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "onpolicy_compare"))
    args = parser.parse_args()
    if args.compare and not (args.data_dir and args.teacher):
        parser.error("--compare needs --data-dir (with the pystdlib dataset) and --teacher")
    host = common.host_info()
    result = {"host": host, "device": jax.devices()[0].device_kind, "versions": _versions(),
              "windows": args.windows, "steps": args.steps,
              "speed": speed(args.windows, args.steps)}
    if args.compare:
        result["compare"] = compare(args, result["speed"]["seconds"])
    result["load_after"] = os.getloadavg()[0]
    common.write_results(f"onpolicy_{args.tag}", result, markdown)


if __name__ == "__main__":
    main()
