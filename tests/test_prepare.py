"""Offline preparation of CIFAR (python and binary tarballs, extracted folders) and image folder
trees, from tiny files written here in the original formats; checksum and corrupt-file errors;
TFDS interoperability; `list_datasets`."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import kdjax.data as kd
import kdjax.prepare as kp

tfds = pytest.importorskip("tensorflow_datasets")

TOPS = {("cifar10", "python"): "cifar-10-batches-py", ("cifar100", "python"): "cifar-100-python",
        ("cifar10", "binary"): "cifar-10-batches-bin", ("cifar100", "binary"): "cifar-100-binary"}
TARBALLS = {("cifar10", "python"): "cifar-10-python.tar.gz",
            ("cifar100", "python"): "cifar-100-python.tar.gz",
            ("cifar10", "binary"): "cifar-10-binary.tar.gz",
            ("cifar100", "binary"): "cifar-100-binary.tar.gz"}


# --------------------------------------------------------------------------
# writers of the original formats (independent of kdjax.prepare's own)
# --------------------------------------------------------------------------


def cifar_arrays(name, n_train=23, n_test=11, seed=0):
    rng = np.random.default_rng(seed)
    classes = 10 if name == "cifar10" else 100
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        out[split] = {"image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                      "label": rng.integers(0, classes, n),
                      "coarse": rng.integers(0, 20, n)}
    return out


def cifar_files(name, layout, arrays):
    """{base name: bytes} exactly as in the official tarballs (pickles with bytes keys, as
    Python 2 wrote them; binary records label byte(s) + 3072 pixel bytes, planes R, G, B)."""
    files = {}
    names = [f"name_{i}" for i in range(10 if name == "cifar10" else 100)]
    for split, a in arrays.items():
        flat = a["image"].transpose(0, 3, 1, 2).reshape(len(a["label"]), -1)
        if layout == "python":
            if name == "cifar10":
                bases = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
            else:
                bases = [split]
            for base, chunk in zip(bases, np.array_split(np.arange(len(flat)), len(bases))):
                d = {b"batch_label": b"x", b"data": flat[chunk],
                     b"filenames": [b"f.png"] * len(chunk)}
                if name == "cifar10":
                    d[b"labels"] = a["label"][chunk].tolist()
                else:
                    d[b"fine_labels"] = a["label"][chunk].tolist()
                    d[b"coarse_labels"] = a["coarse"][chunk].tolist()
                files[base] = pickle.dumps(d, protocol=2)
        else:
            if name == "cifar10":
                bases = ([f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train"
                         else ["test_batch.bin"])
                lab = [a["label"][:, None]]
            else:
                bases = [f"{split}.bin"]
                lab = [a["coarse"][:, None], a["label"][:, None]]
            rec = np.concatenate([*(x.astype(np.uint8) for x in lab), flat], axis=1)
            for base, chunk in zip(bases, np.array_split(np.arange(len(flat)), len(bases))):
                files[base] = rec[chunk].tobytes()
    if layout == "python":
        if name == "cifar10":
            files["batches.meta"] = pickle.dumps({b"label_names": [n.encode() for n in names],
                                                  b"num_cases_per_batch": 10000}, protocol=2)
        else:
            files["meta"] = pickle.dumps({b"fine_label_names": [n.encode() for n in names],
                                          b"coarse_label_names": [b"c%d" % i for i in range(20)]},
                                         protocol=2)
    else:
        if name == "cifar10":
            files["batches.meta.txt"] = ("\n".join(names) + "\n\n").encode()
        else:
            files["fine_label_names.txt"] = "\n".join(names).encode()
            files["coarse_label_names.txt"] = "\n".join(f"c{i}" for i in range(20)).encode()
    return files


def write_tarball(path, top, files):
    with tarfile.open(path, "w:gz") as tar:
        dir_info = tarfile.TarInfo(top)
        dir_info.type = tarfile.DIRTYPE
        tar.addfile(dir_info)
        for base, content in files.items():
            info = tarfile.TarInfo(f"{top}/{base}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path


def write_folder(path, files):
    path.mkdir(parents=True)
    for base, content in files.items():
        (path / base).write_bytes(content)
    return path


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


# --------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["tarball", "folder", "dir_with_tarball"])
@pytest.mark.parametrize("name,layout", [("cifar10", "python"), ("cifar100", "python"),
                                         ("cifar10", "binary"), ("cifar100", "binary")])
def test_cifar_roundtrip_bit_exact(tmp_path, name, layout, form):
    arrays = cifar_arrays(name)
    files = cifar_files(name, layout, arrays)
    top = TOPS[name, layout]
    if form == "tarball":
        src = write_tarball(tmp_path / TARBALLS[name, layout], top, files)
    elif form == "folder":
        src = write_folder(tmp_path / "x" / top, files)
    else:
        (tmp_path / "dl").mkdir()
        write_tarball(tmp_path / "dl" / TARBALLS[name, layout], top, files)
        src = tmp_path / "dl"
    path = kd.prepare(name, src, data_dir=tmp_path / "d", verify_checksums=False)
    assert path == str(tmp_path / "d" / name / "3.0.2")
    spec = kd.dataset_info(name, data_dir=tmp_path / "d")
    assert spec.splits == {"train": 23, "test": 11} and spec.image_shape == (32, 32, 3)
    assert spec.class_names[:2] == ("name_0", "name_1") and spec.complete is False
    for split, a in arrays.items():
        out = kd.load_arrays(name, split, data_dir=tmp_path / "d")
        np.testing.assert_array_equal(out["image"], a["image"])
        np.testing.assert_array_equal(out["label"], a["label"])
    # TFDS itself reads it, with TFDS's features (id, and coarse_label for CIFAR-100).
    ds = tfds.data_source(name, data_dir=os.fspath(tmp_path / "d"), download=False)
    ex = ds["test"][4]
    np.testing.assert_array_equal(ex["image"], arrays["test"]["image"][4])
    assert ex["label"] == arrays["test"]["label"][4] and ex["id"] == b"test_00004"
    if name == "cifar100":
        assert ex["coarse_label"] == arrays["test"]["coarse"][4]
    sidecar = json.loads((Path(path) / "kdjax.json").read_text())
    assert sidecar["layout"] == layout and sidecar["checksums_verified"] is False


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_features_and_version_match_tfds_builder(tmp_path, name):
    files = cifar_files(name, "python", cifar_arrays(name, 5, 5))
    path = kd.prepare(name, write_tarball(tmp_path / "t.tar.gz", TOPS[name, "python"], files),
                      data_dir=tmp_path / "d", verify_checksums=False)
    try:
        official = tfds.builder(name, data_dir=os.fspath(tmp_path / "official")).info
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"TFDS's registered {name} builder not available: {e}")
    ours = tfds.builder_from_directory(path).info
    assert ours.features.to_json() == official.features.to_json()
    assert str(ours.version) == str(official.version) == "3.0.2"


def test_cifar_checksums_match_those_shipped_with_tfds():
    root = Path(tfds.__file__).parent / "url_checksums"
    for d in (kp.cifar._CIFAR10, kp.cifar._CIFAR100):
        lines = (root / f"{d.name}.txt").read_text().split("\n")
        shipped = {ln.split("\t")[3]: (int(ln.split("\t")[1]), ln.split("\t")[2])
                   for ln in lines if ln.strip()}
        binary = d.archives[1]
        assert shipped[binary.filename] == (binary.size, binary.sha256)


def test_cifar_tarball_checksum_mismatch(tmp_path):
    files = cifar_files("cifar100", "python", cifar_arrays("cifar100"))
    src = write_tarball(tmp_path / "cifar-100-python.tar.gz", "cifar-100-python", files)
    with pytest.raises(kd.DataPreparationError) as info:
        kd.prepare("cifar100", src, data_dir=tmp_path / "d")
    msg = str(info.value)
    assert str(src) in msg and "sha256 mismatch" in msg and "169001437 bytes" in msg
    assert "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7" in msg
    assert "truncated" in msg and "--skip-checksums" in msg
    assert not (tmp_path / "d").exists()


def test_cifar_checksum_accepted_when_it_matches(tmp_path, monkeypatch):
    files = cifar_files("cifar10", "binary", cifar_arrays("cifar10"))
    src = write_tarball(tmp_path / "cifar-10-binary.tar.gz", "cifar-10-batches-bin", files)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    d = kp.cifar._CIFAR10
    fake = kp.cifar._CifarArchive(d.archives[1].filename, "binary", d.archives[1].top,
                            src.stat().st_size, sha, None)
    monkeypatch.setitem(kp.cifar.DATASETS, "cifar10",
                        dataclasses.replace(d, archives=(d.archives[0], fake)))
    path = kd.prepare("cifar10", src, data_dir=tmp_path / "d")
    assert kd.dataset_info("cifar10", data_dir=tmp_path / "d").checksums_verified is True
    assert json.loads((Path(path) / "kdjax.json").read_text())["verified_as"] == fake.filename


def test_cifar_extracted_python_folder_md5(tmp_path):
    files = cifar_files("cifar100", "python", cifar_arrays("cifar100"))
    src = write_folder(tmp_path / "cifar-100-python", files)
    with pytest.raises(kd.DataPreparationError) as info:
        kd.prepare("cifar100", src, data_dir=tmp_path / "d")
    msg = str(info.value)
    assert "md5 mismatch" in msg and "16019d7e3df5f24257cddd939b257f8d" in msg
    assert str(src) in msg  # names the file


def test_cifar_extracted_binary_folder_has_no_known_checksums(tmp_path):
    files = cifar_files("cifar10", "binary", cifar_arrays("cifar10"))
    src = write_folder(tmp_path / "cifar-10-batches-bin", files)
    with pytest.raises(kd.DataPreparationError, match="pass the tarball cifar-10-binary.tar.gz"):
        kd.prepare("cifar10", src, data_dir=tmp_path / "d")


def _fails(tmp_path, name, src, match):
    with pytest.raises(kd.DataPreparationError, match=match) as info:
        kd.prepare(name, src, data_dir=tmp_path / "d", verify_checksums=False)
    assert not (tmp_path / "d").exists(), listing(tmp_path / "d")
    return str(info.value)


def test_cifar_truncated_tarball(tmp_path):
    files = cifar_files("cifar10", "python", cifar_arrays("cifar10"))
    src = write_tarball(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", files)
    src.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    msg = _fails(tmp_path, "cifar10", src, "not a readable tar archive")
    assert str(src) in msg and "truncated or corrupt" in msg


def test_cifar_corrupt_pickle_and_contents(tmp_path):
    arrays = cifar_arrays("cifar100")
    files = cifar_files("cifar100", "python", arrays)
    good = dict(files)
    files["train"] = files["train"][:100]
    msg = _fails(tmp_path, "cifar100", write_folder(tmp_path / "a", files),
                 "not a readable CIFAR python batch")
    assert str(tmp_path / "a" / "train") in msg
    # A pickle that would run code is refused, not executed.
    files = dict(good, train=pickle.dumps(os.system, protocol=2))
    _fails(tmp_path, "cifar100", write_folder(tmp_path / "b", files), "refusing to load")
    # Labels out of range, wrong data shape.
    bad = pickle.loads(good["train"], encoding="bytes")
    bad[b"fine_labels"][3] = 100
    files = dict(good, train=pickle.dumps(bad, protocol=2))
    _fails(tmp_path, "cifar100", write_folder(tmp_path / "c", files),
           "label 100 at index 3 is out of range: expected 0..99")
    bad = pickle.loads(good["train"], encoding="bytes")
    bad[b"data"] = bad[b"data"][:, :100]
    files = dict(good, train=pickle.dumps(bad, protocol=2))
    _fails(tmp_path, "cifar100", write_folder(tmp_path / "e", files), r"shape \(N, 3072\)")


def test_cifar_binary_wrong_size_and_missing_files(tmp_path):
    files = cifar_files("cifar100", "binary", cifar_arrays("cifar100"))
    files["test.bin"] = files["test.bin"][:-5]
    msg = _fails(tmp_path, "cifar100", write_folder(tmp_path / "a", files),
                 "whole number of 3074-byte records")
    assert "test.bin" in msg
    del files["test.bin"]
    msg = _fails(tmp_path, "cifar100", write_folder(tmp_path / "b", files),
                 "not a cifar100 source")
    assert "test.bin" in msg and "cifar-100-python.tar.gz" in msg


# --------------------------------------------------------------------------
# Image folder trees
# --------------------------------------------------------------------------


def _jpeg(rng, h, w, mode="RGB", fmt="JPEG"):
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def make_tree(root: Path, classes=("cat", "dog"), n=(3, 2), seed=0, val="val"):
    rng = np.random.default_rng(seed)
    files = {}
    for split, k in (("train", n[0]), (val, n[1])):
        for c in classes:
            for i in range(k):
                p = root / split / c / f"{c}_{i}.jpg"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(_jpeg(rng, int(rng.integers(20, 40)), int(rng.integers(20, 40))))
                files[p] = c
    return files


def test_image_folder_roundtrip(tmp_path):
    files = make_tree(tmp_path / "src")
    odd = tmp_path / "src" / "train" / "dog" / "odd.png"  # PNG, greyscale: re-encoded as JPEG
    odd.write_bytes(_jpeg(np.random.default_rng(1), 25, 30, mode="L", fmt="PNG"))
    (tmp_path / "src" / "train" / "dog" / "notes.txt").write_text("ignored")
    path = kd.prepare("imagefolder:pets", tmp_path / "src", data_dir=tmp_path / "d",
                      num_workers=2)
    assert path == str(tmp_path / "d" / "pets" / "1.0.0")
    spec = kd.dataset_info("pets", data_dir=tmp_path / "d")
    assert spec.class_names == ("cat", "dog") and spec.image_shape == (None, None, 3)
    assert spec.splits == {"train": 7, "validation": 4} and spec.checksums_verified is None
    reader = kd.open_split("pets", "train", data_dir=tmp_path / "d")
    blobs, labels = reader.read(range(7))
    train = sorted((p for p in files if "train" in p.parts), key=lambda p: (p.parent.name, p.name))
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert blobs[0] == train[0].read_bytes()  # JPEG bytes stored as they are
    ds = tfds.data_source("pets", data_dir=os.fspath(tmp_path / "d"), download=False)
    ex = ds["train"][6]
    assert ex["image/filename"] == b"odd.png" and ex["image"].shape == (25, 30, 3)
    sidecar = json.loads((Path(path) / "kdjax.json").read_text())
    assert sidecar["reencoded_as_jpeg"] == [str(Path("train/dog/odd.png"))]
    with pytest.raises(ValueError, match="varying sizes"):
        kd.load_arrays("pets", "train", data_dir=tmp_path / "d")


def test_image_folder_errors_name_the_file(tmp_path):
    make_tree(tmp_path / "src")
    bad = tmp_path / "src" / "val" / "cat" / "cat_1.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
    msg = _fails(tmp_path, "pets", tmp_path / "src", "not a readable image")
    assert str(bad) in msg and "truncated or corrupt" in msg
    bad.write_bytes(b"")
    _fails(tmp_path, "pets", tmp_path / "src", str(bad))


def test_image_folder_layout_errors(tmp_path):
    make_tree(tmp_path / "a")
    (tmp_path / "a" / "val" / "bird").mkdir()
    (tmp_path / "a" / "val" / "bird" / "b.jpg").write_bytes(
        _jpeg(np.random.default_rng(0), 20, 20))
    _fails(tmp_path, "pets", tmp_path / "a", "not classes of pets.*bird")
    make_tree(tmp_path / "b")
    (tmp_path / "b" / "val" / "loose.jpg").write_bytes(_jpeg(np.random.default_rng(0), 20, 20))
    _fails(tmp_path, "pets", tmp_path / "b", "one folder per class")
    (tmp_path / "c").mkdir()
    _fails(tmp_path, "pets", tmp_path / "c", "no split folders")
    with pytest.raises(ValueError, match="not from a folder tree"):
        kd.prepare("imagefolder:cifar10", tmp_path / "a", data_dir=tmp_path / "d")


def test_image_folder_subset_keeps_every_class(tmp_path):
    make_tree(tmp_path / "src", classes=("a", "b", "c"), n=(4, 2))
    kd.prepare("pets", tmp_path / "src", data_dir=tmp_path / "d", max_examples_per_split=3)
    spec = kd.dataset_info("pets", data_dir=tmp_path / "d")
    assert spec.splits == {"train": 3, "validation": 3} and spec.complete is False
    _, labels = kd.open_split("pets", "train", data_dir=tmp_path / "d").read(range(3))
    assert sorted(labels.tolist()) == [0, 1, 2]


def test_imagenette_gets_tfds_name_config_and_features(tmp_path):
    names = [ln for ln in (Path(tfds.__file__).parent / "image_classification" /
                           "imagenette_labels.txt").read_text().split() if ln]
    make_tree(tmp_path / "imagenette2-160", classes=(names[3], names[0]), n=(2, 1))
    path = kd.prepare("imagenette", tmp_path / "imagenette2-160", data_dir=tmp_path / "d")
    assert path == str(tmp_path / "d" / "imagenette" / "160px-v2" / "1.0.0")
    spec = kd.dataset_info("imagenette", data_dir=tmp_path / "d")  # the only config
    assert spec.class_names == tuple(names) and spec.splits == {"train": 4, "validation": 2}
    _, labels = kd.open_split("imagenette/160px-v2", "train", data_dir=tmp_path / "d").read(range(4))
    assert labels.tolist() == [0, 0, 3, 3]  # TFDS's class order, not the folders'
    try:
        official = tfds.builder("imagenette/160px-v2", data_dir=os.fspath(tmp_path / "o")).info
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"TFDS's registered imagenette builder not available: {e}")
    ours = tfds.builder_from_directory(path).info
    assert ours.features.to_json() == official.features.to_json()
    assert str(ours.version) == str(official.version)
    with pytest.raises(ValueError, match="name one"):
        kd.prepare("imagenette", tmp_path / "imagenette2-160" / "train", data_dir=tmp_path / "e")


def test_list_datasets(tmp_path):
    kd.prepare("cifar10", write_tarball(tmp_path / "c.tgz", "cifar-10-batches-py", cifar_files(
        "cifar10", "python", cifar_arrays("cifar10", 4, 3))), data_dir=tmp_path / "d",
        verify_checksums=False)
    make_tree(tmp_path / "src")
    kd.prepare("pets", tmp_path / "src", data_dir=tmp_path / "d")
    old = tmp_path / "d" / "mnist" / "3.0.1"  # a TFDS copy in tfrecord format
    old.mkdir(parents=True)
    (old / "dataset_info.json").write_text(json.dumps({"name": "mnist", "splits": [
        {"name": "train", "shardLengths": ["60000"]}]}))
    entries = {e.name: e for e in kd.list_datasets(tmp_path / "d")}
    assert set(entries) == {"cifar10", "pets", "mnist"}
    assert entries["cifar10"].splits == {"train": 4, "test": 3}
    assert entries["cifar10"].image_shape == (32, 32, 3) and entries["cifar10"].num_classes == 10
    assert entries["pets"].image_shape == (None, None, 3) and entries["pets"].prepared_by == "kdjax"
    assert entries["mnist"].file_format == "tfrecord" and "array_record" in entries["mnist"].problem
    assert entries["mnist"].splits == {"train": 60000} and entries["mnist"].prepared_by == "tfds"
    assert kd.list_datasets(tmp_path / "nothing") == []
