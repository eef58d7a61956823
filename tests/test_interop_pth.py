"""kdjax.interop.pth: PyTorch files read without running pickled code, written without torch.

Without torch these run against files PyTorch wrote (tests/fixtures/interop, from
make_interop_fixtures.py); with torch, also against torch.save / torch.load themselves.
"""

import io
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from kdjax.interop import pth

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "interop")


def fixture(name):
    return os.path.join(FIXTURES, name)


def test_reads_what_torch_saved_as_safetensors_holds():
    got = pth.read(fixture("tiny_resnet.pth"))
    want = safetensors.numpy.load_file(fixture("tiny_resnet.safetensors"))
    assert sorted(got) == sorted(want) and len(want) == 62
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k])
    assert got["bn1.num_batches_tracked"].dtype == np.int64
    assert got["bn1.num_batches_tracked"].shape == () and got["bn1.num_batches_tracked"] == 123


def test_reads_the_legacy_format_and_checkpoint_dicts():
    got = pth.read(fixture("tiny_resnet_legacy.pth"))
    want = safetensors.numpy.load_file(fixture("tiny_resnet.safetensors"))
    assert set(got) == {"epoch", "model", "accuracy"} and got["epoch"] == 240
    assert got["accuracy"].shape == () and got["accuracy"] == np.float32(71.5)
    for k in want:
        np.testing.assert_array_equal(got["model"][k], want[k])


class _Evil:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _zip_pth(path, pickle_bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/version", "3\n")


@pytest.mark.parametrize("container", ["zip", "plain_pickle", "legacy"])
def test_a_malicious_pickle_runs_no_code_and_is_refused(tmp_path, container):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"weight": np.zeros(2), "x": _Evil(marker)}, protocol=2)
    path = str(tmp_path / "evil.pth")
    if container == "zip":
        _zip_pth(path, pickle.dumps({"x": _Evil(marker)}, protocol=2))
    elif container == "plain_pickle":
        with open(path, "wb") as f:
            f.write(pickle.dumps(_Evil(marker), protocol=4))
    else:  # the legacy layout: magic number, protocol, system info, then the object
        with open(path, "wb") as f:
            for obj in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
                f.write(pickle.dumps(obj, protocol=2))
            f.write(payload)
    with pytest.raises(pth.UnsafePickleError) as e:
        pth.read(path)
    assert not marker.exists()
    msg = str(e.value)
    assert f"{os.system.__module__}.system" in msg  # posix.system: the global is named
    assert "never runs the code a pickle names" in msg and "ran none of this file's" in msg
    assert "safetensors" in msg and "torch.save(model.state_dict()" in msg


def test_a_pickled_whole_model_is_named_with_the_fix():
    with pytest.raises(pth.UnsafePickleError) as e:
        pth.read(fixture("tiny_resnet_whole.pth"))
    msg = str(e.value)
    assert "holds a pickled whole model, crd_torch.ResNet, not a state_dict" in msg
    assert "torch.save(model.state_dict(), 'model.pth')" in msg


def test_torchscript_tar_and_other_files_are_refused_clearly(tmp_path):
    ts = str(tmp_path / "scripted.pt")
    with zipfile.ZipFile(ts, "w") as z:
        z.writestr("m/data.pkl", pickle.dumps({}, protocol=2))
        z.writestr("m/constants.pkl", pickle.dumps((), protocol=2))
    with pytest.raises(pth.UnsafePickleError, match=r"TorchScript archive \(torch.jit.save\)"):
        pth.read(ts)
    tar = tmp_path / "old.pth"
    tar.write_bytes(b"\0" * 257 + b"ustar" + b"\0" * 300)
    with pytest.raises(ValueError, match="pre-1.0 tar format"):
        pth.read(str(tar))
    other = tmp_path / "notes.pth"
    other.write_bytes(b"hello world")
    with pytest.raises(ValueError, match="is not a PyTorch file"):
        pth.read(str(other))
    plain = tmp_path / "plain.pth"
    plain.write_bytes(pickle.dumps([1, 2], protocol=2))
    with pytest.raises(ValueError, match="is a pickle but not a torch.save file"):
        pth.read(str(plain))
    zipped = str(tmp_path / "other.zip")
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(ValueError, match=r"not a torch.save file \(no single ARCHIVE/data.pkl"):
        pth.read(zipped)


def test_a_truncated_or_corrupt_file_is_refused(tmp_path):
    data = open(fixture("tiny_resnet.pth"), "rb").read()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable zip archive"):
        pth.read(str(cut))
    # A storage record shorter than its tensors say: refused, not read past its end.
    src = zipfile.ZipFile(fixture("tiny_resnet.pth"))
    short = str(tmp_path / "short.pth")
    with zipfile.ZipFile(short, "w") as z:
        for name in src.namelist():
            z.writestr(name, src.read(name)[:4] if name.endswith("/data/0") else src.read(name))
    with pytest.raises(pth.UnsafePickleError, match=r"data/0 holds 4 bytes, 108 x 4 expected"):
        pth.read(short)
    legacy = open(fixture("tiny_resnet_legacy.pth"), "rb").read()
    cut2 = tmp_path / "cut_legacy.pth"
    cut2.write_bytes(legacy[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        pth.read(str(cut2))


def _sample_tensors():
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "bn.num_batches_tracked": np.asarray(7, np.int64),
        "half": rng.normal(size=(5,)).astype(np.float16),
        "bf16": rng.normal(size=(2, 3)).astype(ml_dtypes.bfloat16),
        "double": rng.normal(size=(3,)),
        "ints": np.arange(6, dtype=np.int32).reshape(2, 3),
        "mask": np.array([True, False]),
        "transposed": np.arange(6, dtype=np.float32).reshape(2, 3).T,  # not C-contiguous
        "empty": np.zeros((0, 3), np.float32),
    }


def test_write_then_read_round_trips_every_dtype(tmp_path):
    path = str(tmp_path / "w.pth")
    tensors = _sample_tensors()
    pth.write(path, tensors)
    got = pth.read(path)
    assert list(got) == list(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v)
    with pytest.raises(ValueError, match="has dtype complex64, which a .pth file cannot hold"):
        pth.write(str(tmp_path / "c.pth"), {"c": np.zeros(2, np.complex64)})


def _pickle_ops(data):
    """The GLOBALs of a pickle (without running it)."""
    import pickletools

    return {arg for op, arg, _ in pickletools.genops(io.BytesIO(data)) if op.name == "GLOBAL"}


def test_written_pickle_names_only_what_torch_load_weights_only_allows(tmp_path):
    path = str(tmp_path / "w.pth")
    pth.write(path, _sample_tensors())
    with zipfile.ZipFile(path) as z:
        assert set(z.namelist()) >= {"w/data.pkl", "w/byteorder", "w/version", "w/data/0"}
        globals_ = _pickle_ops(z.read("w/data.pkl"))
    assert globals_ == {"collections OrderedDict", "torch._utils _rebuild_tensor_v2",
                        "torch FloatStorage", "torch LongStorage", "torch HalfStorage",
                        "torch BFloat16Storage", "torch DoubleStorage", "torch IntStorage",
                        "torch BoolStorage"}


# ------------------------------------------------------------------ against torch itself
def _to_numpy(t):
    import torch

    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()


@pytest.mark.parametrize("zipfile_format", [True, False])
def test_reader_matches_torch_load(tmp_path, zipfile_format):
    torch = pytest.importorskip("torch")
    base = torch.arange(24, dtype=torch.float32)
    obj = {
        "state": torch.nn.BatchNorm2d(3).state_dict(),
        "param": torch.nn.Parameter(torch.randn(2, 3).bfloat16()),
        "strided": base.reshape(4, 6).t(),  # a non-contiguous view
        "view": base[5:9],  # a storage shared with "strided", at an offset
        "half": torch.randn(3).half(),
        "int": torch.tensor(5),
        "meta": {"epoch": 3, "names": ["a", "b"], "lr": 0.1, "ok": True, "none": None},
    }
    path = str(tmp_path / "t.pth")
    torch.save(obj, path, _use_new_zipfile_serialization=zipfile_format)
    want = torch.load(path, weights_only=True)
    got = pth.read(path)
    assert got["meta"] == want["meta"]
    for k in ("param", "strided", "view", "half", "int"):
        assert got[k].dtype == _to_numpy(want[k]).dtype, k
        np.testing.assert_array_equal(got[k], _to_numpy(want[k]))
    for k, v in want["state"].items():
        np.testing.assert_array_equal(got["state"][k], _to_numpy(v))


def test_torch_load_reads_what_write_wrote(tmp_path):
    torch = pytest.importorskip("torch")
    path = str(tmp_path / "w.pth")
    tensors = _sample_tensors()
    pth.write(path, tensors)
    got = torch.load(path, weights_only=True)
    assert list(got) == list(tensors)
    for k, v in tensors.items():
        assert tuple(got[k].shape) == v.shape, k
        np.testing.assert_array_equal(_to_numpy(got[k]), v)
    assert got["bn.num_batches_tracked"].dtype == torch.int64


def test_torch_and_the_reader_refuse_the_same_malicious_file(tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    path = str(tmp_path / "evil.pth")
    torch.save({"w": torch.ones(2), "x": _Evil(marker)}, path)
    with pytest.raises(pth.UnsafePickleError, match=r"refers to posix\.system|refers to nt\."):
        pth.read(path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert not marker.exists()



# ------------------------------------------------------------------ malformed and hostile files
_OD = b"ccollections\nOrderedDict\n)R"


def _storage(key="0", numel=4, kind="FloatStorage", extra=b""):
    return (b"(" + pth._p_str("storage") + f"ctorch\n{kind}\n".encode() + pth._p_str(key)
            + pth._p_str("cpu") + pth._p_int(numel) + extra + b"tQ")


def _tensor(storage, offset=0, size=(4,), stride=(1,), size_bytes=None):
    size_bytes = pth._p_tuple(size) if size_bytes is None else size_bytes
    return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage + pth._p_int(offset) + size_bytes
            + pth._p_tuple(stride) + b"\x89" + _OD + b"tR")


def _dict_pickle(value: bytes) -> bytes:
    return b"\x80\x02(" + pth._p_str("w") + value + b"d."


def _zip(path, data_pkl, records=None):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a/data.pkl", data_pkl)
        if records is None:
            records = {"0": np.arange(4, dtype=np.float32).tobytes()}
        for key, data in records.items():
            z.writestr(f"a/data/{key}", data)
    return path


@pytest.mark.parametrize("pickle_bytes,records,error", [
    (_dict_pickle(_tensor(_storage())), {}, r"the storage a/data/0 is missing"),
    (_dict_pickle(_tensor(_storage(), size=(10,))), None,
     r"a tensor of size \(10,\), stride \(1,\), offset 0 reaches past its storage's 4 elements"),
    (_dict_pickle(_tensor(_storage(), size_bytes=b"(" + pth._p_str("4") + b"t")), None,
     r"a tensor's size is \('4',\), not a tuple of ints >= 0"),
    (_dict_pickle(_tensor(_storage(), size=(2, 2), stride=(1,))), None,
     r"a tensor's size \(2, 2\) and stride \(1,\) differ in length"),
    (_dict_pickle(b"(" + pth._p_str("module") + b"tQ"), None, r"unknown persistent id"),
    (_dict_pickle(_tensor(_storage(extra=pth._p_int(1) + pth._p_int(2)))), None,
     r"malformed storage record"),
    (_dict_pickle(b"c_codecs\nencode\n(" + pth._p_str("x") + pth._p_str("rot13") + b"tR"), None,
     r"_codecs.encode with 'rot13': not how pickle stores bytes"),
    (_dict_pickle(b"ctorch._tensor\n_rebuild_from_type_v2\n(ctorch._utils\n_rebuild_tensor_v2\n"
                  b"ccollections\nOrderedDict\n)" + _OD + b"tR"), None,
     r"a tensor of a subclass other than torch.Tensor/Parameter"),
    (_dict_pickle(_tensor(pth._p_int(3))), None,
     r"a tensor record does not point to one of the file's storages"),
    (b"\x80\x02garbage", None, r"unreadable pickle \(UnpicklingError"),
])
def test_malformed_zip_files_are_refused(tmp_path, pickle_bytes, records, error):
    path = _zip(str(tmp_path / "bad.pth"), pickle_bytes, records)
    with pytest.raises(ValueError, match=error):
        pth.read(path)


def _legacy(path, obj_pickle, keys, data: bytes, *, protocol=1001):
    with open(path, "wb") as f:
        for obj in (0x1950A86A20F9469CFC6C, protocol, {"little_endian": True}):
            f.write(pickle.dumps(obj, protocol=2))
        f.write(obj_pickle)
        f.write(pickle.dumps(keys, protocol=2))
        f.write(data)
    return path


_LEGACY_STORAGE = _storage(extra=b"N")  # legacy records end with view_metadata (None here)
_FOUR = np.int64(4).tobytes() + np.arange(4, dtype=np.float32).tobytes()


@pytest.mark.parametrize("kwargs,error", [
    (dict(keys=["0"], data=_FOUR, protocol=999), "unknown PyTorch legacy protocol version"),
    (dict(keys="0", data=_FOUR), "malformed storage key list"),
    (dict(keys=["0", "7"], data=_FOUR), r"the data of an unknown storage '7'"),
    (dict(keys=["0"], data=b""), r"is truncated \(storage '0' is missing\)"),
    (dict(keys=[], data=b""), "a tensor refers to a storage with no data"),
])
def test_malformed_legacy_files_are_refused(tmp_path, kwargs, error):
    path = _legacy(str(tmp_path / "bad.pth"), _dict_pickle(_tensor(_LEGACY_STORAGE)), **kwargs)
    with pytest.raises(ValueError, match=error):
        pth.read(path)


def test_well_formed_files_of_those_parts_read(tmp_path):
    # The parts above assembled correctly: each malformed case differs from these in one place.
    legacy = _legacy(str(tmp_path / "ok_legacy.pth"), _dict_pickle(_tensor(_LEGACY_STORAGE)),
                     keys=["0"], data=_FOUR)
    zipped = _zip(str(tmp_path / "ok.pth"), _dict_pickle(_tensor(_storage())))
    for path in (legacy, zipped):
        np.testing.assert_array_equal(pth.read(path)["w"], np.arange(4, dtype=np.float32))
    # old torch versions pickled views of storages: (view key, offset, size) in the record
    view = _storage(extra=b"(" + pth._p_str("v") + pth._p_int(1) + pth._p_int(2) + b"t")
    viewed = _legacy(str(tmp_path / "view.pth"), _dict_pickle(_tensor(view, size=(2,))),
                     keys=["0"], data=_FOUR)
    np.testing.assert_array_equal(pth.read(viewed)["w"], np.array([1.0, 2.0], np.float32))
