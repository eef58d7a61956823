"""What every preparation shares: the errors and sidecar record, the data dir, checksums, and the
atomic writer of TFDS dataset directories (array_record shards).

Imports nothing from kdjax.data (which imports this package): preparation sits below the
catalogue that reads what it writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


class DataPreparationError(ValueError):
    """A source file is missing, wrong, truncated or corrupt.

    The message names the file, what was expected and what was found.
    """


#: kdjax's record of how it prepared a dataset, next to TFDS's dataset_info.json.
SIDECAR = "kdjax.json"


def default_data_dir() -> str:
    """``$TFDS_DATA_DIR`` if set, else ``~/tensorflow_datasets`` (TFDS's default)."""
    env = os.environ.get("TFDS_DATA_DIR")
    if env:
        return os.path.expanduser(env)
    return os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
    if data_dir is None or os.fspath(data_dir) == "":
        return default_data_dir()
    return os.path.expanduser(os.fspath(data_dir))


def import_tfds():
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415  (lazy on purpose)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "kdjax.data needs the packages tensorflow-datasets and array-record "
            "to prepare and read datasets (TensorFlow itself is not needed): "
            "pip install tensorflow-datasets array-record"
        ) from e
    return tfds


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digests(path: Path) -> tuple[str, str, int]:
    """(sha256, md5, size) of a file, read in chunks."""
    sha, md5, size = hashlib.sha256(), hashlib.md5(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            sha.update(chunk)
            md5.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), md5.hexdigest(), size


# ==========================================================================
# Writing a TFDS dataset directory atomically
# ==========================================================================

#: A shard is closed once it holds this many bytes (TFDS's writer targets at most 1 GiB too).
SHARD_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class Target:
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


def _write_split(tfds, features, out_dir: Path, target: Target, split: str,
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


def description(text: str, sizes: Mapping[str, int], full: Mapping[str, int] | None,
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


def write_dataset(root: Path, target: Target, *, features, splits: Mapping[str, Iterable],
                   description: str, homepage: str, citation: str,
                   sidecar: Mapping[str, Any]) -> str:
    """Write `<root>/<name>[/<config>]/<version>` from `splits` (split -> examples), atomically.

    Examples are dicts of already-encoded values (image bytes, int labels, str texts). Everything
    is written into a temporary directory beside the target, which is renamed into place at the
    end; on any failure the temporary directory (and any parent this call created) is removed,
    and an existing copy is replaced only after the new one is complete.
    """
    tfds = import_tfds()
    with atomic_directory(root, target.parts(), target.version) as tmp:
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
    return os.fspath(root.joinpath(*target.parts(), target.version))


@contextlib.contextmanager
def atomic_directory(root: Path, parts: Sequence[str], name: str) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``root/*parts/name`` when the block completes.

    An existing copy is replaced only then (renamed aside, the new one renamed in, the old one
    removed); on any failure the temporary directory and every directory this call created are
    removed, and an existing copy is left untouched.
    """
    parent = root.joinpath(*parts)
    created = [p for p in (root, *[root.joinpath(*parts[:i + 1]) for i in range(len(parts))])
               if not p.exists()]
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.incomplete-", dir=parent))
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        if final.exists() or final.is_symlink():
            old = parent / f".{name}.old-{uuid.uuid4().hex[:8]}"
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


# ==========================================================================
# Synthetic images for the synthetic sources of tests and demos
# ==========================================================================


def class_patterns(rng: np.random.Generator, num_classes: int, h: int, w: int,
                   channels: int = 1) -> np.ndarray:
    """[num_classes, h, w, channels] float32 in [0, 1]: random blocky patterns of 4x4 cells."""
    bh, bw = max(1, -(-h // 4)), max(1, -(-w // 4))
    coarse = rng.random((num_classes, bh, bw, channels)) < 0.35
    return np.kron(coarse, np.ones((1, 4, 4, 1), dtype=bool))[:, :h, :w].astype(np.float32)


def synthetic_images(rng, protos, labels) -> np.ndarray:
    imgs = protos[labels] * 190.0 + 30.0
    shifts = rng.integers(-1, 2, size=(len(labels), 2))
    for i, (dy, dx) in enumerate(shifts):
        imgs[i] = np.roll(imgs[i], (int(dy), int(dx)), axis=(0, 1))
    imgs += rng.normal(0.0, 35.0, size=imgs.shape)
    return np.clip(np.rint(imgs), 0, 255).astype(np.uint8)


