"""`kdjax export --format litert`: the student's inference function as a LiteRT (TFLite) model,
checked in the LiteRT interpreter before it is written.

The model takes uint8 images [N, H, W, C] ("images"; N dynamic: the file stores -1, resize the
input before allocating) and returns float32 logits [N, classes]; the input normalisation
(x / 255 - mean) / std is inside it, as in the ONNX export (the same `onnx.inference_fn`).

Converter: TensorFlow's own, the route LiteRT documents for JAX. jax2tf.convert (native
serialization: the function's StableHLO inside one XlaCallModule op, batch polymorphic) wrapped in
a tf.function, then tf.lite.TFLiteConverter.from_concrete_functions, which legalises that
StableHLO to TFLite builtin operators (CONV_2D, FULLY_CONNECTED, ...: for the zoo's and standard
NNX layers no Flex or custom op, so the file runs in the plain interpreter). What it cannot lower
(a dynamic gather) or the interpreter cannot run (a STABLEHLO_SCATTER it refuses to prepare) is
refused with the error, nothing written. Pinned in pyproject.toml's `litert` extra: tensorflow-cpu
2.21.0 and ai-edge-litert 2.3.0, which resolve beside jax 0.10.2 / flax 0.12 without changing
numpy, protobuf or ml_dtypes. Float32 students only: an int8 student is refused (its integers
would be float32 here; `kdjax export --format onnx` keeps them).

Before anything is written, the file runs in the LiteRT interpreter at batch `CHECK_BATCH` and 1
and its logits are compared with kdjax's own forward of the same student; beyond the float32
tolerance (`onnx.tolerance`: reassociation over the jaxpr's reductions, tests/_float32.py's rule)
the export is refused (Mismatch) and nothing is written.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from kdjax import conv
from kdjax.interop import onnx
from kdjax.models import ModelSpec

__all__ = ["FILE", "Mismatch", "build", "build_fn", "check", "convert", "describe",
           "interpreter", "require", "run", "snippet"]

FILE = "model.tflite"
CHECK_BATCH = onnx.CHECK_BATCH

SNIPPET = """\
import numpy as np
from ai_edge_litert.interpreter import Interpreter
interpreter = Interpreter(model_path="{path}")
images = np.zeros((8, {shape}), np.uint8)  # your images: uint8 [N, H, W, C], any N
given, = interpreter.get_input_details()
interpreter.resize_tensor_input(given["index"], images.shape)  # the file's N is -1
interpreter.allocate_tensors()
interpreter.set_tensor(given["index"], images)
interpreter.invoke()
logits = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])  # [N, {classes}]
"""


#: The interpreter's logits differ from kdjax's beyond the tolerance: nothing was written (the
#: error every export format's check raises, `onnx.compare`).
Mismatch = onnx.Mismatch


def require() -> None:
    """Refuse --format litert where its converter or interpreter is missing, naming the
    install."""
    missing = [m for m in ("tensorflow", "ai_edge_litert") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"--format litert needs {', '.join(missing)}: install kdjax's litert "
                         f"extra (pip install 'kdjax[litert]', or pip install -e '.[litert]' in "
                         f"a clone)")


def convert(fn: Callable[[jax.Array], jax.Array], input_shape: Sequence[int],
            *, inputs: onnx.Inputs = onnx.IMAGES) -> tuple[bytes, int]:
    """(the .tflite bytes of `fn`, `inputs` [N, *input_shape] -> logits; its reduction
    terms, for the tolerance)."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    dims = ", ".join(map(str, input_shape))
    spec = tf.TensorSpec([None, *input_shape], tf.as_dtype(inputs.dtype), name=inputs.name)
    serve = tf.function(jax2tf.convert(fn, polymorphic_shapes=[f"(N, {dims})"],
                                       with_gradient=False),
                        autograph=False, input_signature=[spec])
    # kdjax.conv's CPU rewrites off while jax2tf traces, as for ONNX: each convolution stays one
    # conv_general_dilated, which the converter maps to one CONV_2D.
    with conv.native():
        concrete = serve.get_concrete_function()
    # tf.lite exports no name for the error its converter raises
    from tensorflow.lite.python.convert_phase import ConverterError

    try:
        model_bytes = tf.lite.TFLiteConverter.from_concrete_functions([concrete], serve).convert()
    except ConverterError as e:
        # Its message is MLIR's diagnostics with Python tracebacks: the first error names the op.
        first = next((line.strip() for line in str(e).splitlines() if "error:" in line),
                     str(e).splitlines()[0])
        raise ValueError(f"--format litert: TensorFlow's converter cannot convert this model: "
                         f"{first}; nothing written. Export --format onnx or stablehlo "
                         f"meanwhile") from e
    terms = onnx.reduction_terms(onnx.trace(fn, onnx.symbolic_input(input_shape, inputs.dtype)))
    return model_bytes, terms


def interpreter(model_bytes: bytes, *, threads: int | None = None) -> Any:
    """A LiteRT interpreter of a serialized model (its default CPU kernels: XNNPACK)."""
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_content=model_bytes, num_threads=threads)


def run(it: Any, images: np.ndarray) -> np.ndarray:
    """The logits of `images` from interpreter `it`, its input resized to their batch (the
    file's batch dimension is dynamic, stored as -1)."""
    (given,) = it.get_input_details()
    if tuple(given["shape"]) != images.shape:
        it.resize_tensor_input(given["index"], images.shape)
        it.allocate_tensors()
    it.set_tensor(given["index"], images)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


def check(model_bytes: bytes, images: np.ndarray, reference: np.ndarray, atol: float,
          what: str) -> float:
    """Run the file in the LiteRT interpreter on `images` and compare with kdjax's `reference`
    logits; the largest |difference|, or Mismatch beyond `atol`."""
    try:
        it = interpreter(model_bytes)
        it.allocate_tensors()
        got = run(it, images)
    except (RuntimeError, ValueError) as e:
        # The converter can leave an op as a STABLEHLO_* kernel the interpreter then refuses to
        # prepare (a scatter other than add/multiply/max/min, say): a file that does not run.
        raise Mismatch(f"--format litert: the LiteRT interpreter cannot run the converted file "
                       f"({e}); nothing written. Export --format onnx or stablehlo meanwhile"
                       ) from e
    return onnx.compare(got, reference, atol, what, fmt="litert",
                        runtime="the LiteRT interpreter", instead="--format onnx or stablehlo")


def build_fn(fn: Callable[[jax.Array], jax.Array], input_shape: Sequence[int], *,
             inputs: onnx.Inputs = onnx.IMAGES) -> tuple[bytes, dict[str, Any]]:
    """The checked .tflite of inference function `fn` and what was checked: raises Mismatch,
    writing nothing, where the LiteRT interpreter disagrees with `fn` beyond the tolerance."""
    model_bytes, terms = convert(fn, input_shape, inputs=inputs)
    images = inputs.sample(CHECK_BATCH, input_shape)
    reference = np.asarray(jax.jit(fn)(images), np.float64)
    atol = onnx.tolerance(reference, terms)
    rule = (f"float32 reassociation over {terms} summed terms: 4 * eps * sqrt({terms}) * "
            f"max |logit| ({np.abs(reference).max():.4g})")
    diff = check(model_bytes, images, reference, atol, rule)
    diff = max(diff, check(model_bytes, images[:1], reference[:1], atol, rule))
    return model_bytes, {"converter": _versions(), "form": "float32", "input": inputs.name,
                         "checked_batches": [CHECK_BATCH, 1], "max_abs_diff": diff,
                         "tolerance": atol, "tolerance_rule": rule}


def build(model: nnx.Module, spec: ModelSpec, preprocess: Mapping[str, Any]
          ) -> tuple[bytes, dict[str, Any]]:
    """The checked .tflite of `model` (a float student, shrunk if structurally pruned) and what
    was checked, for kdjax_model.json."""
    return build_fn(onnx.inference_fn(model, preprocess), spec.input_shape)


def _versions() -> str:
    import importlib.metadata as md

    def version(*names: str) -> str:
        for name in names:
            try:
                return md.version(name)
            except md.PackageNotFoundError:
                continue
        return "?"

    return (f"jax2tf (jax {jax.__version__}) + TFLiteConverter (tensorflow "
            f"{version('tensorflow-cpu', 'tensorflow')}), run in ai-edge-litert "
            f"{version('ai-edge-litert')}")


def describe(checked: Mapping[str, Any]) -> str:
    """One sentence of what an export holds and how it was checked."""
    return (f"Weights: {checked['form']}; converted by {checked['converter']}. Checked before "
            f"writing: the LiteRT interpreter's logits within {checked['tolerance']:.3g} of "
            f"kdjax's on batches of {checked['checked_batches']} random {checked['input']} "
            f"(largest difference {checked['max_abs_diff']:.3g}; tolerance: "
            f"{checked['tolerance_rule']}).")


def snippet(path: str, spec: ModelSpec) -> str:
    return SNIPPET.format(path=path, shape=", ".join(map(str, spec.input_shape)),
                          classes=spec.num_classes)
