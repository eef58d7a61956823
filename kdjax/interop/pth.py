"""PyTorch `.pth`/`.pt` files, read without running pickled code and written without torch.

A `torch.save` file is a pickle, and unpickling calls whatever callables the file names: loading an
untrusted one with plain `pickle` (or `torch.load` without `weights_only=True`) can run any code.
This reader is a `pickle.Unpickler` whose `find_class` hands out only stand-ins written here: the
functions PyTorch's pickles use to rebuild tensors (`torch._utils._rebuild_tensor_v2` and its
Parameter wrappers) become functions that slice numpy arrays out of the storages, `OrderedDict` and
the primitive containers stay themselves, and every other global becomes an inert placeholder class
that records its name and accepts any arguments without doing anything. The load therefore runs to
its end without executing anything from the file, and then refuses it, naming each such global: a
whole pickled `nn.Module` (placeholders with `_modules` state) is told apart from other objects, so
the message can say `torch.save(model.state_dict(), ...)`.

Both of PyTorch's formats are read:
  zip (the default since PyTorch 1.6): ARCHIVE/data.pkl, one record ARCHIVE/data/KEY per storage,
      ARCHIVE/byteorder;
  legacy (`_use_new_zipfile_serialization=False`): five pickles in a row (magic number, protocol
      1001, system info, the object, the storage keys), then each storage as an int64 element
      count and its bytes.
The pre-1.0 tar format and TorchScript archives are refused with the way to re-save them.

`write` produces the zip format from numpy arrays (the opcodes of a state_dict's pickle are
emitted directly, so torch is not needed), which `torch.load(path, weights_only=True)` reads.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["UnsafePickleError", "read", "write", "is_pth"]

# torch's legacy storage classes (pickled as GLOBAL "torch <Name>") and the arrays they hold.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}
_STORAGE_NAMES = {np.dtype(v): k for k, v in _STORAGE_DTYPES.items() if k != "UntypedStorage"}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _convert_hint(path: str) -> str:
    # torch's own safe loader (weights_only=True) also runs nothing from the file; a file it
    # refuses needs the file's code to load, which no hint here should tell anyone to run.
    return (f"convert it once where torch is installed, with torch's safe loader, which runs no "
            f"code from the file either: `python -c \"import torch; from safetensors.torch "
            f"import save_file; save_file(torch.load('{path}', weights_only=True), "
            f"'model.safetensors')\"`, and import the .safetensors file (if torch refuses it too, "
            f"re-save the weights with torch.save(model.state_dict(), ...) where the model's code "
            f"is installed)")


class UnsafePickleError(ValueError):
    """A .pth file holds (or calls) something other than tensors and plain containers."""


# ----------------------------------------------------------------------------
# stand-ins handed out by the restricted unpickler
# ----------------------------------------------------------------------------
class _Refused:
    """An instance of a refused global: stores what pickle gives it, runs nothing.

    Pickle's opcodes call these methods on the objects they build (REDUCE/NEWOBJ construct,
    BUILD sets state, SETITEMS/APPENDS fill containers), so the load goes on to its end and the
    whole file can be described; none of them does anything with what it gets.
    """

    global_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_pickle_args"] = args
        obj.__dict__["_pickle_state"] = None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["_pickle_state"] = state

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass

    @property
    def is_module(self) -> bool:
        state = self.__dict__["_pickle_state"]
        if isinstance(state, tuple) and state and isinstance(state[0], dict):
            state = state[0]
        return isinstance(state, dict) and ("_modules" in state or "_parameters" in state)


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(_STORAGE_DTYPES[self.name])


@dataclasses.dataclass(frozen=True)
class _Marker:
    """torch.Tensor / torch.nn.Parameter, as the type argument of _rebuild_from_type_v2."""

    name: str


class _Storage:
    """A storage's elements, read when first needed (after the pickle, in the legacy format)."""

    def __init__(self, dtype: np.dtype, numel: int, where: str):
        self.dtype, self.numel, self.where = dtype, numel, where
        self.array: np.ndarray | None = None
        self.parent: _Storage | None = None  # a legacy storage view: a slice of its parent
        self.offset = 0

    def view(self, offset: int, numel: int) -> "_Storage":
        child = _Storage(self.dtype, numel, self.where)
        child.parent, child.offset = self, offset
        return child

    def elements(self) -> np.ndarray:
        if self.array is None and self.parent is not None:
            self.array = self.parent.elements()[self.offset:self.offset + self.numel]
        if self.array is None:
            raise UnsafePickleError(f"{self.where}: a tensor refers to a storage with no data")
        return self.array


@dataclasses.dataclass
class _LazyTensor:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def materialize(self) -> np.ndarray:
        arr = self.storage.elements()
        if any(s == 0 for s in self.size):
            return np.zeros(self.size, arr.dtype)
        last = self.offset + sum((n - 1) * st for n, st in zip(self.size, self.stride))
        if last >= arr.size:
            raise UnsafePickleError(f"{self.storage.where}: a tensor of size {self.size}, stride "
                                    f"{self.stride}, offset {self.offset} reaches past its "
                                    f"storage's {arr.size} elements (a corrupt file)")
        view = np.lib.stride_tricks.as_strided(
            arr[self.offset:], shape=self.size,
            strides=tuple(st * arr.itemsize for st in self.stride), writeable=False)
        return np.array(view)  # a contiguous copy that owns its memory


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(v) is int and v >= 0 for v in value):
        raise UnsafePickleError(f"a tensor's {what} is {value!r}, not a tuple of ints >= 0")
    return value


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False,
                    backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage) or type(storage_offset) is not int or storage_offset < 0:
        raise UnsafePickleError("a tensor record does not point to one of the file's storages")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise UnsafePickleError(f"a tensor's size {size} and stride {stride} differ in length")
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor, _rebuild_parameter) or not isinstance(new_type, _Marker):
        raise UnsafePickleError("a tensor of a subclass other than torch.Tensor/Parameter")
    return func(*args)


def _encode(text: str, encoding: str = "latin1") -> bytes:
    # How protocol-2 pickles store bytes; any other codec is refused.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"_codecs.encode with {encoding!r}: not how pickle stores bytes")
    return text.encode("latin1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("_codecs", "encode"): _encode,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _Marker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _Marker("torch.nn.Parameter"),
    ("torch", "Size"): tuple,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, where: str, storage_bytes):
        super().__init__(file)
        self.where = where
        self.storage_bytes = storage_bytes  # key -> bytes (zip), or None (legacy: read later)
        self.storages: dict[str, _Storage] = {}
        self.refused: list[str] = []

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        full = f"{module}.{name}"
        if full not in self.refused:
            self.refused.append(full)
        return type(name, (_Refused,), {"global_name": full, "__module__": __name__})

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] in ("storage", b"storage")):
            raise UnsafePickleError(f"{self.where}: unknown persistent id {pid!r:.80}")
        if len(pid) == 5:  # zip: (storage, type, key, location, numel)
            _, storage_type, key, _, numel = pid
            view = None
        elif len(pid) == 6:  # legacy: ..., view_metadata
            _, storage_type, key, _, numel, view = pid
        else:
            raise UnsafePickleError(f"{self.where}: malformed storage record {pid!r:.80}")
        if not isinstance(storage_type, _StorageType) or type(numel) is not int or numel < 0:
            raise UnsafePickleError(f"{self.where}: malformed storage record {pid!r:.80}")
        key = str(key)
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(storage_type.dtype, numel, self.where)
            if self.storage_bytes is not None:
                storage.array = self.storage_bytes(key, storage.dtype, numel)
        if view is not None:
            view_key, offset, view_numel = view
            return storage.view(int(offset), int(view_numel))
        return storage


# ----------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------
def is_pth(path: str) -> bool:
    """Whether `path` looks like a torch.save file (zip or legacy pickle), by its first bytes."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def read(path: str) -> Any:
    """The object a torch.save file holds, tensors as numpy arrays, containers as dicts/lists.

    Raises UnsafePickleError naming the refused globals when the file holds anything but tensors,
    (Ordered)dicts, lists, tuples, sets and primitives, with the fix (a pickled whole model gets
    `torch.save(model.state_dict(), ...)`); ValueError for a file that is not a readable .pth.
    """
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:4] == b"PK\x03\x04":
        return _read_zip(path)
    if len(head) >= 262 and head[257:262] == b"ustar":
        raise ValueError(f"{path} is in PyTorch's pre-1.0 tar format, which kdjax does not read; "
                         f"load it with torch and re-save it (torch.save(state_dict, path)) or "
                         f"{_convert_hint(path)}")
    if head[:1] == b"\x80":
        return _read_legacy(path)
    raise ValueError(f"{path} is not a PyTorch file (neither torch.save's zip nor its legacy "
                     f"pickle format) nor a .safetensors file")


def _storage_reader(archive: zipfile.ZipFile, prefix: str, big_endian: bool, where: str):
    names = set(archive.namelist())

    def storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
        name = f"{prefix}data/{key}"
        if name not in names:
            raise UnsafePickleError(f"{where}: the storage {name} is missing (a truncated file?)")
        data = archive.read(name)
        if len(data) < numel * dtype.itemsize:
            raise UnsafePickleError(f"{where}: the storage {name} holds {len(data)} bytes, "
                                    f"{numel} x {dtype.itemsize} expected (a truncated file?)")
        arr = np.frombuffer(data, dtype.newbyteorder(">" if big_endian else "<"), count=numel)
        return arr.astype(dtype) if big_endian else arr

    return storage


def _read_zip(path: str) -> Any:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not a readable zip archive ({e}): a truncated .pth?") from None
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            raise UnsafePickleError(
                f"{path} is a TorchScript archive (torch.jit.save), not a state_dict; save the "
                f"weights with torch.save(model.state_dict(), 'model.pth') and import that")
        if len(pickles) != 1:
            raise ValueError(f"{path} is a zip archive but not a torch.save file (no single "
                             f"ARCHIVE/data.pkl in it)")
        prefix = pickles[0][:-len("data.pkl")]
        big = (prefix + "byteorder" in names
               and archive.read(prefix + "byteorder").strip() == b"big")
        unpickler = _Unpickler(io.BytesIO(archive.read(pickles[0])), path,
                               _storage_reader(archive, prefix, big, path))
        obj = _load(unpickler, path)
        return _materialize(obj)


def _read_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        def header():
            return _load(_Unpickler(f, path, None), path)

        # A plain (non-torch) pickle stops here: its first object is not the magic number (and
        # one that names a global is refused by _load).
        if header() != _LEGACY_MAGIC:
            raise ValueError(f"{path} is a pickle but not a torch.save file (its first object is "
                             f"not PyTorch's magic number)")
        if header() != _LEGACY_PROTOCOL:
            raise ValueError(f"{path}: unknown PyTorch legacy protocol version")
        info = header()
        little = not isinstance(info, dict) or info.get("little_endian", True)
        unpickler = _Unpickler(f, path, None)
        obj = _load(unpickler, path)
        keys = header()
        if not isinstance(keys, list):
            raise ValueError(f"{path}: malformed storage key list")
        order = "<" if little else ">"
        for key in keys:
            storage = unpickler.storages.get(str(key))
            if storage is None:
                raise UnsafePickleError(f"{path}: the data of an unknown storage {key!r}")
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{path} is truncated (storage {key!r} is missing)")
            (numel,) = struct.unpack(order + "q", raw)
            data = f.read(numel * storage.dtype.itemsize)
            if numel != storage.numel or len(data) != numel * storage.dtype.itemsize:
                raise ValueError(f"{path} is truncated or corrupt (storage {key!r}: {numel} "
                                 f"elements recorded, {storage.numel} expected)")
            arr = np.frombuffer(data, storage.dtype.newbyteorder(order))
            storage.array = arr if little else arr.astype(storage.dtype)
        return _materialize(obj)


def _load(unpickler: _Unpickler, path: str) -> Any:
    try:
        obj = unpickler.load()
    except UnsafePickleError:
        if unpickler.refused:
            _refuse(path, unpickler.refused, None)
        raise
    except Exception as e:  # noqa: BLE001  (any malformed or hostile pickle)
        if unpickler.refused:
            _refuse(path, unpickler.refused, None)
        raise ValueError(f"{path}: unreadable pickle ({type(e).__name__}: {e})") from None
    if unpickler.refused:
        _refuse(path, unpickler.refused, obj)
    return obj


def _find_module(obj: Any, where: str = "") -> tuple[str, str] | None:
    """(path in the file, class) of the first pickled nn.Module placeholder in `obj`."""
    if isinstance(obj, _Refused) and obj.is_module:
        return where, obj.global_name
    items = (obj.items() if isinstance(obj, Mapping) else
             enumerate(obj) if isinstance(obj, (list, tuple)) else ())
    for k, v in items:
        found = _find_module(v, f"{where}[{k!r}]")
        if found:
            return found
    return None


def _refuse(path: str, refused: list[str], obj: Any) -> None:
    names = ", ".join(refused[:8]) + (f" and {len(refused) - 8} more" if len(refused) > 8 else "")
    module = _find_module(obj) if obj is not None else None
    if module is not None:
        where, cls = module
        inside = f" (at {where})" if where else ""
        raise UnsafePickleError(
            f"{path} holds a pickled whole model, {cls}{inside}, not a state_dict (a dict of "
            f"tensors). Unpickling it would run code from the file, so kdjax does not. Re-save "
            f"its weights where the model's code is installed: torch.save(model.state_dict(), "
            f"'model.pth'), and import that file")
    raise UnsafePickleError(
        f"{path} refers to {names}: kdjax reads only tensors, dicts, lists and numbers from a "
        f".pth file and never runs the code a pickle names (it ran none of this file's). Save only "
        f"the state_dict (torch.save(model.state_dict(), 'model.pth')), or {_convert_hint(path)}")


def _materialize(obj: Any) -> Any:
    if isinstance(obj, _LazyTensor):
        return obj.materialize()
    if isinstance(obj, Mapping):
        return {k: _materialize(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialize(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialize(v) for v in obj)
    return obj


# ----------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------
def _p_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(b)) + b  # BINUNICODE


def _p_int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])  # BININT1
    if -(2 ** 31) <= v < 2 ** 31:
        return b"J" + struct.pack("<i", v)  # BININT
    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def _p_tuple(values) -> bytes:
    return b"(" + b"".join(_p_int(int(v)) for v in values) + b"t" if len(values) else b")"


_ORDERED_DICT = b"ccollections\nOrderedDict\n)R"  # GLOBAL, EMPTY_TUPLE, REDUCE: OrderedDict()


def _pickle_state_dict(arrays: list[tuple[str, np.ndarray]]) -> bytes:
    """Protocol 2, as torch.save pickles an OrderedDict of tensors (storage i = tensor i)."""
    out = [b"\x80\x02", _ORDERED_DICT, b"("]
    for i, (name, arr) in enumerate(arrays):
        strides = [s // arr.itemsize for s in arr.strides]
        storage = (b"(" + _p_str("storage") + f"ctorch\n{_STORAGE_NAMES[arr.dtype]}\n".encode()
                   + _p_str(str(i)) + _p_str("cpu") + _p_int(arr.size) + b"tQ")  # BINPERSID
        out += [_p_str(name), b"ctorch._utils\n_rebuild_tensor_v2\n(", storage, _p_int(0),
                _p_tuple(arr.shape), _p_tuple(strides), b"\x89", _ORDERED_DICT, b"tR"]
    out.append(b"u.")  # SETITEMS, STOP
    return b"".join(out)


def write(path: str, tensors: Mapping[str, np.ndarray]) -> None:
    """Write `tensors` as torch.save writes a state_dict (zip format, little-endian).

    `torch.load(path, weights_only=True)` returns an OrderedDict of CPU tensors of the same
    names, shapes and dtypes (float32/16/64, bfloat16, int8..64, uint8, bool).
    """
    arrays = []
    for name, value in tensors.items():
        arr = np.asarray(value)  # (ascontiguousarray would make a 0-d array 1-d)
        if arr.dtype not in _STORAGE_NAMES:
            raise ValueError(f"tensor {name!r} has dtype {arr.dtype}, which a .pth file cannot "
                             f"hold (supported: {sorted(str(d) for d in _STORAGE_NAMES)})")
        arrays.append((name, np.require(arr, arr.dtype.newbyteorder("<"), "C")))
    prefix = os.path.splitext(os.path.basename(path))[0] or "archive"
    prefix = "".join(c if c.isalnum() or c in "_-" else "_" for c in prefix) + "/"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(prefix + "data.pkl", _pickle_state_dict(arrays))
        archive.writestr(prefix + "byteorder", "little")
        for i, (_, arr) in enumerate(arrays):
            archive.writestr(prefix + f"data/{i}", arr.tobytes())
        archive.writestr(prefix + "version", "3\n")
