"""Any Flax NNX model in the fused step: logits from `__call__`, features tapped by module path.

A zoo model (kdjax.models.FeatureModel) names its features in `features()`; any other NNX module
only has to return logits [B, classes] from `__call__(x)`. Feature methods tap a sub-module of
either kind by its attribute path, the path `nnx.iter_graph` walks with dots between the parts
("layer3", "blocks.2.mlp"; shell-style wildcards match, "blocks.*.mlp", but must pick exactly one
module). The model is never edited: for the duration of one forward pass the tapped instance's
class is swapped for a subclass whose `__call__` records what it returns, and swapped back after.
This runs while `jax.jit` traces the step, so a tap is an ordinary value of the one compiled
program (unused ones are dead code) and nothing happens on the host per step.

Why not Flax's `nnx.capture(..., method_outputs=...)`: it patches the methods of every module
class, globally, for every instance, and only methods a class defines itself, so a tap on a
subclass of nnx.Linear (which inherits `__call__`) would record nothing. The swap here touches
only the instances named, inherited `__call__`s included.

Train/eval mode: a model whose `__call__` takes `train` gets it (the zoo's convention); any other
is switched with NNX's own `Module.train()` / `Module.eval()` (Dropout's `deterministic`,
BatchNorm's `use_running_average`) on the trace-local copy the step merges, never on the
caller's model. A Linen module wrapped by `nnx.bridge.ToNNX` gets `train` if its `__call__` takes
it, and its `batch_stats` collection is mutable while training.
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import jax
from flax import nnx

LOGITS = "logits"


def module_paths(model: nnx.Module) -> dict[str, nnx.Module]:
    """Every sub-module of `model` by its dotted attribute path (the model itself is "")."""
    return {".".join(str(p) for p in path): node for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Module)}


def native_features(model: nnx.Module) -> tuple[str, ...]:
    """The feature names a model's own `features()` returns (the zoo's), () for any other."""
    return tuple(getattr(model, "feature_names", ())) if hasattr(model, "features") else ()


def find(model: nnx.Module, pattern: str, *, what: str = "tap") -> tuple[str, nnx.Module]:
    """The one sub-module whose path matches `pattern` (a dotted path, wildcards allowed).

    `what` names where the pattern came from (a config key) for the error messages.
    """
    paths = {p: m for p, m in module_paths(model).items() if p}
    if pattern in paths:
        return pattern, paths[pattern]
    matches = sorted(p for p in paths if fnmatch.fnmatchcase(p, pattern))
    if len(matches) == 1:
        return matches[0], paths[matches[0]]
    name = type(model).__name__
    if not matches:
        listing = sorted(paths, key=lambda p: (p.count("."), p))
        shown = ", ".join(repr(p) for p in listing[:40]) + (" ..." if len(listing) > 40 else "")
        native = native_features(model)
        also = f"; its own feature names: {list(native)}" if native else ""
        raise ValueError(f"{what} {pattern!r} matches no module of {name}; tap one of its module "
                         f"paths: {shown}{also}")
    raise ValueError(f"{what} {pattern!r} matches {len(matches)} modules of {name}: {matches}; "
                     f"name exactly one of them")


def _linen_takes_train(model: nnx.bridge.ToNNX) -> bool:
    return "train" in inspect.signature(type(model.to_nnx__module).__call__).parameters


def call(model: nnx.Module, x: jax.Array, *, train: bool) -> Any:
    """`model(x)` in training or inference mode (see the module docstring for how)."""
    if isinstance(model, nnx.bridge.ToNNX):
        kwargs: dict[str, Any] = {"train": train} if _linen_takes_train(model) else {}
        if train and jax.tree.leaves(nnx.state(model, nnx.BatchStat)):
            kwargs["mutable"] = ["batch_stats"]  # Linen's collection of BatchStat variables
        return model(x, **kwargs)
    if "train" in inspect.signature(type(model).__call__).parameters:
        return model(x, train=train)
    model.train() if train else model.eval()
    return model(x)


@contextlib.contextmanager
def _recording(modules: dict[str, nnx.Module]) -> Iterator[dict[str, list]]:
    """While active, each module's outputs are appended to `recorded[path]`."""
    recorded: dict[str, list] = {path: [] for path in modules}
    swapped = []
    try:
        for path, module in modules.items():
            cls = type(module)

            def record(self, *args, _cls=cls, _out=recorded[path], **kwargs):
                out = _cls.__call__(self, *args, **kwargs)
                _out.append(out)
                return out

            # type(cls) is Flax's module metaclass; the subclass only overrides __call__.
            tapped = type(cls)(cls.__name__, (cls,), {"__call__": record,
                                                      "__module__": cls.__module__,
                                                      "__qualname__": cls.__qualname__})
            object.__setattr__(module, "__class__", tapped)
            swapped.append((module, cls))
        yield recorded
    finally:
        for module, cls in swapped:
            object.__setattr__(module, "__class__", cls)


def features(model: nnx.Module, x: jax.Array, *, train: bool, taps: Sequence[str] = (),
             what: str = "tap") -> dict[str, Any]:
    """The model's features: its own `features()` dict (zoo models) or {"logits": model(x)},
    plus the output of each sub-module named in `taps` that is not a feature name already.

    Raises ValueError naming the tap (and `what`, its config key) when it matches no module or
    several, or when the module does not run exactly once per forward pass.
    """
    native = native_features(model)
    wanted = [t for t in dict.fromkeys(taps) if t not in native and t != LOGITS]
    modules = dict(find(model, t, what=what) for t in wanted)
    by_pattern = dict(zip(wanted, modules))
    with _recording(modules) as recorded:
        out = (dict(model.features(x, train=train)) if native
               else {LOGITS: call(model, x, train=train)})
    for pattern, path in by_pattern.items():
        calls = recorded[path]
        if len(calls) != 1:
            raise ValueError(f"{what} {pattern!r}: the module {path!r} of {type(model).__name__} "
                             f"ran {len(calls)} times in one forward pass; tap a module that runs "
                             f"exactly once (a shared module's outputs are ambiguous)")
        out[pattern] = calls[0]
    return out


def check_logits(shape: Sequence[int], num_classes: int, *, model: str, batch: int) -> None:
    """Refuse a model whose output is not [batch, num_classes], naming both shapes."""
    if tuple(shape) != (batch, num_classes):
        raise ValueError(
            f"the model {model} returns an output of shape {tuple(shape)} for a batch of "
            f"{batch} images, but kdjax needs logits of shape [batch, classes] = "
            f"{(batch, num_classes)}; make its __call__(x) return one row of {num_classes} class "
            f"scores per image (set model.num_classes, or the model's own class count, to match "
            f"the data)")
