"""The compression pipeline on Fashion-MNIST: teacher -> distilled student -> pruned at 50/75/90 %
(unstructured and structured, fine-tuned with distillation vs with labels only, same steps) ->
int8 (post-training quantization vs quantization-aware distillation vs QAT with labels only, of
the distilled student and of its 90 %-pruned version, whose int8 export is stored sparse),
plus the combinations (b) prune while distilling, (c) prune-distill cycles and (d) the pruned
teacher as the student (Minitron). Every row is measured on its export, the artefact a user
ships: `kdjax.export.load` it, top-1 on the whole test split.

  nice -n 10 python benchmarks/compress_pipeline.py --data-dir data/tfds --seeds 0 1 2
  nice -n 10 python benchmarks/compress_pipeline.py --data-dir data/tfds --render --report \
      --runtime onnxruntime

The second command adds the size and speed columns (bytes stored, non-zero parameters, latency at
batch 1, time per batch of 256), measured on every export by `kdjax report`'s measure module,
and with --runtime each export's latency in that deployment runtime beside XLA's at batch 1 and
256, as `kdjax report --runtime` measures it.

Each seed trains its own teacher (teacher.py, --teacher-epochs) and distilled student (kd.py,
--student-epochs); every compression run starts from that student (init.workdir) and fine-tunes
for --finetune-epochs with the experiment files' recipes (experiments/fashion_mnist/compress_*.py);
(b) distils from scratch for the student's and the fine-tuning's epochs together, (c) spends the
fine-tuning epochs over three cycles, (d) distils the pruned teacher for the fine-tuning epochs.
Writes benchmarks/results/compress_pipeline_cpu.{json,md}: per-seed numbers, mean ± std, the
commands each run is equivalent to, the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from fashion_mnist_common import RESULTS, ROOT, load_config, machine, mean_std
from kdjax import data, export, trainer

STEPS_PER_EPOCH = 468  # 60k examples at batch 128
SPARSITIES = (0.5, 0.75, 0.9)


def _steps(epochs: float) -> int:
    return max(1, round(epochs * STEPS_PER_EPOCH))


def _cadence(steps: int) -> list[str]:
    return [f"--config.train.steps={steps}", f"--config.eval.every_steps={steps}",
            f"--config.checkpoint.every_steps={steps}"]


class Pipeline:
    def __init__(self, args):
        self.args = args
        self.test = data.load_arrays("fashion_mnist", "test", data_dir=args.data_dir)
        self.commands: list[str] = []

    def train(self, path: str, workdir: str, overrides: list[str], *, distill: bool) -> dict:
        overrides = [f"--config.data.data_dir={self.args.data_dir}", *overrides]
        self.commands.append(f"kdjax {'distill' if distill else 'train'} --config "
                             f"experiments/fashion_mnist/{path} --workdir {workdir} "
                             + " ".join(overrides))
        if os.path.isfile(os.path.join(workdir, "summary.json")):  # a rerun resumes the table
            with open(os.path.join(workdir, "summary.json")) as f:
                return json.load(f)
        config = load_config(path, overrides)
        return trainer.train(config, workdir, distill=distill, progress=False)

    def export(self, workdir: str, out: str, overrides: list[str] = ()) -> dict[str, Any]:
        overrides = [*overrides, f"--config.data.data_dir={self.args.data_dir}"]
        self.commands.append(f"kdjax export --workdir {workdir} --out {out} " + " ".join(overrides))
        if not os.path.isdir(out):
            export.export(workdir, out, overrides=overrides)
        return self.measure(out)

    def measure(self, path: str) -> dict[str, Any]:
        """Top-1 of the export as loaded, its bytes on disk and its non-zero weights."""
        model, preprocess = export.load(path)
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x).argmax(-1))
        correct = 0
        for i in range(0, len(self.test["label"]), 1000):
            pred = forward(state, preprocess(self.test["image"][i:i + 1000]))
            correct += int((np.asarray(pred) == self.test["label"][i:i + 1000]).sum())
        with open(os.path.join(path, export.META_FILE)) as f:
            meta = json.load(f)
        record = meta.get("compression")
        if record is not None:
            nonzeros = sum(r["nonzeros"] for r in record["layers"].values())
            params = sum(r["size"] for r in record["layers"].values())
        else:
            leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
            nonzeros = sum(int(np.count_nonzero(np.asarray(v))) for v in leaves)
            params = sum(int(v.size) for v in leaves)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
        return {"export_accuracy": correct / len(self.test["label"]), "bytes_on_disk": size,
                "nonzero_params": nonzeros, "params": params,
                "model_kwargs": meta["model"]["kwargs"]}


def run_seed(p: Pipeline, seed: int) -> list[dict[str, Any]]:
    a, w = p.args, os.path.join(p.args.workdir, f"seed{seed}")
    rows: list[dict[str, Any]] = []
    s = [f"--config.seed={seed}"]
    teacher, student = f"{w}/teacher", f"{w}/student_kd"
    ft = _steps(a.finetune_epochs)

    def row(stage, name, workdir, summary, export_path, export_overrides=(), **extra):
        t = time.perf_counter()
        measured = p.export(workdir, export_path, list(export_overrides))
        rows.append({"seed": seed, "stage": stage, "name": name, "workdir": workdir,
                     "export": export_path, "train_eval_accuracy": summary.get("eval/accuracy"),
                     "train_wall_s": summary.get("wall_time_s"),
                     "train_images_per_s": summary.get("images_per_s"), **measured, **extra,
                     "measure_wall_s": time.perf_counter() - t})
        print(f"seed {seed} {name}: export top-1 {measured['export_accuracy']:.4f}, "
              f"{measured['bytes_on_disk']:,} B, {measured['nonzero_params']:,} non-zeros",
              flush=True)

    summ = p.train("teacher.py", teacher, [*s, *_cadence(_steps(a.teacher_epochs))], distill=False)
    row("teacher", "teacher", teacher, summ, f"{w}/exports/teacher")
    kd = [f"--config.teacher.workdir={teacher}"]
    summ = p.train("kd.py", student, [*s, *kd, *_cadence(_steps(a.student_epochs))], distill=True)
    row("distilled", "student_kd", student, summ, f"{w}/exports/student_kd")
    start = [f"--config.init.workdir={student}", *_cadence(ft),
             f"--config.prune.end_step={ft // 2}", f"--config.prune.every_steps={max(1, ft // 18)}"]
    for method in ("magnitude", "structured"):
        for sparsity in SPARSITIES:
            for finetune in ("kd", "ce"):
                name = f"{method}_{round(100 * sparsity)}_{finetune}"
                extra = ([] if finetune == "kd" else ["--config.loss.name=ce", "--config.loss.kwargs={}"])
                summ = p.train(f"compress_prune_after.py:{method}-{sparsity}", f"{w}/{name}",
                               [*s, *kd, *start, *extra], distill=finetune == "kd")
                row("pruned", name, f"{w}/{name}", summ, f"{w}/exports/{name}", method=method,
                    sparsity=sparsity, finetune=finetune)
    row("int8", "ptq_int8", student, {}, f"{w}/exports/ptq_int8", ["--config.quant.mode=ptq"],
        finetune="none")
    for finetune in ("kd", "ce"):
        name = f"qat_int8_{finetune}"
        extra = [] if finetune == "kd" else ["--config.loss.name=ce", "--config.loss.kwargs={}"]
        summ = p.train("compress_qat.py", f"{w}/{name}",
                       [*s, *kd, f"--config.init.workdir={student}", *_cadence(ft), *extra],
                       distill=finetune == "kd")
        row("int8", name, f"{w}/{name}", summ, f"{w}/exports/{name}", finetune=finetune)
    # int8 of the 90 %-pruned distilled student: PTQ, and quantization-aware fine-tuning that
    # keeps its masks (one-shot pruning at step 0 to 90 % finds exactly its zeros).
    pruned = f"{w}/magnitude_90_kd"
    row("pruned+int8", "magnitude_90_ptq_int8", pruned, {}, f"{w}/exports/magnitude_90_ptq_int8",
        ["--config.quant.mode=ptq"], finetune="none", sparsity=0.9)
    keep = ["--config.prune.method=magnitude", "--config.prune.sparsity=0.9",
            "--config.prune.dense_first_last=False", "--config.prune.exclude=('out',)"]
    for finetune in ("kd", "ce"):
        name = f"magnitude_90_qat_int8_{finetune}"
        extra = [] if finetune == "kd" else ["--config.loss.name=ce", "--config.loss.kwargs={}"]
        summ = p.train("compress_qat.py", f"{w}/{name}",
                       [*s, *kd, f"--config.init.workdir={pruned}", *_cadence(ft), *keep, *extra],
                       distill=finetune == "kd")
        row("pruned+int8", name, f"{w}/{name}", summ, f"{w}/exports/{name}", finetune=finetune,
            sparsity=0.9)
    # (b) prune while distilling, from scratch, for the student's and the fine-tuning's steps.
    total = _steps(a.student_epochs) + ft
    summ = p.train("compress_prune_during.py:magnitude-0.9", f"{w}/during_magnitude_90",
                   [*s, *kd, *_cadence(total), f"--config.prune.begin_step={total // 10}",
                    f"--config.prune.end_step={total * 6 // 10}",
                    f"--config.prune.every_steps={max(1, total // 50)}"], distill=True)
    row("combination", "(b) during_magnitude_90", f"{w}/during_magnitude_90", summ,
        f"{w}/exports/during_magnitude_90", sparsity=0.9)
    # (c) three prune-distill cycles to 50, 75, 90 %, the fine-tuning's steps in all.
    prev = student
    for k in (1, 2, 3):
        steps = ft // 3
        summ = p.train(f"compress_cycles.py:{k}", f"{w}/cycle{k}",
                       [*s, *kd, f"--config.init.workdir={prev}", *_cadence(steps)],
                       distill=True)
        prev = f"{w}/cycle{k}"
    row("combination", "(c) cycles_magnitude_90", prev, summ, f"{w}/exports/cycles_magnitude_90",
        sparsity=0.9)
    # (d) the teacher, its neurons pruned to 10 %, distilled for the fine-tuning's steps.
    summ = p.train("compress_minitron.py", f"{w}/minitron",
                   [*s, *kd, f"--config.init.workdir={teacher}", *_cadence(ft)], distill=True)
    row("combination", "(d) minitron_structured_90", f"{w}/minitron", summ,
        f"{w}/exports/minitron", sparsity=0.9)
    return rows


RUNTIME_BATCHES = (1, 256)
CALIBRATION = 512  # training images for a W8A8 export's ONNX file (quant.calibration_examples)


def add_report_columns(rows: list[dict[str, Any]], data_dir: str,
                       runtime: str | None = None) -> dict[str, Any]:
    """Bytes stored, non-zero parameters, batch-1 latency and batch-256 throughput of each row's
    export, measured by `kdjax report`'s measure module (one timer for the whole project), and
    with `runtime` its latency there beside XLA's (kdjax.report.runtime, as `kdjax report
    --runtime` measures it) at RUNTIME_BATCHES; returns the environment it measured in."""
    from kdjax.report import load_artifact, measure, runtime as runtime_lib

    env = measure.environment()

    def calibration():
        return data.load_arrays("fashion_mnist", "train", data_dir=data_dir)["image"][
            :CALIBRATION]

    for r in rows:
        artifact = load_artifact(r["export"])
        size, speed = measure.size(artifact), measure.speed(artifact)
        r["report"] = {"size": size, "speed": speed}
        if runtime:
            r["report"]["runtime"] = runtime_lib.speed(
                artifact, runtime, batches=RUNTIME_BATCHES, calibration=calibration)
        print(f"{r['name']} seed {r['seed']}: {size['stored_bytes']:,} B stored, latency "
              f"{speed['latency_batch1_ms']['median']:.3f} ms", flush=True)
    env["load_average_end"] = os.getloadavg()[0]
    env["runtime"] = runtime
    return env


def _runtime_cells(rows: list[dict[str, Any]]) -> str:
    """Median over seeds of the runtime's latency at each of RUNTIME_BATCHES, then its speedup
    over XLA's (below 1 flagged); "skipped" with the reason where it could not convert."""
    skipped = [r["report"]["runtime"]["skipped"] for r in rows
               if "skipped" in r["report"]["runtime"]]
    if skipped:
        return " | ".join(["skipped: " + skipped[0].split(":")[0]] * (2 * len(RUNTIME_BATCHES)))
    cells = []
    for b in range(len(RUNTIME_BATCHES)):
        ms = [r["report"]["runtime"]["batches"][b]["runtime_ms"]["median"] for r in rows]
        cells.append(f"{np.median(ms):.3f}")
    for b in range(len(RUNTIME_BATCHES)):
        su = float(np.median([r["report"]["runtime"]["batches"][b]["speedup"] for r in rows]))
        cells.append(f"{su:.2f}x" + (" **slower**" if su < 1 else ""))
    return " | ".join(cells)


def _speed(rows: list[dict[str, Any]]) -> str:
    # Training images/s of the run behind the export (none for a post-training quantization).
    ips = [r.get("train_images_per_s") for r in rows if r.get("train_images_per_s")]
    return f"{np.mean(ips):,.0f}" if ips and rows[0].get("finetune") != "none" else "–"


def _fill_speed(rows: list[dict[str, Any]]) -> None:
    """Rows written before train_images_per_s was recorded: read it from the run's summary."""
    for r in rows:
        path = os.path.join(r["workdir"], "summary.json")
        if r.get("train_images_per_s") is None and os.path.isfile(path):
            with open(path) as f:
                r["train_images_per_s"] = json.load(f).get("images_per_s")


def table(rows: list[dict[str, Any]], meta: dict[str, Any], args) -> str:
    names = list(dict.fromkeys(r["name"] for r in rows))
    by = {n: [r for r in rows if r["name"] == n] for n in names}
    acc = {n: np.array([r["export_accuracy"] for r in by[n]]) * 100 for n in names}
    reported = all("report" in r for r in rows)
    deployed = reported and all("runtime" in r["report"] for r in rows)
    where = (meta.get("report_environment") or {}).get("runtime")
    lines = ["| stage | run | top-1 of the export (%) | per seed | distillation minus labels "
             "(points; seeds ahead) | bytes on disk | non-zero params | params | "
             + ("latency batch 1 (ms) | batch 256 (ms) | " if reported else "")
             + ("".join(f"{where} batch {b} (ms) | " for b in RUNTIME_BATCHES)
                + "".join(f"{where} vs XLA, batch {b} | " for b in RUNTIME_BATCHES)
                if deployed else "")
             + "train img/s |",
             "|---|---|---:|---|---:|---:|---:|---:|" + ("---:|---:|" if reported else "")
             + ("---:|" * 2 * len(RUNTIME_BATCHES) if deployed else "") + "---:|"]
    for n in names:
        r0 = by[n][0]
        mean, std = mean_std(acc[n])
        delta = ""
        if n.endswith("_kd") and n[:-3] + "_ce" in acc:
            d = acc[n] - acc[n[:-3] + "_ce"]
            dm, ds = mean_std(d)
            delta = f"{dm:+.2f} ± {ds:.2f} ({int((d > 0).sum())}/{len(d)})"
        if reported:  # kdjax report's numbers: stored bytes, non-zeros, parameters, speed
            size = [r["report"]["size"] for r in by[n]]
            stored = np.mean([z["stored_bytes"] for z in size])
            nonzeros = np.mean([z["nonzero_parameters"] for z in size])
            params = np.mean([z["parameters"] for z in size])
            lat = np.median([r["report"]["speed"]["latency_batch1_ms"]["median"] for r in by[n]])
            ips = np.median([r["report"]["speed"]["throughput"]["images_per_s"]["median"]
                             for r in by[n]])
            timing = f"{lat:.3f} | {256 / ips * 1e3:.2f} | "
            if deployed:
                timing += _runtime_cells(by[n]) + " | "
        else:
            stored = np.mean([r["bytes_on_disk"] for r in by[n]])
            nonzeros = np.mean([r["nonzero_params"] for r in by[n]])
            params, timing = np.mean([r["params"] for r in by[n]]), ""
        lines.append(f"| {r0['stage']} | {n} | {mean:.2f} ± {std:.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in acc[n])} | {delta} | {int(stored):,} | "
                     f"{int(nonzeros):,} | {int(params):,} | {timing}{_speed(by[n])} |")
    lines.append(
        f"\nseeds {args.seeds}; teacher {args.teacher_epochs} epochs, distilled student "
        f"{args.student_epochs}, every compression run {args.finetune_epochs} of fine-tuning; "
        f"{meta['device']} ({meta['device_kind']}), shared with other work: 1-minute load "
        f"average {meta['load_average_1min']:.1f} at the start, {meta['load_average_end']:.1f} "
        f"at the end; jax {meta['jax']}, {meta['date']}, {meta['wall_min']:.0f} min.")
    env = meta.get("report_environment")
    if env:
        lines.append(
            f"\nBytes, non-zero parameters, parameters and speed: `kdjax report`'s measurements "
            f"(kdjax.report.measure: bytes of the files holding the arrays; latency the median of "
            f"200 batch-1 calls, batch 256 the median time per call over back-to-back windows, "
            f"preprocessing included), on {env['cpu']} ({env['cpu_count']} cores, shared), load "
            f"{env['load_average_1min']:.1f} at the start and {env['load_average_end']:.1f} at the "
            f"end of the measurements: the machine's numbers at that load, not the models'.")
        if deployed:
            lines.append(
                f"\n{where} columns: `kdjax report --runtime {where}`'s measurement "
                f"(kdjax.report.runtime): each export converted as `kdjax export --format onnx` "
                f"converts it and checked against XLA, then the median of 20 calls at each "
                f"batch in {where} (its default threads) and in XLA, median over seeds; "
                f"'vs XLA' is XLA's latency over {where}'s, below 1x flagged. Unstructured "
                f"sparsity is stored sparse by kdjax's export but runs dense in {where}.")
    if meta.get("note"):
        lines.append(f"\n{meta['note']}")
    return "\n".join(lines)


def pipeline_arguments(description: str, *, name: str, epochs: float
                       ) -> argparse.ArgumentParser:
    """The options every pipeline benchmark takes (this one, resnet_deploy.py): data, seeds,
    the teacher's and student's epochs (default `epochs`) and the fine-tuning's (1), its workdir
    (workdirs/`name`), where the results go, and --render."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--teacher-epochs", type=float, default=epochs)
    p.add_argument("--student-epochs", type=float, default=epochs)
    p.add_argument("--finetune-epochs", type=float, default=1.0)
    p.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", name))
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--render", action="store_true",
                   help="only rewrite the .md from the .json of a finished run")
    return p


def main() -> None:
    p = pipeline_arguments(__doc__.splitlines()[0], name="compress_pipeline", epochs=2.0)
    p.add_argument("--report", action="store_true",
                   help="with --render: add the size and speed columns, measured on the exports "
                        "by kdjax report (kdjax.report.measure)")
    p.add_argument("--runtime", choices=["onnxruntime", "litert"], default=None,
                   help="with --report: also time every export in this deployment runtime beside "
                        "XLA (kdjax.report.runtime)")
    p.add_argument("--note", default=None, help="with --render: a note on how the run went, "
                                                "printed under the table")
    args = p.parse_args()
    if args.render:
        with open(os.path.join(args.out, "compress_pipeline_cpu.json")) as f:
            saved = json.load(f)
        _fill_speed(saved["rows"])
        if args.note:
            saved["meta"]["note"] = args.note
        if args.report:
            saved["meta"]["report_environment"] = add_report_columns(
                saved["rows"], saved["args"]["data_dir"], args.runtime)
        write(saved["rows"], saved["meta"], argparse.Namespace(**saved["args"]),
              saved["commands"])
        return
    meta, t0 = machine(), time.perf_counter()
    pipeline, rows = Pipeline(args), []
    for seed in args.seeds:
        rows += run_seed(pipeline, seed)
    meta.update(load_average_end=os.getloadavg()[0], wall_min=(time.perf_counter() - t0) / 60)
    write(rows, meta, args, pipeline.commands)


def write(rows, meta, args, commands) -> None:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compress_pipeline_cpu.json"), "w") as f:
        json.dump({"meta": meta, "args": vars(args), "rows": rows, "commands": commands}, f,
                  indent=2)
    text = table(rows, meta, args)
    with open(os.path.join(args.out, "compress_pipeline_cpu.md"), "w") as f:
        reported = " then\n`... --render --report` (size and speed columns)" if all(
            "report" in r for r in rows) else ""
        where = (meta.get("report_environment") or {}).get("runtime")
        if reported and where:
            reported = reported.replace("--report`", f"--report --runtime {where}`")
        f.write(f"# Compression pipeline, Fashion-MNIST\n\n`nice -n 10 python "
                f"benchmarks/compress_pipeline.py --data-dir {args.data_dir} --seeds "
                f"{' '.join(map(str, args.seeds))}`,{reported}\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
