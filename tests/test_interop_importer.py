"""`kdjax import`: PyTorch files (made by PyTorch: tests/fixtures/interop) mapped onto zoo models
and written as runs that teacher.workdir, `kdjax eval`, `kdjax export` and `kdjax summary` take.
Runs without torch: the logits are compared with the ones PyTorch computed for the fixture."""

import dataclasses
import hashlib
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from kdjax import checkpoint, cli, config as config_lib, export, models
from kdjax.errors import CheckpointMismatchError
from kdjax.interop import importer, layouts, pth, state_dict
from _interop import (flat_arrays, images, load_run_model, max_relative_error, model_logits,
                      run_logits)

import _float32 as f32
from conftest import EXP

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "interop")
TINY = {"channels": [4, 8, 8, 16]}  # RepDistiller's ResNet(8, [4, 8, 8, 16]) of the fixtures
CRD_MEAN, CRD_STD = [0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]
pytestmark = pytest.mark.usefixtures("quick_compiles")


def fixture(name):
    return os.path.join(FIXTURES, name)


@pytest.fixture(scope="module")
def torch_outputs():
    with np.load(fixture("tiny_resnet_logits.npz")) as f:
        return f["images"], f["logits"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The fixture's .pth imported through the command line, with the defaults of its layout."""
    out = str(tmp_path_factory.mktemp("imports") / "tiny")
    assert cli.main(["import", "--from", fixture("tiny_resnet.pth"), "--model", "resnet8",
                     "--model-kwargs", json.dumps(TINY), "--out", out]) == 0
    return out


def test_import_gives_pytorchs_logits(tiny_run, torch_outputs):
    images, want = torch_outputs
    assert max_relative_error(run_logits(tiny_run, images), want) <= 1e-4


@pytest.mark.parametrize("name", ["tiny_resnet.safetensors", "tiny_resnet_legacy.pth"])
def test_safetensors_and_legacy_files_give_the_same_weights(tmp_path, tiny_run, name):
    report = importer.import_checkpoint(fixture(name), model="resnet8", model_kwargs=TINY,
                                        out=str(tmp_path / "run"))
    a, b = flat_arrays(load_run_model(tiny_run)), flat_arrays(load_run_model(report.out))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert report.format == ("safetensors" if name.endswith("safetensors") else "pth")
    assert report.notes == (() if name.endswith("safetensors") else (
        "read the state_dict under the key 'model' of this training checkpoint (ignored: "
        "accuracy, epoch)",))


def test_the_run_records_model_normalisation_and_provenance(tiny_run):
    reader = checkpoint.RunReader(tiny_run)
    run = reader.run_meta(reader.resolve_step("latest"))
    assert reader.manager.all_steps() == [0]
    reader.close()
    sha = hashlib.sha256(open(fixture("tiny_resnet.pth"), "rb").read()).hexdigest()
    assert run["model"] == {"name": "resnet8", "num_classes": 10, "input_shape": [32, 32, 3],
                            "kwargs": TINY, "compute_dtype": "auto"}
    assert run["preprocess"] == {"mean": CRD_MEAN, "std": CRD_STD}  # RepDistiller's loaders'
    assert run["imported"]["from"] == fixture("tiny_resnet.pth")
    assert run["imported"]["sha256"] == sha and run["imported"]["layout"] == "crd"
    assert run["imported"]["reference"] == "RepDistiller models.resnet.resnet8"
    config = config_lib.from_json(open(os.path.join(tiny_run, "config.json")).read())
    assert config.model.name == "resnet8" and config.data.name == "cifar100"
    assert list(config.data.mean) == CRD_MEAN and config.model.num_classes == 10
    summary = json.load(open(os.path.join(tiny_run, "summary.json")))
    assert summary["imported"] is True and summary["sha256"] == sha
    assert summary["from"] == fixture("tiny_resnet.pth") and summary["num_params"] == 6174


def test_summary_and_export_take_the_imported_run(tiny_run, tmp_path, capsys, torch_outputs):
    assert cli.main(["summary", tiny_run]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:3] == [tiny_run, "resnet8", "6,174"]
    out = str(tmp_path / "export")
    assert cli.main(["export", "--workdir", tiny_run, "--out", out]) == 0
    model, preprocess = export.load(out)
    images, want = torch_outputs
    assert max_relative_error(np.asarray(model(preprocess(images))), want) <= 1e-4


def test_an_imported_run_is_not_resumed(tiny_run):
    with pytest.raises(CheckpointMismatchError, match="holds a model without training state "
                                                      r"\(written by `kdjax import`\)"):
        checkpoint.Checkpointer(tiny_run, max_to_keep=1)._restore({"model": {}, "train": {}},
                                                                  None)


def test_an_imported_teacher_distils_and_evaluates(data_dir, tmp_path):
    """A user's own NNX model (not the zoo's) from a safetensors file in the kdjax layout: the
    imported run is a teacher in `kdjax distill`, evaluates in `kdjax eval`, and serves."""
    import _user_models

    teacher = _user_models.TinyNet(784, 10, hidden=16, rngs=nnx.Rngs(3))
    path = str(tmp_path / "teacher.safetensors")
    state_dict.save(path, layouts.to_state_dict(teacher, "kdjax"), format="safetensors")
    run = str(tmp_path / "teacher")
    assert cli.main(["import", "--from", path, "--model", "_user_models:TinyNet",
                     "--model-kwargs", '{"hidden": 16}', "--layout", "kdjax",
                     "--input-shape", "28,28,1", "--mean", "0.286", "--std", "0.353",
                     "--data", "fashion_mnist", "--data-dir", data_dir, "--out", run]) == 0
    # where its data is prepared is recorded: eval and report find it without --data-dir
    assert json.load(open(os.path.join(run, "config.json")))["data"]["data_dir"] == data_dir
    x = images(3, (28, 28, 1))
    np.testing.assert_allclose(run_logits(run, x), model_logits(teacher, x, [0.286], [0.353]),
                               rtol=1e-6, atol=1e-6)
    common = [f"--config.data.data_dir={data_dir}", "--no-progress"]
    assert cli.main(["eval", "--workdir", run, "--no-progress"]) == 0
    accuracy = json.load(open(os.path.join(run, "eval.json")))["eval/accuracy"]
    assert 0.0 <= accuracy <= 1.0
    serve = tmp_path / "teacher_hlo"
    assert cli.main(["export", "--workdir", run, "--out", str(serve), "--format",
                     "stablehlo"]) == 0
    exported = jax.export.deserialize(bytearray((serve / "model.stablehlo").read_bytes()))
    # the serialized program, compiled anew, vs the run's: float32 reassociation (_float32.py)
    # along 784 inputs, 16 + 16 hidden and 10 classes
    f32.assert_close(np.asarray(exported.call(x)), run_logits(run, x), n=784 + 16 + 16 + 10)
    student = str(tmp_path / "student")
    assert cli.main(["distill", "--config", f"{EXP}/kd.py", "--workdir", student,
                     f"--config.teacher.workdir={run}", "--config.train.steps=4",
                     "--config.train.batch_size=32", "--config.train.log_every_steps=2",
                     "--config.eval.every_steps=4", "--config.eval.batch_size=150",
                     *common]) == 0
    summary = json.load(open(os.path.join(student, "summary.json")))
    assert summary["teacher"] == run and summary["steps"] == 4
    assert 0.0 <= summary["eval/teacher_agreement"] <= 1.0
    # the trained student goes out the same way: an MLP in PyTorch's conventions, with the
    # model.py that defines its nn.Module
    out = tmp_path / "student_st"
    assert cli.main(["export", "--workdir", student, "--out", str(out), "--format",
                     "safetensors"]) == 0
    got = state_dict.load(str(out / "model.safetensors"))
    assert json.loads(got.metadata["kdjax"])["layout"] == "pytorch"
    assert sorted(got.tensors) == ["hidden.0.bias", "hidden.0.weight", "out.bias", "out.weight"]
    assert (out / "model.py").is_file()


# ------------------------------------------------------------------ what is refused
def _leftovers(parent):
    return sorted(os.listdir(parent))


def test_a_file_that_does_not_fit_writes_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(layouts.LayoutMismatchError) as e:
        importer.import_checkpoint(fixture("tiny_resnet.pth"), model="resnet8", out=str(out))
    msg = str(e.value)  # the default resnet8 (16/32/64 channels) against the tiny one
    assert "bn1.weight: (4,) in the file, (16,) expected" in msg
    assert "layer1.0.downsample.0.weight: (8, 4, 1, 1) in the file, not in the model" in msg
    assert "fc.weight: (10, 16) in the file, (10, 64) expected" in msg
    with pytest.raises(layouts.LayoutMismatchError, match=r"fc.weight: \(10, 16\) in the file, "
                                                          r"\(5, 16\) expected"):
        importer.import_checkpoint(fixture("tiny_resnet.pth"), model="resnet8", out=str(out),
                                   model_kwargs=TINY, num_classes=5)
    assert _leftovers(tmp_path) == []  # no run, no temporary directory


def test_nothing_partial_when_writing_fails(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_model_only", fail)
    with pytest.raises(OSError, match="disk full"):
        importer.import_checkpoint(fixture("tiny_resnet.pth"), model="resnet8",
                                   model_kwargs=TINY, out=str(tmp_path / "run"))
    assert _leftovers(tmp_path) == []


def test_bad_arguments_are_named(tmp_path, tiny_run):
    src, out = fixture("tiny_resnet.pth"), str(tmp_path / "run")
    kw = dict(model="resnet8", model_kwargs=TINY, out=out)
    with pytest.raises(ValueError, match="--out .* already exists; pick a new path"):
        importer.import_checkpoint(src, **{**kw, "out": tiny_run})
    with pytest.raises(ValueError, match="unknown model 'resnet9'"):
        importer.import_checkpoint(src, **{**kw, "model": "resnet9"})
    with pytest.raises(ValueError, match=r"--mean has 2 value\(s\) but the input has 3 "
                                         r"channel\(s\)"):
        importer.import_checkpoint(src, **kw, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match=r"--std must be positive per channel"):
        importer.import_checkpoint(src, **kw, std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match=r"--input-shape must be H,W,C"):
        importer.import_checkpoint(src, **kw, input_shape=(32, 32))
    with pytest.raises(ValueError, match=r"--num-classes must be >= 1"):
        importer.import_checkpoint(src, **kw, num_classes=0)
    with pytest.raises(ValueError, match=r"--input-shape is required with --layout kdjax"):
        importer.import_checkpoint(src, **kw, layout="kdjax")
    with pytest.raises(ValueError, match=r"--layout: the layout 'torchvision' has no naming for "
                                         r"CifarResNet"):
        importer.import_checkpoint(src, **kw, layout="torchvision")
    with pytest.raises(pth.UnsafePickleError, match="pickled whole model, crd_torch.ResNet"):
        importer.import_checkpoint(fixture("tiny_resnet_whole.pth"), **kw)
    headless = str(tmp_path / "headless.safetensors")
    tensors = state_dict.load(src).tensors
    state_dict.save(headless, {k: v for k, v in tensors.items() if not k.startswith("fc.")},
                    format="safetensors", metadata={"kdjax": "{not json"})
    with pytest.raises(ValueError, match="its 'kdjax' header entry is not JSON"):
        importer.import_checkpoint(headless, **kw)
    state_dict.save(headless, {k: v for k, v in tensors.items() if not k.startswith("fc.")},
                    format="safetensors")
    with pytest.raises(ValueError, match=r"cannot tell the class count from .*headless"
                                         r".safetensors \(its classifier head is not among its "
                                         r"tensors\): pass --num-classes N"):
        importer.import_checkpoint(headless, **kw)
    os.remove(headless)
    assert _leftovers(tmp_path) == []


def test_command_line_errors(tmp_path, capsys):
    base = ["import", "--from", fixture("tiny_resnet.pth"), "--model", "resnet8", "--out",
            str(tmp_path / "r")]
    with pytest.raises(ValueError, match="--input-shape must be comma-separated integers"):
        cli.main([*base, "--input-shape", "32,32,3.5"])
    with pytest.raises(ValueError, match="--mean must be comma-separated numbers"):
        cli.main([*base, "--mean", "a,b,c"])
    with pytest.raises(ValueError, match="--model-kwargs must be a JSON object"):
        cli.main([*base, "--model-kwargs", "{depth: 8}"])
    with pytest.raises(ValueError, match=r"--model-kwargs must be a JSON object, got '\[8\]'"):
        cli.main([*base, "--model-kwargs", "[8]"])
    with pytest.raises(SystemExit):
        cli.main([*base, "--config.seed=1"])
    assert "kdjax import takes no --config overrides" in capsys.readouterr().err


def test_the_command_line_says_what_it_stripped(tmp_path, capsys):
    sd = state_dict.load(fixture("tiny_resnet.pth")).tensors
    path = str(tmp_path / "dp.pth")
    pth.write(path, {f"module.{k}": v for k, v in sd.items()})
    out = str(tmp_path / "run")
    assert cli.main(["import", "--from", path, "--model", "resnet8", "--model-kwargs",
                     json.dumps(TINY), "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "kdjax: note: stripped the 'module.' prefix" in printed
    assert f"use it as --config.teacher.workdir={out}" in printed


def test_a_colour_teacher_distils_into_a_grayscale_student(data_dir, tmp_path, capsys):
    """A 32x32x3 CIFAR teacher on 28x28x1 Fashion-MNIST: it sees each image replicated to 3
    channels and resized to 32x32 inside the step, says so, evaluates on that data and teaches a
    grayscale student."""
    run = str(tmp_path / "rgb_teacher")
    assert cli.main(["import", "--from", fixture("tiny_resnet.pth"), "--model", "resnet8",
                     "--model-kwargs", json.dumps(TINY), "--data", "fashion_mnist",
                     "--data-dir", data_dir, "--out", run]) == 0
    assert cli.main(["eval", "--workdir", run, "--no-progress"]) == 0
    assert 0.0 <= json.load(open(os.path.join(run, "eval.json")))["eval/accuracy"] <= 1.0
    student = str(tmp_path / "gray_student")
    assert cli.main(["distill", "--config", f"{EXP}/kd.py", "--workdir", student,
                     f"--config.teacher.workdir={run}", f"--config.data.data_dir={data_dir}",
                     "--config.train.steps=2", "--config.train.batch_size=32",
                     "--config.eval.batch_size=150", "--config.teacher.agreement_examples=0",
                     "--config.model.name=mlp_tiny", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert ("takes 32x32x3 images and this run's are 28x28x1: it sees each image replicated "
            "to 3 channels and resized (bilinear) to 32x32") in out
    summary = json.load(open(os.path.join(student, "summary.json")))
    assert summary["steps"] == 2 and 0.0 <= summary["eval/teacher_agreement"] <= 1.0
    # the report sees the teacher as the step did: its agreement is the run's own eval's
    from kdjax import report

    result = report.make_report([student], teacher=run, speed=False, out=str(tmp_path / "r"),
                                log=lambda *a, **k: None)
    (row,) = result["models"]
    assert row["fidelity"]["agreement"] == pytest.approx(summary["eval/teacher_agreement"],
                                                         abs=1 / 150 + 1e-6)


def test_a_teacher_of_other_channels_than_one_is_refused_by_name(data_dir, tmp_path):
    from kdjax import classification, plan

    task = classification.ImageTask(plan.as_plan({"data": {"name": "fashion_mnist",
                                                           "data_dir": data_dir}}))
    spec = models.ModelSpec("resnet8", 10, (32, 32, 3))
    assert task._teacher_input_shape("t", spec) == (32, 32, 3)
    task.spec = dataclasses.replace(task.spec, image_shape=(28, 28, 2))
    with pytest.raises(ValueError, match=r"the teacher in 't' takes 32x32x3 images, "
                                         r"fashion_mnist's are 28x28x2: kdjax replicates "
                                         r"1-channel images"):
        task._teacher_input_shape("t", spec)
