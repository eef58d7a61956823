"""`kdjax import --torch FACTORY`: any PyTorch module as a kdjax run (a teacher.workdir).

The run is the same as `kdjax import`'s (kdjax.interop.importer): one Orbax checkpoint at step 0,
config.json, summary.json, written whole or not at all. Its ModelSpec is
`kdjax.torchbridge:TorchModel` with the factory and its kwargs, so every reader of a run rebuilds
the module from the user's installed code (nothing is unpickled) and runs it through torchax.
Beside the checkpoint, `torch/state_dict.safetensors` keeps the weights under their PyTorch names
with the factory and kwargs in its header: what `load_state_dict` takes back.

Everything that can be wrong is refused before the directory appears: a factory that does not
import, kwargs it rejects, a file whose tensors do not fit the module (every missing, unexpected
and misshapen name listed, with both shapes), an op torchax cannot lower, an output that is not
[batch, num_classes].
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import models, taps
from kdjax.interop import importer, state_dict
from kdjax.interop.layouts import LayoutMismatchError
from kdjax.lm.models import TORCH_CAUSAL_LM
from kdjax.models import ModelSpec, count_params
from kdjax.torchbridge import bridge

__all__ = ["MODEL_NAME", "STATE_DICT_FILE", "describe", "import_torch", "load_state",
           "torch_spec"]

MODEL_NAME = models.TORCH_MODEL
STATE_DICT_FILE = os.path.join("torch", "state_dict.safetensors")


def torch_spec(factory: str, factory_kwargs: Mapping[str, Any] | None, *, num_classes: int,
               input_shape: Sequence[int]) -> ModelSpec:
    """The ModelSpec that rebuilds `factory(**factory_kwargs)`: a TorchModel classifier of
    images [H, W, C], or a TorchCausalLM of token rows [T] (num_classes = its vocabulary)."""
    name = MODEL_NAME if len(input_shape) == 3 else TORCH_CAUSAL_LM
    return ModelSpec(name=name, num_classes=int(num_classes),
                     input_shape=tuple(int(d) for d in input_shape),
                     kwargs={"factory": factory, "factory_kwargs": dict(factory_kwargs or {})})


def _fit(module_state: Mapping[str, np.ndarray], tensors: Mapping[str, np.ndarray],
         source: str, factory: str, aliases: Mapping[str, str]) -> None:
    """Refuse a state_dict that is not the module's: every difference listed."""
    # A tied weight (an LM's lm_head.weight and embed_tokens.weight) is one tensor under several
    # names, which files keep once (Hugging Face's safetensors drop the head's name).
    tied = [{name, *[a for a, n in aliases.items() if n == name]}
            for name in set(aliases.values())]
    covered = {n for group in tied if group & set(tensors) for n in group}
    missing = sorted(set(module_state) - set(tensors) - covered)
    unexpected = sorted(set(tensors) - set(module_state))
    shapes = sorted(k for k in set(module_state) & set(tensors)
                    if tuple(module_state[k].shape) != tuple(tensors[k].shape))
    if not (missing or unexpected or shapes):
        return
    lines = [f"missing: {k} {tuple(module_state[k].shape)}" for k in missing]
    lines += [f"unexpected: {k} {tuple(tensors[k].shape)}" for k in unexpected]
    lines += [f"wrong shape: {k}: the file has {tuple(tensors[k].shape)}, the module "
              f"{tuple(module_state[k].shape)}" for k in shapes]
    raise LayoutMismatchError(
        f"{source} does not fit the module {factory} builds ({len(missing)} missing, "
        f"{len(unexpected)} unexpected, {len(shapes)} of the wrong shape):\n  "
        + "\n  ".join(lines)
        + "\nbuild the same architecture (--torch-kwargs, e.g. its num_classes) or pass its "
          "own state_dict")


def load_state(model: bridge.TorchModel, tensors: Mapping[str, np.ndarray]) -> list[str]:
    """Put a state_dict's tensors into the model's variables (a tied tensor under whichever of its
    names it has); returns notes on dtype casts."""
    aliases = bridge.tied_aliases(model.module)
    notes = []
    by_name = {}
    for group in (model.params, model.buffers):
        for path, var in nnx.iter_graph(group):
            if isinstance(var, nnx.Variable):
                by_name[".".join(map(str, path))] = var
    for name, value in tensors.items():
        var = by_name.get(name, by_name.get(aliases.get(name, "")))
        if var is None:
            continue
        dtype = var[...].dtype
        # int64 counters become int32 without jax_enable_x64: expected, not worth a note.
        if value.dtype != dtype and np.issubdtype(value.dtype, np.floating):
            notes.append(f"{name}: {value.dtype} cast to {dtype}")
        var[...] = jnp.asarray(value.astype(dtype))
    return notes


def _normalization(module, given, what: str, channels: int) -> tuple[float, ...]:
    """The argument, else the mean/std a timm module's pretrained_cfg records."""
    if given is None:
        cfg = getattr(module, "pretrained_cfg", None) or {}
        given = cfg.get(what)
        if given is None or len(given) != channels:
            raise ValueError(f"--{what} is required with --torch for this module (the per-channel "
                             f"input normalisation its weights were trained with, in [0, 1] "
                             f"units; ImageNet's: --mean 0.485,0.456,0.406 --std "
                             f"0.229,0.224,0.225)")
    return importer.channel_values(given, f"--{what}", channels)


def import_torch(factory: str, *, out: str, num_classes: int, input_shape: Sequence[int],
                 factory_kwargs: Mapping[str, Any] | None = None, source: str | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 dataset: str | None = None, key: str | None = None,
                 data_dir: str | None = None) -> importer.ImportReport:
    """Build `factory(**factory_kwargs)`, load `source` (a state_dict .pth/.safetensors; default:
    the weights the factory made) and write it as a run in `out`.

    Raises ValueError (bad arguments, a factory that does not import or rejects its kwargs, an
    output that is not [batch, num_classes]), LayoutMismatchError (weights that do not fit) and
    bridge.TorchOpError (an op torchax cannot lower), each before anything is written.
    """
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise ValueError(f"--out {out!r} already exists; pick a new path (an import never "
                         f"overwrites anything)")
    if input_shape is None or len(input_shape) not in (1, 3) or min(input_shape) < 1:
        raise ValueError(f"--input-shape is required with --torch: H,W,C (three positive ints) "
                         f"for an image model, or T (the sequence length) for a causal language "
                         f"model; got {input_shape}")
    if num_classes is None or num_classes < 1:
        raise ValueError(f"--num-classes N (>= 1; a language model's vocabulary size) is "
                         f"required with --torch, got {num_classes}")
    if dataset is None:
        raise ValueError("--data NAME is required with --torch (the data.name `kdjax eval "
                         "--workdir` evaluates the run on), e.g. --data cifar10")
    lm = len(input_shape) == 1
    spec = torch_spec(factory, factory_kwargs, num_classes=num_classes, input_shape=input_shape)
    bridge.build_module(factory, factory_kwargs)  # its errors name --torch / --torch-kwargs
    model = spec.build()
    if lm:
        if mean is not None or std is not None:
            raise ValueError("--mean/--std normalise images; a language model reads token ids")
        mean_, std_ = (), ()
    else:
        mean_ = _normalization(model.module, mean, "mean", spec.input_shape[-1])
        std_ = _normalization(model.module, std, "std", spec.input_shape[-1])
        if min(std_) <= 0:
            raise ValueError(f"--std must be positive per channel, got {std_}")
    notes: list[str] = []
    fmt, sha = "factory", ""
    if source is not None:
        source = os.path.abspath(source)
        loaded = state_dict.load(source, key=key)
        module_state = {k: v.detach().cpu().numpy() for k, v in model.module.state_dict().items()}
        _fit(module_state, loaded.tensors, source, factory, bridge.tied_aliases(model.module))
        notes = [*loaded.notes, *load_state(model, loaded.tensors)]
        fmt, sha = loaded.format, state_dict.sha256(source)
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    example = (jax.ShapeDtypeStruct((2, *spec.input_shape), jnp.int32) if lm
               else jax.ShapeDtypeStruct((2, *spec.input_shape), jnp.float32))
    shape = jax.eval_shape(lambda p, s, x: nnx.merge(graphdef, p, s)(x), params, model_state,
                           example).shape
    if lm and tuple(shape) != (2, spec.input_shape[0], spec.num_classes):
        raise ValueError(f"--torch {factory}: a causal LM's output of shape {tuple(shape)} on "
                         f"tokens [2, {spec.input_shape[0]}] is not [batch, length, "
                         f"--num-classes={spec.num_classes}]; pass its vocabulary size")
    if not lm:
        taps.check_logits(shape, spec.num_classes, model=factory, batch=2)
    report = importer.ImportReport(
        out=out, spec=spec, layout="torch", source=source or factory, sha256=sha, format=fmt,
        num_params=count_params(params), preprocess={"mean": list(mean_), "std": list(std_)},
        data=dataset, notes=tuple(notes), data_dir=os.path.abspath(data_dir) if data_dir else "")
    weights = model.state_dict()
    torch_record = {"factory": factory, "kwargs": model.factory_kwargs}

    def write_state_dict(tmp: str) -> None:
        os.makedirs(os.path.join(tmp, "torch"))
        state_dict.save(os.path.join(tmp, STATE_DICT_FILE), weights, format="safetensors",
                        metadata={"torch": torch_record})

    importer.write_run(report, params, model_state, factory, torch=torch_record,
                        extra_files=write_state_dict)
    return report


def describe(report: importer.ImportReport) -> str:
    kwargs = report.spec.kwargs
    return (f"imported {kwargs['factory']}(**{json.dumps(kwargs['factory_kwargs'])}) with "
            f"weights from {report.source} ({report.num_params:,} parameters, "
            f"{report.spec.num_classes} classes, input {tuple(report.spec.input_shape)}, "
            f"normalised with mean {report.preprocess['mean']} std {report.preprocess['std']}) "
            f"into {report.out}")

