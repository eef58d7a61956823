"""Quantization with Qwix: quantization-aware distillation, post-training quantization with
calibration, and the integer models that exports store.

Qwix (google/qwix, pinned in pyproject.toml) intercepts the `dot_general` and
`conv_general_dilated` calls of the modules whose path its rules match. kdjax builds the rules
from the `quant` config section: every layer of the student, less quant.exclude (path patterns,
fnmatch as prune's, e.g. "out" or "stages/0/*").

Qwix intercepts the method that every other path runs (kdjax.taps): a zoo model's `features(x, *,
train)`, any other NNX model's `__call__`. Qwix runs the model once to build its quantized state;
kdjax runs it in inference mode: `train=False` where the method takes it, else NNX's own `eval()`
on a copy (the caller's model is never switched). Afterwards the step switches modes as it does
for any model (kdjax.taps.call).

- QAT (quant.mode="qat"): `for_training` wraps the student's forward in Qwix's QtProvider: the
  forward pass quantizes weights (per output channel) and activations (dynamic, per example) to
  int8 and computes in integers, the backward pass is float (straight-through), and the float
  teacher runs beside it in the same compiled step. The parameters stay float, so the run's
  checkpoints are ordinary ones (`kdjax eval` evaluates them in float; the step's own eval
  numbers are the fake-quantized student's).
- PTQ: `calibrated` runs the float (or QAT-trained) model with static activation scales on
  calibration images (quant.calibration_examples, default 512) to collect each layer's input
  range, then converts it with Qwix's PtqProvider: int8 weights and scales, static int8
  activation scales. This is the W8A8 model an export stores and `kdjax.export.load` runs.
- Weight-only (quant.activations="none"): int8 or int4 weights with float activations. Qwix
  0.1.8's PtqProvider refuses convolutions whose weight and activation types differ ("requires
  same act_qtype and weight_qtype"), so kdjax does this part itself: `qwix.quantize` per output
  channel on export, `qwix.dequantize` on load (the numerics of weight-only inference on hardware
  without mixed-type kernels). QAT of weight-only variants uses Qwix's QtProvider, which accepts
  them.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from kdjax import plan as plan_lib, taps

MODES = ("none", "qat", "ptq")
WEIGHTS = ("int8", "int4")
ACTIVATIONS = ("int8", "none")


def check_config(quant: plan_lib.Quant) -> None:
    def bad(key, value, fix):
        raise ValueError(f"quant.{key}={value!r}: {fix}")

    if quant.mode not in MODES:
        bad("mode", quant.mode, f"valid modes: {list(MODES)}")
    if quant.weights not in WEIGHTS:
        bad("weights", quant.weights, f"valid weight types: {list(WEIGHTS)}")
    if quant.activations not in ACTIVATIONS:
        bad("activations", quant.activations,
            f"valid activation types: {list(ACTIVATIONS)} ('none' = weight-only)")
    if quant.weights == "int4" and quant.activations != "none":
        bad("activations", quant.activations,
            "int4 weights are weight-only here: Qwix 0.1.8 convolutions need the weights and "
            "activations in the same type; set quant.activations='none'")
    if quant.calibration_examples < 1:
        bad("calibration_examples", quant.calibration_examples,
            "static activation scales are calibrated on >= 1 training examples (default 512)")


def _regex(pattern: str) -> str:
    # Qwix matches module paths ("stages/0/1/c1/conv") with re.fullmatch; ours are globs that
    # also cover what is below the layer they name.
    return fnmatch.translate(pattern).removesuffix(r"\Z") + "(?:/.*)?"


def rules(quant: plan_lib.Quant, *, static: bool) -> list[qwix.QuantizationRule]:
    """Exclusions first (Qwix applies the first rule that matches), then every other layer."""
    acts = None if quant.activations == "none" else quant.activations
    return [*(qwix.QuantizationRule(module_path=_regex(p)) for p in quant.exclude),
            qwix.QuantizationRule(module_path=".*", weight_qtype=quant.weights,
                                  act_qtype=acts, act_static_scale=(static if acts else None))]


def _method(model: nnx.Module) -> str:
    """The method the step runs (kdjax.taps.features): a zoo model's `features`, which its
    `__call__` also goes through, else `__call__`."""
    return "features" if taps.native_features(model) else "__call__"


def _intercept(model: nnx.Module, provider, input_shape: Sequence[int],
               quant: plan_lib.Quant) -> nnx.Module:
    if isinstance(model, nnx.bridge.ToNNX):
        # Qwix 0.1.8 cannot build the state of a Linen module inside Flax's NNX bridge ("Cannot
        # infer collection name from value"); it quantizes Linen models only outside it.
        raise ValueError(f"quant.mode={quant.mode!r}: Qwix cannot quantize a Linen model "
                         f"wrapped by nnx.bridge.ToNNX ({type(model.to_nnx__module).__name__}); "
                         f"write the model as a Flax NNX module, or set quant.mode='none'")
    if hasattr(model, "kernel_paths"):
        raise ValueError(f"quant.mode={quant.mode!r}: Qwix quantizes Flax layers (nnx.Linear, "
                         f"nnx.Conv, ...) by intercepting them; a PyTorch student "
                         f"({model.factory}) runs torch ops through torchax, which Qwix does not "
                         f"see; set quant.mode='none' (pruning applies: prune.method="
                         f"'magnitude')")
    method = _method(model)
    kwargs = {}
    if "train" in inspect.signature(getattr(type(model), method)).parameters:
        kwargs["train"] = False
    else:
        model = nnx.clone(model)
        model.eval()
    x = jnp.zeros((1, *input_shape), jnp.float32)
    out = qwix.quantize_model(model, provider, x, methods=(method,), **kwargs)
    unused = {r.module_path for r in provider.get_unused_rules()}
    if ".*" in unused:
        raise ValueError(f"quant.mode={quant.mode!r}: Qwix intercepted no layer of the "
                         f"{type(model).__name__}: it computes no matrix product or convolution "
                         f"(jax.lax.dot_general, conv_general_dilated, jnp.einsum: what nnx.Linear "
                         f"and nnx.Conv call) in a Flax NNX module outside "
                         f"quant.exclude={tuple(quant.exclude)}, so there is nothing to "
                         f"quantize; set quant.mode='none'")
    for pattern in quant.exclude:
        if _regex(pattern) in unused:
            raise ValueError(f"quant.exclude pattern {pattern!r} names no layer of the "
                             f"{type(model).__name__}; its layers: "
                             f"{', '.join(_layer_paths(model))} (fnmatch globs, e.g. 'stages/0/*')")
    return out


def _layer_paths(model: nnx.Module) -> list[str]:
    return ["/".join(map(str, p)) for p, n in nnx.iter_graph(model)
            if isinstance(n, (nnx.Linear, nnx.Conv))]


def square_layer_clash(model: nnx.Module, batch_size: int) -> str | None:
    """The path of a square Linear layer (n x n kernel) whose input at `batch_size` examples is
    n x n too, or None. Qwix 0.1.8 identifies a matmul's weight by tracing it back to a
    parameter and, where it cannot, by shape: such a layer's input then looks like its weight
    and Qwix stops with "lhs and rhs cannot be both weights"."""
    for path, module in nnx.iter_modules(model):
        kernel = getattr(module, "kernel", None)
        if isinstance(module, nnx.Linear) and kernel is not None and (
                kernel.shape[0] == kernel.shape[1] == batch_size):
            return "/".join(str(p) for p in path)
    return None


def for_training(model: nnx.Module, quant: plan_lib.Quant, input_shape: Sequence[int], *,
                 batch_sizes: Sequence[tuple[str, int]] = ()) -> nnx.Module:
    """The student with a fake-quantized forward (QAT): int8 (or int4) weights and dynamic int8
    activations in the forward pass, float straight-through gradients. `batch_sizes` are the
    (config key, size) of the batches it will see, refused where Qwix would take a layer's
    input for its weight (`square_layer_clash`)."""
    for key, size in batch_sizes:
        clash = square_layer_clash(model, size)
        if clash is not None:
            raise ValueError(
                f"{key}={size} is the width of the square layer {clash!r} ({size}x{size}): "
                f"with quant.mode='qat', Qwix 0.1.8 would take that layer's {size}x{size} input "
                f"for its weight (it matches weights by shape where it cannot trace them); set "
                f"{key} to another size, e.g. {size - size // 2 if size > 1 else 2}")
    return _intercept(model, qwix.QtProvider(rules(quant, static=False)), input_shape, quant)


CALIBRATION_BATCH = 128


def calibrated(model: nnx.Module, quant: plan_lib.Quant, images: np.ndarray,
               *, batch_size: int = CALIBRATION_BATCH) -> nnx.Module:
    """Qwix's PTQ model of `model`: int8 weights, activation scales from `images` (float,
    preprocessed, [N, H, W, C]): the mean over batches of each layer input's max |x|."""
    static = rules(quant, static=True)
    while square_layer_clash(model, batch_size) or (
            len(images) % batch_size and square_layer_clash(model, len(images) % batch_size)):
        batch_size -= 1  # a batch whose activations Qwix cannot mistake for a square weight
    qt = _intercept(model, qwix.QtProvider(static), images.shape[1:], quant)
    # Eagerly: Qwix updates its QuantStat running averages inside the custom-gradient forward
    # of each quantized op, a trace that a QuantStat created outside it cannot be written from.
    for i in range(0, len(images), batch_size):
        taps.call(qt, jnp.asarray(images[i:i + batch_size]), train=False)
    return _intercept(qt, qwix.PtqProvider(static), images.shape[1:], quant)


def structure_like(model: nnx.Module, quant: plan_lib.Quant, input_shape: Sequence[int]
                   ) -> nnx.Module:
    """A PTQ model of `model`'s architecture for an export's arrays to be loaded into (its
    values are placeholders: calibrated on zero images, a batch of calibration's shape, whose
    eagerly compiled operations `calibrated` has usually compiled already)."""
    return calibrated(model, quant, np.zeros((CALIBRATION_BATCH, *input_shape), np.float32))


def quantize_weight(w: jax.Array, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel (last axis) quantization with Qwix: (integer values as int8,
    float32 scales broadcastable to w)."""
    q = qwix.quantize(jnp.asarray(w, jnp.float32), dtype, channelwise_axes=[w.ndim - 1])
    return np.asarray(q.qvalue.astype(jnp.int8)), np.asarray(q.scale, np.float32)


def dequantize_weight(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return values.astype(np.float32) * scale
