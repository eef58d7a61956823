"""The report as markdown tables and PNG charts (matplotlib, optional: the `report` extra)."""

from __future__ import annotations

import os
import re
from typing import Any

from kdjax.report import runtime


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def _num(v: float | None, fmt: str = "{:.4f}") -> str:
    return "–" if v is None else fmt.format(v)


def _bytes(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n} B"


def markdown(report: dict[str, Any]) -> str:
    """Three tables (accuracy and calibration, fidelity, size and speed) and the conventions."""
    models = report["models"]
    env = report["environment"]
    tokens = report.get("unit") == "tokens"  # a language-model report: every number per token
    lines = [f"# kdjax report: {report['dataset']} {report['split']!r}", ""]
    lines += ["## Accuracy and calibration" + (" (per target token)" if tokens else ""), "",
              ("| model | perplexity | next-token top-1 (%) | top-5 (%) | NLL | " if tokens else
               "| model | top-1 (%) | top-5 (%) | NLL | ")
              + "Brier | ECE (%) | MCE (%) | T | ECE after T (%) | NLL after T | fitted on |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|" if tokens else
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for m in models:
        a, ts = m["metrics"], m["temperature_scaling"]
        fitted = ts.get("split") if "temperature" in ts else f"skipped: {ts.get('skipped')}"
        lines.append(
            f"| {m['name']} | " + (f"{_num(a['perplexity'], '{:.3f}')} | " if tokens else "")
            + f"{_pct(a['accuracy'])} | {_pct(a['top5_accuracy'])} | "
            f"{_num(a['loss'])} | {_num(a['brier'])} | {_pct(a['ece'])} | {_pct(a['mce'])} | "
            f"{_num(ts.get('temperature'), '{:.3f}')} | {_pct(ts.get('after', {}).get('ece'))} | "
            f"{_num(ts.get('after', {}).get('loss'))} | {fitted} |")
    with_teacher = [m for m in models if m.get("fidelity")]
    if with_teacher:
        lines += ["", "## Fidelity to the teacher", "",
                  "| model | teacher | top-1 agreement (%) | KL(teacher ‖ student) |",
                  "|---|---|---:|---:|"]
        for m in with_teacher:
            f = m["fidelity"]
            lines.append(f"| {m['name']} | {f['teacher_name']} | {_pct(f.get('agreement'))} | "
                         f"{_num(f.get('kl'))} |" if "agreement" in f else
                         f"| {m['name']} | {f['teacher_name']} | – | – ({f.get('skipped')}) |")
    unit = "token" if tokens else "example"
    lines += ["", "## Size and speed", "",
              f"| model | parameters | non-zero | stored | in memory | FLOPs/{unit} | "
              + ("latency, one row of batch 1 (ms) | throughput (tokens/s) |" if tokens else
                 "latency, batch 1 (ms) | throughput (images/s) |"),
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in models:
        s, sp = m["size"], m.get("speed") or {}
        lat = sp.get("latency_batch1_ms")
        thr = (sp.get("throughput") or {}).get("tokens_per_s" if tokens else "images_per_s")
        flops, nonzero = s.get(f"flops_per_{unit}"), s["nonzero_parameters"]
        lines.append(
            f"| {m['name']} | {s['parameters']:,} | "
            f"{'–' if nonzero is None else f'{nonzero:,}'} | "
            f"{_bytes(s['stored_bytes'])} | {_bytes(s['memory_bytes'])} | "
            f"{'–' if flops is None else f'{flops:,.0f}'} | "
            + (f"{lat['median']:.3f} [{lat['p25']:.3f}, {lat['p75']:.3f}] | " if lat else "– | ")
            + (f"{thr['median']:,.0f} [{thr['p25']:,.0f}, {thr['p75']:,.0f}] |" if thr
               else "– |"))
    lines += runtime.markdown(models)
    speed_note = report.get("speed_note")
    lines += ["", f"Measured on {env['platform']} ({env['device_kind']}, {env['device_count']} "
                  f"device(s); CPU {env['cpu']}, {env['cpu_count']} cores), jax {env['jax']}, "
                  f"jaxlib {env['jaxlib']}, flax {env['flax']}, kdjax {env['kdjax']}, Python "
                  f"{env['python']}; 1-minute load average {env['load_average_1min']:.2f} before "
                  f"and {report['load_average_after']:.2f} after. " + (speed_note or ""), ""]
    lines += ["## Conventions", ""] + [f"- **{k}**: {v}" for k, v in report["conventions"].items()]
    charts = report.get("charts", {})
    if charts.get("skipped"):
        lines += ["", f"Charts skipped: {charts['skipped']}."]
    elif charts:
        lines += ["", "## Charts", ""] + [f"![{name}]({os.path.basename(path)})"
                                          for name, path in charts.items()]
    return "\n".join(lines) + "\n"


def file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def charts(report: dict[str, Any], out: str) -> dict[str, str]:
    """accuracy_vs_size.png, accuracy_vs_latency.png and reliability_<model>.png in `out`;
    {"skipped": why} without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {"skipped": "matplotlib is not installed (pip install 'kdjax[report]')"}
    models = report["models"]
    written = {}

    def scatter(key: str, x_of, xlabel: str) -> None:
        points = [(x_of(m), 100 * m["metrics"]["accuracy"], m["name"]) for m in models]
        points = [p for p in points if p[0]]
        if not points:
            return
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for x, y, name in points:
            ax.scatter(x, y)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"top-1 accuracy on {report['split']} (%)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out, f"{key}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written[key] = path

    scatter("accuracy_vs_size", lambda m: m["size"]["stored_bytes"], "bytes stored on disk")
    scatter("accuracy_vs_latency",
            lambda m: ((m.get("speed") or {}).get("latency_batch1_ms") or {}).get("median"),
            "latency at batch 1 (ms, median)")
    for m in models:
        key = f"reliability_{file_name(m['name'])}"
        path = os.path.join(out, f"{key}.png")
        reliability_diagram(m["metrics"]["bins"], path, title=m["name"],
                            after=m["temperature_scaling"].get("after", {}).get("bins"),
                            temperature=m["temperature_scaling"].get("temperature"))
        written[key] = path
    return written


def reliability_diagram(bins: dict[str, list], path: str, *, title: str,
                        after: dict[str, list] | None = None,
                        temperature: float | None = None) -> None:
    """Accuracy per confidence bin against the diagonal, and how many examples each bin holds
    (the extra bin of confidence 1.0 is drawn at the right edge). Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    edges = np.asarray(bins["edges"])
    width = edges[1] - edges[0]
    # the bin of confidence exactly 1.0 as a thin bar just right of 1
    left = np.append(edges[:-1], 1.0 + width / 8)
    widths = np.append(np.full(len(edges) - 1, width), width / 4)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    for b, label, color, alpha in ((bins, "as trained", "tab:blue", 0.7),
                                   (after, f"T = {temperature:.2f}" if temperature else None,
                                    "tab:orange", 0.45)):
        if b is None:
            continue
        count = np.asarray(b["count"])
        shown = count > 0
        top.bar(left[shown], np.asarray(b["accuracy"])[shown], width=widths[shown], align="edge",
                edgecolor="black", linewidth=0.4, color=color, alpha=alpha, label=label)
        bottom.bar(left, count / max(count.sum(), 1), width=widths, align="edge", color=color,
                   alpha=alpha)
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set_ylabel("accuracy in bin")
    top.set_title(title, fontsize=10)
    top.legend(fontsize=8, loc="upper left")
    bottom.set_ylabel("examples")
    bottom.set_xlabel("top-label confidence")
    bottom.set_xlim(0, 1.0 + width / 2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
