"""kdjax and the PyTorch peer timed window by window in alternation, for a machine shared with
other jobs.

  python -m benchmarks.interleaved --rows resnet56:resnet20@64,mlp_1200:mlp_128@128 --rounds 5

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

from benchmarks import common, pairs as pairs_lib


def _kdjax_loop(pair: pairs_lib.Pair, batch: int):
    from benchmarks import step_throughput

    su = step_throughput.setup(pair, batch)
    return step_throughput.stepping(su.fused(), su.fresh_state()), step_throughput.sync


def _torch_loop(pair: pairs_lib.Pair, batch: int):
    from benchmarks import torch_peer

    loop = torch_peer.make_loop(pair, batch, "eager32")
    return loop.run, loop.sync


def _worker(side: str, pair_name: str, batch: int, steps: int, conn) -> None:
    """Build one side's loop, warm it up, then time one window per request from the parent."""
    run, sync = {"kdjax": _kdjax_loop, "torch_eager32": _torch_loop}[side](
        pairs_lib.get_pair(pair_name), batch)
    sync(run(2))  # warm-up: compilation, allocator growth
    conn.send("ready")
    while conn.recv() == "window":
        _, (dt,) = common.seconds_per_step(run, sync, warmup=0, windows=1, steps=steps)
        conn.send(dt)


def compare(pair: pairs_lib.Pair, batch: int, *, rounds: int, steps: int) -> dict:
    # One process per side: torch and XLA thread pools in one process slow each other down.
    ctx = multiprocessing.get_context("spawn")
    workers = {}
    for side in ("kdjax", "torch_eager32"):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(side, pair.name, batch, steps, child))
        proc.start()
        workers[side] = (proc, parent)
    try:
        for _, conn in workers.values():
            conn.recv()
        windows = {side: [] for side in workers}
        loads = []
        for _ in range(rounds):
            loads.append(os.getloadavg()[0])
            for side, (_, conn) in workers.items():
                time.sleep(0.5)  # the other side's threads go idle
                conn.send("window")
                windows[side].append(conn.recv())
    finally:
        for proc, conn in workers.values():
            conn.send("stop")
            proc.join()
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
    p.add_argument("--json", default="", help="also write the result here")
    a = p.parse_args(argv)
    host = common.host_info()
    rows = []
    for name, batch in pairs_lib.parse_rows(a.rows):
        r = compare(pairs_lib.get_pair(name), batch, rounds=a.rounds, steps=a.steps)
        rows.append(r)
        print(f"{name} batch {batch}: kdjax {r['kdjax_median_images_per_s']:,.0f} images/s, "
              f"PyTorch eager {r['torch_eager32_median_images_per_s']:,.0f}; kdjax / PyTorch "
              f"{r['ratio_median']:.2f} (medians), {r['ratio_best']:.2f} (best windows); loads "
              f"{[round(v, 1) for v in r['loads']]}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"host": host, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
