"""The dataset catalogue: find, describe, list and read TFDS datasets, with no TensorFlow.

Any TFDS image-classification dataset stored in TFDS's ``array_record`` format is read here by
its TFDS name (``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``, ``svhn_cropped``,
``imagenette/320px-v2``, ``imagenet2012``, ...) through TFDS's random-access data source: a copy
TFDS prepared itself in ``~/tensorflow_datasets`` (or ``--data-dir`` / ``$TFDS_DATA_DIR``) is used
as is, and so is one that ``kdjax prepare`` made offline from the files users copy in
(:mod:`kdjax.prepare`). The layout is TFDS's::

    <data_dir>/<name>[/<config>]/<version>/dataset_info.json, <name>-<split>.array_record-*

* :func:`dataset_info` describes a prepared dataset (true split sizes, classes, image shape);
* :func:`list_datasets` lists everything prepared under a data dir (``kdjax datasets``);
* :func:`open_split` gives random access to a split's (encoded image, label) records, which the
  streaming input pipeline (:mod:`kdjax.input`) decodes on worker threads;
* :func:`load_arrays` loads a whole fixed-shape split as uint8 arrays (the device-resident mode).

``import kdjax.data`` imports neither TensorFlow nor ``tensorflow_datasets``: TFDS is imported
lazily by the functions that need it, and TensorFlow never (TFDS's data sources and its proto
module work without it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kdjax import images as image_codec
from kdjax import prepare as prepare_lib
# Preparation sits below the catalogue: these are defined there (kdjax.prepare imports nothing
# from this module) and stay importable from here.
from kdjax.prepare import (SUPPORTED_DATASETS, DataPreparationError, make_synthetic_idx_dir,
                           prepare)
from kdjax.prepare.common import SIDECAR, default_data_dir
from kdjax.prepare.common import import_tfds as _import_tfds
from kdjax.prepare.common import resolve_data_dir as _resolve_data_dir

__all__ = [
    "DataPreparationError",
    "DatasetNotFoundError",
    "DatasetSpec",
    "NORMALIZATION",
    "PreparedDataset",
    "SplitReader",
    "dataset_info",
    "default_data_dir",
    "list_datasets",
    "load_arrays",
    "make_synthetic_idx_dir",
    "open_split",
    "prepare",
]


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class DatasetNotFoundError(FileNotFoundError):
    """No usable prepared copy of a dataset; the message says how to make one."""


# Per-channel (mean, std) of the training images in [0, 1] units: the usual constants, applied on
# device by kdjax.augment. Datasets not listed are normalised with 0.5 / 0.5.
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet2012": _IMAGENET_STATS,
    "imagenette": _IMAGENET_STATS,
}

# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def _base_name(name: str) -> str:
    return name.partition(":")[0].partition("/")[0]


def _prepare_command(name: str, data_dir: str) -> str:
    source, _ = prepare_lib.prepare_hint(name)
    return f"kdjax prepare {name.partition(':')[0]} --from {source} --data-dir {data_dir}"


def _not_found_message(name: str, data_dir: str, problem: str) -> str:
    _, hint = prepare_lib.prepare_hint(name)
    # Most often the data was prepared, elsewhere: say how to point at it before how to redo it.
    text = (f"{problem}\nIf you prepared it in another directory, point at it: --data-dir DIR "
            f"(kdjax report, import, prepare, datasets) or --config.data.data_dir=DIR (train, "
            f"distill, eval); `kdjax datasets --data-dir DIR` lists what a directory holds.\n"
            f"Otherwise prepare it once (offline) with:\n  {_prepare_command(name, data_dir)}"
            f"\n{hint}")
    if _base_name(name) not in SUPPORTED_DATASETS:
        text += (f"\n(A directory where TFDS prepared {name!r} in array_record format serves "
                 f"too.)")
    return text


# --------------------------------------------------------------------------
# Finding a prepared dataset
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What :func:`dataset_info` reports about a prepared dataset."""

    name: str
    version: str
    path: str  # <data_dir>/<name>[/<config>]/<version>
    num_classes: int
    class_names: tuple[str, ...]
    #: (H, W, C); H and W are None for datasets of variable-size images (e.g. ImageNet).
    image_shape: tuple[int | None, ...]
    splits: dict[str, int]  # true number of examples in each split
    #: False for a subset (max_examples_per_split) or a copy whose split sizes differ from the
    #: official ones kdjax knows; True otherwise.
    complete: bool
    #: True/False as recorded by kdjax's prepare; None for a copy not prepared by kdjax (e.g. by
    #: TFDS itself, which verifies its downloads) or a source with no official checksums.
    checksums_verified: bool | None
    description: str
    prepared_by: str = "tfds"  # "kdjax" or "tfds"

    @property
    def fixed_shape(self) -> bool:
        """Whether every image has the same (H, W, C) (so the split fits in one array)."""
        return all(isinstance(s, int) for s in self.image_shape)

    def num_examples(self, split: str) -> int:
        try:
            return self.splits[split]
        except KeyError:
            raise ValueError(
                f"Unknown split {split!r} for {self.name}; available: {', '.join(self.splits)}"
            ) from None

    def num_bytes(self, split: str) -> int | None:
        """Bytes of the split as a uint8 array, or None for variable-size images."""
        if not self.fixed_shape:
            return None
        return self.num_examples(split) * int(np.prod(self.image_shape))


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def _is_version(v: str) -> bool:
    parts = v.split(".")
    return len(parts) == 3 and all(p.isdigit() for p in parts)


def _versions(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir()
            if p.is_dir() and _is_version(p.name) and (p / "dataset_info.json").is_file()]


def _known_version(name: str) -> str | None:
    return prepare_lib.known_version(name)


def _find_dataset_dir(name: str, data_dir: str | os.PathLike | None) -> Path:
    """Directory of a usable (array_record) prepared copy of ``name[/config][:version]``."""
    root = _resolve_data_dir(data_dir)
    full, _, version = name.partition(":")
    base = Path(root).joinpath(*full.split("/"))
    candidates = _versions(base)
    if not candidates and "/" not in full and base.is_dir():
        # A dataset with builder configs (imagenette/320px-v2/1.0.0): use the only one.
        configs = sorted(p.name for p in base.iterdir() if _versions(p))
        if len(configs) == 1:
            return _find_dataset_dir(f"{full}/{configs[0]}" + (f":{version}" if version else ""),
                                     data_dir)
        if len(configs) > 1:
            raise ValueError(f"Dataset {full!r} in {root} has several configs "
                             f"({', '.join(configs)}); name one, e.g. {full}/{configs[0]}")
    if version:
        candidates = [p for p in candidates if p.name == version]
    if not candidates:
        where = f"{base}/{version or '<version>'}/dataset_info.json"
        raise DatasetNotFoundError(_not_found_message(
            full, root, f"Dataset {name!r} not found in {root} (no {where})."))
    preferred = _known_version(full)
    if preferred and (base / preferred) in candidates:
        chosen = base / preferred
    else:
        chosen = max(candidates, key=lambda p: _version_key(p.name))
    info = json.loads((chosen / "dataset_info.json").read_text())
    file_format = info.get("fileFormat") or "tfrecord"
    if file_format != "array_record":
        problem = (
            f"Dataset {name!r} in {chosen} is stored as {file_format}, which "
            f"tfds.data_source cannot read with random access (it needs array_record)."
        )
        if _base_name(full) in SUPPORTED_DATASETS:
            raise DatasetNotFoundError(_not_found_message(
                full, root, problem + " Re-prepare it (this replaces that copy)."))
        raise DatasetNotFoundError(
            problem + " Rebuild it with `tfds build --file_format=array_record`.")
    return chosen


def _read_sidecar(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / SIDECAR).read_text())
    except (OSError, ValueError):
        return {}


def _image_label_features(info, path: Path):
    tfds = _import_tfds()
    feats = info.features
    keys = set(feats.keys()) if hasattr(feats, "keys") else set()
    if "image" not in keys or "label" not in keys:
        raise DataPreparationError(
            f"{path}: expected an image classification dataset with features "
            f"'image' and 'label', found {sorted(keys)}."
        )
    image, label = feats["image"], feats["label"]
    if not isinstance(image, tfds.features.Image) or not isinstance(label, tfds.features.ClassLabel):
        raise DataPreparationError(
            f"{path}: expected 'image' to be an Image and 'label' a ClassLabel "
            f"feature, found {type(image).__name__} and {type(label).__name__}."
        )
    if np.dtype(image.np_dtype) != np.uint8:
        raise DataPreparationError(f"{path}: expected uint8 images, found {image.np_dtype}.")
    return image, label


def spec_from_dir(name: str, path: Path) -> DatasetSpec:
    """The DatasetSpec of the prepared TFDS dataset `name` in directory `path`."""
    tfds = _import_tfds()
    info = tfds.builder_from_directory(os.fspath(path)).info
    image_feature, label_feature = _image_label_features(info, path)
    splits = {s: int(info.splits[s].num_examples) for s in info.splits}
    sidecar = _read_sidecar(path)
    by_kdjax = sidecar.get("prepared_by") == "kdjax"
    official = prepare_lib.official_sizes(name)
    if by_kdjax and sidecar.get("max_examples_per_split") is not None:
        complete = False
    elif official is not None:
        complete = all(splits.get(s) == n for s, n in official.items())
    else:
        complete = True
    shape = image_feature.shape
    channels = shape[-1] if len(shape) == 3 else 1
    if len(shape) == 2:  # (H, W) greyscale
        shape = (*shape, 1)
    return DatasetSpec(
        name=name,
        version=str(info.version),
        path=os.fspath(path),
        num_classes=int(label_feature.num_classes),
        class_names=tuple(label_feature.names),
        image_shape=tuple(int(s) if s is not None else None for s in (*shape[:2], channels)),
        splits=splits,
        complete=bool(complete),
        checksums_verified=sidecar.get("checksums_verified") if by_kdjax else None,
        description=info.description or "",
        prepared_by="kdjax" if by_kdjax else "tfds",
    )


def dataset_info(name: str, *, data_dir: str | os.PathLike | None = None) -> DatasetSpec:
    """Describe the prepared copy of ``name`` (true split sizes, classes, shape, path).

    ``name`` is a TFDS name, optionally with a config and a version:
    ``imagenette/320px-v2:1.0.0``.
    """
    path = _find_dataset_dir(name, data_dir)
    return spec_from_dir(name.partition(":")[0], path)


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    """One entry of :func:`list_datasets`: a TFDS dataset directory found under a data dir."""

    name: str  # name[/config]
    version: str
    path: str
    file_format: str
    splits: dict[str, int]
    image_shape: tuple[int | None, ...] | None  # None: not an image classification dataset
    num_classes: int | None
    prepared_by: str  # "kdjax" | "tfds"
    #: Why kdjax cannot read it (tfrecord format, no image/label features), or None.
    problem: str | None


def list_datasets(data_dir: str | os.PathLike | None = None) -> list[PreparedDataset]:
    """Every TFDS dataset directory under ``data_dir`` (``<name>[/<config>]/<version>``)."""
    root = Path(_resolve_data_dir(data_dir))
    found: list[tuple[str, Path]] = []
    if root.is_dir():
        for top in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            found += [(top.name, v) for v in _versions(top)]
            for cfg in sorted(p for p in top.iterdir() if p.is_dir() and not _is_version(p.name)
                              and not p.name.startswith(".")):
                found += [(f"{top.name}/{cfg.name}", v) for v in _versions(cfg)]
    out = []
    for name, path in sorted(found, key=lambda t: (t[0], _version_key(t[1].name))):
        try:
            raw = json.loads((path / "dataset_info.json").read_text())
        except (OSError, ValueError) as e:
            out.append(PreparedDataset(name, path.name, os.fspath(path), "?", {}, None, None,
                                       "?", f"unreadable dataset_info.json: {e}"))
            continue
        file_format = raw.get("fileFormat") or "tfrecord"
        by = "kdjax" if _read_sidecar(path).get("prepared_by") == "kdjax" else "tfds"
        splits = {s["name"]: sum(int(n) for n in s.get("shardLengths", []))
                  for s in raw.get("splits", [])}
        shape = classes = None
        problem = None
        if file_format != "array_record":
            problem = f"{file_format}: not readable with random access (needs array_record)"
        try:
            spec = spec_from_dir(name, path)
            shape, classes, splits = spec.image_shape, spec.num_classes, spec.splits
        except (DataPreparationError, ValueError, OSError) as e:
            problem = problem or str(e).split("\n")[0]
        out.append(PreparedDataset(name, path.name, os.fspath(path), file_format, splits, shape,
                                   classes, by, problem))
    return out


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------


class SplitReader:
    """Random access to one split's records: encoded image bytes and int labels.

    Reads through TFDS's array_record data source (raw records, no TensorFlow) and parses the
    ``tf.train.Example`` protos with TFDS's proto module. Safe to call from several threads.
    """

    def __init__(self, name: str, split: str, data_dir: str | os.PathLike | None = None):
        path = _find_dataset_dir(name, data_dir)
        tfds = _import_tfds()
        builder = tfds.builder_from_directory(os.fspath(path))
        self.spec = spec_from_dir(name.partition(":")[0], path)
        self.split = split
        try:
            self._source = builder.as_data_source(
                split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
        except ValueError as e:
            raise ValueError(
                f"Bad split {split!r} for {name} in {path}: {e} "
                f"(available: {', '.join(builder.info.splits.keys())})"
            ) from None
        from tensorflow_datasets.proto import tf_example_pb2  # noqa: PLC0415

        self._example_cls = tf_example_pb2.Example

    @property
    def image_shape(self) -> tuple[int | None, ...]:
        return self.spec.image_shape

    def __len__(self) -> int:
        return len(self._source)

    def read(self, indices: Sequence[int]) -> tuple[list[bytes], np.ndarray]:
        """(encoded images, int32 labels) of the examples at `indices`, in that order."""
        indices = [int(i) for i in indices]
        if not indices:
            return [], np.zeros((0,), np.int32)
        getitems = getattr(self._source, "__getitems__", None)
        records = getitems(indices) if getitems is not None else [self._source[i] for i in indices]
        blobs: list[bytes] = []
        labels = np.empty(len(records), dtype=np.int32)
        example = self._example_cls()
        for i, record in enumerate(records):
            example.ParseFromString(record)
            feature = example.features.feature
            blobs.append(feature["image"].bytes_list.value[0])
            labels[i] = feature["label"].int64_list.value[0]
        return blobs, labels

    def labels(self, chunk: int = 8192) -> np.ndarray:
        """int32 [N]: every example's label, in record order. Parses every record once (a full
        read of the split), for the few methods that need all labels up front (CRD's negatives)."""
        out = np.empty(len(self), np.int32)
        for start in range(0, len(self), chunk):
            stop = min(start + chunk, len(self))
            out[start:stop] = self.read(range(start, stop))[1]
        return out


def open_split(name: str, split: str, *, data_dir: str | os.PathLike | None = None) -> SplitReader:
    """Random access to a prepared split (see :class:`SplitReader`)."""
    return SplitReader(name, split, data_dir)


def load_arrays(
    name: str, split: str, *, data_dir: str | os.PathLike | None = None
) -> dict[str, np.ndarray]:
    """Load a whole split as ``{"image": uint8 [N,H,W,C], "label": int32 [N]}``.

    Reads the prepared copy through TFDS's array_record data source (records
    as raw bytes, read in one batch) and decodes the PNG images vectorised.
    ``split`` may be a TFDS split string such as ``"train"`` or ``"train[:1000]"``.
    Only for datasets whose images all have one shape; variable-size datasets (ImageNet-style)
    are streamed (:mod:`kdjax.input`). Imports no TensorFlow. The arrays are read-only: the
    last two splits loaded are kept and shared between callers (see ``_ARRAYS_CACHE``).
    """
    path = _find_dataset_dir(name, data_dir)
    # Keyed by the files' modification times too, so a split prepared again is read again.
    key = (os.fspath(path), split, max(f.stat().st_mtime_ns for f in path.iterdir()))
    if key not in _ARRAYS_CACHE:
        reader = open_split(name, split, data_dir=data_dir)
        if not reader.spec.fixed_shape:
            raise ValueError(
                f"{name} has images of varying sizes {reader.image_shape}: it cannot be loaded as "
                f"one array; train on it in streaming mode (data.mode='stream' with "
                f"data.image_size).")
        blobs, labels = reader.read(range(len(reader)))
        arrays = {"image": image_codec.decode_images(blobs, reader.image_shape), "label": labels}
        for v in arrays.values():
            v.setflags(write=False)  # shared by every caller of the cache
        if len(_ARRAYS_CACHE) >= _ARRAYS_CACHE_SIZE:
            _ARRAYS_CACHE.pop(next(iter(_ARRAYS_CACHE)))
        _ARRAYS_CACHE[key] = arrays
    return dict(_ARRAYS_CACHE[key])


# The last splits load_arrays decoded (a run's train and eval splits): a process that trains
# several runs in a row (benchmarks, born-again generations) decodes Fashion-MNIST's 70k PNGs
# once instead of per run (~10 s each on 2 CPU cores). Read-only arrays.
_ARRAYS_CACHE: dict[tuple, dict[str, np.ndarray]] = {}
_ARRAYS_CACHE_SIZE = 2
