"""kdjax.interop.state_dict: a flat {name: array} from .pth or .safetensors, unwrapped."""

import os

import numpy as np
import pytest
import safetensors.numpy

from kdjax.interop import pth, state_dict

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "interop")


def test_the_format_is_told_by_content_not_name(tmp_path):
    want = safetensors.numpy.load_file(os.path.join(FIXTURES, "tiny_resnet.safetensors"))
    misnamed = tmp_path / "weights.bin"
    misnamed.write_bytes(open(os.path.join(FIXTURES, "tiny_resnet.safetensors"), "rb").read())
    got = state_dict.load(str(misnamed))
    assert got.format == "safetensors" and got.notes == [] and sorted(got.tensors) == sorted(want)
    got = state_dict.load(os.path.join(FIXTURES, "tiny_resnet.pth"))
    assert got.format == "pth" and got.notes == []
    for k in want:
        np.testing.assert_array_equal(got.tensors[k], want[k])


def test_a_training_checkpoint_dict_is_unwrapped_and_said():
    got = state_dict.load(os.path.join(FIXTURES, "tiny_resnet_legacy.pth"))
    assert "fc.weight" in got.tensors
    assert got.notes == ["read the state_dict under the key 'model' of this training checkpoint "
                         "(ignored: accuracy, epoch)"]


def test_key_names_the_entry(tmp_path):
    tensors = {"w": np.ones(3, np.float32)}
    st = str(tmp_path / "plain.safetensors")
    safetensors.numpy.save_file(tensors, st)
    assert state_dict.load(st, key=None).tensors.keys() == {"w"}
    with pytest.raises(ValueError, match=r"--key 'ema': .* has no entry 'ema' \(its top-level "
                                         r"keys: \['w'\]\)"):
        state_dict.load(st, key="ema")
    got = state_dict.load(os.path.join(FIXTURES, "tiny_resnet_legacy.pth"), key="model")
    assert got.notes == ["read the state_dict under the key 'model'"]
    with pytest.raises(ValueError, match="--key 'epoch': the entry 'epoch' of .* is a int, not "
                                         "a dict of tensors"):
        state_dict.load(os.path.join(FIXTURES, "tiny_resnet_legacy.pth"), key="epoch")


def test_what_is_not_a_state_dict_is_described(tmp_path, monkeypatch):
    path = str(tmp_path / "odd.pth")
    pth.write(path, {"w": np.zeros(2, np.float32)})
    monkeypatch.setattr(pth, "read", lambda p: {"epoch": 3, "weights": {"w": 1}})
    with pytest.raises(ValueError, match=r"holds a dict that is not a state_dict .* 'epoch' "
                                         r"\(int\), 'weights' \(dict\). Name the entry that "
                                         r"holds the state_dict with --key KEY"):
        state_dict.load(path)
    monkeypatch.setattr(pth, "read", lambda p: [np.zeros(2)])
    with pytest.raises(ValueError, match=r"holds a list, not a state_dict .*torch.save\(model"
                                         r".state_dict\(\), 'model.pth'\)"):
        state_dict.load(path)


def test_the_data_parallel_prefix_is_stripped_and_said(tmp_path):
    path = str(tmp_path / "dp.pth")
    pth.write(path, {"module.conv1.weight": np.zeros((2, 3, 3, 3), np.float32),
                     "module.fc.bias": np.zeros(2, np.float32)})
    got = state_dict.load(path)
    assert sorted(got.tensors) == ["conv1.weight", "fc.bias"]
    assert len(got.notes) == 1 and got.notes[0].startswith(
        "stripped the 'module.' prefix that nn.DataParallel / DistributedDataParallel put on "
        "every name")


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="--from .*nope.pth'?: no such file"):
        state_dict.load(str(tmp_path / "nope.pth"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken json     ")
    with pytest.raises(ValueError, match="is not a readable .safetensors file"):
        state_dict.load(str(junk))
    text = tmp_path / "readme.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="neither a .safetensors file nor a PyTorch .pth/.pt"):
        state_dict.load(str(text))


def test_save_both_formats_with_metadata(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3).T,
               "n": np.asarray(4, np.int64)}
    st, pt = str(tmp_path / "m.safetensors"), str(tmp_path / "m.pth")
    state_dict.save(st, tensors, format="safetensors", metadata={"kdjax": {"layout": "crd"}})
    state_dict.save(pt, tensors, format="torch")
    for path in (st, pt):
        got = state_dict.load(path)
        assert got.tensors["n"].shape == () and got.tensors["n"] == 4
        np.testing.assert_array_equal(got.tensors["a"], tensors["a"])
    assert state_dict.load(st).metadata == {"kdjax": '{"layout": "crd"}'}
    with pytest.raises(ValueError, match=r"state-dict format must be one of \('safetensors', "
                                         r"'torch'\), got 'onnx'"):
        state_dict.save(pt, tensors, format="onnx")
