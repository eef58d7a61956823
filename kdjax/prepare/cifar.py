"""CIFAR-10 and CIFAR-100 (TFDS 3.0.2) from the python or binary tarballs, or either one extracted."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import tarfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kdjax import images as image_codec
from kdjax.prepare.common import (DataPreparationError, Target, class_patterns, description,
                                  file_digests, import_tfds, synthetic_images, write_dataset)


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

DATASETS: dict[str, _CifarDef] = {d.name: d for d in (_CIFAR10, _CIFAR100)}


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


def hint(d: _CifarDef) -> str:
    py, binary = d.archives
    return (f"--from takes {py.filename} (or {binary.filename}, the one TFDS downloads), either "
            f"one extracted ({py.top}/ or {binary.top}/), or a folder holding one of these.")


def _read_cifar_tarball(d: _CifarDef, path: Path, verify: bool) -> _CifarFiles:
    sha, md5, size = file_digests(path)
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
        f"{hint(d)}")


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
        raise DataPreparationError(f"{source}: no such file or directory. {hint(d)}")
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


def prepare(d: _CifarDef, source: Path, root: Path, verify_checksums: bool,
            max_examples: int | None) -> str:
    src = _open_cifar(d, source, verify_checksums)
    reader = _cifar_python_split if src.layout == "python" else _cifar_binary_split
    splits = {split: reader(d, src, split) for split in ("train", "test")}
    fine_names, coarse_names = _cifar_names(d, src)
    if max_examples is not None:
        for s in splits.values():
            s.images, s.labels = s.images[:max_examples], s.labels[:max_examples]
            s.coarse = None if s.coarse is None else s.coarse[:max_examples]
    tfds = import_tfds()
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
    return write_dataset(
        root, Target(d.name, None, d.version),
        features=tfds.features.FeaturesDict(feats),
        splits={s: examples(s, v) for s, v in splits.items()},
        description=description(
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
# Synthetic source in the original format (tests, demos)
# ==========================================================================


def make_synthetic_cifar(path: str | os.PathLike, name: str = "cifar100", *, n_train: int = 500,
                         n_test: int = 100, seed: int = 0, layout: str = "python") -> str:
    """Write a tiny, learnable CIFAR-10/100 tarball in the original format; return its path.

    For tests, demos and benchmarks: ``kdjax prepare cifar100 --from PATH --skip-checksums``.
    `layout` is "python" (pickled batches, like cifar-100-python.tar.gz) or "binary" (like
    cifar-10-binary.tar.gz). Each class is a random blocky colour pattern plus shift and noise.
    """
    d = DATASETS[name]
    rng = np.random.default_rng(seed)
    protos = class_patterns(rng, d.num_classes, 32, 32, 3)
    files: dict[str, bytes] = {}
    fine_names = [f"class_{i:03d}" for i in range(d.num_classes)]
    coarse_names = [f"super_{i:02d}" for i in range(d.num_coarse)]
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.permutation(np.arange(n) % d.num_classes)
        coarse = labels % max(1, d.num_coarse)
        planes = synthetic_images(rng, protos, labels).transpose(0, 3, 1, 2).reshape(n, -1)
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


