"""`kdjax export --format safetensors|torch|stablehlo|onnx|litert`: a run's student elsewhere.

An export is a directory (written into a temporary one renamed when complete, like kdjax's own
format):
  model.safetensors | model.pth | model.stablehlo | model.onnx | model.tflite   the student
  kdjax_model.json                                   ModelSpec, layout, normalisation, source
  README.md                                          how to load and run it
safetensors and torch hold the student's state_dict in a layout (`kdjax.interop.layouts`): the one
it was imported in, else its architecture's reference (torchvision for resnet18/34/50, crd for
the CIFAR zoo, "pytorch" for the zoo's MLPs and small CNNs, with a generated model.py defining
their nn.Module: kdjax.interop.torch_code); so `model.load_state_dict(...)` into that class gives
the same logits as the student. A model with none of these (your own, a Linen one) has only the
"kdjax" layout, NNX's names and array layouts, which no PyTorch module loads: `--format torch` is
refused for it, naming the formats that serve it, and `--format safetensors` writes its raw NNX
arrays for `kdjax import`. The .pth is written without torch (the zip format
`torch.load(path, weights_only=True)` reads). stablehlo is the inference function itself
(`kdjax.interop.stablehlo`), runnable with jax alone; onnx is that function as an ONNX graph
(`kdjax.interop.onnx`), checked in ONNX Runtime against kdjax's logits before it is written;
litert is that function as a LiteRT (TFLite) model (`kdjax.interop.litert`), checked the same
way in the LiteRT interpreter.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
from flax import nnx

import kdjax
from kdjax.interop import layouts, litert, onnx, stablehlo, state_dict, torch_code
from kdjax.models import ModelSpec

__all__ = ["FORMATS", "export"]

FORMATS = ("safetensors", "torch", "stablehlo", "onnx", "litert")
_FILES = {"safetensors": "model.safetensors", "torch": "model.pth", "stablehlo": "model.stablehlo",
          "onnx": "model.onnx", "litert": litert.FILE}
# The formats that hold the whole inference function (uint8 images in, logits out), not a
# state_dict: no --layout.
FUNCTIONS = ("stablehlo", "onnx", "litert")
META_FILE = "kdjax_model.json"


def _run_layout(run: dict[str, Any], model: nnx.Module) -> str:
    imported = run.get("imported") or {}
    layout = imported.get("layout")
    if layout and layout in layouts.layouts_for(model):
        return layout
    return layouts.default_layout(model)


def _constructor(spec: ModelSpec, layout: str, out: str) -> str:
    """The PyTorch lines that build the reference model the state_dict loads into."""
    if layout == "torchvision":
        return (f"import torchvision\nmodel = torchvision.models.{spec.name}"
                f"(num_classes={spec.num_classes})\n")
    if layout == "crd":
        key = "MobileNetV2" if spec.name == "mobilenetv2" else spec.name
        kwargs = (f"  # built here with model.kwargs={spec.kwargs}: construct the matching "
                  f"RepDistiller class instead" if spec.kwargs else "")
        return ("# RepDistiller's models/ package (github.com/HobbitLong/RepDistiller) on "
                "sys.path\nfrom models import model_dict\n"
                f"model = model_dict[{key!r}](num_classes={spec.num_classes}){kwargs}\n")
    return (f"import sys\nsys.path.insert(0, {out!r})  # {torch_code.FILE}, written beside it\n"
            "from model import build\nmodel = build()\n")


def _readme(fmt: str, path: str, spec: ModelSpec, layout: str | None, reference: str | None,
            preprocess: dict, source: str, checked: dict[str, Any] | None = None) -> str:
    head = f"# kdjax export ({fmt}): {spec.name}, {spec.num_classes} classes\n\nFrom {source}.\n\n"
    if fmt == "onnx":
        return (head + f"`{_FILES[fmt]}` is the inference function as an ONNX graph (opset "
                f"{onnx.OPSET}): uint8 images \"{onnx.INPUT}\" [N, "
                f"{', '.join(map(str, spec.input_shape))}] in (any N; normalised inside with mean "
                f"{preprocess['mean']}, std {preprocess['std']}), float32 \"{onnx.OUTPUT}\" "
                f"[N, {spec.num_classes}] out. {onnx.describe(checked)}\n\n"
                f"```python\n{onnx.snippet(path, spec)}```\n")
    if fmt == "litert":
        return (head + f"`{_FILES[fmt]}` is the inference function as a LiteRT (TFLite) model: "
                f"uint8 images [N, {', '.join(map(str, spec.input_shape))}] in (N dynamic: "
                f"resize the input to your batch; normalised inside with mean "
                f"{preprocess['mean']}, std {preprocess['std']}), float32 logits "
                f"[N, {spec.num_classes}] out. {litert.describe(checked)}\n\n"
                f"```python\n{litert.snippet(path, spec)}```\n")
    if fmt == "stablehlo":
        return (head + f"`{_FILES[fmt]}` is the whole inference function as serialized StableHLO "
                f"(jax.export, lowered for {', '.join(stablehlo.PLATFORMS)}): uint8 images "
                f"[N, {', '.join(map(str, spec.input_shape))}] in (any N; normalised inside with "
                f"mean {preprocess['mean']}, std {preprocess['std']}), float32 logits out. It "
                f"needs jax alone:\n\n```python\n{stablehlo.snippet(path, spec)}```\n")
    if layout == "kdjax":
        return (head + f"`{_FILES[fmt]}` holds the student's arrays by their NNX paths, as NNX "
                f"holds them (convolution kernels HWIO, linear kernels [in, out]): not a PyTorch "
                f"state_dict, since no PyTorch module defines this model. Read it with "
                f"`safetensors.numpy.load_file(\"{path}\")`, or back into kdjax with "
                f"`kdjax import --from {path} --model {spec.name} --out RUN`. To serve it, "
                f"export `--format stablehlo`.\n")
    imports, load = _loader(fmt, path)
    return (head + f"`{_FILES[fmt]}` is the student's state_dict in the {layout!r} layout"
            + (f" of {reference}" if reference else "") + ".\n\n```python\n" + imports
            + _constructor(spec, layout, os.path.dirname(path)) + load + "model.eval()\n"
            + _input_comment(spec, preprocess) + "```\n")


def _loader(fmt: str, path: str) -> tuple[str, str]:
    """The import and `load_state_dict` lines of a README for `path` in `fmt`."""
    if fmt == "safetensors":
        return ("import torch\nfrom safetensors.torch import load_file\n",
                f"model.load_state_dict(load_file(\"{path}\"))\n")
    return ("import torch\n",
            f"model.load_state_dict(torch.load(\"{path}\", weights_only=True))\n")


def _input_comment(spec: ModelSpec, preprocess: dict) -> str:
    h, w, c = spec.input_shape
    return (f"# inputs: float32 [N, {c}, {h}, {w}] in [0, 1], normalised per channel with\n"
            f"# mean={preprocess['mean']}, std={preprocess['std']}\n")


def check(fmt: str, layout: str | None) -> None:
    """Refuse a format or format/layout pair before any checkpoint is read."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be kdjax or one of {FORMATS}, got {fmt!r}")
    if fmt in FUNCTIONS and layout is not None:
        raise ValueError(f"--layout names a state_dict layout; --format {fmt} has none")
    if fmt == "onnx":
        onnx.require()
    if fmt == "litert":
        litert.require()
    if layout is not None and layout not in layouts.LAYOUTS:
        raise ValueError(f"--layout must be one of {layouts.LAYOUTS}, got {layout!r}")
    if fmt == "torch" and layout == "kdjax":
        raise ValueError("--format torch --layout kdjax: a .pth is for PyTorch's "
                         "load_state_dict, and no PyTorch module loads the kdjax layout (NNX "
                         "names, HWIO and [in, out] kernels); drop --layout to write the model's "
                         "PyTorch layout, or write its NNX arrays with --format safetensors "
                         "--layout kdjax")


def _refuse_torch(spec: ModelSpec) -> None:
    raise ValueError(f"--format torch: PyTorch has no module for the model {spec.name!r}, so a "
                     f".pth of its arrays would load into nothing (kdjax writes PyTorch layouts "
                     f"for torchvision's and RepDistiller's architectures and, with a generated "
                     f"model.py, its own MLPs and small CNNs); export it with --format stablehlo "
                     f"(the whole inference function: runs with jax alone, or any XLA runtime), "
                     f"with kdjax's own format (no --format; kdjax.export.load), or its raw NNX "
                     f"arrays with --format safetensors --layout kdjax")


def _module_constructor(factory: str, kwargs: dict[str, Any]) -> str:
    """The PyTorch lines that rebuild a torch-defined student's module from its factory."""
    module_name, _, attr = factory.partition(":")
    return f"import {module_name}\nmodel = {module_name}.{attr}(**{kwargs!r})\n"


def _torch_defined(model: nnx.Module) -> bool:
    """A PyTorch module run through torchax (kdjax.torchbridge.TorchModel): its state_dict is
    its own, by its own names, and it loads into the class its factory builds."""
    return callable(getattr(model, "state_dict", None)) and hasattr(model, "factory")


def export(model: nnx.Module, spec: ModelSpec, run: dict[str, Any], out: str, *, fmt: str,
           layout: str | None, step: int, source: str,
           integers: onnx.Integers | None = None, images: np.ndarray | None = None) -> str:
    """Write `model` (the student of `run`'s checkpoint `step`) to the new directory `out`.

    For onnx, `integers` are a weight-only int8 student's stored integer weights, `images` a
    W8A8 student's calibration images (kdjax.interop.onnx.build)."""
    check(fmt, layout)
    if fmt not in FUNCTIONS and _torch_defined(model):
        if layout is not None:
            raise ValueError(f"--layout {layout}: the student is the PyTorch module "
                             f"{model.factory} builds, written in its own state_dict naming; "
                             f"drop --layout")
        return _export_module(model, spec, run, out, fmt=fmt, source=source)
    if fmt not in FUNCTIONS:
        layout = layout or _run_layout(run, model)
        layouts.entries(model, layout)  # refuses a layout this architecture has no naming for
        if fmt == "torch" and layout == "kdjax":
            _refuse_torch(spec)
    preprocess = run["preprocess"]
    reference = layouts.reference_class(model, layout, spec.name) if layout else None
    path = os.path.join(out, _FILES[fmt])
    meta = {"format": f"kdjax.export.{fmt}/1", "kdjax_version": kdjax.__version__,
            "model": spec.to_json(), "layout": layout, "reference": reference,
            "preprocess": preprocess, "data": run["config"]["data"]["name"],
            "source": source}
    checked = None
    if fmt == "onnx":  # converted and checked in ONNX Runtime before anything is written
        model_bytes, checked = onnx.build(model, spec, preprocess, integers, images=images)
        meta["onnx"] = checked
    elif fmt == "litert":  # converted and checked in the LiteRT interpreter, likewise
        model_bytes, checked = litert.build(model, spec, preprocess)
        meta["litert"] = checked
    with new_directory(out) as tmp:
        target = os.path.join(tmp, _FILES[fmt])
        if fmt in ("onnx", "litert"):
            with open(target, "wb") as f:
                f.write(model_bytes)
        elif fmt == "stablehlo":
            meta["platforms"] = stablehlo.export(model, spec, preprocess, target)
        else:
            tensors = layouts.to_state_dict(model, layout, num_batches_tracked=step)
            state_dict.save(target, tensors, format=fmt, metadata={
                state_dict.METADATA_KEY: {k: meta[k] for k in ("model", "layout", "preprocess",
                                                             "data")}})
            if layout == "pytorch":
                with open(os.path.join(tmp, torch_code.FILE), "w") as f:
                    f.write(torch_code.source(model, spec.name))
        _write_meta(tmp, meta, _readme(fmt, path, spec, layout, reference, preprocess, source,
                                       checked))
    return out


@contextlib.contextmanager
def new_directory(out: str) -> Iterator[str]:
    """A temporary directory beside `out`, renamed to `out` when the block completes and
    removed when it raises: a path that exists is a whole export."""
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=f".{os.path.basename(out)}.tmp-")
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the export private to this user
        yield tmp
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_meta(tmp: str, meta: dict[str, Any], readme: str) -> None:
    with open(os.path.join(tmp, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(readme)


def _export_module(model: nnx.Module, spec: ModelSpec, run: dict[str, Any], out: str, *,
                   fmt: str, source: str) -> str:
    """A torch-defined student's state_dict, for `load_state_dict` into its factory's module."""
    factory, kwargs = model.factory, dict(model.factory_kwargs)
    reference = f"{factory}(**{json.dumps(kwargs)})"
    preprocess = run["preprocess"]
    meta = {"format": f"kdjax.export.{fmt}/1", "kdjax_version": kdjax.__version__,
            "model": spec.to_json(), "layout": "module", "reference": reference,
            "torch": {"factory": factory, "kwargs": kwargs}, "preprocess": preprocess,
            "data": run["config"]["data"]["name"], "source": source}
    path = os.path.join(out, _FILES[fmt])
    with new_directory(out) as tmp:
        state_dict.save(os.path.join(tmp, _FILES[fmt]), model.state_dict(), format=fmt,
                        metadata={state_dict.METADATA_KEY: {
                            k: meta[k] for k in ("model", "torch", "preprocess", "data")}})
        imports, load = _loader(fmt, path)
        readme = (f"# kdjax export ({fmt}): {reference}, {spec.num_classes} classes\n\n"
                  f"From {source}.\n\n`{_FILES[fmt]}` is the student's state_dict, by the names "
                  f"of the PyTorch module its factory builds:\n\n```python\n{imports}"
                  f"{_module_constructor(factory, kwargs)}{load}model.eval()\n"
                  + _input_comment(spec, preprocess) + "```\n")
        _write_meta(tmp, meta, readme)
    return out
