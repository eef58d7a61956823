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

Text corpora for language models are prepared by :mod:`kdjax.prepare.text` (``kdjax prepare
text``) into a format of their own (kdjax.lm.data), not TFDS's.

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

import os
from pathlib import Path

from kdjax.prepare import cifar, folders, idx
from kdjax.prepare.common import DataPreparationError, resolve_data_dir
from kdjax.prepare.cifar import make_synthetic_cifar
from kdjax.prepare.folders import make_synthetic_image_folder
from kdjax.prepare.idx import make_synthetic_idx_dir

__all__ = [
    "DataPreparationError",
    "SUPPORTED_DATASETS",
    "known_version",
    "make_synthetic_cifar",
    "make_synthetic_idx_dir",
    "make_synthetic_image_folder",
    "official_sizes",
    "prepare",
    "prepare_hint",
]

#: Datasets kdjax prepares from their original files; any other name is an image folder tree.
SUPPORTED_DATASETS: tuple[str, ...] = tuple(sorted(
    [*idx.DATASETS, *cifar.DATASETS, "imagenette", "imagenet2012"]))


_FOLDER_VERSIONS = {"imagenette": "1.0.0", "imagenet2012": "5.1.0"}


def known_version(name: str) -> str | None:
    """The TFDS version kdjax writes for `name` (and prefers when several are prepared)."""
    base = name.partition(":")[0].partition("/")[0]
    if base in idx.DATASETS:
        return idx.DATASETS[base].version
    if base in cifar.DATASETS:
        return cifar.DATASETS[base].version
    return _FOLDER_VERSIONS.get(base)


def official_sizes(name: str) -> dict[str, int] | None:
    """Split sizes of the full official dataset, where kdjax knows them."""
    base = name.partition(":")[0].partition("/")[0]
    if base in idx.DATASETS:
        return {s: sd.num_examples for s, sd in idx.DATASETS[base].splits.items()}
    if base in cifar.DATASETS:
        return dict(cifar.DATASETS[base].num_examples)
    if base == "imagenet2012":
        return {"train": 1281167, "validation": 50000}
    return None


def prepare_hint(name: str) -> tuple[str, str]:
    """(suggested --from, where the files come from) for `name`'s "not prepared" messages."""
    base = name.partition("/")[0].partition(":")[0]
    if base in idx.DATASETS:
        return idx.hint(base)
    if base in cifar.DATASETS:
        d = cifar.DATASETS[base]
        return f"~/{d.archives[0].filename}", (
            f"Copy {d.archives[0].filename} (from https://www.cs.toronto.edu/~kriz/cifar.html) "
            f"onto this machine. {cifar.hint(d)}")
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
    root = Path(resolve_data_dir(data_dir))
    if name in idx.DATASETS:
        return idx.prepare(idx.DATASETS[name], source_path, root, verify_checksums,
                           max_examples_per_split)
    if name in cifar.DATASETS:
        return cifar.prepare(cifar.DATASETS[name], source_path, root, verify_checksums,
                              max_examples_per_split)
    return folders.prepare(name, source_path, root, verify_checksums, max_examples_per_split,
                           num_workers)
