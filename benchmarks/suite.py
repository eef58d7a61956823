"""The step-throughput suite: kdjax's fused distillation step against the PyTorch peer, side by
side on one device, into benchmarks/results/throughput_<platform>.{json,md,png}.

  python -m benchmarks                      (or: kdjax bench) the default rows of this device
  python -m benchmarks --rows resnet56:resnet20@64,resnet56:resnet20@256 --steps-per-call 1,20
  python -m benchmarks --sections kdjax     (no PyTorch)

Per row (pair, batch, steps per dispatch): kdjax images/s and ms/step; the best PyTorch loop's
images/s and which mode it was; the ratio kdjax / best PyTorch; FLOPs per step (XLA's cost
analysis); MFU against the measured bf16 matmul peak (accelerators); memory (kdjax: the compiled
program's footprint and the device's peak; PyTorch: torch.cuda.max_memory_allocated); and the
fusion payoff. Every file names the device, the software versions, the date and the load average.

The PyTorch peer runs first, in a child process: it then owns the accelerator's memory alone
(JAX reserves most of it once it starts) and its threads never share a process with XLA's.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence

from benchmarks import common, pairs as pairs_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
SECTIONS = ("kdjax", "torch")
#: Steps per dispatch (lax.scan) on accelerators: one, and the multi-step dispatch the issue asks
#: for by default there. On the CPU a scanned step is slower (benchmarks/results/perf_notes.md).
ACCELERATOR_STEPS_PER_CALL = (1, 20)


def _versions() -> dict:
    out = {}
    for dist in ("jax", "jaxlib", "flax", "optax", "torch", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _check_torch(sections: Sequence[str]) -> None:
    if "torch" in sections and importlib.util.find_spec("torch") is None:
        raise ValueError("--sections includes 'torch' (the default) but PyTorch is not installed: "
                         "install it (pip install torch) to time the PyTorch peer, or pass "
                         "--sections kdjax to time kdjax alone")


def run_torch(rows, modes: Sequence[str], *, windows: int, steps: int,
              warmup: int | None) -> dict:
    """The PyTorch peer's rows, from a child process (see the module docstring for why); rows
    and warmup None: the child's device's defaults. This process never imports torch: its CUDA
    libraries could shadow the ones JAX loads."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "torch.json")
        cmd = [sys.executable, "-m", "benchmarks.torch_peer",
               "--rows", ",".join(f"{p}@{b}" for p, b in rows or ()),
               "--modes", ",".join(modes), "--windows", str(windows), "--steps", str(steps),
               *(["--warmup", str(warmup)] if warmup is not None else []), "--json", out]
        subprocess.run(cmd, cwd=ROOT, check=True)
        with open(out) as f:
            return json.load(f)


def _merge(kdjax_rows: list[dict], torch_result: dict | None) -> list[dict]:
    """The suite's rows: kdjax's, each with the best PyTorch mode of its (pair, batch)."""
    by_row: dict[tuple, list[dict]] = {}
    for r in (torch_result or {}).get("rows", []):
        by_row.setdefault((r["pair"], r["batch"]), []).append(r)
    out = []
    for k in kdjax_rows:
        peers = by_row.get((k["pair"], k["batch"]), [])
        best = max(peers, key=lambda r: r["images_per_s"], default=None)
        for p in peers:
            for side in ("teacher", "student"):
                if p[f"{side}_params"] != k[f"{side}_params"]:
                    raise ValueError(
                        f"{k['pair']}: the PyTorch {side} has {p[f'{side}_params']:,} parameters "
                        f"and kdjax's {k[f'{side}_params']:,}; fix the architecture in "
                        f"benchmarks/torch_peer.py to match kdjax.models")
        out.append({
            **{f"kdjax_{key}" if key in ("images_per_s", "ms_per_step", "window_ms_per_step")
               else key: v for key, v in k.items()},
            "torch": {p["mode"]: {key: p[key] for key in
                                  ("images_per_s", "ms_per_step", "window_ms_per_step",
                                   "peak_bytes")} for p in peers},
            "torch_best_mode": best and best["mode"],
            "torch_best_images_per_s": best and best["images_per_s"],
            "torch_best_peak_bytes": best and best["peak_bytes"],
            "ratio_kdjax_over_torch": best and k["images_per_s"] / best["images_per_s"],
        })
    return out


def _fmt(v, spec: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v / scale, spec)


def _mib(v) -> str:
    return _fmt(v, ",.0f", 2**20)


def markdown(result: dict) -> str:
    m = result["meta"]
    sw = ", ".join(f"{k} {v}" for k, v in m["software"].items() if v)
    lines = [f"# Fused distillation step: kdjax vs PyTorch ({m['device']})", "",
             f"{m['device']} ({m['platform']}, {m['num_devices']} device(s)); host {m['cpu']}, "
             f"{m['cpu_count']} cores; {sw}; {m['date']}. Load average (1 min) "
             f"{m['load_before']:.1f} before, {m['load_after']:.1f} after. kdjax compute dtype "
             f"{m['compute_dtype']}. Produced by `{m['command']}`.", ""]
    if m.get("note"):
        lines += [m["note"], ""]
    lines += ["| pair | batch | steps/call | kdjax images/s | kdjax ms/step | best PyTorch "
              "images/s (mode) | kdjax / PyTorch | GFLOPs/step | MFU | memory MiB kdjax / "
              "PyTorch | fusion payoff | teacher fwd ms prepared / as built |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        torch_cell = (f"{r['torch_best_images_per_s']:,.0f} ({r['torch_best_mode']})"
                      if r["torch_best_mode"] else "-")
        lines.append(
            f"| {r['pair']} | {r['batch']} | {r['steps_per_call']} | "
            f"{r['kdjax_images_per_s']:,.0f} | {r['kdjax_ms_per_step']:.2f} | {torch_cell} | "
            f"{_fmt(r['ratio_kdjax_over_torch'], '.2f')} | "
            f"{_fmt(r['flops_per_step'], '.2f', 1e9)} | {_fmt(r['mfu'], '.1%')} | "
            f"{_mib(r['program_bytes'])} / "
            f"{_mib(r['torch_best_peak_bytes'])} | {_fmt(r['fusion_payoff'], '.2f')} | "
            f"{_fmt(r.get('teacher_forward_ms'), '.2f')} / "
            f"{_fmt(r.get('teacher_forward_as_built_ms'), '.2f')} |")
    lines += ["", "PyTorch modes, images/s:", "",
              "| pair | batch | " + " | ".join(m["torch_modes"]) + " |",
              "|---|---:|" + "---:|" * len(m["torch_modes"])]
    seen = set()
    for r in result["rows"]:
        if (r["pair"], r["batch"]) in seen or not r["torch"]:
            continue
        seen.add((r["pair"], r["batch"]))
        cells = [_fmt(r["torch"].get(mode, {}).get("images_per_s"), ",.0f")
                 for mode in m["torch_modes"]]
        lines.append(f"| {r['pair']} | {r['batch']} | " + " | ".join(cells) + " |")
    lines += ["", "Columns: median of timed windows after warm-up, synchronised (kdjax: "
              "block_until_ready; PyTorch: torch.cuda.synchronize / the loss's value). Memory: "
              "kdjax's compiled step, arguments + outputs + temporaries less the donated state "
              "(XLA memory analysis; the JSON also has device_peak_bytes, the device's high-water "
              "mark so far, on accelerators); PyTorch's torch.cuda.max_memory_allocated (CUDA "
              "only). "
              "MFU: model FLOPs per step (XLA cost analysis) / time / the measured bf16 matmul "
              "peak, accelerators only. Fusion payoff: fused step / (teacher forward alone + "
              "student step alone), steps_per_call=1. Teacher forward: alone, as the step "
              "runs it (kdjax.teacher.prepare: BatchNorm folded, weights in the compute dtype) "
              "and as built (float32 weights, BatchNorm unfolded)."]
    if m.get("skipped"):
        lines += ["", f"Not measured here: {m['skipped']}."]
    return "\n".join(lines) + "\n"


def chart(result: dict, path: str) -> bool:
    """A grouped bar chart of images/s per row; False (and a message) without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        print(f"kdjax bench: matplotlib is not installed, so {path} was not drawn "
              f"(pip install matplotlib, the 'bench' extra)", file=sys.stderr)
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    spc_values = sorted({r["steps_per_call"] for r in rows})
    groups = sorted({(r["pair"], r["batch"]) for r in rows}, key=[
        (r["pair"], r["batch"]) for r in rows].index)
    labels = [f"{p.replace(':', '→')}\nbatch {b}" for p, b in groups]
    series = {f"kdjax, {s} step(s)/call": [next((r["kdjax_images_per_s"] for r in rows if (
        r["pair"], r["batch"], r["steps_per_call"]) == (*g, s)), 0) for g in groups]
        for s in spc_values}
    series["best PyTorch"] = [next((r["torch_best_images_per_s"] or 0 for r in rows
                                    if (r["pair"], r["batch"]) == g), 0) for g in groups]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4.5))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=name)
    ax.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))], labels,
                  fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("images / s (log scale)")
    m = result["meta"]
    ax.set_title(f"Distillation step throughput on {m['device']} ({m['date'][:10]})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(*, rows: Sequence[tuple[str, int]] | None = None, sections: Sequence[str] = SECTIONS,
        steps_per_call: Sequence[int] | None = None, torch_modes: Sequence[str] = (),
        windows: int = 5, steps: int = 20, warmup: int | None = None, out_dir: str = RESULTS,
        tag: str | None = None, command: str = "python -m benchmarks") -> dict:
    """Measure, write throughput_<tag>.{json,md,png} into `out_dir`, return the result.

    rows/steps_per_call/warmup None: this device's defaults (pairs.default_rows; 1 on the CPU,
    ACCELERATOR_STEPS_PER_CALL elsewhere; pairs.default_warmup).
    """
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or "kdjax" not in sections:
        raise ValueError(f"--sections must include 'kdjax' and may add 'torch' (the peer needs a "
                         f"kdjax row to stand beside), got {list(sections)}")
    _check_torch(sections)
    load_before = os.getloadavg()[0]
    torch_result = None
    if "torch" in sections:  # before JAX starts on the device: see the module docstring
        torch_result = run_torch(rows, torch_modes, windows=windows, steps=steps, warmup=warmup)

    import jax

    from benchmarks import step_throughput
    from kdjax.step import compute_dtype

    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    rows = list(rows or pairs_lib.default_rows(on_cpu))
    warmup = pairs_lib.default_warmup(on_cpu) if warmup is None else warmup
    steps_per_call = tuple(steps_per_call or ((1,) if on_cpu else ACCELERATOR_STEPS_PER_CALL))
    peak = None if on_cpu else step_throughput.bf16_peak_flops()
    kdjax_rows = []
    for name, batch in rows:
        measured = step_throughput.bench_pair(pairs_lib.get_pair(name), batch,
                                              steps_per_call=steps_per_call, windows=windows,
                                              steps=steps, warmup=warmup,
                                              peak=peak)
        for r in measured:
            print(f"kdjax {name} batch {batch} steps/call {r['steps_per_call']}: "
                  f"{r['images_per_s']:,.0f} images/s ({r['ms_per_step']:.2f} ms/step)",
                  file=sys.stderr, flush=True)
        kdjax_rows += measured
    host = common.host_info()
    meta = {
        "device": device.device_kind if not on_cpu else f"CPU ({host['cpu']})",
        "platform": device.platform, "num_devices": jax.device_count(),
        "torch_device": torch_result and torch_result["device"],
        "software": {**_versions(), "python": host["python"],
                     **({"torch_threads": torch_result["software"]["torch_threads"]}
                        if torch_result else {})},
        "cpu": host["cpu"], "cpu_count": host["cpu_count"], "date": host["date"],
        "load_before": load_before, "load_after": host["load_average_1min"],
        "compute_dtype": compute_dtype("auto").name, "measured_bf16_peak_flops": peak,
        "steps_per_call": list(steps_per_call), "windows": windows, "steps_per_window": steps,
        "warmup": warmup, "torch_modes": sorted({r["mode"] for r in (torch_result or {}).get(
            "rows", [])}, key=["eager32", "amp", "compile"].index),
        "command": command,
        "note": ("CPU results: a 2-core machine shared with other jobs, no accelerator; rates "
                 "are noisy, the 1-minute load average is recorded. kdjax runs float32 here "
                 "(bfloat16 is emulated on the CPU), one step per call (the CPU default, see "
                 "perf_notes.md), the PyTorch peer eager float32 and torch.compile'd."
                 if on_cpu else ""),
        "skipped": pairs_lib.CPU_SKIPPED if on_cpu and rows == list(pairs_lib.CPU_ROWS) else "",
    }
    result = {"meta": meta, "rows": _merge(kdjax_rows, torch_result)}
    tag = tag or device.platform
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"throughput_{tag}")
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(base + ".md", "w") as f:
        f.write(markdown(result))
    chart(result, base + ".png")
    print(markdown(result))
    return result


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m benchmarks") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="",
                   help="comma-separated PAIR@BATCH (default: this device's rows; pairs: "
                        f"{', '.join(pairs_lib.PAIRS)})")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help="comma-separated, of kdjax,torch (default both)")
    p.add_argument("--steps-per-call", type=_int_list, default=None,
                   help="comma-separated (default: 1 on the CPU, "
                        f"{','.join(map(str, ACCELERATOR_STEPS_PER_CALL))} on accelerators)")
    p.add_argument("--torch-modes", default="",
                   help="comma-separated, of eager32,amp,compile (default: all this device runs)")
    p.add_argument("--windows", type=int, default=5, help="timed windows per measurement")
    p.add_argument("--steps", type=int, default=20, help="steps per timed window")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls first (default: 2 on the CPU, 10 on accelerators)")
    p.add_argument("--out", default=RESULTS, help="results folder")
    p.add_argument("--tag", default=None, help="file name suffix (default: the platform)")
    a = p.parse_args(argv)
    run(rows=pairs_lib.parse_rows(a.rows) or None,
        sections=[s for s in a.sections.split(",") if s], steps_per_call=a.steps_per_call,
        torch_modes=[m for m in a.torch_modes.split(",") if m], windows=a.windows, steps=a.steps,
        warmup=a.warmup, out_dir=a.out, tag=a.tag, command=" ".join([prog, *(argv or [])]))
    return 0
