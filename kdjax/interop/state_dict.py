"""State-dict files: a flat {name: array} read from a `.pth`/`.pt` or `.safetensors` file, and
written back as either.

The format is told by the file's first bytes, not its name. A `.pth` is read by
`kdjax.interop.pth` (no pickled code runs); a `.safetensors` file by the `safetensors` package's
numpy API (no torch needed). What training scripts wrap around a state_dict is unwrapped, and
said: a checkpoint dict such as RepDistiller's {"epoch", "model", "optimizer", ...} gives the
tensors under its "model" key (or the one `key` names), and the "module." prefix that
nn.DataParallel / DistributedDataParallel put on every name is stripped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import os
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from kdjax.interop import pth

__all__ = ["Loaded", "load", "save", "sha256", "FORMATS", "FLOAT_DTYPES", "read_safetensors",
           "write_safetensors"]

FORMATS = ("safetensors", "torch")
# Where training scripts put the state_dict inside a checkpoint dict, in the order tried.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
DATA_PARALLEL_PREFIX = "module."
# The safetensors header entry in which `kdjax export --format safetensors` records the model
# spec, layout, normalisation and dataset, so that importing the file back needs no options.
METADATA_KEY = "kdjax"


@dataclasses.dataclass
class Loaded:
    """A file's tensors, what it was (`format`: "pth" | "safetensors"), what was done to it."""

    tensors: dict[str, np.ndarray]
    format: str
    notes: list[str]
    metadata: dict[str, str]


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_safetensors(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n < (1 << 30) and head[8:9] == b"{"


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"tensor {tuple(value.shape)}"
    return type(value).__name__


def _is_tensor_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and bool(obj)
            and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()))


def _unwrap(obj: Any, path: str, key: str | None, notes: list[str]) -> dict[str, np.ndarray]:
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            keys = sorted(map(str, obj)) if isinstance(obj, Mapping) else []
            raise ValueError(f"--key {key!r}: {path} has no entry {key!r} (its top-level keys: "
                             f"{keys})")
        obj = obj[key]
        if not _is_tensor_dict(obj):
            raise ValueError(f"--key {key!r}: the entry {key!r} of {path} is a {_describe(obj)}, "
                             f"not a dict of tensors")
        notes.append(f"read the state_dict under the key {key!r}")
        return dict(obj)
    if _is_tensor_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for k in WRAPPER_KEYS:
            if _is_tensor_dict(obj.get(k)):
                others = sorted(str(o) for o in obj if o != k)
                notes.append(f"read the state_dict under the key {k!r} of this training "
                             f"checkpoint (ignored: {', '.join(others) or 'nothing else'})")
                return dict(obj[k])
        entries = ", ".join(f"{k!r} ({_describe(v)})" for k, v in list(obj.items())[:12])
        raise ValueError(f"{path} holds a dict that is not a state_dict (a dict of tensors) and "
                         f"none of its keys {WRAPPER_KEYS} holds one: {entries}. Name the entry "
                         f"that holds the state_dict with --key KEY")
    raise ValueError(f"{path} holds a {_describe(obj)}, not a state_dict (a dict of tensors); "
                     f"save one with torch.save(model.state_dict(), 'model.pth')")


def load(path: str, *, key: str | None = None) -> Loaded:
    """The state_dict in `path` (.pth/.pt or .safetensors) as {name: numpy array}.

    Args:
      path: the file.
      key: for a checkpoint dict, the entry holding the state_dict (default: the first of
        WRAPPER_KEYS that holds a dict of tensors, or the file itself when it is one).
    Raises:
      FileNotFoundError; pth.UnsafePickleError for a .pth holding anything but tensors and plain
      containers (a pickled whole model is named as such); ValueError for anything else that is
      not a state_dict.
    """
    notes: list[str] = []
    metadata: dict[str, str] = {}
    if os.path.isdir(path):
        # A Hugging Face or timm folder holds its weights in one or more files inside.
        inside = sorted(f for f in os.listdir(path)
                        if f.endswith((".safetensors", ".pth", ".pt", ".bin")))
        raise ValueError(f"--from {path!r} is a directory; kdjax import reads one state_dict "
                         f"file (.pth/.pt or .safetensors)"
                         + (f": pass one of the files in it, e.g. --from "
                            f"{os.path.join(path, inside[0])}" if inside else
                            ", and that directory holds none"))
    try:
        is_st = _is_safetensors(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"--from {path!r}: no such file") from None
    if is_st:
        try:
            with safetensors.safe_open(path, framework="numpy") as f:
                metadata = dict(f.metadata() or {})
            obj = safetensors.numpy.load_file(path)
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
            raise ValueError(f"{path} is not a readable .safetensors file ({e})") from None
        fmt = "safetensors"
    elif pth.is_pth(path):
        obj, fmt = pth.read(path), "pth"
    else:
        raise ValueError(f"{path} is neither a .safetensors file nor a PyTorch .pth/.pt file")
    tensors = _unwrap(obj, path, key, notes)
    if all(k.startswith(DATA_PARALLEL_PREFIX) for k in tensors):
        tensors = {k[len(DATA_PARALLEL_PREFIX):]: v for k, v in tensors.items()}
        notes.append(f"stripped the {DATA_PARALLEL_PREFIX!r} prefix that nn.DataParallel / "
                     f"DistributedDataParallel put on every name (the file was saved from the "
                     f"wrapper; model.module.state_dict() saves without it)")
    return Loaded(tensors=tensors, format=fmt, notes=notes, metadata=metadata)


def save(path: str, tensors: Mapping[str, np.ndarray], *, format: str,
         metadata: Mapping[str, Any] | None = None) -> None:
    """Write `tensors` as a .safetensors file (`metadata` goes into its header, values as JSON
    unless strings) or as a torch.save-compatible .pth ("torch"; metadata is not stored)."""
    if format == "safetensors":
        meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
        safetensors.numpy.save_file({k: np.require(v, requirements="C") for k, v in
                                     tensors.items()}, path, metadata=meta or None)
    elif format == "torch":
        pth.write(path, tensors)
    else:
        raise ValueError(f"state-dict format must be one of {FORMATS}, got {format!r}")


#: The safetensors dtypes of weights that `read_safetensors` reads (numpy has no bfloat16 of its
#: own: ml_dtypes', which JAX uses, stands in, so no torch is needed).
FLOAT_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                "BF16": np.dtype(ml_dtypes.bfloat16)}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of the .safetensors file `path`, bfloat16 included, read from its header and
    bytes; each is checked against the file's size before it is read.

    Raises ValueError naming the file (and the tensor) for a truncated or corrupt file and for a
    dtype other than FLOAT_DTYPES' (a quantized checkpoint).
    """
    size = os.path.getsize(path)
    fix = "copy or download it again"
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= size - 8:
            raise ValueError(f"{path} is not a readable .safetensors file (truncated or corrupt "
                             f"header): {fix}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path} has a corrupt .safetensors header (not JSON): "
                             f"{fix}") from None
        # Mapped, not read: the arrays are views of the file until they are converted.
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    base, available = 8 + n, size - 8 - n
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = FLOAT_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} is {entry.get('dtype')}, a dtype kdjax "
                             f"cannot read (it reads {sorted(FLOAT_DTYPES)}): save the model "
                             f"unquantized, e.g. model.to(torch.bfloat16).save_pretrained(DIR)")
        start, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        count = int(np.prod(shape))
        if end > available or end - start != count * dtype.itemsize:
            raise ValueError(f"{path} is truncated or corrupt: tensor {name!r} {shape} "
                             f"{entry['dtype']} lies at bytes {start}..{end} of a data section of "
                             f"{available}: {fix}")
        out[name] = np.frombuffer(data, dtype, count=count, offset=base + start).reshape(shape)
    return out


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (FLOAT_DTYPES', bfloat16 included) as a .safetensors file."""
    names = {v: k for k, v in FLOAT_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, x in tensors.items():
        header[name] = {"dtype": names[x.dtype], "shape": list(x.shape),
                        "data_offsets": [offset, offset + x.nbytes]}
        offset += x.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for x in tensors.values():
            f.write(np.ascontiguousarray(x).tobytes())
