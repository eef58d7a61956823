"""A W8A8 (Qwix PTQ) student in the QDQ form that ONNX Runtime runs with its fast integer
kernels (QLinearConv, QLinearAdd, QGemm), holding the student's own integers and scales.

Why this form: ONNX Runtime fuses DequantizeLinear -> Conv -> QuantizeLinear into one
QLinearConv, whose int8 output feeds the next layer; a convolution whose output stays float has
only ConvInteger, which ONNX Runtime 1.32 runs 9-11x slower than the float convolution on x86
(benchmarks/results/resnet_deploy_cpu.md). So the fast file requantizes some tensors that kdjax's
student keeps in float: the outputs of convolutions that feed a residual sum, the sums
themselves, pooled features. Everything else is the student's.

How: ONNX Runtime's own static quantizer (onnxruntime.quantization.quantize_static, QDQ format,
the maintained tool that knows which patterns its kernels fuse) runs on the float graph of the
student's dequantized weights (`float_twin`: q * scale, BatchNorms folded by the caller), with
what kdjax already decided pinned through its TensorQuantOverrides:
  - each quantized layer's input is quantized with the student's static activation scale `s`:
    uint8 with zero point 128 (the grid of kdjax's symmetric int8, round(x / s) in [-128, 127],
    the same numbers) or, where the tensor comes out of a ReLU (through pooling or layout ops),
    zero point 0 (the same steps on [0, 255 s]: ONNX Runtime drops a ReLU that feeds a
    QuantizeLinear of zero point 0 and keeps its clamp in the integers). Those tensors saturate
    at 255 s, not kdjax's 127 s: larger activations are kept, not clipped;
  - the weights are quantized per output channel with the student's own scales (zero point 0).
    A folded BatchNorm multiplies each output channel by a constant c, which makes the
    channel's scale |c| times the student's and its integers sign(c) times the student's:
    `quantize` checks that the file's integers are the student's, up to that sign, and refuses
    otherwise;
  - biases are int32 at input scale x weight scale, ONNX Runtime's rule (its adjustment of the
    weight scale for small bias scales is off, as it would change the integers);
  - the tensors kdjax does not quantize get ONNX Runtime's min-max calibration on the same
    training images the student's scales came from, except the outputs of dense layers, which
    stay float as in the student (QGemm writes float32: the logits among them).
The layers a student keeps float (quant.exclude) stay float here too.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax.compress.coupling import layer_name
from kdjax.models import ModelSpec

__all__ = ["FORM", "Pinned", "float_twin", "quantize"]

FORM = ("int8 weights and activations in QDQ form (ONNX Runtime's quantize_static with the "
        "student's integers and activation scales pinned; it runs as QLinearConv / QLinearAdd "
        "/ QGemm)")

# Operators whose output is >= 0 wherever their input is: a tensor reached from a ReLU through
# them takes zero point 0 (see the module docstring).
_KEEP_SIGN = {"Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
              "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity",
              "ReduceMean", "ReduceMax"}
_LAYERS = ("Conv", "Gemm", "MatMul")


@dataclasses.dataclass(frozen=True)
class Pinned:
    """One quantized layer of the student: its int8 kernel (kdjax's layout: HWIO or [in, out])
    and the static scale of its input activation."""

    integers: np.ndarray
    activation_scale: float


def float_twin(model: nnx.Module, spec: ModelSpec) -> tuple[nnx.Module, dict[str, Pinned]]:
    """(the float model of a Qwix PTQ `model`: its architecture from `spec`, each int8 kernel
    dequantized to q * scale, every other variable as it is, in eval mode; {kernel path:
    Pinned}). The twin computes the student with float activations: what the ONNX graph is
    built from and what the check measures activation quantization against."""
    flat = {layer_name(k): v.get_value() for k, v in nnx.to_flat_state(nnx.state(model))}
    twin = spec.build()
    state = nnx.state(twin)
    pinned = {}
    for key, var in nnx.to_flat_state(state):
        name = layer_name(key)
        if f"{name}/array/qvalue" not in flat:
            var.set_value(jnp.asarray(flat[name], var.dtype))
            continue
        q = np.asarray(flat[f"{name}/array/qvalue"])
        layer = name.rpartition("/")[0]
        scales = [v for k, v in flat.items()
                  if k.startswith(f"{layer}/") and "_lhs_scale/" in k]
        if len(scales) != 1:
            raise ValueError(f"--format onnx: the int8 layer {layer!r} has {len(scales)} static "
                             f"activation scales (one per call of its kernel); the QDQ form holds "
                             f"one per layer. Export this student in kdjax's format (drop "
                             f"--format) or exclude the layer: --config.quant.exclude")
        var.set_value(jnp.asarray(q.astype(np.float32) * np.asarray(
            flat[f"{name}/array/scale"], np.float32), var.dtype))
        pinned[name] = Pinned(q.astype(np.int8), float(np.asarray(scales[0]).reshape(())))
    nnx.update(twin, state)
    twin.eval()
    return twin, pinned


def quantize(proto: Any, kernels: Mapping[str, np.ndarray], pinned: Mapping[str, Pinned],
             images: np.ndarray, input_name: str) -> Any:
    """The QDQ ModelProto of the float `proto` (jax2onnx's, of the twin with its BatchNorms
    folded): `kernels` are the folded float kernels by path, as the graph holds them (how its
    layers are found), `pinned` what to keep of the student, `images` the uint8 calibration
    images of the tensors kdjax does not quantize."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self._batches = iter([{input_name: images[i:i + 64]}
                                  for i in range(0, len(images), 64)])

        def get_next(self):
            return next(self._batches, None)

    with tempfile.TemporaryDirectory(prefix="kdjax-qdq-") as tmp:
        given, pre, out = (os.path.join(tmp, f) for f in ("float.onnx", "pre.onnx", "q.onnx"))
        onnx.save(proto, given)
        # Constant-folds the NHWC kernel transposes, so that each layer reads its kernel as an
        # initializer, the form quantize_static quantizes per channel.
        quant_pre_process(given, pre, skip_symbolic_shape=True)
        graph_model = onnx.load(pre)
        _drop_zero_gemm_bias(graph_model.graph)
        _pooling_pads(graph_model.graph)
        layers = _match(graph_model.graph, kernels)
        overrides = _overrides(graph_model.graph, layers, pinned)
        onnx.save(graph_model, pre)
        quantize_static(
            pre, out, Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=[n.name for n in graph_model.graph.node
                              if n.op_type in _LAYERS and n.name not in layers]
            + _preprocessing(graph_model.graph, layers),
            extra_options={"TensorQuantOverrides": overrides,
                           "QDQDisableWeightAdjustForInt32Bias": True,
                           "OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"]})
        quantized = onnx.load(out)
    _check_integers(quantized.graph, layers, pinned)
    return quantized


def _drop_zero_gemm_bias(graph: Any) -> None:
    """jax2onnx writes a dense layer as Gemm with a zero scalar bias (beta 0; the bias is added
    after it), which quantize_static cannot quantize: the zero is dropped."""
    from onnx import numpy_helper

    zeros = {i.name for i in graph.initializer
             if not i.dims and not numpy_helper.to_array(i).any()}
    for node in graph.node:
        if node.op_type == "Gemm" and len(node.input) == 3 and node.input[2] in zeros:
            del node.input[2]


def _pooling_pads(graph: Any) -> None:
    """Fold a constant -inf Pad into the MaxPool that reads it (its `pads`, which pad with -inf
    by definition): kdjax writes a padded max-pool as the two (jax2onnx's MaxPool takes no
    explicit padding), and quantize_static would calibrate the Pad's output, -inf included, to
    an infinite scale."""
    from onnx import helper, numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for pad in [n for n in graph.node if n.op_type == "Pad"]:
        after = readers.get(pad.output[0], [])
        mode = next((helper.get_attribute_value(a) for a in pad.attribute if a.name == "mode"),
                    b"constant")
        if (len(after) != 1 or after[0].op_type != "MaxPool" or mode != b"constant"
                or len(pad.input) < 3 or pad.input[1] not in inits or pad.input[2] not in inits
                or not np.all(np.isneginf(inits[pad.input[2]]))):
            continue
        pads = inits[pad.input[1]].reshape(2, -1)  # [begins; ends] over NCHW
        pool = after[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in pool.attribute}
        if pads[:, :2].any() or any(attrs.get("pads", [])) or attrs.get("auto_pad", b"NOTSET") \
                not in (b"NOTSET", b"VALID"):
            continue
        for a in [a for a in pool.attribute if a.name in ("pads", "auto_pad")]:
            pool.attribute.remove(a)  # VALID: no padding of its own
        pool.input[0] = pad.input[0]
        pool.attribute.append(helper.make_attribute("pads", [int(p) for p in
                                                             pads[:, 2:].reshape(-1)]))
        graph.node.remove(pad)


def _match(graph: Any, kernels: Mapping[str, np.ndarray]) -> dict[str, str]:
    """{node name: kernel path} for each Conv / Gemm / MatMul whose weight initializer is one of
    `kernels` (HWIO as OIHW; [in, out] as it is or transposed)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    layers = {}
    for node in graph.node:
        if node.op_type not in _LAYERS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        for name, k in kernels.items():
            forms = [k.transpose(3, 2, 0, 1)] if k.ndim == 4 else [k, k.T]
            if any(f.shape == w.shape and np.array_equal(f, w) for f in forms):
                layers[node.name] = name
                break
    missing = sorted(set(kernels) - set(layers.values()))
    if missing:
        raise ValueError(f"--format onnx: the converted graph holds no layer with the int8 "
                         f"kernel(s) {', '.join(missing)}, so their integers cannot be stored; "
                         f"nothing written. Export this student in kdjax's format (drop --format)")
    return layers


def _preprocessing(graph: Any, layers: Mapping[str, str]) -> list[str]:
    """The nodes that compute the first quantized layers' inputs from the uint8 images (the
    Cast and normalisation): they stay float, as in the student, whose first quantization is
    that layer's input (quantizing them too costs a QLinearMul and its requantization)."""
    producers = {o: n for n in graph.node for o in n.output}
    nodes = {n.name: n for n in graph.node}

    def ancestors(tensor: str, seen: set[str]) -> set[str]:
        node = producers.get(tensor)
        if node is None or node.name in seen:
            return seen
        seen.add(node.name)
        for x in node.input:
            ancestors(x, seen)
        return seen

    upstream = {name: ancestors(nodes[name].input[0], set()) for name in layers}
    first = [name for name, up in upstream.items() if not up & set(layers)]
    return sorted(set().union(*(upstream[name] for name in first)))


def _nonnegative(producers: Mapping[str, Any], tensor: str) -> bool:
    """Whether `tensor` comes out of a ReLU through sign-keeping operators only (`producers`:
    each tensor's node)."""
    node = producers.get(tensor)
    while node is not None and node.op_type in _KEEP_SIGN:
        if node.op_type == "Relu":
            return True
        node = producers.get(node.input[0])
    return False


def _channel_axis(node: Any) -> int:
    """The output-channel axis of a layer's weight as the graph holds it (and as
    quantize_static quantizes it per channel): OIHW's O, a Gemm's B column (row with transB)."""
    if node.op_type == "Conv":
        return 0
    trans_b = any(a.name == "transB" and a.i for a in node.attribute)
    return 0 if node.op_type == "Gemm" and trans_b else 1


def _overrides(graph: Any, layers: Mapping[str, str], pinned: Mapping[str, Pinned]
               ) -> dict[str, list[dict[str, Any]]]:
    """TensorQuantOverrides (module docstring): each quantized layer's input at the student's
    activation scale, and its weight at the student's per-channel scale times |c| (c the folded
    BatchNorm's factor: max |folded kernel| / max |integers| per channel). Qwix's weight scale is
    not ONNX Runtime's symmetric max|w| / 127 (its integers reach -128), so the scale is given,
    not recomputed. A tensor two layers read (a block's input, its shortcut) has one scale in
    QDQ: the layers must agree on it."""
    from onnx import numpy_helper

    nodes = {n.name: n for n in graph.node}
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    overrides: dict[str, list[dict[str, Any]]] = {}
    for node_name, kernel in layers.items():
        node = nodes[node_name]
        tensor = node.input[0]
        scale = np.array(pinned[kernel].activation_scale, np.float32)
        zero = np.array(0 if _nonnegative(producers, tensor) else 128, np.uint8)
        if tensor in overrides and overrides[tensor][0]["scale"] != scale:
            raise ValueError(f"--format onnx: layers reading the same tensor {tensor!r} have "
                             f"different activation scales ({overrides[tensor][0]['scale']} and "
                             f"{scale} for {kernel}); QDQ quantizes a tensor once. Export this "
                             f"student in kdjax's format (drop --format)")
        overrides[tensor] = [{"scale": scale, "zero_point": zero}]
        axis = _channel_axis(node)
        w = np.moveaxis(numpy_helper.to_array(inits[node.input[1]]), axis, 0)
        q = _rows(pinned[kernel].integers)
        overrides[node.input[1]] = [
            {"axis": axis, "zero_point": np.array(0, np.int8),
             "scale": np.array(np.abs(w_o).max() / np.abs(q_o).max() if q_o.any() else 1.0,
                               np.float32)}
            for w_o, q_o in zip(w.reshape(len(w), -1), q)]
    return overrides


def _rows(integers: np.ndarray) -> np.ndarray:
    """A kdjax kernel's integers by output channel (its last axis), in the graph's order within
    a channel (HWIO -> OIHW), as int32 (int8's -128 has no negation)."""
    integers = integers.astype(np.int32)
    if integers.ndim == 4:
        return integers.transpose(3, 2, 0, 1).reshape(integers.shape[3], -1)
    return integers.T


def _check_integers(graph: Any, layers: Mapping[str, str], pinned: Mapping[str, Pinned]
                    ) -> None:
    """Refuse a file whose int8 weights are not the student's (per output channel, up to the
    sign a folded BatchNorm gives; an all-zero channel where the fold zeroed it)."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    nodes = {n.name: n for n in graph.node}
    wrong = []
    for node_name, kernel in layers.items():
        node = nodes[node_name]
        dq = producers.get(node.input[1])
        stored = inits.get(dq.input[0]) if dq is not None and (
            dq.op_type == "DequantizeLinear") else None
        expected = _rows(pinned[kernel].integers)
        if stored is None or stored.dtype != np.int8:  # not quantized, or not to int8
            wrong.append(kernel)
            continue
        rows = np.moveaxis(stored.astype(np.int32), _channel_axis(node), 0)
        rows = rows.reshape(len(rows), -1)
        if rows.shape != expected.shape or not _same_up_to_sign(rows, expected):
            wrong.append(kernel)
    if wrong:
        raise ValueError(f"--format onnx: ONNX Runtime's quantizer did not store the student's "
                         f"integers for {', '.join(sorted(wrong))}; nothing written. Export "
                         f"this student in kdjax's format (drop --format)")


def _same_up_to_sign(stored: np.ndarray, expected: np.ndarray) -> bool:
    """Row by row (output channels): equal, negated, or zero."""
    return all(np.array_equal(s, e) or np.array_equal(s, -e) or not s.any()
               for s, e in zip(stored, expected))

