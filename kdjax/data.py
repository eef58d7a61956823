"""Offline dataset preparation and loading in the standard TFDS on-disk format.

kdjax never downloads anything. The user copies the original dataset files
onto the machine (for Fashion-MNIST: ``apt-get install dataset-fashion-mnist``
puts them in ``/usr/share/datasets/fashion-mnist``) and :func:`prepare`
converts them, once, into the layout that TensorFlow Datasets itself writes::

    <data_dir>/<name>/<version>/
        dataset_info.json  features.json  label.labels.txt  kdjax.json
        <name>-train.array_record-00000-of-00001
        <name>-test.array_record-00000-of-00001

The result has the same name, version (3.0.1) and features as TFDS's own
``mnist`` / ``fashion_mnist``, so ``tfds.data_source("fashion_mnist",
data_dir=...)`` reads it with random access, and a copy that TFDS prepared
itself (in ``array_record`` format) is used as is by :func:`load_arrays`.

Nothing here needs TensorFlow, and ``import kdjax.data`` does not even import
``tensorflow_datasets``: it is imported lazily by the functions that need it
(:func:`prepare`, :func:`load_arrays`, :func:`dataset_info`).

How the files are written (and why): TFDS's registered ``fashion_mnist``
builder cannot be used offline without TensorFlow (its generator reads the
files with ``tf.io.gfile``, and ``download_and_prepare`` wants the exact
downloaded ``.gz`` files, while e.g. Debian's copies differ in their gzip
header). So kdjax encodes the examples with TFDS's public
``tfds.features.FeaturesDict.serialize_example`` (images are given as PNG
bytes that kdjax encodes itself), writes them with ``array_record`` exactly as
TFDS's array_record adapter does (``group_size:1``), and writes the metadata
with ``tfds.core.DatasetInfo.write_to_directory``.
"""

from __future__ import annotations

import dataclasses
import datetime
import gzip
import hashlib
import json
import os
import shutil
import struct
import tempfile
import uuid
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DataPreparationError",
    "DatasetNotFoundError",
    "DatasetSpec",
    "NORMALIZATION",
    "SUPPORTED_DATASETS",
    "dataset_info",
    "default_data_dir",
    "load_arrays",
    "make_synthetic_idx_dir",
    "prepare",
]


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class DatasetNotFoundError(FileNotFoundError):
    """No usable prepared copy of a dataset; the message says how to make one."""


class DataPreparationError(ValueError):
    """A source file is missing, wrong, truncated or corrupt.

    The message names the file, what was expected and what was found.
    """


# --------------------------------------------------------------------------
# Dataset definitions
# --------------------------------------------------------------------------

_IMAGE_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
_LABEL_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension
_IMAGE_HEADER = 16
_LABEL_HEADER = 8


@dataclasses.dataclass(frozen=True)
class _SourceFile:
    name: str  # base name without ".gz"
    # sha256 of the official gzip file, as registered in TFDS
    # (tensorflow_datasets/url_checksums/<dataset>.txt).
    gz_sha256: str
    gz_size: int
    # sha256 of the uncompressed IDX content (None when unknown).
    content_sha256: str | None


@dataclasses.dataclass(frozen=True)
class _SplitDef:
    images: _SourceFile
    labels: _SourceFile
    num_examples: int


@dataclasses.dataclass(frozen=True)
class _IdxDatasetDef:
    name: str
    version: str
    class_names: tuple[str, ...] | None  # None: ClassLabel(num_classes=...)
    num_classes: int
    image_shape: tuple[int, int, int]
    splits: Mapping[str, _SplitDef]
    description: str
    homepage: str
    citation: str
    source_hint: str  # where the user gets the files
    suggested_source: str  # the --from directory shown in messages


_MNIST_CITATION = """\
@article{lecun2010mnist,
  title={MNIST handwritten digit database},
  author={LeCun, Yann and Cortes, Corinna and Burges, CJ},
  journal={ATT Labs [Online]. Available: http://yann.lecun.com/exdb/mnist},
  volume={2},
  year={2010}
}
"""

_FASHION_MNIST_CITATION = """\
@article{DBLP:journals/corr/abs-1708-07747,
  author    = {Han Xiao and Kashif Rasul and Roland Vollgraf},
  title     = {Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning
               Algorithms},
  journal   = {CoRR},
  volume    = {abs/1708.07747},
  year      = {2017},
  url       = {http://arxiv.org/abs/1708.07747},
  archivePrefix = {arXiv},
  eprint    = {1708.07747},
}
"""

# Checksums of the official .gz files: copied from TFDS 4.9.10's
# url_checksums/{mnist,fashion_mnist}.txt (what `tfds build` verifies).
# Checksums of the uncompressed content of Fashion-MNIST: computed from the
# files of the Debian package dataset-fashion-mnist. Those .gz files differ
# from the official downloads only in their gzip header (no stored file name,
# another mtime): re-inserting the name and the original mtime reproduces the
# TFDS-registered sha256 of all four files, so this content is the official
# one. The uncompressed sha256 of MNIST is not known to kdjax: MNIST files are
# verified only as the original .gz downloads.
_FASHION_MNIST = _IdxDatasetDef(
    name="fashion_mnist",
    version="3.0.1",
    class_names=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    num_classes=10,
    image_shape=(28, 28, 1),
    splits={
        "train": _SplitDef(
            images=_SourceFile(
                "train-images-idx3-ubyte",
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                26421880,
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            ),
            labels=_SourceFile(
                "train-labels-idx1-ubyte",
                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                29515,
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            ),
            num_examples=60000,
        ),
        "test": _SplitDef(
            images=_SourceFile(
                "t10k-images-idx3-ubyte",
                "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                4422102,
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            ),
            labels=_SourceFile(
                "t10k-labels-idx1-ubyte",
                "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                5148,
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            ),
            num_examples=10000,
        ),
    },
    description=(
        "Fashion-MNIST: 28x28 grayscale images of Zalando's articles, "
        "60,000 for training and 10,000 for testing, each labelled with one "
        "of 10 classes."
    ),
    homepage="https://github.com/zalandoresearch/fashion-mnist",
    citation=_FASHION_MNIST_CITATION,
    source_hint=(
        "The four IDX files come with the Debian package dataset-fashion-mnist "
        "(`apt-get install dataset-fashion-mnist` installs them in "
        "/usr/share/datasets/fashion-mnist)."
    ),
    suggested_source="/usr/share/datasets/fashion-mnist",
)

_MNIST = _IdxDatasetDef(
    name="mnist",
    version="3.0.1",
    class_names=None,
    num_classes=10,
    image_shape=(28, 28, 1),
    splits={
        "train": _SplitDef(
            images=_SourceFile(
                "train-images-idx3-ubyte",
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                9912422,
                None,
            ),
            labels=_SourceFile(
                "train-labels-idx1-ubyte",
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                28881,
                None,
            ),
            num_examples=60000,
        ),
        "test": _SplitDef(
            images=_SourceFile(
                "t10k-images-idx3-ubyte",
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                1648877,
                None,
            ),
            labels=_SourceFile(
                "t10k-labels-idx1-ubyte",
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                4542,
                None,
            ),
            num_examples=10000,
        ),
    },
    description=(
        "MNIST: 28x28 grayscale images of handwritten digits, 60,000 for "
        "training and 10,000 for testing."
    ),
    homepage="http://yann.lecun.com/exdb/mnist/",
    citation=_MNIST_CITATION,
    source_hint=(
        "DIR must hold the four original MNIST files train-images-idx3-ubyte, "
        "train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
        "t10k-labels-idx1-ubyte (gzipped *.gz or not), copied onto this "
        "machine by hand."
    ),
    suggested_source="DIR",
)

_DATASETS: dict[str, _IdxDatasetDef] = {d.name: d for d in (_MNIST, _FASHION_MNIST)}

#: Names accepted by :func:`prepare`.
SUPPORTED_DATASETS: tuple[str, ...] = tuple(sorted(_DATASETS))

# Per-channel (mean, std) of the training images in [0, 1] units: the usual constants, applied on
# device by kdjax.augment. Datasets not listed are normalised with 0.5 / 0.5.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

_SIDECAR = "kdjax.json"


def _get_def(name: str) -> _IdxDatasetDef:
    try:
        return _DATASETS[name]
    except KeyError:
        raise ValueError(
            f"Unknown dataset {name!r}; kdjax can prepare: "
            f"{', '.join(SUPPORTED_DATASETS)}."
        ) from None


def _prepare_command(name: str, data_dir: str) -> str:
    d = _DATASETS[name]
    return f"kdjax prepare {name} --from {d.suggested_source} --data-dir {data_dir}"


def _not_found_message(name: str, data_dir: str, problem: str) -> str:
    d = _DATASETS[name]
    return (
        f"{problem}\nPrepare it once (offline) with:\n"
        f"  {_prepare_command(name, data_dir)}\n"
        f"{d.source_hint}"
    )


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def default_data_dir() -> str:
    """``$TFDS_DATA_DIR`` if set, else ``~/tensorflow_datasets`` (TFDS's default)."""
    env = os.environ.get("TFDS_DATA_DIR")
    if env:
        return os.path.expanduser(env)
    return os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def _resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
    if data_dir is None:
        return default_data_dir()
    return os.path.expanduser(os.fspath(data_dir))


def _import_tfds():
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415  (lazy on purpose)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "kdjax.data needs the packages tensorflow-datasets and array-record "
            "to prepare and read datasets (TensorFlow itself is not needed): "
            "pip install tensorflow-datasets array-record"
        ) from e
    return tfds


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------
# PNG encoding / decoding
# --------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type
_PNG_CHANNELS = {v: k for k, v in _PNG_COLOR_TYPES.items()}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _encode_png(image: np.ndarray) -> bytes:
    """Lossless 8-bit PNG of an (H, W, C) uint8 array (filter type 0 rows)."""
    h, w, c = image.shape
    rows = np.zeros((h, 1 + w * c), dtype=np.uint8)
    rows[:, 1:] = image.reshape(h, w * c)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, _PNG_COLOR_TYPES[c], 0, 0, 0)
    return (
        _PNG_SIGNATURE
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + _png_chunk(b"IEND", b"")
    )


def _png_filtered_rows(blob: bytes, shape: tuple[int, int, int]) -> bytes | None:
    """Decompressed (still filtered) scanlines of a simple PNG, else None.

    "Simple": 8-bit, non-interlaced, of exactly ``shape`` and with the colour
    type matching its channel count. Anything else (JPEG, palette, 16-bit,
    interlaced, other shapes) returns None and is decoded by TFDS instead.
    """
    if not blob.startswith(_PNG_SIGNATURE):
        return None
    h, w, c = shape
    pos = len(_PNG_SIGNATURE)
    idat = []
    header_ok = False
    try:
        while pos + 8 <= len(blob):
            length, kind = struct.unpack_from(">I4s", blob, pos)
            data = blob[pos + 8 : pos + 8 + length]
            pos += 12 + length
            if kind == b"IHDR":
                pw, ph, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", data)
                header_ok = (
                    (pw, ph) == (w, h)
                    and depth == 8
                    and interlace == 0
                    and _PNG_CHANNELS.get(color) == c
                )
                if not header_ok:
                    return None
            elif kind == b"IDAT":
                idat.append(data)
            elif kind == b"IEND":
                break
            elif kind == b"PLTE":
                return None
        if not header_ok or not idat:
            return None
        raw = zlib.decompress(b"".join(idat))
    except (struct.error, zlib.error):
        return None
    if len(raw) != h * (1 + w * c):
        return None
    return raw


def _unfilter(filtered: np.ndarray, channels: int) -> np.ndarray:
    """Undo PNG row filters for a batch: (N, H, 1 + W*C) uint8 -> (N, H, W*C)."""
    n, h, _ = filtered.shape
    ftype = filtered[:, :, 0]
    data = filtered[:, :, 1:]
    stride = data.shape[2]
    out = np.empty_like(data)
    prev = np.zeros((n, stride), dtype=np.uint8)
    for r in range(h):
        f = ftype[:, r]
        row = data[:, r, :].copy()
        if f.any():
            up = f == 2
            if up.any():
                row[up] += prev[up]  # uint8 arithmetic wraps mod 256
            sub = f == 1
            if sub.any():
                s = row[sub].reshape(-1, stride // channels, channels)
                row[sub] = np.cumsum(s, axis=1, dtype=np.uint8).reshape(-1, stride)
            seq = (f == 3) | (f == 4)
            if seq.any():
                # Average and Paeth depend on the reconstructed left neighbour:
                # walk the columns, vectorised over the images.
                x_f = row[seq].astype(np.int16)
                b_all = prev[seq].astype(np.int16)
                paeth = f[seq] == 4
                rec = np.zeros_like(x_f)
                zero = np.zeros(x_f.shape[0], dtype=np.int16)
                for x in range(stride):
                    a = rec[:, x - channels] if x >= channels else zero
                    b = b_all[:, x]
                    c = b_all[:, x - channels] if x >= channels else zero
                    p = a + b - c
                    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
                    pred_paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
                    pred_avg = (a + b) >> 1
                    rec[:, x] = (x_f[:, x] + np.where(paeth, pred_paeth, pred_avg)) & 0xFF
                row[seq] = rec.astype(np.uint8)
        out[:, r, :] = row
        prev = row
    return out


def _decode_images(blobs: Sequence[bytes], image_feature: Any) -> np.ndarray:
    """Decode encoded images into one (N, H, W, C) uint8 array.

    PNGs of the declared fixed shape (what kdjax and TFDS write for
    MNIST-like data) are decoded here, vectorised over the batch; any other
    image falls back to TFDS's own NumPy decoder (OpenCV or PIL).
    """
    shape = tuple(image_feature.shape)
    n = len(blobs)
    fixed = len(shape) == 3 and all(isinstance(s, int) for s in shape)
    if not fixed:
        decoded = [np.asarray(image_feature.decode_example_np(b)) for b in blobs]
        return np.stack(decoded).astype(np.uint8, copy=False)
    h, w, c = shape
    row_bytes = h * (1 + w * c)
    # Fast path: the exact layout kdjax (and TFDS) writes - signature, IHDR,
    # one IDAT, IEND - recognised by its fixed 33-byte prefix.
    prefix = _PNG_SIGNATURE + _png_chunk(
        b"IHDR", struct.pack(">IIBBBBB", w, h, 8, _PNG_COLOR_TYPES.get(c, 255), 0, 0, 0)
    )
    plen = len(prefix)
    raws: list[bytes] = []
    slow: list[int] = []
    empty = bytes(row_bytes)
    for i, blob in enumerate(blobs):
        raw = None
        if blob.startswith(prefix) and blob[plen + 4 : plen + 8] == b"IDAT":
            (length,) = struct.unpack_from(">I", blob, plen)
            if len(blob) == plen + 12 + length + 12:
                try:
                    raw = zlib.decompress(blob[plen + 8 : plen + 8 + length])
                except zlib.error:
                    raw = None
        if raw is None:
            raw = _png_filtered_rows(blob, shape)
        if raw is None or len(raw) != row_bytes:
            slow.append(i)
            raw = empty
        raws.append(raw)
    filtered = np.frombuffer(b"".join(raws), dtype=np.uint8).reshape(n, h, 1 + w * c).copy()
    bad_filter = np.nonzero((filtered[:, :, 0] > 4).any(axis=1))[0]
    if len(bad_filter):
        slow = sorted(set(slow) | set(bad_filter.tolist()))
        filtered[bad_filter] = 0
    images = _unfilter(filtered, c).reshape(n, h, w, c)
    for i in slow:
        img = np.asarray(image_feature.decode_example_np(blobs[i]))
        images[i] = img.reshape(h, w, c)
    return images


# --------------------------------------------------------------------------
# IDX reading and validation
# --------------------------------------------------------------------------


def _find_source_file(source: Path, base: str) -> Path:
    candidates = [source / base, source / (base + ".gz")]
    found = [p for p in candidates if p.is_file()]
    if not found:
        present = sorted(p.name for p in source.iterdir()) if source.is_dir() else []
        raise DataPreparationError(
            f"{source / base}[.gz]: file not found; expected {base} or {base}.gz "
            f"in {source} (the directory holds: {', '.join(present) or 'nothing'})."
        )
    if len(found) > 1:
        raise DataPreparationError(
            f"{source}: both {base} and {base}.gz are present; keep only one of them."
        )
    return found[0]


def _read_source(path: Path) -> tuple[bytes, bytes]:
    """Returns (bytes of the file as stored, uncompressed IDX content)."""
    stored = path.read_bytes()
    if stored[:2] == b"\x1f\x8b":
        try:
            content = gzip.decompress(stored)
        except (OSError, EOFError, zlib.error) as e:
            raise DataPreparationError(
                f"{path}: not a valid gzip file ({e}); expected a gzip-compressed "
                f"IDX file. The file is truncated or corrupt: copy it again from "
                f"the original source."
            ) from None
        return stored, content
    if path.suffix == ".gz":
        raise DataPreparationError(
            f"{path}: expected a gzip file (the name ends in .gz) but the file does "
            f"not start with the gzip magic bytes 1f 8b (found {stored[:2].hex(' ') or 'an empty file'}). "
            f"Copy it again from the original source, or drop the .gz suffix if it "
            f"is an uncompressed IDX file."
        )
    return stored, stored


def _parse_idx(
    path: Path, content: bytes, *, images: bool, image_hw: tuple[int, int]
) -> np.ndarray:
    kind = "images" if images else "labels"
    magic_expected = _IMAGE_MAGIC if images else _LABEL_MAGIC
    header = _IMAGE_HEADER if images else _LABEL_HEADER
    if len(content) < header:
        raise DataPreparationError(
            f"{path}: truncated: expected an IDX {kind} file with a {header}-byte "
            f"header, found only {len(content)} bytes."
        )
    magic, n = struct.unpack_from(">II", content, 0)
    if magic != magic_expected:
        raise DataPreparationError(
            f"{path}: not an IDX {kind} file: expected magic number {magic_expected} "
            f"(0x{magic_expected:08x}), found {magic} (0x{magic:08x})."
            + (
                " It looks like a labels file: are the file names swapped?"
                if magic == _LABEL_MAGIC
                else " It looks like an images file: are the file names swapped?"
                if magic == _IMAGE_MAGIC
                else ""
            )
        )
    if images:
        rows, cols = struct.unpack_from(">II", content, 8)
        if (rows, cols) != tuple(image_hw):
            raise DataPreparationError(
                f"{path}: expected {image_hw[0]}x{image_hw[1]} images, the header "
                f"says {rows}x{cols}."
            )
        expected = header + n * rows * cols
        what = f"{header}-byte header + {n} images of {rows}x{cols} bytes"
    else:
        expected = header + n
        what = f"{header}-byte header + {n} one-byte labels"
    if len(content) != expected:
        state = "truncated" if len(content) < expected else "has trailing data"
        raise DataPreparationError(
            f"{path}: wrong size ({state}): expected {expected} bytes "
            f"({what}), found {len(content)} bytes"
            f"{' after decompression' if path.suffix == '.gz' else ''}. "
            f"Copy the file again from the original source."
        )
    arr = np.frombuffer(content, dtype=np.uint8, offset=header)
    if images:
        return arr.reshape(n, image_hw[0], image_hw[1], 1)
    return arr


def _verify_checksum(
    path: Path, stored: bytes, content: bytes, ref: _SourceFile, dataset: str
) -> tuple[str, str]:
    stored_sha = _sha256(stored)
    content_sha = stored_sha if stored is content else _sha256(content)
    if stored_sha == ref.gz_sha256:
        return stored_sha, content_sha
    if ref.content_sha256 is not None and content_sha == ref.content_sha256:
        return stored_sha, content_sha
    expected = [f"{ref.gz_sha256} (the official {ref.name}.gz, {ref.gz_size} bytes)"]
    if ref.content_sha256 is not None:
        expected.append(f"{ref.content_sha256} (its uncompressed content)")
    else:
        expected.append(
            "(the uncompressed content of the official file has no sha256 known "
            "to kdjax: keep the original .gz file)"
        )
    actual = f"{stored_sha} (file as stored, {len(stored)} bytes)"
    if stored is not content:
        actual += f", {content_sha} (uncompressed content, {len(content)} bytes)"
    raise DataPreparationError(
        f"{path}: sha256 mismatch for {dataset}: expected {' or '.join(expected)}; "
        f"actual {actual}. The file is corrupt or not the official {dataset} file: "
        f"copy it again from the original source, or pass --skip-checksums "
        f"(verify_checksums=False) for a subset you made yourself."
    )


@dataclasses.dataclass
class _LoadedSplit:
    images: np.ndarray
    labels: np.ndarray
    files: dict[str, dict[str, Any]]


def _load_source_split(
    d: _IdxDatasetDef, split: str, source: Path, verify_checksums: bool
) -> _LoadedSplit:
    sdef = d.splits[split]
    files: dict[str, dict[str, Any]] = {}
    arrays = []
    paths = []
    for ref, is_images in ((sdef.images, True), (sdef.labels, False)):
        path = _find_source_file(source, ref.name)
        stored, content = _read_source(path)
        arr = _parse_idx(path, content, images=is_images, image_hw=d.image_shape[:2])
        if verify_checksums:
            stored_sha, content_sha = _verify_checksum(path, stored, content, ref, d.name)
        else:
            stored_sha = _sha256(stored)
            content_sha = stored_sha if stored is content else _sha256(content)
        files[path.name] = {
            "path": str(path.resolve()),
            "sha256": stored_sha,
            "content_sha256": content_sha,
            "num_examples": int(arr.shape[0]),
        }
        arrays.append(arr)
        paths.append(path)
    images, labels = arrays
    if images.shape[0] != labels.shape[0]:
        raise DataPreparationError(
            f"{paths[0]} holds {images.shape[0]} images but {paths[1]} holds "
            f"{labels.shape[0]} labels: expected the same number in both files "
            f"of the {split!r} split."
        )
    if labels.size and int(labels.max()) >= d.num_classes:
        bad = int(np.argmax(labels >= d.num_classes))
        raise DataPreparationError(
            f"{paths[1]}: label {int(labels[bad])} at index {bad} is out of range: "
            f"expected labels 0..{d.num_classes - 1} for {d.name}."
        )
    return _LoadedSplit(images=images, labels=labels, files=files)


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def _features(tfds, d: _IdxDatasetDef):
    if d.class_names is not None:
        label = tfds.features.ClassLabel(names=list(d.class_names))
    else:
        label = tfds.features.ClassLabel(num_classes=d.num_classes)
    return tfds.features.FeaturesDict(
        {"image": tfds.features.Image(shape=d.image_shape), "label": label}
    )


def _fast_serializer(features):
    try:
        from tensorflow_datasets.proto import tf_example_pb2  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        return None

    def serialize(png: bytes, label: int) -> bytes:
        example = tf_example_pb2.Example()
        feature = example.features.feature
        feature["image"].bytes_list.value.append(png)
        feature["label"].int64_list.value.append(label)
        return example.SerializeToString()

    probe_png = _encode_png(np.zeros(tuple(features["image"].shape), dtype=np.uint8))
    reference = features.serialize_example({"image": probe_png, "label": 1})
    # Compare parsed messages: the order in which protobuf writes map entries
    # (the feature names) varies between calls, so bytes may legitimately differ.
    same = tf_example_pb2.Example.FromString(serialize(probe_png, 1)) == (
        tf_example_pb2.Example.FromString(reference)
    )
    return serialize if same else None


def _write_split(tfds, features, out_dir: Path, d: _IdxDatasetDef, split: str, data: _LoadedSplit):
    from array_record.python import array_record_module  # noqa: PLC0415

    template = tfds.core.naming.ShardedFileTemplate(
        data_dir=out_dir,
        dataset_name=d.name,
        split=split,
        filetype_suffix="array_record",
    )
    path = template.sharded_filepath(shard_index=0, num_shards=1)
    writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1")
    num_bytes = 0
    # TFDS's public serializer is slow (~0.15 ms per example); the record is a
    # plain tf.train.Example with two features, so it is built directly with
    # TFDS's proto module, after checking on a probe example that this gives
    # the same message (otherwise TFDS's serializer is used throughout).
    fast = _fast_serializer(features)
    try:
        for image, label in zip(data.images, data.labels, strict=True):
            png, lab = _encode_png(image), int(label)
            if fast is not None:
                record = fast(png, lab)
            else:
                record = features.serialize_example({"image": png, "label": lab})
            num_bytes += len(record)
            writer.write(record)
    finally:
        writer.close()
    return tfds.core.SplitInfo(
        name=split,
        shard_lengths=[int(data.labels.shape[0])],
        num_bytes=num_bytes,
        filename_template=template,
    )


def _description(d: _IdxDatasetDef, sizes: Mapping[str, int], subset: int | None, verified: bool) -> str:
    text = d.description + "\nPrepared offline by kdjax from the original IDX files."
    if subset is not None:
        parts = ", ".join(
            f"{s}: {sizes[s]} of {d.splits[s].num_examples}" for s in d.splits
        )
        text += (
            f"\n\nWARNING: SUBSET, NOT THE FULL DATASET. Prepared with "
            f"max_examples_per_split={subset}: only the first examples of each "
            f"split ({parts})."
        )
    if not verified:
        text += "\n\nNOTE: the source files were not checksum-verified (verify_checksums=False)."
    return text


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def prepare(
    name: str,
    source: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    verify_checksums: bool = True,
    max_examples_per_split: int | None = None,
) -> str:
    """Prepare ``name`` from the original files in ``source``; return its directory.

    Writes ``<data_dir>/<name>/<version>/`` in the TFDS format (array_record).
    All source files are validated (IDX headers, sizes, consistent counts,
    label range and, with ``verify_checksums``, the sha256 of the official
    files) before anything is written; a bad file raises
    :class:`DataPreparationError`. The dataset is written into a temporary
    directory next to the target and renamed into place, so a failure leaves
    nothing behind, and preparing over an existing copy replaces it (the old
    copy stays intact if the new one fails).

    ``max_examples_per_split`` keeps only the first N examples of each split,
    for tests and quick demos; such a subset says so in its description, and
    :func:`dataset_info` reports its true sizes and ``complete=False``.
    """
    d = _get_def(name)
    if max_examples_per_split is not None:
        if isinstance(max_examples_per_split, bool) or not isinstance(max_examples_per_split, int):
            raise TypeError("max_examples_per_split must be an int or None")
        if max_examples_per_split < 1:
            raise ValueError(
                f"max_examples_per_split must be >= 1, got {max_examples_per_split}"
            )
    source_path = Path(os.path.expanduser(os.fspath(source)))
    if not source_path.is_dir():
        raise DataPreparationError(
            f"{source_path}: not a directory; expected a directory holding the "
            f"original {name} IDX files. {d.source_hint}"
        )
    root = Path(_resolve_data_dir(data_dir))

    # 1. Read and validate everything before touching the output.
    loaded: dict[str, _LoadedSplit] = {}
    for split in d.splits:
        data = _load_source_split(d, split, source_path, verify_checksums)
        if max_examples_per_split is not None:
            data.images = data.images[:max_examples_per_split]
            data.labels = data.labels[:max_examples_per_split]
        loaded[split] = data

    tfds = _import_tfds()
    features = _features(tfds, d)

    # 2. Write into a temporary directory beside the target.
    created: list[Path] = []
    for p in (root, root / d.name):
        if not p.exists():
            created.append(p)
    (root / d.name).mkdir(parents=True, exist_ok=True)
    final = root / d.name / d.version
    tmp = Path(tempfile.mkdtemp(prefix=f".{d.version}.incomplete-", dir=root / d.name))
    try:
        os.chmod(tmp, 0o755)
        split_infos = [
            _write_split(tfds, features, tmp, d, split, data) for split, data in loaded.items()
        ]
        sizes = {s: int(loaded[s].labels.shape[0]) for s in loaded}
        identity = tfds.core.dataset_info.DatasetIdentity(
            name=d.name,
            version=tfds.core.Version(d.version),
            data_dir=os.fspath(tmp),
            module_name="",
        )
        info = tfds.core.DatasetInfo(
            builder=identity,
            description=_description(d, sizes, max_examples_per_split, verify_checksums),
            features=features,
            supervised_keys=("image", "label"),
            homepage=d.homepage,
            citation=d.citation,
        )
        info.set_file_format(tfds.core.FileFormat.ARRAY_RECORD)
        info.set_splits(tfds.core.SplitDict(split_infos))
        info.write_to_directory(tmp)
        sidecar = {
            "prepared_by": "kdjax",
            "name": d.name,
            "version": d.version,
            "source": str(source_path.resolve()),
            "checksums_verified": bool(verify_checksums),
            "max_examples_per_split": max_examples_per_split,
            "num_examples": sizes,
            "full_num_examples": {s: d.splits[s].num_examples for s in d.splits},
            "source_files": {k: v for data in loaded.values() for k, v in data.files.items()},
            "prepared_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
        (tmp / _SIDECAR).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")

        # 3. Move into place (replacing an existing copy).
        if final.exists() or final.is_symlink():
            old = final.parent / f".{d.version}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            try:
                os.rename(tmp, final)
            except BaseException:
                os.rename(old, final)
                raise
            _remove_tree(old)
        else:
            os.rename(tmp, final)
    except BaseException:
        _remove_tree(tmp)
        for p in reversed(created):
            try:
                p.rmdir()
            except OSError:
                pass
        raise
    return os.fspath(final)


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What :func:`dataset_info` reports about a prepared dataset."""

    name: str
    version: str
    path: str  # <data_dir>/<name>/<version>
    num_classes: int
    class_names: tuple[str, ...]
    image_shape: tuple[int, ...]  # (H, W, C)
    splits: dict[str, int]  # true number of examples in each split
    #: True when every split has the size of the official dataset; False for a
    #: subset (max_examples_per_split) or an unknown dataset.
    complete: bool
    #: True/False as recorded by kdjax's prepare; None for a copy not prepared
    #: by kdjax (e.g. by TFDS itself, which verifies its downloads).
    checksums_verified: bool | None
    description: str

    def num_examples(self, split: str) -> int:
        try:
            return self.splits[split]
        except KeyError:
            raise ValueError(
                f"Unknown split {split!r} for {self.name}; available: {', '.join(self.splits)}"
            ) from None


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def _is_version(v: str) -> bool:
    parts = v.split(".")
    return len(parts) == 3 and all(p.isdigit() for p in parts)


def _find_dataset_dir(name: str, data_dir: str | os.PathLike | None) -> Path:
    """Directory of a usable (array_record) prepared copy of ``name``."""
    root = _resolve_data_dir(data_dir)
    known = name in _DATASETS
    base = Path(root) / name
    candidates: list[Path] = []
    if base.is_dir():
        candidates = [
            p
            for p in base.iterdir()
            if p.is_dir() and _is_version(p.name) and (p / "dataset_info.json").is_file()
        ]
    if not candidates:
        if not known:
            raise ValueError(
                f"Unknown dataset {name!r}: no prepared copy in {base}, and kdjax can "
                f"prepare only: {', '.join(SUPPORTED_DATASETS)}."
            )
        raise DatasetNotFoundError(
            _not_found_message(name, root, f"Dataset {name!r} not found in {root} (no {base}/<version>/dataset_info.json).")
        )
    if known and (base / _DATASETS[name].version) in candidates:
        chosen = base / _DATASETS[name].version
    else:
        chosen = max(candidates, key=lambda p: _version_key(p.name))
    info = json.loads((chosen / "dataset_info.json").read_text())
    file_format = info.get("fileFormat") or "tfrecord"
    if file_format != "array_record":
        problem = (
            f"Dataset {name!r} in {chosen} is stored as {file_format}, which "
            f"tfds.data_source cannot read with random access (it needs array_record)."
        )
        if known:
            raise DatasetNotFoundError(
                _not_found_message(name, root, problem + " Re-prepare it (this replaces that copy).")
            )
        raise DatasetNotFoundError(
            problem + " Rebuild it with `tfds build --file_format=array_record`."
        )
    return chosen


def _read_sidecar(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / _SIDECAR).read_text())
    except (OSError, ValueError):
        return {}


def dataset_info(name: str, *, data_dir: str | os.PathLike | None = None) -> DatasetSpec:
    """Describe the prepared copy of ``name`` (true split sizes, classes, shape, path)."""
    path = _find_dataset_dir(name, data_dir)
    tfds = _import_tfds()
    builder = tfds.builder_from_directory(os.fspath(path))
    info = builder.info
    image_feature, label_feature = _image_label_features(info, path)
    splits = {s: int(info.splits[s].num_examples) for s in info.splits}
    d = _DATASETS.get(name)
    complete = d is not None and all(
        splits.get(s) == sd.num_examples for s, sd in d.splits.items()
    )
    sidecar = _read_sidecar(path)
    verified = sidecar.get("checksums_verified") if sidecar.get("prepared_by") == "kdjax" else None
    return DatasetSpec(
        name=name,
        version=str(info.version),
        path=os.fspath(path),
        num_classes=int(label_feature.num_classes),
        class_names=tuple(label_feature.names),
        image_shape=tuple(int(s) if s is not None else None for s in image_feature.shape),
        splits=splits,
        complete=bool(complete),
        checksums_verified=verified,
        description=info.description or "",
    )


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


def load_arrays(
    name: str, split: str, *, data_dir: str | os.PathLike | None = None
) -> dict[str, np.ndarray]:
    """Load a whole split as ``{"image": uint8 [N,H,W,C], "label": int32 [N]}``.

    Reads the prepared copy through TFDS's array_record data source (records
    as raw bytes, read in one batch) and decodes the PNG images vectorised.
    ``split`` may be a TFDS split string such as ``"train"`` or ``"train[:1000]"``.
    Imports no TensorFlow.
    """
    path = _find_dataset_dir(name, data_dir)
    tfds = _import_tfds()
    from tensorflow_datasets.proto import tf_example_pb2  # noqa: PLC0415

    builder = tfds.builder_from_directory(os.fspath(path))
    image_feature, _ = _image_label_features(builder.info, path)
    try:
        source = builder.as_data_source(
            split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
        )
    except ValueError as e:
        raise ValueError(
            f"Bad split {split!r} for {name} in {path}: {e} "
            f"(available: {', '.join(builder.info.splits.keys())})"
        ) from None
    n = len(source)
    indices = range(n)
    getitems = getattr(source, "__getitems__", None)
    records = getitems(indices) if getitems is not None else [source[i] for i in indices]

    blobs: list[bytes] = []
    labels = np.empty(n, dtype=np.int32)
    example = tf_example_pb2.Example()
    for i, record in enumerate(records):
        example.ParseFromString(record)
        feature = example.features.feature
        blobs.append(feature["image"].bytes_list.value[0])
        labels[i] = feature["label"].int64_list.value[0]
    images = _decode_images(blobs, image_feature)
    return {"image": images, "label": labels}


# --------------------------------------------------------------------------
# Synthetic sources (tests and demos)
# --------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if array.ndim == 3:
        header = struct.pack(">IIII", _IMAGE_MAGIC, *array.shape)
    elif array.ndim == 1:
        header = struct.pack(">II", _LABEL_MAGIC, array.shape[0])
    else:
        raise ValueError(f"IDX images need shape (N, H, W), labels (N,); got {array.shape}")
    return header + array.tobytes()


def make_synthetic_idx_dir(
    dir: str | os.PathLike,
    n_train: int,
    n_test: int,
    seed: int,
    num_classes: int = 10,
    shape: tuple[int, int] = (28, 28),
    *,
    compress: bool = True,
) -> str:
    """Write a tiny, learnable MNIST-like source (four IDX files) into ``dir``.

    For tests and demos only: ``prepare("fashion_mnist", dir,
    verify_checksums=False)`` (or ``kdjax prepare fashion_mnist --from dir
    --skip-checksums``) turns it into a dataset. Each class has its own random
    blocky pattern; images are that pattern plus a random shift and noise, so
    even a small model gets well above chance (a nearest-class-mean classifier
    already does). Labels are balanced. Files are gzipped when ``compress``.
    ``prepare`` accepts only 28x28 images and at most 10 classes for
    mnist/fashion_mnist; other ``shape``/``num_classes`` are for other uses.
    Returns ``dir``.
    """
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    h, w = shape
    rng = np.random.default_rng(seed)
    # Class prototypes: blocks of 4x4 pixels switched on at random.
    bh, bw = max(1, h // 4), max(1, w // 4)
    coarse = rng.random((num_classes, bh, bw)) < 0.35
    protos = np.kron(coarse, np.ones((4, 4), dtype=bool))[:, :h, :w].astype(np.float32)
    protos = np.pad(protos, ((0, 0), (0, h - protos.shape[1]), (0, w - protos.shape[2])))

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.permutation(np.arange(n) % num_classes).astype(np.uint8)
        imgs = protos[labels] * 190.0 + 30.0
        shifts = rng.integers(-1, 2, size=(n, 2))
        for i, (dy, dx) in enumerate(shifts):
            imgs[i] = np.roll(imgs[i], (int(dy), int(dx)), axis=(0, 1))
        imgs += rng.normal(0.0, 35.0, size=imgs.shape)
        return np.clip(np.rint(imgs), 0, 255).astype(np.uint8), labels

    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = make(n)
        for base, arr in (
            (f"{prefix}-images-idx3-ubyte", images),
            (f"{prefix}-labels-idx1-ubyte", labels),
        ):
            data = _idx_bytes(arr)
            plain, gz = out / base, out / (base + ".gz")
            (plain if compress else gz).unlink(missing_ok=True)  # a stale other form
            if compress:
                gz.write_bytes(gzip.compress(data, mtime=0))
            else:
                plain.write_bytes(data)
    return os.fspath(out)
