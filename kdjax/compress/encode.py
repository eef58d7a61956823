"""What `kdjax export` writes for a compressed student, and how `kdjax.export.load` reads it back.

The run's config says what the student is (its `prune` and `quant` sections; `kdjax export` may
override `quant.*` to quantize a float run after training):

- structured pruning: the pruned channels are removed (kdjax.compress.structured.shrink); the
  export is an ordinary one of the smaller architecture, its ModelSpec recording the new widths.
- unstructured or N:M pruning: each parameter is stored in the smallest of three encodings:
  dense, a bitmap of the non-zeros (1 bit per entry) plus their values, or their flat indices
  (uint16 when the array has <= 65536 entries, else uint32) plus their values.
- quantization: integer weights and their float32 per-channel scales. W8A8 (activations int8)
  stores Qwix's PTQ model (int8 kernels, static activation scales calibrated on
  quant.calibration_examples training images), which `load` runs with Qwix; weight-only int8/int4
  stores the integers (int4 packed two per byte) and `load` dequantizes them into the float model.
  A student pruned unstructured as well has its int8 weights in the sparse encoding (pruned
  weights quantize to exactly 0).

Encoded arrays go into one `weights.npz` (numpy's zip of raw arrays, read with
allow_pickle=False: no code is ever unpickled), concatenated per dtype; the export's
kdjax_model.json ("compression") holds where each array lies in them ("index") and a per-layer
table of shapes, non-zeros, sparsity, encoding and bytes ("layers").
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import augment, data, plan as plan_lib
from kdjax.compress import quantize, structured
from kdjax.compress.structured import layer_name
from kdjax.models import ModelSpec

FILE = "weights.npz"
UNSTRUCTURED = ("magnitude", "random", "nm")


@dataclasses.dataclass
class Encoded:
    """An export's content: the model to describe, its spec, the encoded arrays packed per dtype
    (None: stored as an ordinary Orbax export) and the record for kdjax_model.json (None: not
    compressed)."""

    model: nnx.Module
    spec: ModelSpec
    arrays: dict[str, np.ndarray] | None
    record: dict[str, Any] | None


def export_config(saved: Mapping[str, Any], overrides: Sequence[str] = ()) -> plan_lib.RunPlan:
    """The plan a run was trained with (its checkpoint's config), with `kdjax export`'s
    overrides: quant.* (quantize a float run on export) and data.data_dir (where its calibration
    images are); anything else is the run's own and refused."""
    for item in overrides:
        key = item.removeprefix("--").partition("=")[0].removeprefix("config.")
        if not (key.startswith("quant.") or key == "data.data_dir"):
            raise ValueError(f"kdjax export takes --config.quant.* (quantize on export) and "
                             f"--config.data.data_dir (the calibration images' data dir) only, "
                             f"got {item!r}: the rest is the run's config")
    return plan_lib.as_plan(saved, overrides)


def training_images(data_plan: plan_lib.Data, n: int, *, seed: int) -> np.ndarray:
    """n training images (uint8 [n, H, W, C], in order) drawn with the run's seed: the images a
    post-training quantization is calibrated on."""
    arrays = data.load_arrays(data_plan.name, data_plan.train_split,
                              data_dir=data_plan.data_dir or None)
    count = len(arrays["label"])
    idx = np.sort(np.random.default_rng(seed).choice(count, min(n, count), replace=False))
    return arrays["image"][idx]


def calibration_images(data_plan: plan_lib.Data, preprocess: Mapping[str, Any], n: int, *,
                       seed: int) -> np.ndarray:
    """`training_images`, preprocessed as the model sees them."""
    recipe = augment.Preprocess(mean=tuple(preprocess["mean"]), std=tuple(preprocess["std"]))
    return np.asarray(augment.preprocess(jnp.asarray(training_images(data_plan, n, seed=seed)),
                                         recipe, key=None, dtype=jnp.float32))


def for_other_format(model: nnx.Module, spec: ModelSpec, fmt: str, *, prune: plan_lib.Prune,
                     quant: plan_lib.Quant) -> tuple[nnx.Module, ModelSpec]:
    """The student for an export in another format (kdjax.interop: safetensors, torch,
    stablehlo, litert): shrunk when pruned structurally; integer weights have no place there."""
    if quant.mode != "none":
        raise ValueError(f"quant.mode={quant.mode!r}: --format {fmt} cannot represent integer "
                         f"weights and scales; the formats that can: kdjax (drop --format) and, "
                         f"for int8, onnx; or export the float weights with "
                         f"--config.quant.mode=none")
    if prune.method == "structured":
        model, spec, _ = structured.shrink(model, spec)
    return model, spec


def _is_key(dtype) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _flat(model: nnx.Module) -> dict[str, np.ndarray]:
    # A typed PRNG key (the RngKey of a model's Dropout) is stored as its key data, as Orbax
    # stores it in an uncompressed export.
    return {layer_name(k): np.asarray(jax.random.key_data(v.get_value()) if _is_key(v.dtype)
                                      else v.get_value())
            for k, v in nnx.to_flat_state(nnx.state(model))}


def _is_param(model: nnx.Module) -> set[str]:
    return {layer_name(k) for k, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def encode(model: nnx.Module, spec: ModelSpec, calibration: Callable[[int], np.ndarray] | None,
           *, prune: plan_lib.Prune, quant: plan_lib.Quant) -> Encoded:
    """The export of `model` (a run's student, rebuilt from `spec`) as the run's `prune` and
    `quant` sections describe it.

    `calibration(n)` returns n preprocessed training images (float [n, H, W, C]); it is called
    only for W8A8 quantization.
    """
    quantize.check_config(quant)
    record: dict[str, Any] = {}
    if prune.method == "structured":
        model, spec, sizes = structured.shrink(model, spec)
        record["channels"] = {name: {"before": a, "after": b} for name, (a, b) in sizes.items()}
    if quant.mode != "none":
        arrays = _encode_int(model, quant, calibration)
        record.update(encoding="int", weights=quant.weights, activations=quant.activations,
                      quant={"weights": quant.weights, "activations": quant.activations,
                             "exclude": quant.exclude,
                             "calibration_examples": quant.calibration_examples})
        if prune.method in UNSTRUCTURED:  # pruned weights quantize to exactly 0
            arrays = _encode_sparse(arrays, {n for n, a in arrays.items()
                                             if a.dtype == np.int8 and a.ndim >= 2})
    elif prune.method in UNSTRUCTURED:
        arrays = _flat(model)
        arrays = _encode_sparse(arrays, {n for n in _is_param(model) if arrays[n].ndim >= 2})
        record["encoding"] = "sparse"
    else:
        arrays = None
        if record:
            record["encoding"] = "dense"
    if arrays is not None:
        arrays, record["index"] = pack(arrays)
    if record:
        record["layers"] = layer_table(model, None if arrays is None else
                                       unpack(arrays, record["index"]))
        # Everything stored (BatchNorm statistics, activation scales included), and the same
        # model's arrays in float32.
        stored = arrays if arrays is not None else _flat(model)  # (packed: the same bytes)
        record["bytes"] = int(sum(v.nbytes for v in stored.values()))
        record["float32_bytes"] = int(sum(v.size * 4 for v in _flat(model).values()))
    return Encoded(model, spec, arrays, record or None)


def layer_table(model: nnx.Module, arrays: Mapping[str, np.ndarray] | None
                ) -> dict[str, dict[str, Any]]:
    """Per parameter: shape, entries, non-zeros, sparsity, how it is stored and its bytes (its
    encoded arrays', or float32's when the export is an ordinary one)."""
    flat, table = _flat(model), {}
    for name in sorted(_is_param(model)):
        value = flat[name]
        parts = ({k: v for k, v in arrays.items()
                  if k == name or k.startswith(name + ":") or k.startswith(name + "/")}
                 if arrays is not None else {name: value})
        suffixes = {part for k in parts for part in k.split(":")[1:]}
        ints = [e for e in ("int8", "int4") if e in suffixes] or (
            ["int8"] if any(v.dtype == np.int8 for v in parts.values()) else [])
        encoding = "+".join(ints + [e for e in ("bitmap", "indices") if e in suffixes]) or "dense"
        nonzeros = int(np.count_nonzero(value))
        table[name] = {"shape": list(value.shape), "size": int(value.size),
                       "nonzeros": nonzeros, "sparsity": 1.0 - nonzeros / max(value.size, 1),
                       "encoding": encoding, "bytes": int(sum(v.nbytes for v in parts.values())),
                       "float32_bytes": int(value.size * 4)}
    return table


def describe(record: Mapping[str, Any]) -> str:
    """The record as `kdjax export` prints it: one line per parameter, then the totals."""
    head = ("parameter", "shape", "non-zeros", "sparsity", "stored as", "bytes")
    rows = [(name, "x".join(map(str, r["shape"])) or "scalar", f"{r['nonzeros']:,}",
             f"{100 * r['sparsity']:.1f}%", r["encoding"], f"{r['bytes']:,}")
            for name, r in record["layers"].items()]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(row, widths))) for row in [head, *rows]]
    lines.append(f"stored: {record['bytes']:,} bytes, {record['float32_bytes'] / record['bytes']:.2f}x "
                 f"fewer than the same model's float32 arrays ({record['float32_bytes']:,})")
    if "channels" in record:
        lines.append("channels kept: " + ", ".join(f"{n} {c['after']}/{c['before']}"
                                                   for n, c in record["channels"].items()))
    return "\n".join(lines)


def pack(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """One flat array per dtype, and where each named array lies in it: a few large arrays in
    the file instead of one (with its ~250 bytes of headers) per parameter and scale."""
    parts: dict[str, list[np.ndarray]] = {}
    index = {}
    for name, a in arrays.items():
        chunks = parts.setdefault(a.dtype.name, [])
        index[name] = [a.dtype.name, int(sum(c.size for c in chunks)), list(a.shape)]
        chunks.append(np.ascontiguousarray(a).reshape(-1))
    return {k: np.concatenate(v) for k, v in parts.items()}, index


def unpack(blobs: Mapping[str, np.ndarray], index: Mapping[str, list]) -> dict[str, np.ndarray]:
    return {name: blobs[dtype][offset:offset + int(np.prod(shape))].reshape(shape)
            for name, (dtype, offset, shape) in index.items()}


# -- unstructured: bitmap or indices ------------------------------------------------------------

def _encode_sparse(arrays: Mapping[str, np.ndarray], candidates: set[str]
                   ) -> dict[str, np.ndarray]:
    """`arrays` with each of `candidates` in the smallest of dense, bitmap + values and
    indices + values (the values keep their dtype: float32 weights, or int8 ones)."""
    out = {}
    for name, a in arrays.items():
        nz = np.flatnonzero(a)
        index_dtype = np.uint16 if a.size <= 2**16 else np.uint32
        options = {"dense": a.nbytes,
                   "bitmap": (a.size + 7) // 8 + nz.size * a.itemsize,
                   "indices": nz.size * np.dtype(index_dtype).itemsize + nz.size * a.itemsize}
        best = min(options, key=options.get) if name in candidates else "dense"
        if best == "dense":
            out[name] = a
            continue
        out[f"{name}:values"] = a.reshape(-1)[nz]
        if best == "bitmap":
            out[f"{name}:bitmap"] = np.packbits(a.reshape(-1) != 0)
        else:
            out[f"{name}:indices"] = nz.astype(index_dtype)
    return out


def _decode_sparse(name: str, shape, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    values = arrays[f"{name}:values"]
    dense = np.zeros(int(np.prod(shape)), values.dtype)
    if f"{name}:bitmap" in arrays:
        where = np.unpackbits(arrays[f"{name}:bitmap"], count=dense.size).astype(bool)
        dense[where] = values
    else:
        dense[arrays[f"{name}:indices"].astype(np.int64)] = values
    return dense.reshape(shape)


# -- integers -----------------------------------------------------------------------------------

def _pack_int4(q: np.ndarray) -> np.ndarray:
    nibbles = (q.reshape(-1).astype(np.int16) + 8).astype(np.uint8)  # [-8, 7] -> [0, 15]
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(8))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def _unpack_int4(packed: np.ndarray, shape) -> np.ndarray:
    nibbles = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(-1)
    return (nibbles[:int(np.prod(shape))].astype(np.int16) - 8).astype(np.int8).reshape(shape)


def refuse_for_onnx(prune: plan_lib.Prune, quant: plan_lib.Quant) -> None:
    """Refuse a student that ONNX cannot hold as kdjax stores it: int4 weights."""
    if quant.mode != "none" and quant.weights != "int8":
        sparse = "sparse " if prune.method in UNSTRUCTURED else ""
        raise ValueError(f"--format onnx cannot represent this student: quant.weights="
                         f"{quant.weights!r} ({sparse}{quant.weights} weights packed two per byte) "
                         f"is stored by kdjax's own export format only; the formats that can: "
                         f"kdjax (drop --format). For ONNX, export it with "
                         f"--config.quant.weights=int8 or --config.quant.mode=none")


def integer_weights(record: Mapping[str, Any], blobs: Mapping[str, np.ndarray]
                    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The int8 kernels of a weight-only int8 export (`blobs`: its packed arrays):
    {kernel path: (int8 values, float32 scales)}, sparse-encoded ones decoded."""
    arrays = unpack(blobs, record["index"])
    out = {}
    for key, scale in arrays.items():
        name = key.removesuffix(":scale")
        if name == key or not any(k.startswith(f"{name}:int8") for k in arrays):
            continue
        q = (arrays[f"{name}:int8"] if f"{name}:int8" in arrays else
             _decode_sparse(f"{name}:int8", record["layers"][name]["shape"], arrays))
        out[name] = (q, scale)
    return out


def _weight_only_layers(model: nnx.Module, quant: plan_lib.Quant) -> set[str]:
    """The kernels quantized weight-only: those of layers outside quant.exclude."""
    rules = quantize.rules(quant, static=False)[:-1]  # the exclusions
    out = set()
    for path, node in nnx.iter_graph(model):
        if isinstance(node, (nnx.Linear, nnx.Conv)):
            name = layer_name(path)
            if not any(re.fullmatch(r.module_path, name) for r in rules):
                out.add(f"{name}/kernel")
    return out


def _encode_int(model: nnx.Module, quant: plan_lib.Quant, calibration) -> dict[str, np.ndarray]:
    if quant.activations != "none":
        ptq = quantize.calibrated(model, quant, calibration(quant.calibration_examples))
        return _flat(ptq)
    out, layers = {}, _weight_only_layers(model, quant)
    for name, a in _flat(model).items():
        if name not in layers:
            out[name] = a
            continue
        q, scale = quantize.quantize_weight(a, quant.weights)
        out[f"{name}:{quant.weights}"] = q if quant.weights == "int8" else _pack_int4(q)
        out[f"{name}:scale"] = scale
    return out


def decode(spec: ModelSpec, record: Mapping[str, Any], blobs: Mapping[str, np.ndarray]
           ) -> nnx.Module:
    """The model an encoded export stores (`blobs`: its weights.npz; module docstring), ready to
    run."""
    arrays = unpack(blobs, record["index"])
    if record["encoding"] == "int" and record["activations"] != "none":
        # Qwix builds its PTQ structure by running the model (it cannot be traced abstractly).
        # The record keeps the quant keys that shaped the model; through the schema they are
        # the section `structure_like` takes.
        quant = plan_lib.as_plan({"quant": {**record["quant"], "mode": "ptq"}}).quant
        model = quantize.structure_like(spec.build(), quant, spec.input_shape)
    else:
        model = spec.abstract()  # nnx.eval_shape: no weights initialised only to be replaced
    state = nnx.state(model)
    for key, var in nnx.to_flat_state(state):
        name, shape = layer_name(key), var.shape
        if name in arrays:
            value = arrays[name]
        elif f"{name}:values" in arrays:
            value = _decode_sparse(name, shape, arrays)
        elif f"{name}:int8" in arrays or f"{name}:int8:values" in arrays:
            q = (arrays[f"{name}:int8"] if f"{name}:int8" in arrays else
                 _decode_sparse(f"{name}:int8", shape, arrays))
            value = quantize.dequantize_weight(q, arrays[f"{name}:scale"])
        elif f"{name}:int4" in arrays:
            value = quantize.dequantize_weight(_unpack_int4(arrays[f"{name}:int4"], shape),
                                               arrays[f"{name}:scale"])
        else:
            raise ValueError(f"the export has no array for {name} of its {spec.name} model: it "
                             f"is incomplete or of another architecture")
        if _is_key(var.dtype):
            # The default implementation is the one nnx.Rngs made the key with.
            value = jax.random.wrap_key_data(value)
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"the export's {name} is {value.shape}, its {spec.name} model "
                             f"expects {shape}")
        var.set_value(value if _is_key(var.dtype) else jnp.asarray(value, var.dtype))
    nnx.update(model, state)
    return model
