"""Teacher placement on one device: the fused step with the teacher's variables as they are
(kdjax.step.place_teachers) against the same variables placed with a replicated NamedSharding
(what the image step did before the one step builder), interleaved windows of 20 steps.

    python -m benchmarks.teacher_placement
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax import models, objectives, sharding
from kdjax.step import DeviceData, freeze, init_train_state, make_distill_step, FrozenModel
mesh = sharding.make_mesh()


def bench(t_name: str, s_name: str, shape: tuple, B: int = 128, steps: int = 20,
          windows: int = 5) -> None:
    """Print both placements' ms/step medians and windows for one teacher->student pair."""
    rng = np.random.default_rng(0)
    n = B * 8
    data = DeviceData({"image": jnp.asarray(rng.integers(0, 256, (n, *shape), dtype=np.uint8)),
                       "label": jnp.asarray(rng.integers(0, 10, n).astype(np.int32))}, B)
    teacher = freeze(models.ModelSpec(t_name, 10, shape).build(0))
    placed = FrozenModel(teacher.graphdef, sharding.put(teacher.variables, sharding.replicated(mesh)))
    obj = objectives.logit_distillation("kd", ce_weight=0.1, kd_weight=0.9, temperature=4.0)
    res = {}
    runs = {}
    for name, t in (("as_is", teacher), ("named", placed)):
        tx = optax.sgd(0.01)
        g, st = init_train_state(models.ModelSpec(s_name, 10, shape).build(1), tx, seed=0, num_examples=n)
        step = make_distill_step(g, tx, obj, teachers=(t,), data=data, mesh=mesh)
        st, m = step(st); jax.block_until_ready(st)
        runs[name] = [step, st]; res[name] = []
    for w in range(windows):
        for name in runs:
            step, st = runs[name]
            t0 = time.perf_counter()
            for _ in range(steps):
                st, m = step(st)
            jax.block_until_ready(st)
            res[name].append((time.perf_counter() - t0) / steps * 1e3)
            runs[name][1] = st
    print(t_name, s_name, {k: f"median {np.median(v):.2f} ms/step ({', '.join(f'{x:.1f}' for x in v)})" for k, v in res.items()}, flush=True)
if __name__ == "__main__":
    bench("mlp_1200", "mlp_tiny", (28, 28, 1))
    bench("cnn_small", "cnn_tiny", (28, 28, 1))
