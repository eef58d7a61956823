"""Disjoint teacher partitions and the training of a PATE ensemble (`kdjax train
--config.pate.teachers=N`).

Teacher k trains on the k-th of N contiguous, disjoint, near-equal slices of the training split
(`train[a_k:b_k]`, as the original PATE code partitions), with the same config otherwise, in
`WORKDIR/teacher_<k>`: each is an ordinary kdjax run whose config.json records its slice.
`WORKDIR/pate.json` records the whole partition; `kdjax distill` with `teacher.aggregation`
reads it to find the teachers and to check they are disjoint. Disjointness is what the privacy
analysis rests on: one training example is seen by one teacher, so it can move one vote.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from kdjax import data, distributed, metrics
from kdjax import plan as plan_lib

MANIFEST = "pate.json"
_SLICE = re.compile(r"^(?P<name>[A-Za-z0-9_]+)(\[(?P<start>\d*):(?P<stop>\d*)\])?$")


def parse_split(split: str) -> tuple[str, int | None, int | None] | None:
    """(name, start, stop) of "name" or "name[a:b]" (absolute indices, None where left out);
    None for any other TFDS split string."""
    m = _SLICE.match(split)
    if m is None:
        return None
    return (m["name"], int(m["start"]) if m["start"] else None,
            int(m["stop"]) if m["stop"] else None)


def split_range(split: str, num_examples: int, *, key: str = "data.train_split"
                ) -> tuple[str, int, int]:
    """(split name, start, stop) of `split` = "name" or "name[a:b]" (absolute indices)."""
    parsed = parse_split(split)
    if parsed is None:
        raise ValueError(f"{key}={split!r}: PATE partitions a split given as NAME or NAME[a:b] "
                         f"(absolute example indices), e.g. 'train' or 'train[:50000]'")
    name, start, stop = parsed
    start = start or 0
    stop = num_examples if stop is None else stop
    if not 0 <= start < stop <= num_examples:
        raise ValueError(f"{key}={split!r} selects examples {start}..{stop} of the "
                         f"{num_examples} in {name!r}")
    return name, start, stop


def partition(start: int, stop: int, num_teachers: int) -> list[tuple[int, int]]:
    """N contiguous disjoint [a, b) ranges covering [start, stop), sizes differing by <= 1."""
    if num_teachers < 1:
        raise ValueError(f"pate.teachers must be >= 1, got {num_teachers}")
    if num_teachers > stop - start:
        raise ValueError(f"pate.teachers={num_teachers} exceeds the {stop - start} training "
                         f"examples: each teacher needs at least one")
    edges = np.linspace(start, stop, num_teachers + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def teacher_workdir(workdir: str, k: int) -> str:
    return os.path.join(workdir, f"teacher_{k}")


def read_manifest(workdir: str, *, key: str = "teacher.workdir") -> dict[str, Any]:
    """The partition an ensemble was trained with, checked disjoint."""
    path = os.path.join(workdir, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{key}={workdir!r} has no {MANIFEST}: teacher.aggregation needs the workdir of a "
            f"teacher ensemble trained with `kdjax train --config.pate.teachers=N`")
    with open(path) as f:
        manifest = json.load(f)
    ranges = sorted(tuple(t["range"]) for t in manifest["teachers"])
    if any(b0 > a1 for (_, b0), (a1, _) in zip(ranges, ranges[1:])):
        raise ValueError(f"{path}: the teachers' training ranges {ranges} overlap; PATE's "
                         f"privacy analysis needs disjoint partitions")
    return manifest


def train_ensemble(config: plan_lib.RunPlan, workdir: str, *, progress: bool = True,
                   fresh: bool = False) -> dict[str, Any]:
    """Train `config.pate.teachers` teachers on disjoint slices of data.train_split.

    Each teacher is `kdjax.trainer.train` with data.train_split set to its slice and seed
    config.seed + k (so the members differ in initialisation too), in WORKDIR/teacher_<k>; a
    rerun resumes the unfinished ones and skips those with a summary.json. Returns the
    ensemble's summary (each teacher's accuracy, their mean), also written to summary.json.
    """
    from kdjax import trainer

    config = plan_lib.as_plan(config)
    n = config.pate.teachers
    if config.loss.name != "ce":
        raise ValueError(f"pate.teachers={n} trains a teacher ensemble with supervised "
                         f"training (loss.name='ce'), got loss.name={config.loss.name!r}")
    spec = data.dataset_info(config.data.name, data_dir=config.data.data_dir or None)
    name, start, stop = split_range(config.data.train_split,
                                    spec.num_examples(config.data.train_split.partition("[")[0]))
    ranges = partition(start, stop, n)
    manifest = {"teachers": [], "dataset": config.data.name, "split": name,
                "range": [start, stop], "num_teachers": n}
    os.makedirs(workdir, exist_ok=True)
    summaries = []
    for k, (a, b) in enumerate(ranges):
        # each member is an ordinary run
        sub = config.replace(pate={"teachers": 0}, data={"train_split": f"{name}[{a}:{b}]"},
                             seed=config.seed + k)
        if b - a < sub.train.batch_size:
            raise ValueError(f"teacher {k} trains on {b - a} examples, fewer than train.batch_size="
                             f"{sub.train.batch_size}: lower train.batch_size or pate.teachers")
        path = teacher_workdir(workdir, k)
        done = os.path.join(path, "summary.json")
        if os.path.isfile(done):
            with open(done) as f:
                summary = json.load(f)
        else:
            print(f"kdjax: PATE teacher {k + 1} of {n} on {sub.data.train_split} -> {path}",
                  flush=True)
            summary = trainer.train(sub, path, distill=False,
                                    progress=progress, fresh=fresh)
        summaries.append(summary)
        manifest["teachers"].append({"workdir": f"teacher_{k}", "split": sub.data.train_split,
                                     "range": [a, b], "seed": sub.seed,
                                     "eval/accuracy": summary.get("eval/accuracy")})
    accuracies = [s.get("eval/accuracy") for s in summaries]
    result = {"pate/teachers": n, "pate/examples_per_teacher": [b - a for a, b in ranges],
              "pate/teacher_accuracy": accuracies,
              "eval/accuracy": float(np.mean(accuracies)) if None not in accuracies else None,
              "model": config.model.name, "seed": config.seed}
    if distributed.is_primary():
        with open(os.path.join(workdir, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(metrics.json_safe(result), f, indent=2)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json())
    return result
