"""kdjax: knowledge distillation in JAX/Flax, with the teacher and the student in one fused step.

`import kdjax.losses` needs only jax and optax; the step's names below load on first use, so the
losses stay importable into any training code without pulling in Flax, Orbax or TFDS.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "make_step": "kdjax.step",
    "StepParts": "kdjax.step",
    "make_distill_step": "kdjax.step",
    "make_eval_step": "kdjax.step",
    "init_train_state": "kdjax.step",
    "freeze": "kdjax.step",
    "compute_dtype": "kdjax.step",
    "TrainState": "kdjax.step",
    "FrozenModel": "kdjax.step",
    "DeviceData": "kdjax.step",
    "Distillee": "kdjax.distillee",
    "supervised": "kdjax.objectives",
    "logit_distillation": "kdjax.objectives",
    "feature_distillation": "kdjax.objectives",
    "mutual_learning": "kdjax.objectives",
    "build_connectors": "kdjax.objectives",
    "teacher_free": "kdjax.objectives",
    "byot": "kdjax.objectives",
    "build_exits": "kdjax.objectives",
    "build_temperature": "kdjax.objectives",
    "create_model": "kdjax.models",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kdjax' has no attribute {name!r}")


__all__ = sorted(_LAZY)
