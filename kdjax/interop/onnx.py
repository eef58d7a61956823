"""`kdjax export --format onnx`: the student's inference function as an ONNX model, checked in
ONNX Runtime before it is written.

The graph takes uint8 images [N, H, W, C] ("images"; N dynamic) and returns float32 logits
[N, classes] ("logits"); the input normalisation (x / 255 - mean) / std is inside it. A language
model takes int32 token ids [N, seq_len] ("tokens") and returns [N, seq_len, vocab]. Opset
`OPSET` (21: ONNX Runtime 1.17+ runs it).

Converter: jax2onnx 0.17.1 (pyproject.toml's `onnx` extra, installed --no-deps), which lowers a
jaxpr primitive by primitive. kdjax traces the model itself (`jax.make_jaxpr`, kdjax.conv's CPU
rewrites off so that each convolution is one ONNX Conv) and hands jax2onnx a replay of that
jaxpr (`_eval`), so jax2onnx's flax.nnx call-site patches (its nnx.max_pool takes keywords and
string padding only) never meet the model's code. The replay rewrites what jax2onnx lowers
into graphs ONNX Runtime refuses or runs slowly:
  - a max-pool over H and W (`reduce_window_max`, or the zoo's reshape + max over two axes) is
    an explicit -inf pad and jax2onnx's NHWC max-pool, one ONNX MaxPool (its generic lowering
    pools over four axes: "Unsupported pooling size");
  - an integer cumulative max (an LM's positions) runs in float32 (ONNX MaxPool is float only).
After conversion Max(x, 0) becomes Relu (fused into the Conv before it); a float student's
BatchNorms are folded into its convolutions first (kdjax.models.fold_batchnorm; the check runs
against the unfolded model).

Integer students keep their integers. Weight-only int8 is the QDQ form: each kernel an int8
initializer with its float32 per-output-channel scale through DequantizeLinear (q * scale in
float32, exactly `kdjax.export.load`'s numbers), float activations. W8A8 (Qwix PTQ) is the
QDQ form ONNX Runtime runs with its integer kernels (QLinearConv, QLinearAdd, QGemm): the
student's integers and activation scales pinned in ONNX Runtime's own static quantizer
(kdjax.interop.onnx_qdq, which says what that form requantizes that the student does not).

Before anything is written, the file runs in ONNX Runtime at batch `CHECK_BATCH` and 1 and its
logits are compared with kdjax's own forward of the same student; beyond `tolerance` (float32
reassociation over the graph's reductions, tests/_float32.py's rule) the export is refused
(Mismatch) and nothing is written. A W8A8 file is checked on its calibration images instead,
within twice the student's own activation quantization error on them (`_build_w8a8`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import augment, conv, models, taps
from kdjax.interop import onnx_qdq
from kdjax.models import ModelSpec

__all__ = ["FILE", "OPSET", "Inputs", "Integers", "Mismatch", "build", "build_fn", "check",
           "convert", "describe", "inference_fn", "is_w8a8", "require", "session",
           "snippet", "tokens", "tolerance"]

FILE = "model.onnx"
OPSET = 21
INPUT, OUTPUT = "images", "logits"
# The batch checked in ONNX Runtime before writing: several examples, and not a power of two, so
# that a graph whose batch dimension was fixed at trace time fails the run.
CHECK_BATCH = 5
EPS = float(np.finfo(np.float32).eps)

SNIPPET = """\
import numpy as np, onnxruntime as ort
session = ort.InferenceSession("{path}", providers=["CPUExecutionProvider"])
images = np.zeros((8, {shape}), np.uint8)  # your images: uint8 [N, H, W, C], any N
logits = session.run(None, {{"images": images}})[0]  # float32 [N, {classes}]
"""


class Mismatch(ValueError):
    """A runtime's logits (ONNX Runtime's, the LiteRT interpreter's) differ from kdjax's beyond
    the tolerance: nothing was written."""


def require() -> None:
    """Refuse --format onnx where its converter or runtime is missing, naming the install."""
    missing = [m for m in ("onnx", "onnxruntime", "jax2onnx")
               if not _importable(m)]
    if missing:
        raise ValueError(f"--format onnx needs {', '.join(missing)}: install kdjax's onnx extra "
                         f"(pip install -e '.[onnx]', then pip install --no-deps "
                         f"jax2onnx==0.17.1: see pyproject.toml)")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


class _SymbolicShapes:
    """onnx_ir, with `Shape` taking a symbolic dimension (jax's batch) by its name."""

    def __init__(self, ir: Any):
        self._ir = ir

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ir, name)

    def Shape(self, dims: Sequence[Any]) -> Any:  # noqa: N802 (onnx_ir's name)
        return self._ir.Shape([d if isinstance(d, int) else str(d) for d in dims])


@contextlib.contextmanager
def _dynamic_batch_pads() -> Iterator[None]:
    # jax2onnx 0.17.1's lax.pad lowering builds its output's onnx_ir.Shape from the jaxpr's
    # dimensions with int(), which a symbolic batch dimension refuses; every other lowering
    # kdjax's models reach names such dimensions. Only that module's reference is swapped.
    from jax2onnx.plugins.jax.lax import pad

    ir = pad.ir
    pad.ir = _SymbolicShapes(ir)
    try:
        yield
    finally:
        pad.ir = ir


def inference_fn(model: nnx.Module, preprocess: Mapping[str, Any]
                 ) -> Callable[[jax.Array], jax.Array]:
    """uint8 images -> float32 logits: `model` in inference mode after the normalisation."""
    graphdef, state = nnx.split(model)
    recipe = augment.Preprocess(mean=tuple(preprocess["mean"]), std=tuple(preprocess["std"]))

    def serve(images: jax.Array) -> jax.Array:
        x = augment.preprocess(images, recipe, key=None, dtype=jnp.float32)
        return taps.call(nnx.merge(graphdef, state), x, train=False).astype(jnp.float32)

    return serve


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What a graph takes: its input's name and dtype, and the values checked (0 .. high-1)."""

    name: str
    dtype: Any
    high: int

    def sample(self, n: int, shape: Sequence[int]) -> np.ndarray:
        return np.random.default_rng(0).integers(0, self.high, (n, *shape)).astype(self.dtype)


IMAGES = Inputs(INPUT, np.uint8, 256)


def tokens(vocab_size: int) -> Inputs:
    """A language model's input: int32 token ids."""
    return Inputs("tokens", np.int32, vocab_size)


def symbolic_input(input_shape: Sequence[int], dtype: Any = jnp.uint8) -> jax.ShapeDtypeStruct:
    """[N, *input_shape] with N symbolic: one object for kdjax's trace and jax2onnx's, so that
    the shapes inside the jaxpr's equations name the very dimension jax2onnx makes dynamic."""
    (batch,) = jax.export.symbolic_shape("N")
    return jax.ShapeDtypeStruct((batch, *input_shape), dtype)


def trace(fn: Callable[[jax.Array], jax.Array], example: jax.ShapeDtypeStruct
          ) -> jex.ClosedJaxpr:
    """The jaxpr of `fn` on `example` (symbolic_input)."""
    with conv.native():
        return jax.make_jaxpr(fn)(example)


def _nhwc_max_pool(eqn: jex.JaxprEqn) -> tuple[tuple[int, int], tuple[int, int],
                                                tuple[tuple[int, int], ...]] | None:
    """(window, strides, padding) of a reduce_window_max that pools H and W of an NHWC array
    without dilation, else None."""
    p = eqn.params
    dims, strides, pads = p["window_dimensions"], p["window_strides"], p["padding"]
    if (len(dims) == 4 and dims[0] == dims[3] == 1 and strides[0] == strides[3] == 1
            and tuple(pads[0]) == tuple(pads[3]) == (0, 0)
            and all(d == 1 for d in (*p["base_dilation"], *p["window_dilation"]))):
        return (dims[1], dims[2]), (strides[1], strides[2]), tuple(map(tuple, pads))
    return None


def _eval(jaxpr: jex.Jaxpr, consts: Sequence[Any], *args: Any) -> list[Any]:
    """jax.core.eval_jaxpr, with max-pools replayed as nnx.max_pool (see the module docstring)
    and nested jaxprs (jit, custom_jvp) inlined so that their max-pools are found too."""
    env: dict[Any, Any] = {}
    # [B, H, W, C] arrays reshaped to [B, H/k, k, W/k, k, C]: kdjax's zoo pools non-overlapping
    # windows as that reshape and a max over axes 2 and 4 (its gradient is cheaper in XLA);
    # in ONNX Runtime a 6-axis ReduceMax is a layout round trip where a MaxPool is one kernel.
    windows: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jex.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name == "cummax" and jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.integer):
            # jax2onnx lowers a cumulative max to ONNX MaxPool, defined for floats only; an LM's
            # positions (kdjax.lm.models.positions_from_segments) are small integers, exact in
            # float32.
            x = invals[0]
            outs = [eqn.primitive.bind(x.astype(jnp.float32), **eqn.params).astype(x.dtype)]
        elif name == "reduce_window_max" and _nhwc_max_pool(eqn) is not None:
            window, strides, pads = _nhwc_max_pool(eqn)
            x = invals[0]
            if any(p != (0, 0) for p in pads):
                x = jax.lax.pad(x, jnp.array(-jnp.inf, x.dtype), [(lo, hi, 0) for lo, hi in pads])
            # Looked up at call time: inside jax2onnx's trace this is its MaxPool primitive.
            outs = [nnx.max_pool(x, window_shape=window, strides=strides, padding="VALID")]
        elif (name == "reduce_max" and tuple(eqn.params["axes"]) == (2, 4)
              and not isinstance(eqn.invars[0], jex.Literal) and eqn.invars[0] in windows):
            k = (eqn.invars[0].aval.shape[2], eqn.invars[0].aval.shape[4])
            outs = [nnx.max_pool(windows[eqn.invars[0]], window_shape=k, strides=k,
                                 padding="VALID")]
        elif name in ("pjit", "jit", "closed_call"):
            inner = eqn.params["jaxpr" if "jaxpr" in eqn.params else "call_jaxpr"]
            outs = _eval(inner.jaxpr, inner.consts, *invals)
        elif name == "custom_jvp_call":
            inner = eqn.params["call_jaxpr"]
            outs = _eval(inner.jaxpr, inner.consts, *invals)
        else:
            outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outs = [outs]
        if name == "reshape" and len(eqn.outvars[0].aval.shape) == 6:
            source, shape = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
            if len(source) == 4 and (shape[0], shape[1] * shape[2], shape[3] * shape[4],
                                     shape[5]) == tuple(source):
                windows[eqn.outvars[0]] = invals[0]
        for v, x in zip(eqn.outvars, outs):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def reduction_terms(closed: jex.ClosedJaxpr) -> int:
    """The additions along the longest chain of reductions of the logits: the sum over the
    jaxpr's dot_general, conv_general_dilated and reduce_sum equations of each one's number of
    summed terms (a matmul's contracted size, a convolution's window x input channels per group,
    a mean's reduced size). Counting every reduction, not only those of one path, bounds the
    chain of any network from above."""
    n = 0

    def walk(jaxpr: jex.Jaxpr) -> None:
        nonlocal n
        for eqn in jaxpr.eqns:
            p = eqn.params
            if eqn.primitive.name == "dot_general":
                (lhs_contract, _), _ = p["dimension_numbers"]
                shape = eqn.invars[0].aval.shape
                n += math.prod(int(shape[d]) for d in lhs_contract)
            elif eqn.primitive.name == "conv_general_dilated":
                rhs = eqn.invars[1].aval.shape
                spec = p["dimension_numbers"].rhs_spec  # (out, in, *spatial)
                n += int(rhs[spec[1]]) * math.prod(int(rhs[d]) for d in spec[2:])
            elif eqn.primitive.name == "reduce_sum":
                shape = eqn.invars[0].aval.shape
                n += math.prod(int(shape[d]) for d in p["axes"])
            for sub in jex.jaxprs_in_params(p):
                walk(getattr(sub, "jaxpr", sub))

    walk(closed.jaxpr)
    return max(n, 1)


def tolerance(reference: np.ndarray, terms: int) -> float:
    """The largest |ONNX Runtime - kdjax| a logit may show: float32 reassociation over `terms`
    additions, 4 * eps * sqrt(terms) * max |logit| (tests/_float32.py's rule: two programs that
    sum in different orders, the error a random walk of roundings of partial sums at the
    logits' scale)."""
    return 4 * EPS * math.sqrt(terms) * float(np.abs(reference).max(initial=0.0))


def convert(fn: Callable[[jax.Array], jax.Array], input_shape: Sequence[int], name: str,
            *, inputs: Inputs = IMAGES) -> tuple[Any, int]:
    """(the ONNX ModelProto of `fn`, `inputs` [N, *input_shape] -> logits, W8A8 integer
    products as ONNX integer operators; its reduction terms)."""
    from jax2onnx import to_onnx

    # jax2onnx imports its optional plugins (equinox, dm_pix examples) at first use and logs a
    # traceback for each one not installed; none of them concerns a Flax NNX model.
    logging.getLogger("jax2onnx.plugins.plugin_system").setLevel(logging.ERROR)
    # and onnx_ir warns of the untyped shape constants jax2onnx builds, which ONNX infers
    logging.getLogger("onnx_ir.serde").setLevel(logging.ERROR)
    example = symbolic_input(input_shape, inputs.dtype)
    closed = trace(fn, example)

    def replay(images):
        return _eval(closed.jaxpr, closed.consts, images)[0]

    with _dynamic_batch_pads():
        proto = to_onnx(replay, [example],
                        model_name=name, opset=OPSET, input_names=[inputs.name],
                        output_names=[OUTPUT])
    _relus(proto.graph)
    return proto, reduction_terms(closed)


def _relus(graph: Any) -> None:
    """Rewrite Max(x, 0) as Relu(x): jax's relu is a max with zero, and ONNX Runtime fuses a
    Relu (not a Max) into the Conv before it, in its blocked-channel layout, where a Max
    makes it convert every activation out of that layout and back. The same values."""
    from onnx import helper, numpy_helper

    scalars = {i.name: numpy_helper.to_array(i) for i in graph.initializer
               if list(i.dims) in ([], [1])}
    zeros = {name for name, v in scalars.items() if v.dtype.kind == "f" and v.item() == 0}
    for i, node in enumerate(list(graph.node)):
        others = [x for x in node.input if x not in zeros]
        if node.op_type != "Max" or len(node.input) != 2 or len(others) != 1:
            continue
        graph.node.remove(node)
        graph.node.insert(i, helper.make_node("Relu", others, list(node.output),
                                              name=node.name + "_relu"))
    _drop_unused(graph)


def _gemm_biases(graph: Any) -> None:
    """Move a dense layer's bias into its Gemm: jax2onnx writes x @ W + b as Gemm(x, W) or
    Gemm(x, W, 0) with beta 0, and the bias in an Add after it (through a Reshape to [1, N]).
    Gemm(x, W, b) is one kernel, and in an int8 graph the bias is then added in int32 inside
    QGemm instead of in a separate requantized QLinearAdd. The same values: Gemm adds C in
    float32 as the Add does."""
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    producers = _producers(graph)
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    for gemm in [n for n in graph.node if n.op_type == "Gemm"]:
        attrs = {a.name: a for a in gemm.attribute}
        after = consumers.get(gemm.output[0], [])
        no_bias = len(gemm.input) == 2 or (
            len(gemm.input) == 3 and gemm.input[2] in inits
            and not numpy_helper.to_array(inits[gemm.input[2]]).any())
        if (not no_bias or gemm.output[0] in outputs or len(after) != 1
                or after[0].op_type != "Add"):
            continue
        add = after[0]
        (other,) = [x for x in add.input if x != gemm.output[0]] or [None]
        source = producers.get(other)
        if source is not None and source.op_type == "Reshape" and source.input[0] in inits:
            other = source.input[0]
        bias = numpy_helper.to_array(inits[other]) if other in inits else None
        if bias is None or bias.ndim != 1:
            continue
        if len(gemm.input) == 3:
            gemm.input[2] = other
        else:
            gemm.input.append(other)
        if "beta" in attrs:  # else ONNX's default, 1
            attrs["beta"].f = 1.0
        gemm.output[0] = add.output[0]
        graph.node.remove(add)
    _drop_unused(graph)


Integers = Mapping[str, tuple[np.ndarray, np.ndarray]]
"""An int8 student's stored weights: {kernel path: (int8 values, float32 per-output-channel
scales broadcastable to them)}, as kdjax.compress.encode stores weight-only int8."""


def _producers(graph: Any) -> dict[str, Any]:
    return {out: node for node in graph.node for out in node.output}


def _dequantize_weights(proto: Any, dequantized: Mapping[str, np.ndarray],
                        integers: Integers) -> None:
    """Replace each float32 initializer that holds a dequantized kernel (`dequantized`: the
    model's kernels, q * scale) with DequantizeLinear(int8 q, scale) on the output-channel axis:
    the QDQ weight form. Refuses a kernel the graph does not hold as is."""
    import onnx
    from onnx import numpy_helper

    graph = proto.graph
    by_bytes = {np.ascontiguousarray(v, np.float32).tobytes(): name
                for name, v in dequantized.items()}
    found = set()
    for init in list(graph.initializer):
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        name = by_bytes.get(numpy_helper.to_array(init).astype(np.float32).tobytes())
        if name is None or name in found:
            continue
        q, scale = integers[name]
        found.add(name)
        axis = q.ndim - 1  # kdjax kernels: HWIO and [in, out], output channel last
        graph.initializer.remove(init)
        graph.initializer.extend([
            numpy_helper.from_array(np.ascontiguousarray(q, np.int8), f"{init.name}_int8"),
            numpy_helper.from_array(np.ascontiguousarray(scale, np.float32).reshape(-1),
                                    f"{init.name}_scale")])
        graph.node.insert(0, onnx.helper.make_node(
            "DequantizeLinear", [f"{init.name}_int8", f"{init.name}_scale"], [init.name],
            axis=axis, name=f"{init.name}_dequantize"))
    missing = sorted(set(integers) - found)
    if missing:
        raise Mismatch(f"--format onnx: the converted graph holds no initializer equal to the "
                       f"int8 kernel(s) {', '.join(missing)} (dequantized), so their integers "
                       f"cannot be stored; nothing written")


def _drop_unused(graph: Any) -> None:
    """Remove the nodes and initializers nothing reads any more (the int32 casts and zero
    biases the integer operators replaced), so the file holds only what runs."""
    while True:
        used = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
        dead = [node for node in graph.node if not any(o in used for o in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def build(model: nnx.Module, spec: ModelSpec, preprocess: Mapping[str, Any],
          integers: Integers | None = None, *, images: np.ndarray | None = None
          ) -> tuple[bytes, dict[str, Any]]:
    """The checked ONNX file of `model` (kdjax's own student, as `kdjax.export.load` returns
    it) and what was checked, for kdjax_model.json: raises Mismatch, writing nothing, where ONNX
    Runtime disagrees with kdjax beyond the tolerance. A W8A8 student (`is_w8a8`) needs
    `images`: uint8 training images [N, H, W, C], its calibration images (`_build_w8a8`)."""
    if is_w8a8(model):
        return _build_w8a8(model, spec, preprocess, images)
    dequantized, graph_model, folded = None, model, 0
    if integers:
        dequantized = {name: np.asarray(v.get_value(), np.float32)
                       for name, v in _kernels(model).items() if name in integers}
    else:
        # A BatchNorm left after its convolution stays three elementwise passes in ONNX Runtime
        # (its layout transposes sit between them, so its Conv+Mul+Add fusions do not apply);
        # folded into the kernel it is the Conv's bias. Integer kernels are stored as they are.
        graph_model = nnx.clone(model)
        folded = models.fold_batchnorm(graph_model)
    model_bytes, checked = build_fn(
        inference_fn(graph_model, preprocess), spec.input_shape, spec.name,
        dequantized=dequantized, integers=integers, reference=inference_fn(model, preprocess))
    return model_bytes, {**checked, "batchnorms_folded": folded}


def is_w8a8(model: nnx.Module) -> bool:
    """Whether `model` is Qwix's PTQ model (int8 kernels stored as qvalue/scale)."""
    return any("qvalue" in map(str, k) for k, _ in nnx.to_flat_state(nnx.state(model)))


# How many of the calibration images a W8A8 file is checked on.
CHECK_IMAGES = 64


def _build_w8a8(model: nnx.Module, spec: ModelSpec, preprocess: Mapping[str, Any],
                images: np.ndarray | None) -> tuple[bytes, dict[str, Any]]:
    """A W8A8 student in ONNX Runtime's fast QDQ form (kdjax.interop.onnx_qdq), checked on
    `images`. The student and the file both quantize the activations of one float model, its
    float twin (the same int8 weights, float activations): the file with the student's scales
    where the student quantizes, plus requantized tensors the student keeps float, and wider
    ReLU ranges where the student saturates. Each is allowed the student's own distance from
    the twin on these images, so the file may differ from the student by twice that (the
    triangle inequality), plus float32 reassociation. Random images would not do: the
    activation scales are calibrated for real ones."""
    if images is None or not len(images):
        raise ValueError("a W8A8 student's ONNX file is calibrated and checked on the images its "
                         "activation scales came from: pass images (uint8 training images "
                         "[N, H, W, C], e.g. kdjax.compress.encode.training_images)")
    twin, pinned = onnx_qdq.float_twin(model, spec)
    graph_model = nnx.clone(twin)
    folded = models.fold_batchnorm(graph_model)
    kernels = {name: np.asarray(v.get_value(), np.float32)
               for name, v in _kernels(graph_model).items() if name in pinned}
    proto, terms = convert(inference_fn(graph_model, preprocess), spec.input_shape, spec.name)
    _gemm_biases(proto.graph)
    model_bytes = onnx_qdq.quantize(proto, kernels, pinned, images, INPUT).SerializeToString()
    batch = np.asarray(images[:CHECK_IMAGES])
    reference = np.asarray(jax.jit(inference_fn(model, preprocess))(batch), np.float64)
    float_activations = np.asarray(jax.jit(inference_fn(twin, preprocess))(batch), np.float64)
    activation_error = float(np.abs(reference - float_activations).max())
    atol = tolerance(reference, terms) + 2 * activation_error
    rule = (f"twice the student's own activation quantization error on these images, 2 * max "
            f"|int8 - float activations| = 2 * {activation_error:.4g} (the file quantizes the "
            f"same float model's activations, requantizing some the student keeps float), plus "
            f"float32 reassociation over {terms} summed terms, 4 * eps * sqrt({terms}) * max "
            f"|logit| ({np.abs(reference).max():.4g})")
    diff = check(model_bytes, batch, reference, atol, rule)
    diff = max(diff, check(model_bytes, batch[:1], reference[:1], atol, rule))
    got = session(model_bytes).run(None, {INPUT: batch})[0]
    return model_bytes, {"opset": OPSET, "form": onnx_qdq.FORM, "input": INPUT,
                         "output": OUTPUT, "checked_batches": [len(batch), 1],
                         "checked_on": "the calibration (training) images",
                         "max_abs_diff": diff, "tolerance": atol, "tolerance_rule": rule,
                         "top1_agreement": float(np.mean(got.argmax(-1) ==
                                                         reference.argmax(-1))),
                         "batchnorms_folded": folded}


def build_fn(fn: Callable[[jax.Array], jax.Array], input_shape: Sequence[int], name: str, *,
             dequantized: Mapping[str, np.ndarray] | None = None,
             integers: Integers | None = None, inputs: Inputs = IMAGES,
             reference: Callable[[jax.Array], jax.Array] | None = None
             ) -> tuple[bytes, dict[str, Any]]:
    """`build` for any float inference function `fn` (`inputs` -> logits: uint8 images, or a
    language model's tokens); `dequantized` and `integers`: the float kernels to store as
    int8 + scale (QDQ weights); `reference`: kdjax's forward the file is checked against
    (default `fn`)."""
    proto, terms = convert(fn, input_shape, name, inputs=inputs)
    form = "float32"
    if integers:
        # Biases stay in their Adds here: ONNX Runtime rewrites DequantizeLinear -> Gemm with a
        # bias into MatMulNBits, which computes below float32 precision (measured: 1.6e-3 off
        # on logits of 0.4), where these numbers are kdjax's exactly.
        _dequantize_weights(proto, dequantized or {}, integers)
        form = "int8 weights (QDQ: DequantizeLinear on int8 initializers), float activations"
    else:
        _gemm_biases(proto.graph)
    model_bytes = proto.SerializeToString()
    images = inputs.sample(CHECK_BATCH, input_shape)
    reference = np.asarray(jax.jit(reference or fn)(images), np.float64)
    atol = tolerance(reference, terms)
    rule = (f"float32 reassociation over {terms} summed terms: 4 * eps * sqrt({terms}) * "
            f"max |logit| ({np.abs(reference).max():.4g})")
    diff = check(model_bytes, images, reference, atol, rule, inputs.name)
    diff = max(diff, check(model_bytes, images[:1], reference[:1], atol, rule, inputs.name))
    return model_bytes, {"opset": OPSET, "form": form, "input": inputs.name, "output": OUTPUT,
                         "checked_batches": [CHECK_BATCH, 1],
                         "checked_on": f"random {inputs.name}", "max_abs_diff": diff,
                         "tolerance": atol, "tolerance_rule": rule}


def describe(checked: Mapping[str, Any]) -> str:
    """One sentence of what an export holds and how it was checked."""
    on = checked.get("checked_on", f"random {checked['input']}")
    agreement = (f", the same top-1 class on {checked['top1_agreement']:.1%} of them"
                 if "top1_agreement" in checked else "")
    return (f"Weights: {checked['form']}. Checked before writing: ONNX Runtime's logits within "
            f"{checked['tolerance']:.3g} of kdjax's on batches of {checked['checked_batches']} "
            f"of {on} (largest difference {checked['max_abs_diff']:.3g}{agreement}; tolerance: "
            f"{checked['tolerance_rule']}).")


def _kernels(model: nnx.Module) -> dict[str, Any]:
    from kdjax.compress.structured import layer_name

    return {f"{layer_name(path)}/kernel": node.kernel for path, node in nnx.iter_graph(model)
            if isinstance(node, (nnx.Linear, nnx.Conv))}


def session(model_bytes: bytes, *, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session of a serialized model (all graph optimisations on)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # its warnings about unused initializers are not ours
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def check(model_bytes: bytes, images: np.ndarray, reference: np.ndarray, atol: float,
          what: str, input_name: str = INPUT) -> float:
    """Run the file in ONNX Runtime on `images` (uint8, or an LM's tokens) and compare with
    kdjax's `reference` logits; the largest |difference|, or Mismatch beyond `atol`."""
    got = session(model_bytes).run(None, {input_name: images})[0]
    return compare(got, reference, atol, what, fmt="onnx", runtime="ONNX Runtime",
                   instead="--format stablehlo (the same function for any XLA runtime) or "
                           "kdjax's own format")


def compare(got: np.ndarray, reference: np.ndarray, atol: float, what: str, *, fmt: str,
            runtime: str, instead: str) -> float:
    """The largest |difference| between a runtime's logits `got` and kdjax's `reference`, or
    Mismatch (naming `runtime`, the tolerance `atol` and `what` it allows, and the export to use
    `instead`) when the shapes differ or it exceeds `atol`: the check every export format makes
    before it writes a file."""
    if got.shape != reference.shape:
        raise Mismatch(f"--format {fmt}: {runtime} returned logits of shape {got.shape} for "
                       f"{len(reference)} images, kdjax {reference.shape}; nothing written")
    diff = float(np.abs(got.astype(np.float64) - reference).max())
    if not diff <= atol:  # NaN fails too
        raise Mismatch(f"--format {fmt}: {runtime}'s logits differ from kdjax's by up to "
                       f"{diff:.3g} on {len(reference)} images, beyond the tolerance {atol:.3g} "
                       f"({what}); the file is not written. This is a converter fault: export "
                       f"{instead} meanwhile")
    return diff


def snippet(path: str, spec: ModelSpec) -> str:
    return SNIPPET.format(path=path, shape=", ".join(map(str, spec.input_shape)),
                          classes=spec.num_classes)
