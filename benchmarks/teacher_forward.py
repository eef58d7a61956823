"""A teacher's eval forward on the CPU, kdjax against PyTorch eager, and the single convolutions
behind the difference (issue 26, item 8; benchmarks/results/perf_notes.md).

  python -m benchmarks.teacher_forward --rounds 7                 # the whole teacher
  python -m benchmarks.teacher_forward --convs --rounds 7         # one convolution per row
  python -m benchmarks.teacher_forward --convs --grad --rounds 5  # ... forward and backward

Whole teacher (default: the zoo's resnet18 at 32x32x3, 10 classes, batch 128, float32 inputs
already normalised): kdjax's jitted eval forward of the model as built and of the teacher as
`kdjax distill` prepares it (kdjax.teacher: BatchNorms folded), each with kdjax.conv (the default)
and with XLA's convolution everywhere (KDJAX_CPU_CONV=native, as before kdjax.conv), against
PyTorch eager (eval mode, no_grad, NCHW) of the same architecture (benchmarks/torch_peer.py).

`--convs`: the 3x3 and 1x1 convolutions of a ResNet-18 at 32x32 (and a few neighbours), each as
XLA's convolution, as `conv_general_dilated_patches` followed by a matrix product, and as
kdjax.conv computes it on the CPU (all taps, and the taps that see the image), against
`torch.nn.functional.conv2d`.

Every candidate is built in one of three processes (kdjax.conv on, kdjax.conv off, PyTorch: one
thread pool each, as benchmarks/interleaved.py) and the candidates' timed windows alternate round
by round, so a shared machine's load falls on all of them alike; medians, the spread of the
windows and the load average per round are reported.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
import statistics
from typing import Any

from benchmarks import common, interleaved

#: (in channels, out channels, input side, stride, kernel side): a ResNet-18 at 32x32 has the
#: first eleven (its 7x7 stem aside), the rest are neighbours that place the switch-over.
CONVS: tuple[tuple[int, int, int, int, int], ...] = (
    (64, 64, 8, 1, 3), (64, 128, 8, 2, 3), (128, 128, 4, 1, 3), (128, 256, 4, 2, 3),
    (256, 256, 2, 1, 3), (256, 512, 2, 2, 3), (512, 512, 1, 1, 3),
    (64, 128, 8, 2, 1), (128, 256, 4, 2, 1), (256, 512, 2, 2, 1), (3, 64, 32, 2, 7),
    (256, 256, 3, 1, 3), (512, 512, 2, 1, 3), (512, 512, 4, 2, 3),
)


def _conv_name(shape: tuple[int, ...]) -> str:
    ci, co, side, stride, k = shape
    return f"{k}x{k} {ci}->{co} at {side}x{side}" + (f", stride {stride}" if stride > 1 else "")


def _sync_jax(tree: Any) -> None:
    import jax

    jax.block_until_ready(tree)


def _repeat(f, *args):
    def run(k):
        out = None
        for _ in range(k):
            out = f(*args)
        return out

    return run


def _kdjax_teacher(model: str, side: int, batch: int, conv: str) -> interleaved.Loops:
    from kdjax import conv as conv_lib

    os.environ[conv_lib.ENV] = conv  # read when the forwards below are traced
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from kdjax import teacher as teacher_lib
    from kdjax.models import ModelSpec

    spec = ModelSpec(model, 10, (side, side, 3), compute_dtype="float32")
    as_built = spec.build()
    prepared, _ = teacher_lib.prepare(as_built, spec, dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(0), (batch, side, side, 3), jnp.float32)
    loops = {}
    for name, m in (("as built", as_built), ("prepared", prepared)):
        graphdef, variables = nnx.split(m)
        fwd = jax.jit(lambda v, x, g=graphdef: nnx.merge(g, v)(x, train=False))
        loops[f"kdjax {name}, {'kdjax.conv' if conv == 'auto' else 'native conv'}"] = (
            _repeat(fwd, variables, x), _sync_jax)
    return loops


def _torch_teacher(model: str, side: int, batch: int) -> interleaved.Loops:
    import torch

    from benchmarks import torch_peer

    torch.manual_seed(0)
    net = torch_peer.build(model, 10, (side, side, 3)).eval()
    x = torch.randn(batch, 3, side, side)

    def run(k):
        with torch.no_grad():
            for _ in range(k):
                y = net(x)
        return y

    return {"PyTorch eager": (run, lambda _: None)}


def _kdjax_convs(batch: int, grad: bool) -> interleaved.Loops:
    import jax
    import jax.numpy as jnp
    from jax import lax

    from kdjax import conv as conv_lib

    dn = ("NHWC", "HWIO", "NHWC")

    def native(x, w, s, p):
        return lax.conv_general_dilated(x, w, (s, s), ((p, p), (p, p)), dimension_numbers=dn)

    def patches(x, w, s, p):
        # Patch features come out ordered (channel, row, column).
        cols = lax.conv_general_dilated_patches(x, w.shape[:2], (s, s), ((p, p), (p, p)),
                                                dimension_numbers=dn)
        kh, kw, ci, co = w.shape
        return cols @ jnp.transpose(w, (2, 0, 1, 3)).reshape(ci * kh * kw, co)

    def all_taps(x, w, s, p):
        # kdjax.conv's matrix product over every tap: what the live-tap restriction saves.
        kh, kw = w.shape[:2]
        ho, wo = [(n + 2 * p - k) // s + 1 for n, k in zip(x.shape[1:3], (kh, kw))]
        xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        cols = jnp.concatenate([xp[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s]
                                for i in range(kh) for j in range(kw)], -1)
        return cols @ w.reshape(-1, w.shape[-1])

    def live_taps(x, w, s, p):
        return conv_lib.as_matmul(x, w, (s, s), ((p, p), (p, p)))

    forms = {"XLA conv": native, "patches + dot": patches, "matmul, all taps": all_taps,
             "kdjax.conv matmul": live_taps}
    loops = {}
    for shape in CONVS:
        ci, co, side, stride, k = shape
        x = jax.random.normal(jax.random.key(0), (batch, side, side, ci), jnp.float32)
        w = jax.random.normal(jax.random.key(1), (k, k, ci, co), jnp.float32) / (k * k * ci) ** .5
        ref = None
        for name, form in forms.items():
            f = functools.partial(form, s=stride, p=k // 2)
            if grad:
                f = jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) ** 2), argnums=(0, 1))
            f = jax.jit(f)
            out = f(x, w)
            if ref is None:
                ref = out
            else:  # every form computes the same function (float32 summation order aside)
                for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
                    scale = float(jnp.max(jnp.abs(b)))
                    assert float(jnp.max(jnp.abs(a - b))) <= 1e-4 * scale, (name, shape)
            loops[f"{_conv_name(shape)}|{name}"] = (_repeat(f, x, w), _sync_jax)
    return loops


def _torch_convs(batch: int, grad: bool) -> interleaved.Loops:
    import torch
    import torch.nn.functional as F

    loops = {}
    for shape in CONVS:
        ci, co, side, stride, k = shape
        x = torch.randn(batch, ci, side, side, requires_grad=grad)
        w = (torch.randn(co, ci, k, k) / (k * k * ci) ** .5).requires_grad_(grad)

        def run(n, x=x, w=w, stride=stride, k=k):
            with torch.set_grad_enabled(grad):
                for _ in range(n):
                    y = F.conv2d(x, w, stride=stride, padding=k // 2)
                    if grad:
                        torch.autograd.grad((y ** 2).sum(), (x, w))
            return y

        loops[f"{_conv_name(shape)}|PyTorch"] = (run, lambda _: None)
    return loops


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("jax", "jaxlib", "flax", "torch"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _summary(windows: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    return {k: {"median_ms": statistics.median(v) * 1e3, "min_ms": min(v) * 1e3,
                "max_ms": max(v) * 1e3, "windows_ms": [w * 1e3 for w in v]}
            for k, v in windows.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18", help="a zoo model the PyTorch peer also builds")
    p.add_argument("--size", type=int, default=32, help="input side (pixels)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--convs", action="store_true", help="time single convolutions instead")
    p.add_argument("--grad", action="store_true", help="with --convs: forward and backward")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=3, help="calls per timed window")
    p.add_argument("--json", default="", help="also write the result here")
    a = p.parse_args(argv)
    host = {**common.host_info(), **_versions()}
    if a.convs:
        sides = [(_kdjax_convs, (a.batch, a.grad)), (_torch_convs, (a.batch, a.grad))]
    else:
        sides = [(_kdjax_teacher, (a.model, a.size, a.batch, "auto")),
                 (_kdjax_teacher, (a.model, a.size, a.batch, "native")),
                 (_torch_teacher, (a.model, a.size, a.batch))]
    windows, loads = interleaved.alternate(sides, rounds=a.rounds, steps=a.steps)
    rows = _summary(windows)
    print(f"{host['cpu']}, {host['cpu_count']} cores; jax {host['jax']}, flax {host['flax']}, "
          f"torch {host['torch']}; load average per round {[round(v, 1) for v in loads]}")
    if a.convs:
        forms = list(dict.fromkeys(k.split("|")[1] for k in rows))
        what = "forward + backward" if a.grad else "forward"
        print(f"\n{what}, batch {a.batch}, median ms (min-max of {a.rounds} windows)\n")
        print("| convolution | " + " | ".join(forms) + " |")
        print("|---|" + "---:|" * len(forms))
        for shape in CONVS:
            cells = [rows[f"{_conv_name(shape)}|{f}"] for f in forms]
            print(f"| {_conv_name(shape)} | " + " | ".join(
                f"{c['median_ms']:.2f} ({c['min_ms']:.1f}-{c['max_ms']:.1f})" for c in cells)
                  + " |")
    else:
        print(f"\n{a.model} at {a.size}x{a.size}, batch {a.batch}, eval forward\n")
        print("| | median ms (min-max) | images/s (median) |")
        print("|---|---:|---:|")
        for name, r in rows.items():
            print(f"| {name} | {r['median_ms']:.1f} ({r['min_ms']:.1f}-{r['max_ms']:.1f}) | "
                  f"{a.batch / r['median_ms'] * 1e3:,.0f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"host": host, "args": vars(a), "loads": loads, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
