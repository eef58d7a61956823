"""`kdjax export --format safetensors|torch|stablehlo` (kdjax.interop.formats, .stablehlo).

Without torch: the state_dicts written are exactly the PyTorch file the run was imported from
(so load_state_dict gives PyTorch's logits, stored with the fixture), and the StableHLO artefact
gives those logits in a process that never imports kdjax. With torch the round trip through
load_state_dict is in test_interop_layouts.py.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

from kdjax import cli, export
from kdjax.interop import importer, pth
from _interop import flat_arrays, load_run_model

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "interop")
TINY = {"channels": [4, 8, 8, 16]}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("formats") / "tiny")
    importer.import_checkpoint(os.path.join(FIXTURES, "tiny_resnet.safetensors"),
                               model="resnet8", model_kwargs=TINY, out=out)
    return out


@pytest.fixture(scope="module")
def original():
    return safetensors.numpy.load_file(os.path.join(FIXTURES, "tiny_resnet.safetensors"))


@pytest.mark.parametrize("fmt,file,read", [("safetensors", "model.safetensors",
                                            safetensors.numpy.load_file),
                                           ("torch", "model.pth", pth.read)])
def test_state_dict_exports_are_the_pytorch_file(tmp_path, tiny_run, original, fmt, file, read):
    out = tmp_path / "export"
    assert cli.main(["export", "--workdir", tiny_run, "--out", str(out), "--format", fmt]) == 0
    assert sorted(os.listdir(out)) == ["README.md", "kdjax_model.json", file]
    got = read(str(out / file))
    assert sorted(got) == sorted(original)
    for k, v in original.items():
        if k.endswith("num_batches_tracked"):  # the run's step: 0 for an imported run
            assert got[k].dtype == np.int64 and got[k].shape == () and got[k] == 0
        else:
            assert got[k].dtype == v.dtype
            np.testing.assert_array_equal(got[k], v)
    meta = json.load(open(out / "kdjax_model.json"))
    assert meta["format"] == f"kdjax.export.{fmt}/1" and meta["layout"] == "crd"
    assert meta["reference"] == "RepDistiller models.resnet.resnet8"
    readme = open(out / "README.md").read()
    assert "from models import model_dict" in readme
    assert "model = model_dict['resnet8'](num_classes=10)  # built here with model.kwargs" in readme
    load = ("model.load_state_dict(load_file(" if fmt == "safetensors" else
            "model.load_state_dict(torch.load(")
    assert f'{load}"{out / file}"' in readme
    with pytest.raises(ValueError, match=f"is a kdjax.export.{fmt}/1 export, not kdjax's own"):
        export.load(str(out))


def test_kdjax_layout_round_trips_through_import_without_options(tmp_path, tiny_run):
    out = tmp_path / "export"
    assert cli.main(["export", "--workdir", tiny_run, "--out", str(out), "--format",
                     "safetensors", "--layout", "kdjax"]) == 0
    got = safetensors.numpy.load_file(str(out / "model.safetensors"))
    assert "stem.conv.kernel" in got and got["stem.conv.kernel"].shape == (3, 3, 3, 4)
    # layout, kwargs, input shape, normalisation and dataset come from the file's header
    back = importer.import_checkpoint(str(out / "model.safetensors"), model="resnet8",
                                      out=str(tmp_path / "back"))
    assert back.layout == "kdjax" and back.spec.kwargs == TINY and back.data == "cifar100"
    assert back.preprocess == {"mean": [0.5071, 0.4867, 0.4408], "std": [0.2675, 0.2565, 0.2761]}
    a, b = flat_arrays(load_run_model(tiny_run)), flat_arrays(load_run_model(back.out))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


_SERVE = """
import sys, jax, numpy as np
exported = jax.export.deserialize(bytearray(open(sys.argv[1], "rb").read()))
with np.load(sys.argv[2]) as f:
    images, want = f["images"], f["logits"]
for n in (1, 4):
    got = np.asarray(exported.call(images[:n]))
    assert got.shape == (n, 10) and got.dtype == np.float32
    err = np.abs(got - want[:n]).max() / np.abs(want[:n]).max()
    assert err <= 1e-4, err
assert not any(m == "kdjax" or m.startswith("kdjax.") for m in sys.modules)
print("served", exported.in_avals[0], sorted(exported.platforms))
"""


def test_stablehlo_runs_without_kdjax_at_any_batch_size(tmp_path, tiny_run):
    out = tmp_path / "serve"
    assert cli.main(["export", "--workdir", tiny_run, "--out", str(out), "--format",
                     "stablehlo"]) == 0
    meta = json.load(open(out / "kdjax_model.json"))
    assert meta["platforms"] == ["cpu", "cuda", "tpu"] and meta["layout"] is None
    readme = open(out / "README.md").read()
    assert "exported = jax.export.deserialize(" in readme and "exported.call(images)" in readme
    r = subprocess.run([sys.executable, "-c", _SERVE, str(out / "model.stablehlo"),
                        os.path.join(FIXTURES, "tiny_resnet_logits.npz")],
                       capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "served uint8[batch,32,32,3] ['cpu', 'cuda', 'tpu']"


def test_export_errors(tmp_path, tiny_run):
    out = str(tmp_path / "e")
    with pytest.raises(ValueError, match=r"the layout 'torchvision' has no naming for "
                                         r"CifarResNet models"):
        export.export(tiny_run, out, format="torch", layout="torchvision")
    with pytest.raises(ValueError, match="--format stablehlo has none"):
        export.export(tiny_run, out, format="stablehlo", layout="crd")
    with pytest.raises(ValueError, match="it goes with --format safetensors or torch"):
        export.export(tiny_run, out, layout="crd")
    with pytest.raises(ValueError, match=r"--format must be kdjax or one of \('safetensors', "
                                         r"'torch', 'stablehlo'\), got 'onnx'"):
        export.export(tiny_run, out, format="onnx")
    with pytest.raises(ValueError, match="already exists"):
        export.export(tiny_run, tiny_run, format="torch")
    assert os.listdir(tmp_path) == []
