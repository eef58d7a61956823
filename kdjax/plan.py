"""TEMPORARY shim until the typed plan lands (issue20-plan)."""
from __future__ import annotations

from typing import Any

import ml_collections

from kdjax import config as config_lib


class RunPlan:
    def __init__(self, config):
        object.__setattr__(self, "_c", config)

    def __getattr__(self, k):
        return getattr(self._c, k)

    def to_json(self) -> str:
        return config_lib.to_json(self._c)


Data = Model = LM = Any


def as_plan(x) -> RunPlan:
    if isinstance(x, RunPlan):
        return x
    return RunPlan(config_lib.validate(x))


def read_run(workdir: str) -> RunPlan:
    import os
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {workdir!r} is not a kdjax workdir (train a "
                                f"model there first with `kdjax train`)")
    with open(path) as f:
        return RunPlan(config_lib.from_json(f.read()))


def diff(old, new) -> list[str]:
    return config_lib.diff(old, new._c if isinstance(new, RunPlan) else new)


def with_teacher(plan: RunPlan, workdir: str) -> RunPlan:
    c = ml_collections.ConfigDict(plan._c.to_dict())
    c.teacher.update(workdir=workdir, workdirs=(), weights=())
    return RunPlan(config_lib.validate(c))


def replace(plan: RunPlan, **sections: dict) -> RunPlan:
    c = ml_collections.ConfigDict(plan._c.to_dict())
    for name, changes in sections.items():
        c[name].update(changes)
    return RunPlan(config_lib.validate(c))
