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

import jax
import numpy as np
import pytest
import safetensors.numpy

from kdjax import cli, export
from kdjax.interop import importer, pth
from _interop import flat_arrays, load_run_model, max_relative_error, run_logits, torch_logits

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
                                         r"'torch', 'stablehlo', 'onnx', 'litert'\), got 'tflite'"):
        export.export(tiny_run, out, format="tflite")
    with pytest.raises(ValueError, match="already exists"):
        export.export(tiny_run, tiny_run, format="torch")
    assert os.listdir(tmp_path) == []


# -- models with no reference PyTorch class: the zoo's MLPs and small CNNs, a user's model ---------

RUN = ["--config.train.steps=4", "--config.train.batch_size=32", "--config.eval.every_steps=4",
       "--config.train.log_every_steps=4", "--config.checkpoint.every_steps=4",
       "--config.eval.batch_size=50", "--no-progress"]


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """Short runs of the zoo MLP, the zoo's small CNN and a user's plain NNX model."""
    from conftest import EXP

    work, out = tmp_path_factory.mktemp("no_reference"), {}
    for name, model, kwargs in (("mlp", "mlp", "{'hidden': (16, 8)}"),
                                ("cnn", "cnn_tiny", "{}"),
                                ("user", "_user_models:TinyNet", "{'hidden': 12}")):
        out[name] = str(work / name)
        assert cli.main(["train", "--config", f"{EXP}/teacher.py", "--workdir", out[name],
                         f"--config.model.name={model}", f"--config.model.kwargs={kwargs}",
                         f"--config.data.data_dir={data_dir}", *RUN]) == 0
    return out


def _images(n=8):
    return np.random.default_rng(0).integers(0, 256, (n, 28, 28, 1), np.uint8)


def _numpy_mlp(sd, x):
    """The forward model.py defines for the MLP, in numpy: NHWC flattened, [out, in] weights."""
    x = x.reshape(len(x), -1)
    n = sum(k.startswith("hidden.") and k.endswith(".weight") for k in sd)
    for i in range(n):
        x = np.maximum(x @ sd[f"hidden.{i}.weight"].T + sd[f"hidden.{i}.bias"], 0.0)
    return x @ sd["out.weight"].T + sd["out.bias"]


def _torch_logits(out, file, images, meta):
    """model.py's module with the export's state_dict loaded strictly, on images as PyTorch
    gets them (NCHW, normalised as the README says)."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    namespace = {}
    exec(compile(open(os.path.join(out, "model.py")).read(), "model.py", "exec"), namespace)
    model = namespace["build"]()
    sd = (load_file(os.path.join(out, file)) if file.endswith(".safetensors")
          else torch.load(os.path.join(out, file), weights_only=True))
    model.load_state_dict(sd, strict=True)
    return torch_logits(model, images, meta["preprocess"]["mean"], meta["preprocess"]["std"])


@pytest.mark.parametrize("fmt,file,read", [("torch", "model.pth", pth.read),
                                           ("safetensors", "model.safetensors",
                                            safetensors.numpy.load_file)])
@pytest.mark.parametrize("run", ["mlp", "cnn"])
def test_zoo_models_without_a_reference_get_pytorch_conventions_and_a_model_py(
        tmp_path, runs, run, fmt, file, read):
    out = str(tmp_path / "export")
    assert cli.main(["export", "--workdir", runs[run], "--out", out, "--format", fmt]) == 0
    assert sorted(os.listdir(out)) == sorted(["README.md", "kdjax_model.json", file, "model.py"])
    meta = json.load(open(os.path.join(out, "kdjax_model.json")))
    assert meta["layout"] == "pytorch" and meta["reference"] == "the export's model.py"
    sd = read(os.path.join(out, file))
    first, shape = (("hidden.0.weight", (16, 784)) if run == "mlp"
                    else ("conv1.conv.weight", (8, 1, 3, 3)))
    assert sd[first].shape == shape  # [out, in] and OIHW, as nn.Linear and nn.Conv2d hold them
    readme = open(os.path.join(out, "README.md")).read()
    assert "from model import build\nmodel = build()\nmodel.load_state_dict(" in readme
    compile(open(os.path.join(out, "model.py")).read(), "model.py", "exec")
    images = _images()
    want = run_logits(runs[run], images)
    if run == "mlp":  # the conventions, checked without torch
        x = (images / 255.0 - meta["preprocess"]["mean"]) / meta["preprocess"]["std"]
        np.testing.assert_allclose(_numpy_mlp(sd, x), want, rtol=1e-4, atol=1e-5)
    assert max_relative_error(_torch_logits(out, file, images, meta), want) <= 1e-5


def _loads_where_it_says(fmt, out, workdir, tmp_path):
    """Each format's own promise: the logits of the run, by the route its README names."""
    images, want = _images(), run_logits(workdir, _images())
    meta = json.load(open(os.path.join(out, "kdjax_model.json")))
    if fmt == "kdjax":
        model, preprocess = export.load(out)
        got = np.asarray(model(preprocess(images)))
    elif fmt == "stablehlo":
        exported = jax.export.deserialize(bytearray(open(os.path.join(out, "model.stablehlo"),
                                                         "rb").read()))
        got = np.asarray(exported.call(images))
    elif meta["layout"] == "kdjax":  # NNX arrays, back into kdjax with `kdjax import`
        assert "not a PyTorch state_dict" in open(os.path.join(out, "README.md")).read()
        back = importer.import_checkpoint(os.path.join(out, "model.safetensors"),
                                          model=meta["model"]["name"], out=str(tmp_path / "back"))
        got = run_logits(back.out, images)
    else:  # a PyTorch state_dict and its module
        file = "model.pth" if fmt == "torch" else "model.safetensors"
        got = _torch_logits(out, file, images, meta)
    assert max_relative_error(got, want) <= 1e-5


@pytest.mark.parametrize("fmt", ["kdjax", "safetensors", "torch", "stablehlo"])
@pytest.mark.parametrize("run", ["mlp", "user"])
def test_every_format_loads_where_it_says_or_is_refused(tmp_path, runs, run, fmt):
    out = str(tmp_path / "export")
    args = ["export", "--workdir", runs[run], "--out", out] + (
        ["--format", fmt] if fmt != "kdjax" else [])
    if run == "user" and fmt == "torch":
        with pytest.raises(ValueError, match=r"--format torch: PyTorch has no module for the "
                                             r"model '_user_models:TinyNet', so a \.pth of its "
                                             r"arrays would load into nothing .* export it with "
                                             r"--format stablehlo"):
            cli.main(args)
        assert os.listdir(tmp_path) == []  # nothing written, not even a temporary directory
        return
    assert cli.main(args) == 0
    _loads_where_it_says(fmt, out, runs[run], tmp_path)


def test_a_pth_in_the_kdjax_layout_is_refused_before_reading_the_run(tmp_path):
    with pytest.raises(ValueError, match=r"--format torch --layout kdjax: a \.pth is for "
                                         r"PyTorch's load_state_dict, and no PyTorch module loads "
                                         r"the kdjax layout"):
        export.export(str(tmp_path / "no_run"), str(tmp_path / "e"), format="torch",
                      layout="kdjax")
    assert os.listdir(tmp_path) == []
