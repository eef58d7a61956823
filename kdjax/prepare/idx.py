"""MNIST and Fashion-MNIST from their four IDX files, gzipped or not (TFDS 3.0.1)."""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kdjax import images as image_codec
from kdjax.prepare.common import (DataPreparationError, Target, description, import_tfds,
                                  sha256_hex, write_dataset)


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

DATASETS: dict[str, _IdxDatasetDef] = {d.name: d for d in (_MNIST, _FASHION_MNIST)}


def hint(name: str) -> tuple[str, str]:
    d = DATASETS[name]
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
    stored_sha = sha256_hex(stored)
    content_sha = stored_sha if stored is content else sha256_hex(content)
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
            stored_sha = sha256_hex(stored)
            content_sha = stored_sha if stored is content else sha256_hex(content)
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


def prepare(d: _IdxDatasetDef, source: Path, root: Path, verify_checksums: bool,
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
    tfds = import_tfds()
    sizes = {s: int(v.labels.shape[0]) for s, v in loaded.items()}

    def examples(data: _LoadedSplit) -> Iterator[dict[str, Any]]:
        for image, label in zip(data.images, data.labels, strict=True):
            yield {"image": image_codec.encode_png(image), "label": int(label)}

    return write_dataset(
        root, Target(d.name, None, d.version),
        features=_idx_features(tfds, d),
        splits={s: examples(v) for s, v in loaded.items()},
        description=description(
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
# Synthetic sources in the original format (tests, demos, benchmarks)
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


