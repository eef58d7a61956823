"""Offline preparation: the files users copy in by hand -> TFDS datasets (array_record).

kdjax never downloads anything. `prepare(NAME, SOURCE)` converts, once, the original
distribution files of a dataset into exactly the layout TensorFlow Datasets writes::

    <data_dir>/<name>[/<config>]/<version>/
        dataset_info.json  features.json  *.labels.txt  kdjax.json
        <name>-<split>.array_record-<shard>-of-<shards>

with TFDS's registered name, version and features where TFDS has a builder, so a copy TFDS
prepared and a copy kdjax prepared are interchangeable (`tfds.data_source` reads both; kdjax
reads both). Supported sources:

* ``mnist``, ``fashion_mnist`` (3.0.1): the four IDX files, gzipped or not.
* ``cifar10``, ``cifar100`` (3.0.2): the python tarball (``cifar-10-python.tar.gz``,
  ``cifar-100-python.tar.gz``), the binary tarball TFDS itself uses (``cifar-10-binary.tar.gz``,
  ``cifar-100-binary.tar.gz``), or either one extracted; a directory holding one of these works
  too. CIFAR-100 keeps TFDS's features: image, label (fine), coarse_label, id.
* an ImageNet-style folder tree ``train/<class>/*.jpg``, ``val/<class>/*.jpg`` [``test/...``]:
  ``imagenette[/<config>]`` and ``imagenet2012`` get TFDS's names, versions, label lists and
  features; any other name (or ``imagefolder:NAME``) is a generic dataset with the features of
  TFDS's ``ImageFolder`` (image, label, image/filename) and the class folders' sorted names as
  labels. ``val`` becomes the split ``validation`` (as in TFDS's ImageNet-style builders).
  JPEG bytes are stored as they are; other images (PNG, CMYK, greyscale) are converted to RGB
  JPEG (quality 95), as TFDS's imagenet2012 builder does for its few odd files.

Known checksums are verified (``verify_checksums=False`` / ``--skip-checksums`` for subsets you
made yourself); every source problem is a :class:`kdjax.data.DataPreparationError` that names the
file and what was expected. Output is written into a temporary directory next to the target and
renamed into place: a failure leaves nothing behind, and re-preparing replaces an old copy only
once the new one is complete.

Nothing here imports TensorFlow: records are ``tf.train.Example`` protos built with TFDS's own
proto module (checked against ``FeaturesDict.serialize_example`` on the first example of every
split) and written with ``array_record`` exactly as TFDS's writer does (``group_size:1``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime
import gzip
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import struct
import tarfile
import tempfile
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kdjax import images as image_codec
from kdjax.data import (
    SIDECAR,
    DataPreparationError,
    _import_tfds,
    _resolve_data_dir,
)

__all__ = [
    "SUPPORTED_DATASETS",
    "make_synthetic_cifar",
    "make_synthetic_idx_dir",
    "make_synthetic_image_folder",
    "prepare",
    "prepare_hint",
]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_digests(path: Path) -> tuple[str, str, int]:
    """(sha256, md5, size) of a file, read in chunks."""
    sha, md5, size = hashlib.sha256(), hashlib.md5(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            sha.update(chunk)
            md5.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), md5.hexdigest(), size


# ==========================================================================
# MNIST and Fashion-MNIST: IDX files
# ==========================================================================

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

_IDX_DATASETS: dict[str, _IdxDatasetDef] = {d.name: d for d in (_MNIST, _FASHION_MNIST)}


def _idx_hint(name: str) -> tuple[str, str]:
    d = _IDX_DATASETS[name]
    return d.suggested_source, d.source_hint


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



def _idx_features(tfds, d: _IdxDatasetDef):
    if d.class_names is not None:
        label = tfds.features.ClassLabel(names=list(d.class_names))
    else:
        label = tfds.features.ClassLabel(num_classes=d.num_classes)
    return tfds.features.FeaturesDict(
        {"image": tfds.features.Image(shape=d.image_shape), "label": label}
    )


def _prepare_idx(d: _IdxDatasetDef, source: Path, root: Path, verify_checksums: bool,
                 max_examples: int | None) -> str:
    if not source.is_dir():
        raise DataPreparationError(
            f"{source}: not a directory; expected a directory holding the "
            f"original {d.name} IDX files. {d.source_hint}"
        )
    # Read and validate everything before touching the output.
    loaded: dict[str, _LoadedSplit] = {}
    for split in d.splits:
        data = _load_source_split(d, split, source, verify_checksums)
        if max_examples is not None:
            data.images = data.images[:max_examples]
            data.labels = data.labels[:max_examples]
        loaded[split] = data
    tfds = _import_tfds()
    sizes = {s: int(v.labels.shape[0]) for s, v in loaded.items()}

    def examples(data: _LoadedSplit) -> Iterator[dict[str, Any]]:
        for image, label in zip(data.images, data.labels, strict=True):
            yield {"image": image_codec.encode_png(image), "label": int(label)}

    return _write_dataset(
        root, _Target(d.name, None, d.version),
        features=_idx_features(tfds, d),
        splits={s: examples(v) for s, v in loaded.items()},
        description=_description(
            d.description + "\nPrepared offline by kdjax from the original IDX files.",
            sizes, {s: sd.num_examples for s, sd in d.splits.items()}, max_examples,
            verify_checksums),
        homepage=d.homepage, citation=d.citation,
        sidecar={
            "source": str(source.resolve()),
            "checksums_verified": bool(verify_checksums),
            "max_examples_per_split": max_examples,
            "full_num_examples": {s: sd.num_examples for s, sd in d.splits.items()},
            "source_files": {k: v for data in loaded.values() for k, v in data.files.items()},
        },
    )


# ==========================================================================
# CIFAR-10 and CIFAR-100: python or binary tarballs, or their extracted folders
# ==========================================================================

_CIFAR_CITATION = """\
@TECHREPORT{Krizhevsky09learningmultiple,
    author = {Alex Krizhevsky},
    title = {Learning multiple layers of features from tiny images},
    institution = {},
    year = {2009}
}
"""
_CIFAR_PIXELS = 32 * 32 * 3


@dataclasses.dataclass(frozen=True)
class _CifarArchive:
    filename: str
    layout: str  # "python" | "binary"
    top: str  # the folder inside the tarball
    size: int
    sha256: str
    md5: str | None


@dataclasses.dataclass(frozen=True)
class _CifarDef:
    name: str
    version: str
    num_classes: int
    num_coarse: int  # 0: no coarse labels (CIFAR-10)
    archives: tuple[_CifarArchive, ...]
    # python layout: split -> [(file, md5)], the meta file and md5, and the pickle keys
    py_files: Mapping[str, tuple[tuple[str, str], ...]]
    py_meta: tuple[str, str]
    py_label_key: str
    py_names_key: str
    # binary layout: split -> [file], label-name files (fine, coarse)
    bin_files: Mapping[str, tuple[str, ...]]
    bin_names: tuple[str, ...]
    num_examples: Mapping[str, int]
    description: str


# The python tarballs: size, md5 (published on https://www.cs.toronto.edu/~kriz/cifar.html and
# used by torchvision) and sha256 (the one Keras pins), plus torchvision's md5 of each extracted
# file. The binary tarballs: size and sha256 from TFDS 4.9.10's url_checksums/cifar{10,100}.txt
# (what `tfds build` verifies); tests check these against the installed TFDS.
_CIFAR10 = _CifarDef(
    name="cifar10",
    version="3.0.2",
    num_classes=10,
    num_coarse=0,
    archives=(
        _CifarArchive("cifar-10-python.tar.gz", "python", "cifar-10-batches-py", 170498071,
                      "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
                      "c58f30108f718f92721af3b95e74349a"),
        _CifarArchive("cifar-10-binary.tar.gz", "binary", "cifar-10-batches-bin", 170052171,
                      "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd", None),
    ),
    py_files={
        "train": (("data_batch_1", "c99cafc152244af753f735de768cd75f"),
                  ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
                  ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
                  ("data_batch_4", "634d18415352ddfa80567beed471001a"),
                  ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb")),
        "test": (("test_batch", "40351d587109b95175f43aff81a1287e"),),
    },
    py_meta=("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
    py_label_key="labels",
    py_names_key="label_names",
    bin_files={"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
               "test": ("test_batch.bin",)},
    bin_names=("batches.meta.txt",),
    num_examples={"train": 50000, "test": 10000},
    description=(
        "The CIFAR-10 dataset consists of 60000 32x32 colour images in 10 classes, with 6000 "
        "images per class. There are 50000 training images and 10000 test images."
    ),
)

_CIFAR100 = _CifarDef(
    name="cifar100",
    version="3.0.2",
    num_classes=100,
    num_coarse=20,
    archives=(
        _CifarArchive("cifar-100-python.tar.gz", "python", "cifar-100-python", 169001437,
                      "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
                      "eb9058c3a382ffc7106e4002c42a8d85"),
        _CifarArchive("cifar-100-binary.tar.gz", "binary", "cifar-100-binary", 168513733,
                      "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec", None),
    ),
    py_files={"train": (("train", "16019d7e3df5f24257cddd939b257f8d"),),
              "test": (("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),)},
    py_meta=("meta", "7973b15100ade9c7d40fb424638fde48"),
    py_label_key="fine_labels",
    py_names_key="fine_label_names",
    bin_files={"train": ("train.bin",), "test": ("test.bin",)},
    bin_names=("fine_label_names.txt", "coarse_label_names.txt"),
    num_examples={"train": 50000, "test": 10000},
    description=(
        "This dataset is just like the CIFAR-10, except it has 100 classes containing 600 images "
        "each. There are 500 training images and 100 testing images per class. The 100 classes "
        "in the CIFAR-100 are grouped into 20 superclasses. Each image comes with a \"fine\" "
        "label (the class to which it belongs) and a \"coarse\" label (the superclass to which "
        "it belongs)."
    ),
)

_CIFAR_DATASETS: dict[str, _CifarDef] = {d.name: d for d in (_CIFAR10, _CIFAR100)}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles CIFAR's batches (dicts, lists, numpy arrays) and nothing else.

    A pickle can run arbitrary code; CIFAR's python files only need numpy's array
    reconstruction, so every other global is refused (a file from an unknown source, with
    --skip-checksums, cannot execute anything).
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("__builtin__", "bytes"),
        ("builtins", "bytes"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}")


def _unpickle(content: bytes, where: str) -> dict[str, Any]:
    try:
        obj = _SafeUnpickler(io.BytesIO(content), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any failure means a bad file
        raise DataPreparationError(
            f"{where}: not a readable CIFAR python batch ({type(e).__name__}: {e}); expected a "
            f"pickled dict as in the official python tarball. The file is truncated or corrupt: "
            f"copy it again from the original source."
        ) from None
    if not isinstance(obj, dict):
        raise DataPreparationError(
            f"{where}: expected a pickled dict (a CIFAR python batch), found {type(obj).__name__}.")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


class _CifarFiles:
    """The files of one CIFAR source (tarball or extracted folder), by their base name."""

    def __init__(self, layout: str, files: dict[str, bytes], where: dict[str, str],
                 verified_as: str | None, record: dict[str, Any]):
        self.layout = layout
        self.files = files
        self.where = where  # base name -> "path" or "tarball:member" for messages
        self.verified_as = verified_as
        self.record = record

    def get(self, base: str) -> bytes:
        if base not in self.files:
            present = ", ".join(sorted(self.files)) or "nothing"
            raise DataPreparationError(
                f"{self.record['source']}: {base} not found; expected it in the {self.layout} "
                f"CIFAR layout (found: {present}).")
        return self.files[base]


def _cifar_expected_files(d: _CifarDef, layout: str) -> list[str]:
    if layout == "python":
        return [f for split in d.py_files.values() for f, _ in split] + [d.py_meta[0]]
    return [f for split in d.bin_files.values() for f in split] + list(d.bin_names)


def _cifar_hint(d: _CifarDef) -> str:
    py, binary = d.archives
    return (f"--from takes {py.filename} (or {binary.filename}, the one TFDS downloads), either "
            f"one extracted ({py.top}/ or {binary.top}/), or a folder holding one of these.")


def _read_cifar_tarball(d: _CifarDef, path: Path, verify: bool) -> _CifarFiles:
    sha, md5, size = _file_digests(path)
    known = {a.sha256: a for a in d.archives}
    by_name = {a.filename: a for a in d.archives}
    verified_as = None
    if sha in known:
        verified_as = known[sha].filename
    elif verify:
        ref = by_name.get(path.name)
        refs = [ref] if ref else list(d.archives)
        expected = " or ".join(f"{a.filename}: {a.size} bytes, sha256 {a.sha256}" for a in refs)
        if ref and size < ref.size:
            state = f"The file is truncated ({size} of {ref.size} bytes)"
        elif ref and size > ref.size:
            state = f"The file is too long ({size} of {ref.size} bytes)"
        else:
            state = f"The file is corrupt or not the official {d.name} tarball"
        raise DataPreparationError(
            f"{path}: sha256 mismatch for {d.name}: expected {expected}; actual {size} bytes, "
            f"sha256 {sha} (md5 {md5}). {state}: copy it again from the original source, or "
            f"pass --skip-checksums (verify_checksums=False) for a subset you made yourself.")
    files, where = {}, {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                f = tar.extractfile(member)
                files[base] = f.read() if f is not None else b""
                where[base] = f"{path}:{member.name}"
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataPreparationError(
            f"{path}: not a readable tar archive ({type(e).__name__}: {e}); expected "
            f"{' or '.join(a.filename for a in d.archives)}. The file is truncated or corrupt: "
            f"copy it again from the original source.") from None
    layout = _cifar_detect_layout(d, set(files), path)
    return _CifarFiles(layout, files, where, verified_as, {
        "source": str(path.resolve()), "sha256": sha, "md5": md5, "size": size,
        "verified_as": verified_as})


def _cifar_detect_layout(d: _CifarDef, names: set[str], where: Path) -> str:
    for layout in ("python", "binary"):
        if set(_cifar_expected_files(d, layout)) <= names:
            return layout
    py, binary = (_cifar_expected_files(d, lay) for lay in ("python", "binary"))
    raise DataPreparationError(
        f"{where}: not a {d.name} source: expected the files {', '.join(py)} (python layout) or "
        f"{', '.join(binary)} (binary layout); found {', '.join(sorted(names)) or 'nothing'}. "
        f"{_cifar_hint(d)}")


def _read_cifar_folder(d: _CifarDef, folder: Path, verify: bool) -> _CifarFiles:
    names = {p.name for p in folder.iterdir() if p.is_file()}
    layout = _cifar_detect_layout(d, names, folder)
    files = {n: (folder / n).read_bytes() for n in _cifar_expected_files(d, layout)}
    where = {n: str(folder / n) for n in files}
    verified_as = None
    if verify:
        if layout == "binary":
            raise DataPreparationError(
                f"{folder}: no checksums of the extracted binary CIFAR files are known to kdjax; "
                f"pass the tarball {d.archives[1].filename} itself (its sha256 is known), or "
                f"--skip-checksums (verify_checksums=False).")
        for base, md5 in [*(f for s in d.py_files.values() for f in s), d.py_meta]:
            actual = hashlib.md5(files[base]).hexdigest()
            if actual != md5:
                raise DataPreparationError(
                    f"{folder / base}: md5 mismatch for {d.name}: expected {md5} (the official "
                    f"{base}), actual {actual} ({len(files[base])} bytes). The file is corrupt or "
                    f"not the official one: copy it again from the original source, or pass "
                    f"--skip-checksums (verify_checksums=False) for a subset you made yourself.")
        verified_as = f"{d.archives[0].top}/ (md5 of every file)"
    return _CifarFiles(layout, files, where, verified_as, {
        "source": str(folder.resolve()), "verified_as": verified_as})


def _open_cifar(d: _CifarDef, source: Path, verify: bool) -> _CifarFiles:
    if source.is_file():
        return _read_cifar_tarball(d, source, verify)
    if not source.is_dir():
        raise DataPreparationError(f"{source}: no such file or directory. {_cifar_hint(d)}")
    for a in d.archives:  # a tarball inside the folder
        if (source / a.filename).is_file():
            return _read_cifar_tarball(d, source / a.filename, verify)
    for a in d.archives:  # an extracted tarball inside the folder
        if (source / a.top).is_dir():
            return _read_cifar_folder(d, source / a.top, verify)
    return _read_cifar_folder(d, source, verify)


@dataclasses.dataclass
class _CifarSplit:
    images: np.ndarray  # [N, 32, 32, 3]
    labels: np.ndarray  # [N]
    coarse: np.ndarray | None


def _check_labels(labels: np.ndarray, num: int, where: str, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.size == 0:
        labels = labels.reshape(0).astype(np.int64)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataPreparationError(f"{where}: expected a list of integer {what}, found "
                                   f"{labels.dtype} of shape {labels.shape}.")
    if labels.size and (labels.min() < 0 or labels.max() >= num):
        bad = int(np.argmax((labels < 0) | (labels >= num)))
        raise DataPreparationError(
            f"{where}: {what} {int(labels[bad])} at index {bad} is out of range: expected "
            f"0..{num - 1}.")
    return labels.astype(np.int64)


def _cifar_python_split(d: _CifarDef, src: _CifarFiles, split: str) -> _CifarSplit:
    parts = []
    for base, _ in d.py_files[split]:
        where = src.where[base]
        batch = _unpickle(src.get(base), where)
        for key in ("data", d.py_label_key):
            if key not in batch:
                raise DataPreparationError(
                    f"{where}: the batch has no {key!r} entry (found {sorted(batch)}); expected "
                    f"a {d.name} python batch.")
        data = np.asarray(batch["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS:
            raise DataPreparationError(
                f"{where}: expected 'data' to be uint8 of shape (N, {_CIFAR_PIXELS}), found "
                f"{data.dtype} {data.shape}.")
        labels = _check_labels(np.asarray(batch[d.py_label_key]), d.num_classes, where, "label")
        coarse = None
        if d.num_coarse:
            if "coarse_labels" not in batch:
                raise DataPreparationError(f"{where}: the batch has no 'coarse_labels' entry.")
            coarse = _check_labels(np.asarray(batch["coarse_labels"]), d.num_coarse, where,
                                   "coarse label")
        for arr, what in ((labels, d.py_label_key), (coarse, "coarse_labels")):
            if arr is not None and len(arr) != len(data):
                raise DataPreparationError(
                    f"{where}: {len(data)} images but {len(arr)} {what}: expected one each.")
        parts.append((data, labels, coarse))
    data = np.concatenate([p[0] for p in parts])
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return _CifarSplit(np.ascontiguousarray(images), np.concatenate([p[1] for p in parts]),
                       np.concatenate([p[2] for p in parts]) if d.num_coarse else None)


def _cifar_binary_split(d: _CifarDef, src: _CifarFiles, split: str) -> _CifarSplit:
    nlab = 2 if d.num_coarse else 1
    record = nlab + _CIFAR_PIXELS
    parts = []
    for base in d.bin_files[split]:
        where, content = src.where[base], src.get(base)
        if len(content) % record or not content:
            raise DataPreparationError(
                f"{where}: wrong size: expected a whole number of {record}-byte records "
                f"({nlab} label byte{'s' if nlab > 1 else ''} + {_CIFAR_PIXELS} pixels), found "
                f"{len(content)} bytes. The file is truncated or corrupt.")
        arr = np.frombuffer(content, np.uint8).reshape(-1, record)
        labels = _check_labels(arr[:, nlab - 1], d.num_classes, where, "label")
        coarse = _check_labels(arr[:, 0], d.num_coarse, where, "coarse label") if nlab == 2 else None
        parts.append((arr[:, nlab:], labels, coarse))
    images = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return _CifarSplit(np.ascontiguousarray(images), np.concatenate([p[1] for p in parts]),
                       np.concatenate([p[2] for p in parts]) if d.num_coarse else None)


def _cifar_names(d: _CifarDef, src: _CifarFiles) -> tuple[list[str], list[str] | None]:
    def check(names, num, where, what):
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        if len(names) != num:
            raise DataPreparationError(
                f"{where}: expected {num} {what} names, found {len(names)}.")
        return names

    if src.layout == "python":
        base = d.py_meta[0]
        meta = _unpickle(src.get(base), src.where[base])
        keys = [d.py_names_key] + (["coarse_label_names"] if d.num_coarse else [])
        for k in keys:
            if k not in meta:
                raise DataPreparationError(
                    f"{src.where[base]}: no {k!r} entry (found {sorted(meta)}).")
        fine = check(meta[d.py_names_key], d.num_classes, src.where[base], "class")
        coarse = (check(meta["coarse_label_names"], d.num_coarse, src.where[base], "superclass")
                  if d.num_coarse else None)
        return fine, coarse
    texts = []
    for base in d.bin_names:
        lines = [ln.strip() for ln in src.get(base).decode("utf-8", "replace").splitlines()]
        texts.append(([ln for ln in lines if ln], src.where[base]))
    fine = check(texts[0][0], d.num_classes, texts[0][1], "class")
    coarse = check(texts[1][0], d.num_coarse, texts[1][1], "superclass") if d.num_coarse else None
    return fine, coarse


def _prepare_cifar(d: _CifarDef, source: Path, root: Path, verify_checksums: bool,
                   max_examples: int | None) -> str:
    src = _open_cifar(d, source, verify_checksums)
    reader = _cifar_python_split if src.layout == "python" else _cifar_binary_split
    splits = {split: reader(d, src, split) for split in ("train", "test")}
    fine_names, coarse_names = _cifar_names(d, src)
    if max_examples is not None:
        for s in splits.values():
            s.images, s.labels = s.images[:max_examples], s.labels[:max_examples]
            s.coarse = None if s.coarse is None else s.coarse[:max_examples]
    tfds = _import_tfds()
    feats = {
        "id": tfds.features.Text(),
        "image": tfds.features.Image(shape=(32, 32, 3)),
        "label": tfds.features.ClassLabel(names=fine_names),
    }
    if d.num_coarse:
        feats["coarse_label"] = tfds.features.ClassLabel(names=coarse_names)

    def examples(split: str, data: _CifarSplit) -> Iterator[dict[str, Any]]:
        for i in range(len(data.labels)):
            ex = {"id": f"{split}_{i:05d}", "image": image_codec.encode_png(data.images[i]),
                  "label": int(data.labels[i])}
            if data.coarse is not None:
                ex["coarse_label"] = int(data.coarse[i])
            yield ex

    sizes = {s: len(v.labels) for s, v in splits.items()}
    return _write_dataset(
        root, _Target(d.name, None, d.version),
        features=tfds.features.FeaturesDict(feats),
        splits={s: examples(s, v) for s, v in splits.items()},
        description=_description(
            d.description + f"\nPrepared offline by kdjax from the {src.layout} CIFAR files.",
            sizes, dict(d.num_examples), max_examples, verify_checksums),
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html", citation=_CIFAR_CITATION,
        sidecar={
            **src.record,
            "layout": src.layout,
            "checksums_verified": bool(verify_checksums),
            "max_examples_per_split": max_examples,
            "full_num_examples": dict(d.num_examples),
        },
    )


# ==========================================================================
# ImageNet-style folder trees: train/<class>/*.jpg, val/<class>/*.jpg
# ==========================================================================

_IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
_SPLIT_NAMES = {"train": "train", "val": "validation", "validation": "validation",
                "valid": "validation", "test": "test"}
_FOLDER_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_JPEG_QUALITY = 95


@dataclasses.dataclass(frozen=True)
class _FolderProfile:
    """How a folder tree becomes a dataset: TFDS's layout for a known builder, else generic."""

    name: str
    config: str | None
    version: str
    labels_file: str | None  # path inside the tfds package: the official class order
    filename_feature: str | None  # feature holding the file name (None: not stored)
    description: str
    homepage: str = ""


# imagenette's folder names in fast.ai's tarballs -> TFDS's builder configs.
_IMAGENETTE_CONFIGS = {
    "imagenette2": "full-size-v2", "imagenette2-320": "320px-v2", "imagenette2-160": "160px-v2",
    "imagenette": "full-size", "imagenette-320": "320px", "imagenette-160": "160px",
}


def _folder_profile(name: str, source: Path) -> _FolderProfile:
    base, _, config = name.partition("/")
    if base == "imagenette":
        if not config:
            config = _IMAGENETTE_CONFIGS.get(source.name) or next(
                (_IMAGENETTE_CONFIGS[p.name] for p in source.iterdir()
                 if p.is_dir() and p.name in _IMAGENETTE_CONFIGS), None) if source.is_dir() else None
        if config not in _IMAGENETTE_CONFIGS.values():
            raise ValueError(
                f"imagenette has the TFDS configs {sorted(_IMAGENETTE_CONFIGS.values())}; name one "
                f"(e.g. `kdjax prepare imagenette/320px-v2 --from DIR`) when the source folder is "
                f"not called like fast.ai's tarballs ({', '.join(sorted(_IMAGENETTE_CONFIGS))}); "
                f"got {name!r} with --from {source}.")
        return _FolderProfile(
            "imagenette", config, "1.0.0", "image_classification/imagenette_labels.txt", None,
            "Imagenette is a subset of 10 easily classified classes from the Imagenet dataset.",
            "https://github.com/fastai/imagenette")
    if base == "imagenet2012":
        if config:
            raise ValueError(f"imagenet2012 has no config {config!r}")
        return _FolderProfile(
            "imagenet2012", None, "5.1.0", "datasets/imagenet2012/labels.txt", "file_name",
            "ILSVRC 2012, commonly known as 'ImageNet' (1000 classes).",
            "http://image-net.org/")
    generic = name.removeprefix("imagefolder:")
    if not _FOLDER_NAME.match(generic) or config:
        raise ValueError(
            f"dataset name {generic!r}: a folder dataset needs a name of lowercase letters, digits "
            f"and underscores starting with a letter (e.g. `kdjax prepare my_flowers --from DIR` "
            f"or `imagefolder:my_flowers`).")
    if generic in _IDX_DATASETS or generic in _CIFAR_DATASETS:
        raise ValueError(f"{generic!r} is a dataset kdjax prepares from its original files, not "
                         f"from a folder tree; pick another name for your folder dataset.")
    return _FolderProfile(generic, None, "1.0.0", None, "image/filename",
                          f"Image classification dataset {generic!r} (an image folder tree).")


def _folder_root(source: Path) -> Path:
    """The folder that holds the split folders (train/, val/, ...)."""
    if not source.is_dir():
        raise DataPreparationError(
            f"{source}: not a directory; expected an ImageNet-style folder tree "
            f"(train/<class>/*.jpg, val/<class>/*.jpg).")
    def has_splits(p: Path) -> bool:
        return any((p / s).is_dir() for s in _SPLIT_NAMES)

    if has_splits(source):
        return source
    subdirs = [p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(subdirs) == 1 and has_splits(subdirs[0]):
        return subdirs[0]
    raise DataPreparationError(
        f"{source}: no split folders; expected an ImageNet-style tree with train/<class>/*.jpg "
        f"and val/<class>/*.jpg (or test/), found: "
        f"{', '.join(sorted(p.name for p in source.iterdir())) or 'nothing'}.")


def _scan_folder_tree(root: Path) -> dict[str, list[tuple[Path, str]]]:
    """split -> sorted [(file, class folder name)]."""
    out: dict[str, list[tuple[Path, str]]] = {}
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        split = _SPLIT_NAMES.get(split_dir.name)
        if split is None:
            continue
        if split in out:
            raise DataPreparationError(
                f"{root}: two folders map to the split {split!r} (e.g. val/ and validation/); "
                f"keep one.")
        classes = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        loose = [p for p in split_dir.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_EXTENSIONS]
        if loose:
            raise DataPreparationError(
                f"{split_dir}: holds images directly ({loose[0].name}, ...); expected one folder "
                f"per class ({split_dir.name}/<class>/*.jpg). For ImageNet's validation set, sort "
                f"the images into class folders first (e.g. with the usual valprep.sh).")
        files = [(f, c.name) for c in classes for f in sorted(c.iterdir())
                 if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in _IMAGE_EXTENSIONS]
        if not files:
            raise DataPreparationError(f"{split_dir}: no images in any class folder "
                                       f"(looked for {', '.join(sorted(_IMAGE_EXTENSIONS))}).")
        out[split] = files
    if "train" not in out:
        raise DataPreparationError(f"{root}: no train/ folder with class folders of images.")
    return out


def _image_record(path: Path) -> tuple[bytes, bool]:
    """(JPEG bytes of `path`, whether it had to be re-encoded); DataPreparationError if bad."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode = im.format, im.mode
            if fmt == "JPEG" and mode == "RGB":
                # A whole JPEG ends with the EOI marker; otherwise decode it to be sure.
                if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
                    im.load()
                return data, False
            im.load()
            rgb = im.convert("RGB")
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=_JPEG_QUALITY)
        return buf.getvalue(), True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataPreparationError(
            f"{path}: not a readable image ({type(e).__name__}: {e}); expected a JPEG (or PNG) "
            f"image of {len(data)} bytes. The file is truncated or corrupt: copy it again or "
            f"remove it.") from None


def _ordered_map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int) -> Iterator[Any]:
    """fn over items on `workers` threads, results in order, at most 4*workers in flight."""
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        pending: collections.deque = collections.deque()
        it = iter(items)
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * max(1, workers):
                break
        while pending:
            yield pending.popleft().result()
            for item in it:
                pending.append(pool.submit(fn, item))
                break


def _prepare_folder(name: str, source: Path, root: Path, verify_checksums: bool,
                    max_examples: int | None, num_workers: int | None) -> str:
    del verify_checksums  # no official checksums exist for image files in a folder
    profile = _folder_profile(name, source)
    tree_root = _folder_root(source)
    tree = _scan_folder_tree(tree_root)
    tfds = _import_tfds()
    if profile.labels_file:
        names_path = Path(os.path.dirname(tfds.__file__)) / profile.labels_file
        class_names = [ln.strip() for ln in names_path.read_text().splitlines() if ln.strip()]
    else:
        class_names = sorted({c for _, c in tree["train"]})
    index = {c: i for i, c in enumerate(class_names)}
    for split, files in tree.items():
        unknown = sorted({c for _, c in files} - set(index))
        if unknown:
            raise DataPreparationError(
                f"{tree_root}: {split} has class folders that are not classes of {profile.name} "
                f"({', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}); expected "
                f"{'the official class ids of ' + profile.name if profile.labels_file else 'the class folders of train/'}.")
    if max_examples is not None:  # evenly spaced, so that every class is represented
        for split, files in tree.items():
            if len(files) > max_examples:
                keep = np.linspace(0, len(files) - 1, max_examples).round().astype(int)
                tree[split] = [files[i] for i in keep]
    feats: dict[str, Any] = {
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(names=class_names),
    }
    if profile.filename_feature:
        feats[profile.filename_feature] = tfds.features.Text()
    workers = num_workers or os.cpu_count() or 1
    reencoded: list[str] = []

    def examples(files: list[tuple[Path, str]]) -> Iterator[dict[str, Any]]:
        for (path, cls), (blob, converted) in zip(
                files, _ordered_map(_image_record, [f for f, _ in files], workers)):
            if converted:
                reencoded.append(str(path.relative_to(tree_root)))
            ex = {"image": blob, "label": index[cls]}
            if profile.filename_feature:
                ex[profile.filename_feature] = path.name
            yield ex

    sizes = {s: len(f) for s, f in tree.items()}
    return _write_dataset(
        root, _Target(profile.name, profile.config, profile.version),
        features=tfds.features.FeaturesDict(feats),
        splits={s: examples(f) for s, f in tree.items()},
        description=_description(
            profile.description + f"\nPrepared offline by kdjax from the folder tree "
            f"{tree_root} ({len(class_names)} classes).", sizes, None, max_examples, None),
        homepage=profile.homepage, citation="",
        sidecar={
            "source": str(tree_root.resolve()),
            "checksums_verified": None,  # image folders have no official checksums
            "max_examples_per_split": max_examples,
            "reencoded_as_jpeg": reencoded,
        },
    )


# ==========================================================================
# Writing a TFDS dataset directory atomically
# ==========================================================================

#: A shard is closed once it holds this many bytes (TFDS's writer targets at most 1 GiB too).
SHARD_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class _Target:
    name: str
    config: str | None
    version: str

    def parts(self) -> tuple[str, ...]:
        return (self.name, self.config) if self.config else (self.name,)


def _serializer(features, first: Mapping[str, Any]) -> Callable[[Mapping[str, Any]], bytes]:
    """Build tf.train.Example records directly (TFDS's serializer costs ~0.15 ms per example),
    after checking on `first` that this gives the very message TFDS's own serializer gives;
    otherwise use TFDS's serializer throughout."""
    try:
        from tensorflow_datasets.proto import tf_example_pb2  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        return features.serialize_example

    def serialize(ex: Mapping[str, Any]) -> bytes:
        example = tf_example_pb2.Example()
        feature = example.features.feature
        for key, value in ex.items():
            if isinstance(value, bytes):
                feature[key].bytes_list.value.append(value)
            elif isinstance(value, str):
                feature[key].bytes_list.value.append(value.encode("utf-8"))
            else:
                feature[key].int64_list.value.append(int(value))
        return example.SerializeToString()

    # Compare parsed messages: the order in which protobuf writes map entries (the feature
    # names) varies between calls, so bytes may legitimately differ.
    parse = tf_example_pb2.Example.FromString
    if parse(serialize(first)) == parse(features.serialize_example(dict(first))):
        return serialize
    return features.serialize_example  # pragma: no cover


def _write_split(tfds, features, out_dir: Path, target: _Target, split: str,
                 examples: Iterable[Mapping[str, Any]]):
    """Write one split as array_record shards of at most ~SHARD_BYTES; returns its SplitInfo."""
    from array_record.python import array_record_module  # noqa: PLC0415

    template = tfds.core.naming.ShardedFileTemplate(
        data_dir=out_dir, dataset_name=target.name, split=split,
        filetype_suffix="array_record")
    shard_files: list[Path] = []
    lengths: list[int] = []
    num_bytes = 0
    writer, serialize, in_shard, shard_bytes = None, None, 0, 0
    try:
        for ex in examples:
            if serialize is None:
                serialize = _serializer(features, ex)
            if writer is None:
                shard_files.append(out_dir / f".{split}-shard-{len(shard_files):05d}")
                writer = array_record_module.ArrayRecordWriter(
                    os.fspath(shard_files[-1]), "group_size:1")
                in_shard, shard_bytes = 0, 0
            record = serialize(ex)
            writer.write(record)
            in_shard += 1
            shard_bytes += len(record)
            num_bytes += len(record)
            if shard_bytes >= SHARD_BYTES:
                writer.close()
                writer = None
                lengths.append(in_shard)
        if writer is not None:
            writer.close()
            writer = None
            lengths.append(in_shard)
    finally:
        if writer is not None:
            writer.close()
    if not lengths:
        raise DataPreparationError(f"split {split!r} of {target.name} has no examples")
    for i, tmp in enumerate(shard_files):
        os.rename(tmp, template.sharded_filepath(shard_index=i, num_shards=len(shard_files)))
    return tfds.core.SplitInfo(name=split, shard_lengths=lengths, num_bytes=num_bytes,
                               filename_template=template)


def _description(text: str, sizes: Mapping[str, int], full: Mapping[str, int] | None,
                 subset: int | None, verified: bool | None) -> str:
    if subset is not None:
        parts = ", ".join(f"{s}: {n}" + (f" of {full[s]}" if full and s in full else "")
                          for s, n in sizes.items())
        text += (
            f"\n\nWARNING: SUBSET, NOT THE FULL DATASET. Prepared with "
            f"max_examples_per_split={subset}: only some examples of each split ({parts})."
        )
    if verified is False:
        text += "\n\nNOTE: the source files were not checksum-verified (verify_checksums=False)."
    return text


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _write_dataset(root: Path, target: _Target, *, features, splits: Mapping[str, Iterable],
                   description: str, homepage: str, citation: str,
                   sidecar: Mapping[str, Any]) -> str:
    """Write `<root>/<name>[/<config>]/<version>` from `splits` (split -> examples), atomically.

    Examples are dicts of already-encoded values (image bytes, int labels, str texts). Everything
    is written into a temporary directory beside the target, which is renamed into place at the
    end; on any failure the temporary directory (and any parent this call created) is removed,
    and an existing copy is replaced only after the new one is complete.
    """
    tfds = _import_tfds()
    parent = root.joinpath(*target.parts())
    created = [p for p in (root, *[root.joinpath(*target.parts()[:i + 1])
                                   for i in range(len(target.parts()))]) if not p.exists()]
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / target.version
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.version}.incomplete-", dir=parent))
    try:
        os.chmod(tmp, 0o755)
        split_infos = [_write_split(tfds, features, tmp, target, s, ex) for s, ex in splits.items()]
        identity = tfds.core.dataset_info.DatasetIdentity(
            name=target.name, version=tfds.core.Version(target.version),
            data_dir=os.fspath(tmp), module_name="", config_name=target.config)
        info = tfds.core.DatasetInfo(
            builder=identity, description=description, features=features,
            supervised_keys=("image", "label"), homepage=homepage, citation=citation)
        info.set_file_format(tfds.core.FileFormat.ARRAY_RECORD)
        info.set_splits(tfds.core.SplitDict(split_infos))
        info.write_to_directory(tmp)
        meta = {
            "prepared_by": "kdjax",
            "name": target.name,
            "config": target.config,
            "version": target.version,
            **{k: (v() if callable(v) else v) for k, v in sidecar.items()},
            "num_examples": {si.name: int(si.num_examples) for si in split_infos},
            "prepared_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
        (tmp / SIDECAR).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        # Move into place (replacing an existing copy only now).
        if final.exists() or final.is_symlink():
            old = parent / f".{target.version}.old-{uuid.uuid4().hex[:8]}"
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


# ==========================================================================
# The entry point
# ==========================================================================

#: Datasets kdjax prepares from their original files; any other name is an image folder tree.
SUPPORTED_DATASETS: tuple[str, ...] = tuple(sorted(
    [*_IDX_DATASETS, *_CIFAR_DATASETS, "imagenette", "imagenet2012"]))


_FOLDER_VERSIONS = {"imagenette": "1.0.0", "imagenet2012": "5.1.0"}


def known_version(name: str) -> str | None:
    """The TFDS version kdjax writes for `name` (and prefers when several are prepared)."""
    base = name.partition(":")[0].partition("/")[0]
    if base in _IDX_DATASETS:
        return _IDX_DATASETS[base].version
    if base in _CIFAR_DATASETS:
        return _CIFAR_DATASETS[base].version
    return _FOLDER_VERSIONS.get(base)


def official_sizes(name: str) -> dict[str, int] | None:
    """Split sizes of the full official dataset, where kdjax knows them."""
    base = name.partition(":")[0].partition("/")[0]
    if base in _IDX_DATASETS:
        return {s: sd.num_examples for s, sd in _IDX_DATASETS[base].splits.items()}
    if base in _CIFAR_DATASETS:
        return dict(_CIFAR_DATASETS[base].num_examples)
    if base == "imagenet2012":
        return {"train": 1281167, "validation": 50000}
    return None


def prepare_hint(name: str) -> tuple[str, str]:
    """(suggested --from, where the files come from) for `name`'s "not prepared" messages."""
    base = name.partition("/")[0].partition(":")[0]
    if base in _IDX_DATASETS:
        return _idx_hint(base)
    if base in _CIFAR_DATASETS:
        d = _CIFAR_DATASETS[base]
        return f"~/{d.archives[0].filename}", (
            f"Copy {d.archives[0].filename} (from https://www.cs.toronto.edu/~kriz/cifar.html) "
            f"onto this machine. {_cifar_hint(d)}")
    return "DIR", ("DIR is an ImageNet-style folder tree: DIR/train/<class>/*.jpg and "
                   "DIR/val/<class>/*.jpg.")


def prepare(
    name: str,
    source: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    verify_checksums: bool = True,
    max_examples_per_split: int | None = None,
    num_workers: int | None = None,
) -> str:
    """Prepare `name` from the original files in `source`; return the dataset's directory.

    `name` is ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``, ``imagenette[/config]``,
    ``imagenet2012``, or any other name (or ``imagefolder:NAME``) for an ImageNet-style folder
    tree; see the module docstring for the sources each accepts. Writes
    ``<data_dir>/<name>[/<config>]/<version>/`` in the TFDS format (array_record). IDX and CIFAR
    sources are read and validated completely (sizes, headers, label ranges and, with
    `verify_checksums`, the official checksums) before anything is written; folder trees are
    validated image by image while writing. A bad source raises
    :class:`~kdjax.data.DataPreparationError` and leaves nothing behind.

    `max_examples_per_split` keeps N examples of each split (the first ones; for folder trees,
    N evenly spaced ones so that every class appears), for tests and quick demos; such a subset
    says so in its description and :func:`kdjax.data.dataset_info` reports ``complete=False``.
    `num_workers` threads read and check images of folder trees (default: one per CPU).
    """
    if max_examples_per_split is not None:
        if isinstance(max_examples_per_split, bool) or not isinstance(max_examples_per_split, int):
            raise TypeError("max_examples_per_split must be an int or None")
        if max_examples_per_split < 1:
            raise ValueError(
                f"max_examples_per_split must be >= 1, got {max_examples_per_split}")
    source_path = Path(os.path.expanduser(os.fspath(source)))
    root = Path(_resolve_data_dir(data_dir))
    if name in _IDX_DATASETS:
        return _prepare_idx(_IDX_DATASETS[name], source_path, root, verify_checksums,
                            max_examples_per_split)
    if name in _CIFAR_DATASETS:
        return _prepare_cifar(_CIFAR_DATASETS[name], source_path, root, verify_checksums,
                              max_examples_per_split)
    return _prepare_folder(name, source_path, root, verify_checksums, max_examples_per_split,
                           num_workers)


# ==========================================================================
# Synthetic sources in the original formats (tests, demos, benchmarks)
# ==========================================================================


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


def _class_patterns(rng: np.random.Generator, num_classes: int, h: int, w: int,
                    channels: int = 1) -> np.ndarray:
    """[num_classes, h, w, channels] float32 in [0, 1]: random blocky patterns of 4x4 cells."""
    bh, bw = max(1, -(-h // 4)), max(1, -(-w // 4))
    coarse = rng.random((num_classes, bh, bw, channels)) < 0.35
    return np.kron(coarse, np.ones((1, 4, 4, 1), dtype=bool))[:, :h, :w].astype(np.float32)


def _synthetic_images(rng, protos, labels) -> np.ndarray:
    imgs = protos[labels] * 190.0 + 30.0
    shifts = rng.integers(-1, 2, size=(len(labels), 2))
    for i, (dy, dx) in enumerate(shifts):
        imgs[i] = np.roll(imgs[i], (int(dy), int(dx)), axis=(0, 1))
    imgs += rng.normal(0.0, 35.0, size=imgs.shape)
    return np.clip(np.rint(imgs), 0, 255).astype(np.uint8)


def make_synthetic_cifar(path: str | os.PathLike, name: str = "cifar100", *, n_train: int = 500,
                         n_test: int = 100, seed: int = 0, layout: str = "python") -> str:
    """Write a tiny, learnable CIFAR-10/100 tarball in the original format; return its path.

    For tests, demos and benchmarks: ``kdjax prepare cifar100 --from PATH --skip-checksums``.
    `layout` is "python" (pickled batches, like cifar-100-python.tar.gz) or "binary" (like
    cifar-10-binary.tar.gz). Each class is a random blocky colour pattern plus shift and noise.
    """
    d = _CIFAR_DATASETS[name]
    rng = np.random.default_rng(seed)
    protos = _class_patterns(rng, d.num_classes, 32, 32, 3)
    files: dict[str, bytes] = {}
    fine_names = [f"class_{i:03d}" for i in range(d.num_classes)]
    coarse_names = [f"super_{i:02d}" for i in range(d.num_coarse)]
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.permutation(np.arange(n) % d.num_classes)
        coarse = labels % max(1, d.num_coarse)
        planes = _synthetic_images(rng, protos, labels).transpose(0, 3, 1, 2).reshape(n, -1)
        if layout == "python":
            names = [f for f, _ in d.py_files[split]]
            for i, chunk in enumerate(np.array_split(np.arange(n), len(names))):
                batch = {b"batch_label": f"synthetic {split} {i}".encode(),
                         b"data": planes[chunk],
                         d.py_label_key.encode(): labels[chunk].tolist(),
                         b"filenames": [f"img_{j}.png".encode() for j in chunk]}
                if d.num_coarse:
                    batch[b"coarse_labels"] = coarse[chunk].tolist()
                files[names[i]] = pickle.dumps(batch, protocol=2)
        else:
            names = list(d.bin_files[split])
            lab = ([coarse[:, None].astype(np.uint8)] if d.num_coarse else []) + [
                labels[:, None].astype(np.uint8)]
            records = np.concatenate([*lab, planes], axis=1)
            for i, chunk in enumerate(np.array_split(np.arange(n), len(names))):
                files[names[i]] = records[chunk].tobytes()
    if layout == "python":
        meta = {d.py_names_key.encode(): [s.encode() for s in fine_names]}
        if d.num_coarse:
            meta[b"coarse_label_names"] = [s.encode() for s in coarse_names]
        files[d.py_meta[0]] = pickle.dumps(meta, protocol=2)
        top = d.archives[0].top
    else:
        files[d.bin_names[0]] = ("\n".join(fine_names) + "\n").encode()
        if d.num_coarse:
            files[d.bin_names[1]] = ("\n".join(coarse_names) + "\n").encode()
        top = d.archives[1].top
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:gz") as tar:
        for base, content in files.items():
            info = tarfile.TarInfo(f"{top}/{base}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return os.fspath(out)


def make_synthetic_image_folder(dir: str | os.PathLike, *, classes: Sequence[str] = ("a", "b", "c"),
                                n_train: int = 12, n_val: int = 6, size: tuple[int, int] = (48, 64),
                                seed: int = 0, quality: int = 90) -> str:
    """Write an ImageNet-style tree DIR/{train,val}/<class>/*.JPEG of random-size JPEGs.

    Image sizes vary around `size` (H, W) so that the variable-shape path is exercised. For
    tests, demos and the input benchmark. Returns DIR.
    """
    rng = np.random.default_rng(seed)
    protos = _class_patterns(rng, len(classes), 64, 64, 3)
    out = Path(dir)
    for split, n in (("train", n_train), ("val", n_val)):
        labels = np.arange(n) % len(classes)
        for i, k in enumerate(labels):
            h = int(size[0] * rng.uniform(0.75, 1.25))
            w = int(size[1] * rng.uniform(0.75, 1.25))
            small = _synthetic_images(rng, protos, np.array([k]))[0]
            ys = (np.arange(h) * 64 // h)[:, None]
            xs = (np.arange(w) * 64 // w)[None, :]
            img = small[ys, xs]
            folder = out / split / classes[k]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{split}_{i:05d}.JPEG").write_bytes(image_codec.encode_jpeg(img, quality))
    return os.fspath(out)
