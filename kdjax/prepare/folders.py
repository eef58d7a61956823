"""ImageNet-style folder trees: ``train/<class>/*.jpg``, ``val/<class>/*.jpg`` [``test/...``]."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kdjax import images as image_codec
from kdjax.prepare import cifar, idx
from kdjax.prepare.common import (DataPreparationError, Target, class_patterns, description,
                                  import_tfds, synthetic_images, write_dataset)


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
    if generic in idx.DATASETS or generic in cifar.DATASETS:
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


def prepare(name: str, source: Path, root: Path, verify_checksums: bool,
            max_examples: int | None, num_workers: int | None) -> str:
    del verify_checksums  # no official checksums exist for image files in a folder
    profile = _folder_profile(name, source)
    tree_root = _folder_root(source)
    tree = _scan_folder_tree(tree_root)
    tfds = import_tfds()
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
    return write_dataset(
        root, Target(profile.name, profile.config, profile.version),
        features=tfds.features.FeaturesDict(feats),
        splits={s: examples(f) for s, f in tree.items()},
        description=description(
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
# Synthetic source in the original format (tests, demos)
# ==========================================================================


def make_synthetic_image_folder(dir: str | os.PathLike, *, classes: Sequence[str] = ("a", "b", "c"),
                                n_train: int = 12, n_val: int = 6, size: tuple[int, int] = (48, 64),
                                seed: int = 0, quality: int = 90) -> str:
    """Write an ImageNet-style tree DIR/{train,val}/<class>/*.JPEG of random-size JPEGs.

    Image sizes vary around `size` (H, W) so that the variable-shape path is exercised. For
    tests, demos and the input benchmark. Returns DIR.
    """
    rng = np.random.default_rng(seed)
    protos = class_patterns(rng, len(classes), 64, 64, 3)
    out = Path(dir)
    for split, n in (("train", n_train), ("val", n_val)):
        labels = np.arange(n) % len(classes)
        for i, k in enumerate(labels):
            h = int(size[0] * rng.uniform(0.75, 1.25))
            w = int(size[1] * rng.uniform(0.75, 1.25))
            small = synthetic_images(rng, protos, np.array([k]))[0]
            ys = (np.arange(h) * 64 // h)[:, None]
            xs = (np.arange(w) * 64 // w)[None, :]
            img = small[ys, xs]
            folder = out / split / classes[k]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{split}_{i:05d}.JPEG").write_bytes(image_codec.encode_jpeg(img, quality))
    return os.fspath(out)

