"""Tests for kdjax.data: offline preparation of IDX datasets in the TFDS format.

Everything here uses tiny synthetic IDX files written into tmp_path: no
network, no dependency on /usr/share/datasets.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

import kdjax.data as kd
import kdjax.images as codec
import kdjax.prepare as kp

IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
REPO_ROOT = Path(kd.__file__).resolve().parent.parent


# --------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, *, magic: int | None = None, gz: bool = False) -> Path:
    """Write ``array`` (N,H,W images or N labels, uint8) as an IDX file."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if array.ndim == 3:
        header = struct.pack(">IIII", IMAGE_MAGIC if magic is None else magic, *array.shape)
    else:
        header = struct.pack(">II", LABEL_MAGIC if magic is None else magic, array.shape[0])
    data = header + array.tobytes()
    path = Path(str(path) + ".gz") if gz else Path(path)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_source(directory: Path, n_train=64, n_test=32, *, gz=False, seed=0):
    """Random IDX files in ``directory``; returns the arrays written."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(directory / FILES[split][0], images, gz=gz)
        write_idx(directory / FILES[split][1], labels, gz=gz)
        arrays[split] = (images, labels)
    return arrays


def source_file(directory: Path, base: str) -> Path:
    for p in (directory / base, directory / (base + ".gz")):
        if p.exists():
            return p
    raise AssertionError(base)


def listing(path: Path) -> list[str]:
    """All paths under ``path`` (hidden ones too), relative."""
    if not path.exists():
        return []
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture(params=[False, True], ids=["plain", "gzip"])
def source(request, tmp_path):
    src = tmp_path / "src"
    arrays = make_source(src, gz=request.param)
    return src, arrays


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """One small fashion_mnist dataset shared by the read-only tests."""
    base = tmp_path_factory.mktemp("prepared")
    arrays = make_source(base / "src", gz=True, seed=1)
    data_dir = base / "data"
    path = kd.prepare("fashion_mnist", base / "src", data_dir=data_dir, verify_checksums=False)
    return data_dir, path, arrays


# --------------------------------------------------------------------------
# round trip
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fashion_mnist", "mnist"])
def test_prepare_and_load_roundtrip_bit_exact(source, tmp_path, name):
    src, arrays = source
    data_dir = tmp_path / "data"
    path = kd.prepare(name, src, data_dir=data_dir, verify_checksums=False)
    assert path == str(data_dir / name / "3.0.1")
    files = set(os.listdir(path))
    assert {
        "dataset_info.json",
        "features.json",
        f"{name}-train.array_record-00000-of-00001",
        f"{name}-test.array_record-00000-of-00001",
    } <= files
    for split, (images, labels) in arrays.items():
        out = kd.load_arrays(name, split, data_dir=data_dir)
        assert set(out) == {"image", "label"}
        assert out["image"].dtype == np.uint8 and out["image"].shape == (len(labels), 28, 28, 1)
        assert out["label"].dtype == np.int32 and out["label"].shape == (len(labels),)
        np.testing.assert_array_equal(out["image"][..., 0], images)
        np.testing.assert_array_equal(out["label"], labels)


def test_dataset_info_numbers(prepared):
    data_dir, path, _ = prepared
    spec = kd.dataset_info("fashion_mnist", data_dir=data_dir)
    assert isinstance(spec, kd.DatasetSpec)
    assert spec.name == "fashion_mnist" and spec.version == "3.0.1"
    assert spec.path == path
    assert spec.num_classes == 10
    assert spec.class_names[0] == "T-shirt/top" and len(spec.class_names) == 10
    assert spec.image_shape == (28, 28, 1)
    assert spec.splits == {"train": 64, "test": 32}
    assert spec.num_examples("train") == 64
    assert spec.complete is False  # 64/32, not 60000/10000
    assert spec.checksums_verified is False
    assert "not checksum-verified" in spec.description
    with pytest.raises(ValueError, match="available: train, test"):
        spec.num_examples("validation")


def test_mnist_class_names_are_digits(tmp_path):
    make_source(tmp_path / "src")
    kd.prepare("mnist", tmp_path / "src", data_dir=tmp_path / "d", verify_checksums=False)
    spec = kd.dataset_info("mnist", data_dir=tmp_path / "d")
    assert spec.class_names == tuple(str(i) for i in range(10))


def test_readable_with_plain_tfds_data_source(prepared):
    """The interop claim: TFDS itself reads our dataset (decoding with its own code)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    data_dir, _, arrays = prepared
    ds = tfds.data_source("fashion_mnist", data_dir=os.fspath(data_dir), download=False)
    assert set(ds) == {"train", "test"}
    assert len(ds["train"]) == 64 and len(ds["test"]) == 32
    images, labels = arrays["test"]
    for i in (0, 5, 31):
        ex = ds["test"][i]
        np.testing.assert_array_equal(np.asarray(ex["image"])[..., 0], images[i])
        assert int(ex["label"]) == labels[i]


def test_features_match_tfds_registered_builder(prepared):
    tfds = pytest.importorskip("tensorflow_datasets")
    data_dir, path, _ = prepared
    try:
        official = tfds.builder("fashion_mnist", data_dir=os.fspath(data_dir / "official"))
        official_features = official.info.features.to_json()
        official_version = str(official.info.version)
    except Exception as e:  # registry not importable in this environment
        pytest.skip(f"TFDS's registered fashion_mnist builder not available: {e}")
    ours = tfds.builder_from_directory(path).info
    assert ours.features.to_json() == official_features
    assert str(ours.version) == official_version


def test_split_slicing(prepared):
    data_dir, _, arrays = prepared
    out = kd.load_arrays("fashion_mnist", "train[:10]", data_dir=data_dir)
    np.testing.assert_array_equal(out["image"][..., 0], arrays["train"][0][:10])
    with pytest.raises(ValueError, match="available: train, test"):
        kd.load_arrays("fashion_mnist", "validation", data_dir=data_dir)


def test_default_data_dir(monkeypatch, prepared):
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    assert kd.default_data_dir() == os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    data_dir, _, arrays = prepared
    monkeypatch.setenv("TFDS_DATA_DIR", os.fspath(data_dir))
    assert kd.default_data_dir() == os.fspath(data_dir)
    out = kd.load_arrays("fashion_mnist", "test")
    np.testing.assert_array_equal(out["label"], arrays["test"][1])


def test_max_examples_per_split_is_marked_as_subset(tmp_path):
    arrays = make_source(tmp_path / "src")
    kd.prepare(
        "fashion_mnist",
        tmp_path / "src",
        data_dir=tmp_path / "d",
        verify_checksums=False,
        max_examples_per_split=10,
    )
    spec = kd.dataset_info("fashion_mnist", data_dir=tmp_path / "d")
    assert spec.splits == {"train": 10, "test": 10}
    assert spec.complete is False
    assert "SUBSET" in spec.description and "train: 10 of 60000" in spec.description
    info = json.loads((Path(spec.path) / "dataset_info.json").read_text())
    assert "SUBSET" in info["description"]
    sidecar = json.loads((Path(spec.path) / "kdjax.json").read_text())
    assert sidecar["max_examples_per_split"] == 10
    out = kd.load_arrays("fashion_mnist", "train", data_dir=tmp_path / "d")
    np.testing.assert_array_equal(out["image"][..., 0], arrays["train"][0][:10])
    with pytest.raises(ValueError):
        kd.prepare("fashion_mnist", tmp_path / "src", data_dir=tmp_path / "e",
                   verify_checksums=False, max_examples_per_split=0)


# --------------------------------------------------------------------------
# validation errors
# --------------------------------------------------------------------------


def _prepare_fails(src, data_dir, match, **kwargs):
    kwargs.setdefault("verify_checksums", False)
    with pytest.raises(kd.DataPreparationError, match=match) as info:
        kd.prepare("fashion_mnist", src, data_dir=data_dir, **kwargs)
    assert not data_dir.exists(), listing(data_dir)  # nothing left behind
    return str(info.value)


def test_truncated_file(source, tmp_path):
    src, _ = source
    path = source_file(src, "train-images-idx3-ubyte")
    content = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    cut = content[:-100]
    path.write_bytes(gzip.compress(cut) if path.suffix == ".gz" else cut)
    msg = _prepare_fails(src, tmp_path / "data", "truncated")
    assert str(path) in msg
    assert f"expected {16 + 64 * 28 * 28} bytes" in msg and f"found {len(cut)} bytes" in msg


def test_truncated_gzip_stream(tmp_path):
    src = tmp_path / "src"
    make_source(src, gz=True)
    path = src / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-10])
    msg = _prepare_fails(src, tmp_path / "data", "not a valid gzip file")
    assert str(path) in msg


def test_gz_name_but_not_gzip(tmp_path):
    src = tmp_path / "src"
    make_source(src, gz=True)
    path = src / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.decompress(path.read_bytes()))
    msg = _prepare_fails(src, tmp_path / "data", "gzip magic")
    assert str(path) in msg


def test_bad_magic(tmp_path):
    src = tmp_path / "src"
    make_source(src)
    path = write_idx(src / "train-images-idx3-ubyte", np.zeros((64, 28, 28), np.uint8), magic=1234)
    msg = _prepare_fails(src, tmp_path / "data", "magic number 2051")
    assert str(path) in msg and "found 1234" in msg


def test_swapped_files_are_recognised(tmp_path):
    src = tmp_path / "src"
    make_source(src)
    write_idx(src / "t10k-images-idx3-ubyte", np.zeros(32, np.uint8))  # a labels file
    _prepare_fails(src, tmp_path / "data", "looks like a labels file")


def test_label_image_count_mismatch(tmp_path):
    src = tmp_path / "src"
    make_source(src)
    write_idx(src / "t10k-labels-idx1-ubyte", np.zeros(31, np.uint8))
    msg = _prepare_fails(src, tmp_path / "data", "32 images but")
    assert str(src / "t10k-images-idx3-ubyte") in msg
    assert str(src / "t10k-labels-idx1-ubyte") in msg and "31 labels" in msg


def test_wrong_image_size(tmp_path):
    src = tmp_path / "src"
    make_source(src)
    write_idx(src / "t10k-images-idx3-ubyte", np.zeros((32, 16, 16), np.uint8))
    _prepare_fails(src, tmp_path / "data", "expected 28x28 images, the header says 16x16")


def test_label_out_of_range(tmp_path):
    src = tmp_path / "src"
    make_source(src)
    labels = np.zeros(64, np.uint8)
    labels[7] = 12
    write_idx(src / "train-labels-idx1-ubyte", labels)
    _prepare_fails(src, tmp_path / "data", "label 12 at index 7 is out of range")


def test_missing_file_and_ambiguous_files(tmp_path):
    src = tmp_path / "src"
    make_source(src)
    (src / "t10k-labels-idx1-ubyte").unlink()
    _prepare_fails(src, tmp_path / "data", "t10k-labels-idx1-ubyte.*file not found")
    make_source(src)
    write_idx(src / "t10k-labels-idx1-ubyte", np.zeros(32, np.uint8), gz=True)
    _prepare_fails(src, tmp_path / "data", "both t10k-labels-idx1-ubyte and t10k-labels-idx1-ubyte.gz")
    _prepare_fails(tmp_path / "nowhere", tmp_path / "data", "not a directory")


def test_checksum_mismatch_names_file_expected_and_actual(tmp_path):
    src = tmp_path / "src"
    make_source(src, gz=True)
    path = src / "train-images-idx3-ubyte.gz"
    msg = _prepare_fails(src, tmp_path / "data", "sha256 mismatch", verify_checksums=True)
    ref = kp.idx.DATASETS["fashion_mnist"].splits["train"].images
    assert str(path) in msg
    assert ref.gz_sha256 in msg and ref.content_sha256 in msg  # expected
    assert hashlib.sha256(path.read_bytes()).hexdigest() in msg  # actual
    assert hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest() in msg
    assert "--skip-checksums" in msg


def test_checksums_accepted_when_they_match(tmp_path, monkeypatch):
    """Stored-file sha256 (like TFDS's .gz checksums) or content sha256 both pass."""
    src = tmp_path / "src"
    make_source(src, gz=True)
    d = kp.idx.DATASETS["fashion_mnist"]
    splits = {}
    for i, (split, sdef) in enumerate(d.splits.items()):
        refs = []
        for ref in (sdef.images, sdef.labels):
            stored = (src / (ref.name + ".gz")).read_bytes()
            if i == 0:  # match on the .gz file itself
                ref = dataclasses.replace(ref, gz_sha256=hashlib.sha256(stored).hexdigest())
            else:  # match on the uncompressed content
                content = gzip.decompress(stored)
                ref = dataclasses.replace(ref, content_sha256=hashlib.sha256(content).hexdigest())
            refs.append(ref)
        splits[split] = dataclasses.replace(sdef, images=refs[0], labels=refs[1])
    monkeypatch.setitem(kp.idx.DATASETS, "fashion_mnist", dataclasses.replace(d, splits=splits))
    kd.prepare("fashion_mnist", src, data_dir=tmp_path / "d", verify_checksums=True)
    spec = kd.dataset_info("fashion_mnist", data_dir=tmp_path / "d")
    assert spec.checksums_verified is True
    assert "not checksum-verified" not in spec.description


def test_known_checksums_match_those_shipped_with_tfds():
    tfds = pytest.importorskip("tensorflow_datasets")
    for name, d in kp.idx.DATASETS.items():
        path = Path(tfds.__file__).parent / "url_checksums" / f"{name}.txt"
        if not path.exists():
            pytest.skip(f"{path} not shipped")
        registered = {}
        for line in path.read_text().splitlines():
            url, size, sha, fname = line.split("\t")
            registered[fname] = (int(size), sha)
        for sdef in d.splits.values():
            for ref in (sdef.images, sdef.labels):
                assert registered[ref.name + ".gz"] == (ref.gz_size, ref.gz_sha256)


# --------------------------------------------------------------------------
# missing / unknown datasets
# --------------------------------------------------------------------------


def test_missing_dataset_message_has_prepare_command(tmp_path):
    data_dir = tmp_path / "empty"
    with pytest.raises(kd.DatasetNotFoundError) as info:
        kd.load_arrays("fashion_mnist", "train", data_dir=data_dir)
    assert isinstance(info.value, FileNotFoundError)
    msg = str(info.value)
    assert (
        f"kdjax prepare fashion_mnist --from /usr/share/datasets/fashion-mnist --data-dir {data_dir}"
        in msg
    )
    assert "apt-get install dataset-fashion-mnist" in msg
    with pytest.raises(kd.DatasetNotFoundError, match=f"kdjax prepare mnist --from DIR --data-dir {data_dir}"):
        kd.dataset_info("mnist", data_dir=data_dir)


def test_unknown_dataset_name(tmp_path):
    # Any other name is an image-folder dataset: an IDX folder is not one.
    with pytest.raises(kd.DataPreparationError, match="no split folders"):
        kd.prepare("cifar11", tmp_path)
    with pytest.raises(ValueError, match="lowercase letters"):
        kd.prepare("Bad Name", tmp_path)
    with pytest.raises(kd.DatasetNotFoundError, match="kdjax prepare cifar11 --from DIR") as info:
        kd.load_arrays("cifar11", "train", data_dir=tmp_path)
    assert "kdjax datasets" in str(info.value)


def test_tfrecord_copy_is_reported(tmp_path):
    version_dir = tmp_path / "fashion_mnist" / "3.0.1"
    version_dir.mkdir(parents=True)
    (version_dir / "dataset_info.json").write_text(json.dumps({"name": "fashion_mnist"}))
    with pytest.raises(kd.DatasetNotFoundError, match="stored as tfrecord") as info:
        kd.load_arrays("fashion_mnist", "train", data_dir=tmp_path)
    assert "kdjax prepare fashion_mnist" in str(info.value)


# --------------------------------------------------------------------------
# atomicity
# --------------------------------------------------------------------------


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    make_source(tmp_path / "src")
    data_dir = tmp_path / "data"
    calls = {"n": 0}
    real = codec.encode_png

    def flaky(image):
        calls["n"] += 1
        if calls["n"] > 40:
            raise OSError("disk full (simulated)")
        return real(image)

    monkeypatch.setattr(codec, "encode_png", flaky)
    with pytest.raises(OSError, match="simulated"):
        kd.prepare("fashion_mnist", tmp_path / "src", data_dir=data_dir, verify_checksums=False)
    assert calls["n"] > 40  # it did fail half-way through writing
    assert not data_dir.exists(), listing(data_dir)


def test_reprepare_replaces_atomically_and_failure_keeps_old(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    make_source(tmp_path / "a", seed=1)
    second = make_source(tmp_path / "b", n_train=20, n_test=10, seed=2)
    kd.prepare("fashion_mnist", tmp_path / "a", data_dir=data_dir, verify_checksums=False)
    path = kd.prepare("fashion_mnist", tmp_path / "b", data_dir=data_dir, verify_checksums=False)
    out = kd.load_arrays("fashion_mnist", "train", data_dir=data_dir)
    np.testing.assert_array_equal(out["image"][..., 0], second["train"][0])
    assert os.listdir(data_dir / "fashion_mnist") == ["3.0.1"]  # no temp/old dirs left
    assert json.loads((Path(path) / "kdjax.json").read_text())["source"] == str((tmp_path / "b").resolve())

    # A failing re-prepare (bad source) leaves the existing copy untouched ...
    write_idx(tmp_path / "a" / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(kd.DataPreparationError):
        kd.prepare("fashion_mnist", tmp_path / "a", data_dir=data_dir, verify_checksums=False)
    # ... and so does one that fails while writing.
    make_source(tmp_path / "a", seed=1)
    monkeypatch.setattr(codec, "encode_png", lambda image: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        kd.prepare("fashion_mnist", tmp_path / "a", data_dir=data_dir, verify_checksums=False)
    assert os.listdir(data_dir / "fashion_mnist") == ["3.0.1"]
    out = kd.load_arrays("fashion_mnist", "test", data_dir=data_dir)
    np.testing.assert_array_equal(out["label"], second["test"][1])


# --------------------------------------------------------------------------
# no TensorFlow
# --------------------------------------------------------------------------


def test_no_tensorflow_imported(prepared):
    data_dir, _, arrays = prepared
    code = f"""
import sys
import kdjax.data as kd
import kdjax.images as codec
import kdjax.prepare as kp
assert "tensorflow_datasets" not in sys.modules, "import kdjax.data imported TFDS"
out = kd.load_arrays("fashion_mnist", "train", data_dir={os.fspath(data_dir)!r})
spec = kd.dataset_info("fashion_mnist", data_dir={os.fspath(data_dir)!r})
assert out["image"].shape == (64, 28, 28, 1), out["image"].shape
assert "tensorflow_datasets" in sys.modules
bad = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
assert not bad, bad
print("OK")
"""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("OK")


# --------------------------------------------------------------------------
# PNG decoding
# --------------------------------------------------------------------------


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def encode_png_with_filters(image: np.ndarray, *, split_idat=False, text_chunk=False) -> bytes:
    """Reference PNG encoder using all five filter types (row r uses r % 5)."""
    h, w, c = image.shape
    stride = w * c
    rows = image.reshape(h, stride).astype(int)
    out = bytearray()
    for r in range(h):
        f = r % 5
        prev = rows[r - 1] if r else np.zeros(stride, int)
        line = [f]
        for x in range(stride):
            a = rows[r, x - c] if x >= c else 0
            b = prev[x]
            cc = prev[x - c] if x >= c else 0
            pred = [0, a, b, (a + b) // 2, _paeth(a, b, cc)][f]
            line.append((rows[r, x] - pred) % 256)
        out += bytes(line)
    comp = zlib.compress(bytes(out))
    color = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    png = codec._PNG_SIGNATURE + codec._png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
    if text_chunk:
        png += codec._png_chunk(b"tEXt", b"Comment\x00kdjax test")
    if split_idat:
        png += codec._png_chunk(b"IDAT", comp[:7]) + codec._png_chunk(b"IDAT", comp[7:])
    else:
        png += codec._png_chunk(b"IDAT", comp)
    return png + codec._png_chunk(b"IEND", b"")


@pytest.mark.parametrize("small_batch_pil", [False, True], ids=["vectorised", "pil"])
@pytest.mark.parametrize("shape", [(28, 28, 1), (6, 5, 3), (4, 7, 4)])
def test_png_decoder_handles_all_filter_types(shape, small_batch_pil):
    PIL_Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(7, *shape), dtype=np.uint8)
    images[0] = 255  # exercise wrap-around
    blobs = [
        encode_png_with_filters(im, split_idat=(i == 1), text_chunk=(i == 2))
        for i, im in enumerate(images)
    ]
    blobs.append(codec.encode_png(images[3]))
    decoded = codec.decode_images(blobs, shape, small_batch_pil=small_batch_pil)
    np.testing.assert_array_equal(decoded[:7], images)
    np.testing.assert_array_equal(decoded[7], images[3])
    # The reference encoder is right: PIL agrees.
    for blob, im in zip(blobs[:7], images, strict=True):
        with PIL_Image.open(io.BytesIO(blob)) as pil:
            np.testing.assert_array_equal(np.asarray(pil).reshape(shape), im)


def test_png_decoder_falls_back_to_pil_for_other_pngs():
    PIL_Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    blobs = []
    for im in images:  # palette PNGs with an identity grey palette
        pil = PIL_Image.frombytes("P", (28, 28), im.tobytes())
        pil.putpalette([v for i in range(256) for v in (i, i, i)])
        buf = io.BytesIO()
        pil.save(buf, format="png")
        assert codec._png_filtered_rows(buf.getvalue(), (28, 28, 1)) is None
        blobs.append(buf.getvalue())
    decoded = codec.decode_images(blobs, (28, 28, 1))
    np.testing.assert_array_equal(decoded[..., 0], images)


# --------------------------------------------------------------------------
# synthetic source for other tests and demos
# --------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_make_synthetic_idx_dir_is_preparable_and_learnable(tmp_path, compress):
    src = kd.make_synthetic_idx_dir(tmp_path / "syn", n_train=300, n_test=100, seed=0, compress=compress)
    assert src == str(tmp_path / "syn")
    suffix = ".gz" if compress else ""
    assert sorted(os.listdir(src)) == sorted(f + suffix for pair in FILES.values() for f in pair)
    kd.prepare("fashion_mnist", src, data_dir=tmp_path / "d", verify_checksums=False)
    train = kd.load_arrays("fashion_mnist", "train", data_dir=tmp_path / "d")
    test = kd.load_arrays("fashion_mnist", "test", data_dir=tmp_path / "d")
    assert np.bincount(train["label"], minlength=10).tolist() == [30] * 10  # balanced
    # A nearest-class-mean classifier is far above chance (10%).
    x_tr = train["image"].reshape(300, -1).astype(np.float32)
    x_te = test["image"].reshape(100, -1).astype(np.float32)
    means = np.stack([x_tr[train["label"] == k].mean(0) for k in range(10)])
    pred = np.argmin(((x_te[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == test["label"]).mean() > 0.8
    # Same seed, same data; another seed, other data.
    again = kd.make_synthetic_idx_dir(tmp_path / "syn2", 300, 100, seed=0, compress=compress)
    other = kd.make_synthetic_idx_dir(tmp_path / "syn3", 300, 100, seed=1, compress=compress)
    name = "train-images-idx3-ubyte" + suffix
    assert (Path(again) / name).read_bytes() == (Path(src) / name).read_bytes()
    assert (Path(other) / name).read_bytes() != (Path(src) / name).read_bytes()
