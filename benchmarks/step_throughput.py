"""The kdjax side of the suite: throughput of the fused distillation step, and what fusing buys.

For one (teacher:student pair, batch): images/s and ms/step of the fused kdjax step (teacher
forward + student forward/backward + SGD, one XLA program, data resident on the device, bf16
compute on accelerators and float32 on the CPU), for each requested number of steps per dispatch;
model FLOPs per step from XLA's cost analysis and MFU against a measured bf16 matmul peak
(accelerators only); the compiled program's memory (XLA's memory analysis) and the device's peak
where the backend reports one; and the fusion payoff, time(fused step) / [time(teacher forward
alone) + time(student train step alone)], all three measured here with steps_per_call=1. The
teacher is prepared as `kdjax distill` prepares it (kdjax.teacher: BatchNorm folded, weights in
the compute dtype); its forward as built, before that, is timed too.
Run it through the suite: `python -m benchmarks` (benchmarks/suite.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import common, pairs as pairs_lib
from kdjax import augment, models, objectives, optim, plan, sharding, teacher as teacher_lib
from kdjax.models import ModelSpec
from kdjax.step import (DeviceData, FrozenModel, Step, TrainState, compute_dtype, freeze,
                        init_train_state, make_distill_step)


def sync(tree) -> None:
    """Wait until the device has computed `tree` (the timing protocol's synchronisation)."""
    jax.block_until_ready(tree)


def bf16_peak_flops(*, windows: int = 3, steps: int = 10) -> float:
    """Measured bf16 matmul FLOP/s of device 0: the MFU denominator (what this device reaches,
    not the datasheet's figure)."""
    n = 8192
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda x: x @ x)
    dt, _ = common.seconds_per_step(lambda k: [f(a) for _ in range(k)][-1], sync, warmup=2,
                                    windows=windows, steps=steps)
    return 2 * n**3 / dt


def _model(name: str, pair: pairs_lib.Pair, seed: int, dtype) -> nnx.Module:
    base, kwargs = pairs_lib.registry_entry(name)
    return models.create_model(base, num_classes=pair.num_classes, input_shape=pair.input_shape,
                               rngs=nnx.Rngs(seed), dtype=dtype, **kwargs)


class Setup(NamedTuple):
    """Everything a fused step of one (pair, batch) is built from."""

    graphdef: nnx.GraphDef
    state0: TrainState
    tx: optax.GradientTransformation
    objective: Callable
    teacher: FrozenModel
    teacher_as_built: FrozenModel  # before kdjax.teacher.prepare: float32 weights, unfolded BN
    recipe: augment.Preprocess
    mesh: jax.sharding.Mesh
    data: DeviceData

    def fused(self, steps_per_call: int = 1) -> Step:
        return make_distill_step(self.graphdef, self.tx, self.objective, teachers=[self.teacher],
                                 preprocess=self.recipe, mesh=self.mesh, data=self.data,
                                 steps_per_call=steps_per_call)

    def fresh_state(self) -> TrainState:
        return sharding.replicate(jax.tree.map(jnp.copy, self.state0), self.mesh)  # steps donate


def setup(pair: pairs_lib.Pair, batch: int) -> Setup:
    """The models, device-resident data and optimizer of the suite's step for (pair, batch)."""
    dtype = compute_dtype("auto")
    mesh = sharding.make_mesh()
    n = batch * 8  # a small device-resident set: the in-step sampling is what real runs pay
    rng = np.random.default_rng(0)
    data = DeviceData(sharding.replicate({
        "image": rng.integers(0, 256, (n, *pair.input_shape), dtype=np.uint8),
        "label": rng.integers(0, pair.num_classes, n).astype(np.int32)}, mesh), batch)
    as_built = _model(pair.teacher, pair, 0, dtype)
    base, kwargs = pairs_lib.registry_entry(pair.teacher)
    teacher, _ = teacher_lib.prepare(as_built, ModelSpec(base, pair.num_classes, pair.input_shape,
                                                         kwargs), dtype=dtype)
    student = _model(pair.student, pair, 1, dtype)
    tx = optim.make_optimizer(plan.as_plan({"optimizer": {
        **pairs_lib.SGD, "name": "sgd", "schedule": "constant", "warmup_steps": 0}}).optimizer,
        total_steps=1)
    c = pair.input_shape[-1]
    recipe = augment.Preprocess(mean=(pairs_lib.MEAN,) * c, std=(pairs_lib.STD,) * c, flip=True)
    graphdef, state0 = init_train_state(student, tx, seed=0, num_examples=n)
    kd = objectives.logit_distillation("kd", ce_weight=pairs_lib.KD["ce_weight"],
                                       kd_weight=pairs_lib.KD["kd_weight"],
                                       temperature=pairs_lib.KD["temperature"])
    return Setup(graphdef, state0, tx, kd, freeze(teacher), freeze(as_built), recipe, mesh, data)


def stepping(step, state):
    """`run(k)`: k calls of `step`, each on the state the last one returned (donated buffers)."""

    def run(k):
        nonlocal state
        for _ in range(k):
            state = step(state)[0]
        return state

    return run


def bench_pair(pair: pairs_lib.Pair, batch: int, *, steps_per_call: Sequence[int], windows: int,
               steps: int, warmup: int = 2, peak: float | None = None) -> list[dict]:
    """One row per steps_per_call value; `steps` steps per timed window (rounded down to whole
    calls, at least one). The fusion payoff and FLOPs come from the steps_per_call=1 program."""
    su = setup(pair, batch)
    graphdef, state0, tx, teacher, recipe, mesh, data = (
        su.graphdef, su.state0, su.tx, su.teacher, su.recipe, su.mesh, su.data)

    def time_step(step, per_call: int = 1) -> tuple[float, list[float]]:
        run = stepping(step, su.fresh_state())
        dt, per_window = common.seconds_per_step(run, sync, warmup=warmup, windows=windows,
                                                 steps=max(1, steps // per_call))
        return dt / per_call, [w / per_call for w in per_window]

    rows = []
    for spc in steps_per_call:
        fused = su.fused(spc)
        compiled = fused.lower(sharding.replicate(state0, mesh)).compile()
        mem = compiled.memory_analysis()
        # The compiled program itself: calling `fused` would compile it a second time.
        dt, per_window = time_step(
            lambda s, c=compiled, f=fused: c(s, f.teachers, f.data, None), spc)
        rows.append({
            "pair": pair.name, "batch": batch, "steps_per_call": spc,
            "images_per_s": batch / dt, "ms_per_step": dt * 1e3,
            "window_ms_per_step": [w * 1e3 for w in per_window],
            # arguments + outputs + temporaries, less the donated (aliased) state
            "program_bytes": None if mem is None else (
                mem.argument_size_in_bytes + mem.output_size_in_bytes
                + mem.temp_size_in_bytes - mem.alias_size_in_bytes),
            "teacher_params": models.count_params(su.teacher_as_built.variables),  # as trained
            "student_params": models.count_params(state0.params),
        })
        if spc == 1:
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            rows[-1]["flops_per_step"] = float(cost.get("flops", 0.0)) or None
    flops = next((r.get("flops_per_step") for r in rows if r["steps_per_call"] == 1), None)

    alone = make_distill_step(graphdef, tx, objectives.supervised(), preprocess=recipe,
                              mesh=mesh, data=data)
    t_student, _ = time_step(alone)
    x = data.arrays["image"][:batch]

    def time_forward(frozen: FrozenModel) -> float:
        fwd = jax.jit(lambda v, x: nnx.merge(frozen.graphdef, v)(
            augment.preprocess(x, recipe, key=None, dtype=jnp.float32)))
        return common.seconds_per_step(lambda k: [fwd(frozen.variables, x) for _ in range(k)][-1],
                                       sync, warmup=warmup, windows=windows, steps=steps)[0]

    t_teacher, t_as_built = time_forward(teacher), time_forward(su.teacher_as_built)
    stats = jax.devices()[0].memory_stats() or {}
    for r in rows:
        dt = r["ms_per_step"] / 1e3
        r["flops_per_step"] = flops
        r["mfu"] = flops / dt / peak if flops and peak else None
        r["teacher_forward_ms"], r["student_step_ms"] = t_teacher * 1e3, t_student * 1e3
        r["teacher_forward_as_built_ms"] = t_as_built * 1e3
        r["fusion_payoff"] = dt / (t_teacher + t_student) if r["steps_per_call"] == 1 else None
        # The allocator's high-water mark of the whole process so far (GPU/TPU only).
        r["device_peak_bytes"] = stats.get("peak_bytes_in_use")
    return rows
