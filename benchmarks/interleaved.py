"""kdjax and the PyTorch peer timed window by window in alternation, for a machine shared with
other jobs.

  python -m benchmarks.interleaved --rows resnet56:resnet20@64,mlp_1200:mlp_128@128 --rounds 5
  python -m benchmarks.interleaved --rows resnet18:mlp_128@128 --native-conv   (+ kdjax before
      kdjax.conv: XLA's convolution everywhere, KDJAX_CPU_CONV=native)

The suite times one side after the other, so on a shared machine each side may meet a different
load (PyTorch's threads lose far more than XLA's to other jobs). Here, for each row, the kdjax
fused step (steps_per_call=1) and the PyTorch peer's eager float32 loop alternate, each in its
own process (in one process the two thread pools slow each other down): one timed window each
per round, a pause between, the 1-minute load average noted per round. Reports each side's
median and best window and their ratios. CPU-oriented: on accelerators use the suite.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from benchmarks import common, pairs as pairs_lib

#: A side's timed loops by name: `run(k)` runs k steps, `sync(run(k))` waits for them.
Loops = dict[str, tuple[Callable[[int], Any], Callable[[Any], None]]]


def _kdjax_loop(pair_name: str, batch: int, conv: str) -> Loops:
    from kdjax import conv as conv_lib

    # Read when the step is traced, which happens below, in this process only.
    os.environ[conv_lib.ENV] = conv
    from benchmarks import step_throughput

    su = step_throughput.setup(pairs_lib.get_pair(pair_name), batch)
    side = "kdjax" if conv == "auto" else "kdjax_native_conv"
    return {side: (step_throughput.stepping(su.fused(), su.fresh_state()), step_throughput.sync)}


def _torch_loop(pair_name: str, batch: int) -> Loops:
    from benchmarks import torch_peer

    loop = torch_peer.make_loop(pairs_lib.get_pair(pair_name), batch, "eager32")
    return {"torch_eager32": (loop.run, loop.sync)}


def _worker(build: Callable[..., Loops], args: tuple, steps: int, conn) -> None:
    """Build one process's loops, warm them up, then time one window per name the parent sends."""
    loops = build(*args)
    for run, sync in loops.values():
        sync(run(2))  # warm-up: compilation, allocator growth
    conn.send(list(loops))
    while (name := conn.recv()) is not None:
        run, sync = loops[name]
        _, (dt,) = common.seconds_per_step(run, sync, warmup=0, windows=1, steps=steps)
        conn.send(dt)


def alternate(sides: list[tuple[Callable[..., Loops], tuple]], *, rounds: int,
              steps: int) -> tuple[dict[str, list[float]], list[float]]:
    """Seconds per step of every loop the `sides` build, one window each per round in turn.

    Each side is `(build, args)`, `build(*args)` run in a process of its own (a module-level
    function: processes are spawned); loop names must be distinct across sides. Returns the
    windows by loop name and the 1-minute load average at the start of each round.
    """
    # One process per side: torch and XLA thread pools in one process slow each other down.
    ctx = multiprocessing.get_context("spawn")
    procs, owner = [], {}
    try:
        for build, args in sides:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(build, args, steps, child))
            proc.start()
            procs.append((proc, parent))
        for _, conn in procs:
            for name in conn.recv():
                owner[name] = conn
        windows: dict[str, list[float]] = {name: [] for name in owner}
        loads = []
        for _ in range(rounds):
            loads.append(os.getloadavg()[0])
            for name, conn in owner.items():
                time.sleep(0.5)  # the other loops' threads go idle
                conn.send(name)
                windows[name].append(conn.recv())
    finally:
        for proc, conn in procs:
            if proc.is_alive():
                conn.send(None)
            proc.join()
    return windows, loads


def compare(pair: pairs_lib.Pair, batch: int, *, rounds: int, steps: int,
            native_conv: bool = False) -> dict:
    sides = [(_kdjax_loop, (pair.name, batch, "auto")), (_torch_loop, (pair.name, batch))]
    if native_conv:
        sides.append((_kdjax_loop, (pair.name, batch, "native")))
    windows, loads = alternate(sides, rounds=rounds, steps=steps)
    med = {k: statistics.median(v) for k, v in windows.items()}
    best = {k: min(v) for k, v in windows.items()}
    return {"pair": pair.name, "batch": batch, "loads": loads,
            **{f"{k}_ms_per_step": [w * 1e3 for w in v] for k, v in windows.items()},
            **{f"{k}_median_images_per_s": batch / v for k, v in med.items()},
            "ratio_median": med["torch_eager32"] / med["kdjax"],
            "ratio_best": best["torch_eager32"] / best["kdjax"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(f"{n}@{b}" for n, b in pairs_lib.CPU_ROWS[:3]))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="steps per timed window")
    p.add_argument("--native-conv", action="store_true",
                   help="also time kdjax with XLA's convolution everywhere (KDJAX_CPU_CONV=native)")
    p.add_argument("--json", default="", help="also write the result here")
    a = p.parse_args(argv)
    host = common.host_info()
    rows = []
    for name, batch in pairs_lib.parse_rows(a.rows):
        r = compare(pairs_lib.get_pair(name), batch, rounds=a.rounds, steps=a.steps,
                    native_conv=a.native_conv)
        rows.append(r)
        native = (f", kdjax with XLA's convolution everywhere "
                  f"{r['kdjax_native_conv_median_images_per_s']:,.0f}" if a.native_conv else "")
        print(f"{name} batch {batch}: kdjax {r['kdjax_median_images_per_s']:,.0f} images/s, "
              f"PyTorch eager {r['torch_eager32_median_images_per_s']:,.0f}{native}; kdjax / "
              f"PyTorch {r['ratio_median']:.2f} (medians), {r['ratio_best']:.2f} (best windows); "
              f"loads {[round(v, 1) for v in r['loads']]}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"host": host, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
