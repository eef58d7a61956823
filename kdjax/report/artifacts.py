"""What `kdjax report` measures: an `Artifact`, read from a path by the loader that knows its
format.

An Artifact is format-free: a pure, jittable `apply(variables, images) -> logits` (uint8 images
in, preprocessing included), the arrays it takes, the parameters counted as the model's size, the
files that hold those arrays on disk, and what is known about its data and its teacher. Two
formats are built in, a trained run (a workdir with checkpoints, also a teacher imported into
one) and a `kdjax export`; `register_loader` adds another (safetensors, StableHLO, a sparse or
integer export) without touching the report.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import augment, checkpoint, export, taps
from kdjax.compress import encode
from kdjax.models import ModelSpec

Apply = Callable[[Any, jax.Array], jax.Array]


@dataclasses.dataclass
class Artifact:
    """A model ready to measure.

    Attributes:
      path: where it was read from (absolute).
      kind: its format ("run", "export", or a registered loader's name).
      apply: ``apply(variables, images) -> logits``: uint8 ``[B, H, W, C]`` images in, float
        ``[B, num_classes]`` logits out, preprocessing included; pure and jittable.
      variables: the pytree of arrays `apply` takes (parameters and statistics).
      params: the trainable parameters' arrays as stored (counted as "parameters"; integer or
        sparse formats give their stored arrays here).
      stored_files: files and folders holding its arrays on disk (their bytes are its size).
      input_shape: ``(H, W, C)``; num_classes: outputs.
      data: what is known of its data: a run's `data` config section (``name``,
        ``train_split``, ``eval_split``, ``data_dir``, ``image_size``, ...; any may be missing).
      teacher: path of the run or export that taught it, when known.
      spec: its ModelSpec when it has one; details: anything else worth reporting (step, source).
      module, normalization: the NNX model `apply` runs and its input's {"mean", "std"}, where
        the format has them (runs and kdjax exports): what `kdjax export --format onnx` would
        convert, for `kdjax report --runtime` to time that very graph.
    """

    path: str
    kind: str
    apply: Apply
    variables: Any
    params: Any
    stored_files: tuple[str, ...]
    input_shape: tuple[int, ...]
    num_classes: int
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    teacher: str | None = None
    spec: ModelSpec | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    module: nnx.Module | None = None
    normalization: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Loader:
    kind: str
    detect: Callable[[str], bool]
    load: Callable[..., Artifact]


_LOADERS: list[Loader] = []


def register_loader(kind: str, detect: Callable[[str], bool], load: Callable[..., Artifact],
                    *, first: bool = True) -> None:
    """Teach `load_artifact` a format: `detect(path)` says whether a path is one, and
    `load(path, step=...)` reads it into an Artifact. Registered loaders are tried before the
    built-in ones (`first=False`: after them); a kind registered again replaces the old one."""
    _LOADERS[:] = [entry for entry in _LOADERS if entry.kind != kind]
    entry = Loader(kind, detect, load)
    _LOADERS.insert(0, entry) if first else _LOADERS.append(entry)


def load_artifact(path: str, *, step: str | int = "latest") -> Artifact:
    """Read a run, an export or any registered format from `path` (`step` picks a run's
    checkpoint: "latest", "best" or a number)."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} does not exist; pass a kdjax run (a workdir with "
                                f"checkpoints) or an export (`kdjax export --out`)")
    for loader in _LOADERS:
        if loader.detect(path):
            return loader.load(path, step=step)
    kinds = ", ".join(entry.kind for entry in _LOADERS)
    raise ValueError(f"{path!r} is none of the formats kdjax report reads ({kinds}): a run has "
                     f"{checkpoint.CHECKPOINT_DIR}/, an export {export.META_FILE}")


def _nnx_apply(model: nnx.Module, preprocess: Callable[[jax.Array], jax.Array]
               ) -> tuple[Apply, Any]:
    graphdef, variables = nnx.split(model)

    def apply(variables, images):
        return taps.call(nnx.merge(graphdef, variables), preprocess(images), train=False)

    return apply, variables


def _params(model: nnx.Module) -> Any:
    return nnx.state(model, nnx.Param)


def _is_run(path: str) -> bool:
    return os.path.isdir(os.path.join(path, checkpoint.CHECKPOINT_DIR))


def _resolve(path: str | None, base: str) -> str | None:
    """A recorded path as given (relative to where the run was launched), else next to `base`."""
    if not path:
        return None
    for candidate in (path, os.path.join(base, path)):
        if os.path.exists(candidate):
            return os.path.abspath(candidate)
    return path  # kept as recorded: the report says it cannot be found


def _data_of(config: dict[str, Any]) -> dict[str, Any]:
    return dict(config.get("data", {}))  # the run's whole data section (image_size, crops, ...)


def _teacher_of(config: dict[str, Any], base: str) -> str | None:
    teacher = config.get("teacher", {})
    if config.get("loss", {}).get("name", "ce") == "ce":
        return None
    first = teacher.get("workdir") or next(iter(teacher.get("workdirs") or ()), None)
    return _resolve(first, base)


def _load_run(path: str, *, step: str | int = "latest") -> Artifact:
    n, saved, run, spec, model = checkpoint.read_model(path, step, what="the run")
    recipe = augment.Preprocess(mean=tuple(run["preprocess"]["mean"]),
                                std=tuple(run["preprocess"]["std"]))
    apply, variables = _nnx_apply(model, lambda x: augment.preprocess(
        x, recipe, key=None, dtype=jnp.float32))
    config = run["config"]
    return Artifact(path=path, kind="run", apply=apply, variables=variables, params=_params(model),
                    stored_files=(os.path.join(saved, "model"),),
                    input_shape=tuple(spec.input_shape), num_classes=spec.num_classes,
                    data=_data_of(config), teacher=_teacher_of(config, os.path.dirname(path)),
                    spec=spec, details={"step": n, "checkpoint": saved}, module=model,
                    normalization=run["preprocess"])


def _is_export(path: str) -> bool:
    return _export_format(path) == export.FORMAT


def _load_export(path: str, *, step: str | int = "latest") -> Artifact:
    del step  # an export holds one model
    with open(os.path.join(path, export.META_FILE)) as f:
        meta = json.load(f)
    spec = ModelSpec.from_json(meta["model"])
    model, preprocess = export.load(path)
    apply, variables = _nnx_apply(model, preprocess)
    source = meta.get("source", {})
    data, teacher = dict(meta.get("data", {})), None
    config_path = os.path.join(source.get("workdir", ""), "config.json")
    if os.path.isfile(config_path):  # the run it came from, when it is still there
        with open(config_path) as f:
            config = json.load(f)
        data = {**_data_of(config), **data}
        teacher = _teacher_of(config, os.path.dirname(source["workdir"]))
    # model/ (Orbax), or weights.npz for a compressed export (kdjax.compress.encode)
    stored = tuple(p for p in (os.path.join(path, export.MODEL_DIR),
                               os.path.join(path, encode.FILE)) if os.path.exists(p))
    return Artifact(path=path, kind="export", apply=apply, variables=variables,
                    params=_params(model), stored_files=stored,
                    input_shape=tuple(spec.input_shape), num_classes=spec.num_classes, data=data,
                    teacher=teacher, spec=spec, details={"source": source}, module=model,
                    normalization=meta["preprocess"])


def _export_format(path: str) -> str | None:
    try:
        with open(os.path.join(path, export.META_FILE)) as f:
            return json.load(f).get("format")
    except (OSError, ValueError):
        return None


def _interop_meta(path: str) -> tuple[dict[str, Any], ModelSpec, Callable[[jax.Array], jax.Array]]:
    with open(os.path.join(path, export.META_FILE)) as f:
        meta = json.load(f)
    recipe = augment.Preprocess(mean=tuple(meta["preprocess"]["mean"]),
                                std=tuple(meta["preprocess"]["std"]))
    return meta, ModelSpec.from_json(meta["model"]), lambda x: augment.preprocess(
        x, recipe, key=None, dtype=jnp.float32)


def _model_file(path: str) -> str:
    """The one model file of an interop export (model.safetensors, model.pth, model.stablehlo;
    not the model.py that defines a zoo MLP's or CNN's nn.Module beside a state_dict)."""
    (name,) = [n for n in os.listdir(path) if n.startswith("model.") and not n.endswith(".py")]
    return os.path.join(path, name)


def _is_state_dict_export(path: str) -> bool:
    return _export_format(path) in ("kdjax.export.safetensors/1", "kdjax.export.torch/1")


def _load_state_dict_export(path: str, *, step: str | int = "latest") -> Artifact:
    """`kdjax export --format safetensors|torch`: the state_dict put back into the model."""
    del step
    from kdjax.interop import layouts, state_dict

    meta, spec, preprocess = _interop_meta(path)
    fmt = meta["format"].split(".")[-1].split("/")[0]
    file = _model_file(path)
    abstract = spec.abstract()
    state = layouts.from_state_dict(abstract, state_dict.load(file).tensors, meta["layout"],
                                    source=file)
    model = nnx.merge(nnx.graphdef(abstract), state)
    apply, variables = _nnx_apply(model, preprocess)
    return Artifact(path=path, kind=fmt, apply=apply, variables=variables, params=_params(model),
                    stored_files=(file,), input_shape=tuple(spec.input_shape),
                    num_classes=spec.num_classes, data={"name": meta.get("data")}, spec=spec,
                    details={"source": meta.get("source"), "layout": meta["layout"]})


def _is_stablehlo_export(path: str) -> bool:
    return _export_format(path) == "kdjax.export.stablehlo/1"


def _load_stablehlo_export(path: str, *, step: str | int = "latest") -> Artifact:
    """`kdjax export --format stablehlo`: the serialized inference function; its weights are
    constants inside it, so its parameters are counted from its ModelSpec (non-zero: unknown)."""
    del step
    meta, spec, _ = _interop_meta(path)
    file = _model_file(path)
    with open(file, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    return Artifact(path=path, kind="stablehlo", apply=lambda variables, x: exported.call(x),
                    variables={}, params=_params(spec.abstract()), stored_files=(file,),
                    input_shape=tuple(spec.input_shape), num_classes=spec.num_classes,
                    data={"name": meta.get("data")}, spec=spec,
                    details={"source": meta.get("source"), "platforms": meta.get("platforms"),
                             "nonzero_parameters": "unknown: the weights are compiled in"})


def _is_onnx_export(path: str) -> bool:
    return _export_format(path) == "kdjax.export.onnx/1" and os.path.isfile(
        os.path.join(path, "model.onnx"))


def _load_onnx_export(path: str, *, step: str | int = "latest") -> Artifact:
    """`kdjax export --format onnx`: the file run by ONNX Runtime (on the host, through a JAX
    callback, so that the report's evaluation runs it unchanged); its weights are in the graph,
    so its parameters are counted from its ModelSpec (non-zero: unknown)."""
    del step
    from kdjax.interop import onnx

    meta, spec, _ = _interop_meta(path)
    if "preprocess" not in meta:
        raise ValueError(f"{path!r} is a language model's ONNX export: kdjax report reads its "
                         f"run or kdjax export (kdjax.report.lm)")
    file = os.path.join(path, onnx.FILE)
    with open(file, "rb") as f:
        session = onnx.session(f.read())

    def run(images: np.ndarray) -> np.ndarray:
        return session.run(None, {onnx.INPUT: np.asarray(images, np.uint8)})[0]

    return _runtime_artifact(path, "onnx", run, meta, spec, file, runtime="ONNX Runtime",
                             holder="graph")


def _runtime_artifact(path: str, kind: str, run: Callable[[np.ndarray], np.ndarray],
                      meta: dict[str, Any], spec: ModelSpec, file: str, *, runtime: str,
                      holder: str) -> Artifact:
    """An export that its own runtime runs (`run`: uint8 images to logits, on the host), seen by
    the report through a JAX host callback; its parameters counted from its ModelSpec."""

    def apply(variables, images):
        out = jax.ShapeDtypeStruct((images.shape[0], spec.num_classes), jnp.float32)
        return jax.pure_callback(run, out, images.astype(jnp.uint8), vmap_method="sequential")

    return Artifact(path=path, kind=kind, apply=apply, variables={},
                    params=_params(spec.abstract()), stored_files=(file,),
                    input_shape=tuple(spec.input_shape), num_classes=spec.num_classes,
                    data={"name": meta.get("data")}, spec=spec,
                    details={"source": meta.get("source"), kind: meta.get(kind),
                             "speed": f"{runtime} through a host callback",
                             "nonzero_parameters": f"unknown: the weights are in the {holder}"})


def _is_litert_export(path: str) -> bool:
    return _export_format(path) == "kdjax.export.litert/1" and os.path.isfile(
        os.path.join(path, "model.tflite"))


def _load_litert_export(path: str, *, step: str | int = "latest") -> Artifact:
    """`kdjax export --format litert`: the file run by the LiteRT interpreter, through a JAX
    host callback as an ONNX export is; parameters counted from its ModelSpec."""
    del step
    from kdjax.interop import litert

    meta, spec, _ = _interop_meta(path)
    file = os.path.join(path, litert.FILE)
    with open(file, "rb") as f:
        interpreter = litert.interpreter(f.read())
    interpreter.allocate_tensors()

    def run(images: np.ndarray) -> np.ndarray:
        return litert.run(interpreter, np.asarray(images, np.uint8))

    return _runtime_artifact(path, "litert", run, meta, spec, file,
                             runtime="the LiteRT interpreter", holder="file")


register_loader("export", _is_export, _load_export, first=False)
register_loader("safetensors/torch export", _is_state_dict_export, _load_state_dict_export,
                first=False)
register_loader("stablehlo export", _is_stablehlo_export, _load_stablehlo_export, first=False)
register_loader("onnx export", _is_onnx_export, _load_onnx_export, first=False)
register_loader("litert export", _is_litert_export, _load_litert_export, first=False)
register_loader("run", _is_run, _load_run, first=False)


def stored_bytes(files: tuple[str, ...]) -> int:
    """Bytes on disk of these files and of every file under these folders."""
    total = 0
    for top in files:
        if os.path.isfile(top):
            total += os.path.getsize(top)
        for root, _, names in os.walk(top):
            total += sum(os.path.getsize(os.path.join(root, n)) for n in names)
    return total


def array_leaves(tree: Any) -> list[np.ndarray]:
    """The arrays of a pytree of arrays or nnx Variables (their values)."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, nnx.Variable))
    return [v.get_value() if isinstance(v, nnx.Variable) else v for v in leaves]
