"""`kdjax export`: a run's student alone, for inference.

An export is a directory:
  model/            an Orbax checkpoint of {"params", "model_state"}: the student's parameters and
                    BatchNorm statistics, i.e. the checkpoint's "model" item and nothing else (no
                    optimizer, PRNG or data state; trainable connectors, when they come, stay out)
  weights.npz       instead of model/ for an unstructured-pruned or quantized student: its arrays
                    encoded (non-zeros, integers and scales; kdjax.compress.encode), described
                    layer by layer under "compression" in kdjax_model.json
  kdjax_model.json  the ModelSpec that rebuilds the network, its input normalisation, its data
                    (dataset name, train and eval splits), its source
  README.md         what this is, and `SNIPPET`: how to load it into the model and run it

It is written into a temporary directory renamed when complete, so a path that exists is a whole
export. `load` rebuilds the model without allocating random weights first (nnx.eval_shape) and
places the arrays on the current devices (Orbax restores onto any mesh).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

import kdjax
from kdjax import augment, checkpoint
from kdjax.compress import encode
from kdjax.models import ModelSpec

FORMAT = "kdjax.export/1"
MODEL_DIR = "model"
META_FILE = "kdjax_model.json"

# The documented way to use an export (README.md and each export's README.md); {path} and
# {shape} are filled in.
SNIPPET = """\
import numpy as np
from kdjax import export
model, preprocess = export.load("{path}")  # the student (a Flax NNX module) + its input transform
images = np.zeros((8, {shape}), np.uint8)  # your images: uint8 [N, H, W, C]
predictions = model(preprocess(images)).argmax(-1)  # logits [N, classes] -> class ids
"""


def export(workdir: str, out: str, *, step: str | int = "latest", format: str = "kdjax",
           layout: str | None = None, overrides: Sequence[str] = ()) -> str:
    """Write the student of `workdir`'s checkpoint `step` ("latest", "best" or a number) to `out`.

    `format` "kdjax" is this module's; "safetensors", "torch" (a state_dict in `layout`),
    "stablehlo" and "onnx" are written by kdjax.interop.formats. A pruned or quantized student
    (the run's prune/quant config, `overrides` of quant.*) is written compressed in kdjax's format
    (kdjax.compress.encode); the other formats get a structurally pruned one shrunk, and onnx an
    int8 one with its integer weights (kdjax.interop.onnx).
    """
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise ValueError(f"--out {out!r} already exists; pick a new path (an export never "
                         f"overwrites anything)")
    if format != "kdjax":
        from kdjax.interop import formats

        formats.check(format, layout)
    elif layout is not None:
        raise ValueError("--layout names a state_dict layout: it goes with --format "
                         "safetensors or torch")
    n, checkpoint_path, run, spec, model = checkpoint.read_model(workdir, step)
    plan = encode.export_config(run["config"], overrides)
    if format == "onnx":
        return _onnx(model, spec, run, plan, out, step=n, source=f"{os.path.abspath(workdir)} "
                                                                   f"step {n}")
    if format != "kdjax":
        model, spec = encode.for_other_format(model, spec, format, prune=plan.prune,
                                              quant=plan.quant)
        return formats.export(model, spec, run, out, fmt=format, layout=layout, step=n,
                              source=f"{os.path.abspath(workdir)} step {n}")
    encoded = encode.encode(model, spec, lambda k: encode.calibration_images(
        plan.data, run["preprocess"], k, seed=plan.seed), prune=plan.prune, quant=plan.quant)
    model, spec = encoded.model, encoded.spec
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=f".{os.path.basename(out)}.tmp-")
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the export private to this user
        if encoded.arrays is None:
            saver = ocp.StandardCheckpointer()
            saver.save(os.path.join(tmp, MODEL_DIR), {"params": params,
                                                      "model_state": model_state})
            saver.wait_until_finished()
            saver.close()
        else:
            np.savez(os.path.join(tmp, encode.FILE), **encoded.arrays)
        meta = {"format": FORMAT, "kdjax_version": kdjax.__version__, "model": spec.to_json(),
                "preprocess": run["preprocess"],
                # what it was trained and evaluated on, for `kdjax report` and readers alike
                "data": {"name": plan.data.name, "train_split": plan.data.train_split,
                         "eval_split": plan.data.eval_split},
                "source": {"workdir": os.path.abspath(workdir), "step": n,
                           "checkpoint": checkpoint_path}}
        if encoded.record is not None:
            meta["compression"] = encoded.record
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(_readme(out, spec, n, workdir, encoded=encoded.arrays is not None))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _onnx(model: nnx.Module, spec: ModelSpec, run: dict, plan, out: str, *, step: int,
          source: str) -> str:
    """--format onnx: the student exactly as kdjax's own export of it holds it (shrunk,
    quantized, decoded), so that ONNX Runtime is checked against `load`'s forward."""
    from kdjax.interop import formats

    encode.refuse_for_onnx(plan.prune, plan.quant)
    encoded = encode.encode(model, spec, lambda k: encode.calibration_images(
        plan.data, run["preprocess"], k, seed=plan.seed), prune=plan.prune, quant=plan.quant)
    model, integers, images = encoded.model, None, None
    if encoded.arrays is not None:
        model = encode.decode(encoded.spec, encoded.record, encoded.arrays)
        if plan.quant.mode != "none" and plan.quant.activations == "none":
            integers = encode.integer_weights(encoded.record, encoded.arrays)
        elif plan.quant.mode != "none":  # W8A8: the file is calibrated on the student's images
            images = encode.training_images(plan.data, plan.quant.calibration_examples,
                                            seed=plan.seed)
    model.eval()
    return formats.export(model, encoded.spec, run, out, fmt="onnx", layout=None, step=step,
                          source=source, integers=integers, images=images)


def snippet(path: str, spec: ModelSpec | None = None) -> str:
    """`SNIPPET` for the export at `path` (its spec is read from it unless given)."""
    if spec is None:
        with open(os.path.join(path, META_FILE)) as f:
            spec = ModelSpec.from_json(json.load(f)["model"])
    return SNIPPET.format(path=path, shape=", ".join(str(d) for d in spec.input_shape))


def _readme(path: str, spec: ModelSpec, step: int, workdir: str, *, encoded: bool) -> str:
    where = (f"`{encode.FILE}`, encoded as `{META_FILE}`'s \"compression\" describes" if encoded
             else f"`{MODEL_DIR}/`, an Orbax checkpoint")
    raw = (f"`numpy.load(\"{path}/{encode.FILE}\")` holds the encoded arrays, concatenated per "
           f"dtype (\"compression\"/\"index\" says where each lies)" if encoded else
           f"`orbax.checkpoint.StandardCheckpointer().restore(\"{path}/{MODEL_DIR}\")` returns "
           f"the raw arrays as nested dicts")
    return (f"# kdjax export: {spec.name}, {spec.num_classes} classes\n\n"
            f"The student of `{os.path.abspath(workdir)}` at step {step}, for inference: its "
            f"parameters and BatchNorm statistics ({where}), and "
            f"`{META_FILE}` (the architecture and input normalisation). No optimizer state.\n\n"
            f"```python\n{snippet(path, spec)}```\n\n"
            f"Without kdjax, {raw}.\n")


def load(path: str, *, mesh: Mesh | None = None
         ) -> tuple[nnx.Module, Callable[[np.ndarray], jax.Array]]:
    """Load an export: (the student model, `preprocess` for uint8 [N, H, W, C] images).

    `model(preprocess(images))` gives logits [N, num_classes]: the model is in NNX's eval mode.
    The arrays are replicated over `mesh` (default: every device).
    """
    path = os.path.abspath(path)
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{path!r} is not a kdjax export (no {META_FILE}); make one with "
                                f"`kdjax export --workdir RUN --out {path}`")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path!r} is a {meta.get('format')} export, not kdjax's own format; its "
                         f"README.md says how to load it")
    spec = ModelSpec.from_json(meta["model"])
    if os.path.isfile(os.path.join(path, encode.FILE)):  # a compressed export
        with np.load(os.path.join(path, encode.FILE), allow_pickle=False) as arrays:
            model = encode.decode(spec, meta["compression"], dict(arrays))
    else:
        model_dir = os.path.join(path, MODEL_DIR)
        reader = ocp.StandardCheckpointer()
        try:
            model = checkpoint.restore_model(
                spec, reader.metadata(model_dir).item_metadata.tree,
                lambda target: reader.restore(model_dir, target), mesh=mesh, where=model_dir,
                what=f"the model of {META_FILE}")
        finally:
            reader.close()
    # `model(x)` is inference for any model: a user's model built from its spec holds NNX's
    # training mode (Dropout active, BatchNorm on the batch's statistics) until switched.
    model.eval()
    recipe = augment.Preprocess(mean=tuple(meta["preprocess"]["mean"]),
                                std=tuple(meta["preprocess"]["std"]))

    def preprocess(images: np.ndarray) -> jax.Array:
        return augment.preprocess(jnp.asarray(images), recipe, key=None, dtype=jnp.float32)

    return model, preprocess
