"""What every benchmark shares: the timing protocol and the description of the machine it ran on.

Kept free of jax and torch imports, so that the PyTorch peer (benchmarks/torch_peer.py) times its
loop with exactly the protocol the kdjax side uses, in a process that never imports jax.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

from kdjax.host import cpu_name  # noqa: F401  (benchmarks call common.cpu_name)


def seconds_per_step(run: Callable[[int], Any], sync: Callable[[Any], None], *, warmup: int,
                     windows: int, steps: int) -> tuple[float, list[float]]:
    """Median seconds per step over `windows` timed windows of `steps` steps each.

    `run(n)` runs n steps and returns something `sync` can wait on (the last state, or None): the
    clock stops only once the device has finished the window's work, so asynchronous dispatch
    (JAX, CUDA) cannot make a window look shorter than it was. `warmup` steps run first, untimed
    (compilation, autotuning, allocator growth). The median, not the mean or the best, because the
    machines these run on may be shared: one disturbed window moves it little.
    """
    if windows < 1 or steps < 1:
        raise ValueError(f"windows and steps must be >= 1, got windows={windows} steps={steps}")
    if warmup:
        sync(run(warmup))
    per_step = []
    for _ in range(windows):
        t0 = time.perf_counter()
        sync(run(steps))
        per_step.append((time.perf_counter() - t0) / steps)
    return statistics.median(per_step), per_step


def host_info() -> dict[str, Any]:
    """The host side of a result's provenance: CPU, cores, Python, date and the load average.

    The load average is the 1-minute figure at the moment of the call; benchmarks record it before
    and after their timed work, since a shared machine's other jobs slow every number down.
    """
    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_average_1min": os.getloadavg()[0]}


def write_results(stem: str, result: dict[str, Any], markdown: Callable[[dict[str, Any]], str]
                  ) -> None:
    """`result` as benchmarks/results/<stem>.json and its `markdown` as <stem>.md (printed)."""
    base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", stem)
    os.makedirs(os.path.dirname(base), exist_ok=True)
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=2)
    text = markdown(result)
    with open(base + ".md", "w") as f:
        f.write(text)
    print(text)
