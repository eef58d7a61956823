"""kdjax.interop.layouts: the zoo's variables under torchvision's and RepDistiller's names.

Without torch: every name and shape against the state_dicts the reference classes produce
(recorded by make_interop_fixtures.py), round trips, mismatch reports. With torch: each
supported architecture with random weights and BatchNorm statistics, imported from .pth and
.safetensors, against PyTorch's eval-mode logits, and exported back into PyTorch.
"""

import json
import os

import numpy as np
import pytest
from flax import nnx

from kdjax import cli, models
from kdjax.interop import layouts
from _interop import (flat_arrays, images, load_run_model, max_relative_error, random_model,
                      run_logits, torch_logits)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "interop")
CRD = ("resnet8", "resnet8x4", "wrn_16_1", "wrn_16_2", "vgg8", "vgg13", "mobilenetv2")
TORCHVISION = ("resnet18", "resnet34", "resnet50")
TOLERANCE = 1e-4  # max relative error of float32 logits


def abstract(name, num_classes=10, shape=(32, 32, 3), **kwargs):
    return nnx.eval_shape(lambda: models.create_model(
        name, num_classes=num_classes, rngs=nnx.Rngs(0), input_shape=shape, **kwargs))


@pytest.fixture(scope="module")
def reference_shapes():
    with open(os.path.join(FIXTURES, "reference_shapes.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name,layout", [(n, "crd") for n in CRD]
                         + [(n, "torchvision") for n in TORCHVISION])
def test_names_and_shapes_are_the_references(reference_shapes, name, layout):
    model = abstract(name)
    mine = {k: list(v) for k, v in layouts.expected_shapes(model, layout).items()}
    for prefix in layouts._batchnorm_prefixes(model, layout):
        mine[f"{prefix}.{layouts.NUM_BATCHES_TRACKED}"] = []
    assert mine == reference_shapes[name]
    assert layouts.default_layout(model) == layout
    assert layouts.layouts_for(model) == (layout, "kdjax")


def test_round_trip_and_conversions():
    model = random_model("resnet8x4", seed=1)
    sd = layouts.to_state_dict(model, "crd", num_batches_tracked=42)
    # OIHW convolutions and [out, in] linears, BatchNorm statistics under torch's names
    kernel = np.asarray(model.stages[0][0].c1.conv.kernel[...])
    np.testing.assert_array_equal(sd["layer1.0.conv1.weight"], kernel.transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(sd["fc.weight"], np.asarray(model.fc.kernel[...]).T)
    np.testing.assert_array_equal(sd["layer1.0.downsample.1.running_var"],
                                  np.asarray(model.stages[0][0].shortcut.bn.var[...]))
    assert sd["bn1.num_batches_tracked"].dtype == np.int64 and sd["bn1.num_batches_tracked"] == 42
    target = abstract("resnet8x4")
    state = layouts.from_state_dict(target, sd, "crd", source="sd")
    back = nnx.merge(nnx.split(target)[0], state)
    for (p, a), (q, b) in zip(nnx.to_flat_state(nnx.state(model)),
                              nnx.to_flat_state(nnx.state(back))):
        assert p == q and type(a) is type(b)
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))
    # num_batches_tracked is optional on import, as in older torch files
    layouts.from_state_dict(target, {k: v for k, v in sd.items()
                                     if not k.endswith("num_batches_tracked")}, "crd", source="sd")


def test_kdjax_layout_is_the_nnx_paths_of_any_model():
    model = random_model("cnn_tiny", shape=(28, 28, 1))
    sd = layouts.to_state_dict(model, "kdjax")
    assert "conv1.conv.kernel" in sd and "conv1.bn.mean" in sd and "out.kernel" in sd
    assert sd["conv1.conv.kernel"].shape == (3, 3, 1, 8)  # HWIO, as NNX holds it
    # its PyTorch layout is the one of the module kdjax.interop.torch_code writes for it
    assert layouts.layouts_for(model) == ("pytorch", "kdjax")
    assert layouts.default_layout(model) == "pytorch"
    state = layouts.from_state_dict(abstract("cnn_tiny", shape=(28, 28, 1)), sd, "kdjax",
                                    source="sd")
    np.testing.assert_array_equal(
        np.asarray(dict(nnx.to_flat_state(state))[("conv1", "bn", "var")][...]),
        np.asarray(model.conv1.bn.var[...]))


def test_a_mismatch_lists_every_name_with_both_shapes():
    sd = layouts.to_state_dict(random_model("resnet8"), "crd")
    sd["fc.weight"] = np.zeros((100, 64), np.float32)  # another class count
    del sd["layer3.0.bn2.running_var"]
    sd["layer4.0.conv1.weight"] = np.zeros((8, 8, 3, 3), np.float32)
    sd["layer1.0.conv1.weight"] = sd["layer1.0.conv1.weight"].astype(np.int32)
    with pytest.raises(layouts.LayoutMismatchError) as e:
        layouts.from_state_dict(abstract("resnet8"), sd, "crd", source="teacher.pth")
    msg = str(e.value)
    assert msg.startswith("teacher.pth does not fit the model in the 'crd' layout: 1 unmapped, "
                          "1 missing, 2 wrongly shaped or typed tensor(s):")
    assert "layer4.0.conv1.weight: (8, 8, 3, 3) in the file, not in the model" in msg
    assert "layer3.0.bn2.running_var: (64,) expected, not in the file" in msg
    assert "fc.weight: (100, 64) in the file, (10, 64) expected" in msg
    assert "layer1.0.conv1.weight: dtype int32 in the file, floating expected" in msg


def test_a_layout_without_naming_for_the_architecture_is_refused():
    with pytest.raises(ValueError, match=r"--layout: the layout 'torchvision' has no naming for "
                                         r"CifarResNet models; this model's layouts are \('crd', "
                                         r"'kdjax'\)"):
        layouts.entries(abstract("resnet8"), "torchvision")
    with pytest.raises(ValueError, match=r"layout must be one of \('torchvision', 'crd', "
                                         r"'pytorch', 'hf', 'kdjax'\), got 'timm'"):
        layouts.entries(abstract("resnet8"), "timm")
    # a zoo module that a layout's rules do not name is a bug here, said as such
    with pytest.raises(AssertionError, match="no naming rule for the zoo module 'stem.extra'"):
        layouts._rename(layouts._RESNET, "stem.extra")


# ------------------------------------------------------------------ against PyTorch
def _torch_model(name, num_classes):
    torch = pytest.importorskip("torch")
    import crd_torch

    if name in TORCHVISION:
        torchvision = pytest.importorskip("torchvision")
        model = getattr(torchvision.models, name)(num_classes=num_classes)
    else:
        model = crd_torch.build(name, num_classes)
    torch.manual_seed(0)
    return crd_torch.randomize(model, seed=len(name))


TORCH_CASES = [("resnet18", 64), ("resnet34", 64), ("resnet50", 64), ("resnet8", 32),
               ("resnet8x4", 32), ("wrn_16_1", 32), ("wrn_16_2", 32), ("vgg8", 32),
               ("vgg8", 128), ("vgg13", 32), ("mobilenetv2", 32)]


@pytest.mark.parametrize("name,size", TORCH_CASES)
def test_pytorch_models_import_and_export_with_their_logits(tmp_path, name, size):
    """Random weights and BatchNorm statistics; .pth and .safetensors in, logits equal to
    PyTorch's; exported as torch and safetensors, loaded back with load_state_dict, equal again."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    from kdjax.interop.importer import LAYOUT_CONVENTIONS

    reference = _torch_model(name, 7)
    layout = "torchvision" if name in TORCHVISION else "crd"
    conv = LAYOUT_CONVENTIONS[layout]
    x = images(3, (size, size, 3), seed=1)
    want = torch_logits(reference, x, conv["mean"], conv["std"])
    sd = reference.state_dict()
    torch.save(sd, tmp_path / "teacher.pth")
    save_file(sd, str(tmp_path / "teacher.safetensors"))
    for ext in ("pth", "safetensors"):
        assert cli.main(["import", "--from", str(tmp_path / f"teacher.{ext}"), "--model", name,
                         "--input-shape", f"{size},{size},3", "--out",
                         str(tmp_path / f"run_{ext}")]) == 0
    got = run_logits(str(tmp_path / "run_pth"), x)
    assert max_relative_error(got, want) <= TOLERANCE
    # the .safetensors file gives the very same arrays (so the same logits)
    a, b = (flat_arrays(load_run_model(str(tmp_path / f"run_{e}"))) for e in ("pth",
                                                                              "safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    for fmt, load in (("torch", lambda p: torch.load(p, weights_only=True)),
                      ("safetensors", load_file)):
        out = tmp_path / f"export_{fmt}"
        assert cli.main(["export", "--workdir", str(tmp_path / "run_pth"), "--out", str(out),
                         "--format", fmt]) == 0
        back = _torch_model(name, 7)  # other random weights, replaced by the export's
        back.load_state_dict(load(str(out / f"model.{'pth' if fmt == 'torch' else fmt}")))
        assert max_relative_error(torch_logits(back, x, conv["mean"], conv["std"]), got) \
            <= TOLERANCE
        for k, v in back.state_dict().items():
            if not k.endswith("num_batches_tracked"):
                assert torch.equal(v, sd[k]), k
