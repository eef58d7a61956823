"""A user's NNX residual model pruned by coupled channel groups through the CLI: its checkpoints
and exports record the shrunk shapes (ModelSpec.shrunk), `kdjax eval` rebuilds it, and
`kdjax export --format onnx` writes it shrunk with ONNX Runtime's logits equal to kdjax's."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from _user_models import PoolResNet
from flax import nnx

from kdjax import checkpoint, cli, export, models
from kdjax.compress import structured
from kdjax.models import ModelSpec

pytest.importorskip("onnxruntime")
pytest.importorskip("jax2onnx")
import onnx  # noqa: E402  (after the skip: installed with onnxruntime's extra)

from kdjax.interop import onnx as kdjax_onnx  # noqa: E402

pytestmark = pytest.mark.usefixtures("quick_compiles")
EXP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                   "fashion_mnist")
RUN = ["--config.train.steps=4", "--config.train.batch_size=32", "--config.eval.every_steps=4",
       "--config.train.log_every_steps=4", "--config.checkpoint.every_steps=4",
       "--config.eval.batch_size=50", "--no-progress", "--config.model.name=_user_models:PoolResNet",
       "--config.model.kwargs={}"]
STRUCTURED = ["--config.prune.method=structured", "--config.prune.criterion=group_l2"]


def _spec(workdir: str) -> ModelSpec:
    reader = checkpoint.RunReader(workdir, what="the test's run")
    try:
        return reader.model_spec(reader.resolve_step("latest"))
    finally:
        reader.close()


def _onnx_export(workdir: str, out: str) -> tuple[dict, dict]:
    """`kdjax export --format onnx` (which checks ONNX Runtime against kdjax before writing):
    (its kdjax_model.json, the shapes of the ONNX file's initializers)."""
    assert cli.main(["export", "--workdir", workdir, "--out", out, "--format", "onnx"]) == 0
    shapes = {i.name: list(i.dims) for i in onnx.load(os.path.join(out, "model.onnx"))
              .graph.initializer}
    return json.load(open(os.path.join(out, "kdjax_model.json"))), shapes


def _onnx_matches_kdjax(workdir: str, tmp_path) -> tuple[dict, dict]:
    """Both exports of `workdir`: ONNX Runtime's logits against kdjax's own export's forward, at
    batch 1 and 5, within the tolerance the ONNX export states. Returns (the kdjax export's
    spec json, the ONNX initializers' shapes)."""
    ours, theirs = str(tmp_path / "onnx"), str(tmp_path / "kdjax")
    meta, shapes = _onnx_export(workdir, ours)
    assert cli.main(["export", "--workdir", workdir, "--out", theirs]) == 0
    checked = meta["onnx"]
    session = kdjax_onnx.session(open(os.path.join(ours, "model.onnx"), "rb").read())
    model, preprocess = export.load(theirs)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(preprocess(x)))
    for n in (1, 5):
        images = np.random.default_rng(n).integers(0, 256, (n, 28, 28, 1), np.uint8)
        got, want = session.run(None, {"images": images})[0], np.asarray(forward(state, images))
        assert got.shape == (n, 10)
        assert np.abs(got - want).max() <= checked["tolerance"], (n, checked)
    return json.load(open(os.path.join(theirs, export.META_FILE)))["model"], shapes


def test_a_user_residual_model_is_pruned_distilled_evaluated_and_exported_shrunk(
        data_dir, tmp_path, capsys):
    data = [f"--config.data.data_dir={data_dir}"]
    # PoolResNet (width 8): the stem and the residual branch's convolution are one group.
    teacher = str(tmp_path / "teacher")
    assert cli.main(["train", "--config", f"{EXP}/teacher.py", "--workdir", teacher, *RUN, *data,
                     *STRUCTURED, "--config.prune.schedule=one_shot",
                     "--config.prune.begin_step=0", "--config.prune.sparsity=0.5"]) == 0
    # Trained with the masks: the checkpoint holds the full model, the export the shrunk one.
    assert _spec(teacher).shrunk == {}
    meta, shapes = _onnx_export(teacher, str(tmp_path / "teacher_onnx"))
    assert meta["model"]["shrunk"]["conv/kernel"] == [3, 3, 4, 4]
    assert meta["model"]["shrunk"]["head/kernel"] == [4, 10]
    assert meta["onnx"]["max_abs_diff"] <= meta["onnx"]["tolerance"]
    assert [3, 3, 4, 4] in shapes.values() and [3, 3, 8, 8] not in shapes.values()

    # Distilled from it, starting from its weights pruned further (to 2 of the residual 8
    # channels) and shrunk before the first step: the checkpoints hold the shrunk model.
    student = str(tmp_path / "student")
    assert cli.main(["distill", "--config", f"{EXP}/kd.py", "--workdir", student, *RUN, *data,
                     f"--config.teacher.workdir={teacher}", f"--config.init.workdir={teacher}",
                     *STRUCTURED, "--config.prune.schedule=init",
                     "--config.prune.sparsity=0.75"]) == 0
    spec = _spec(student)
    assert spec.shrunk["stem/kernel"] == [3, 3, 1, 2] and spec.shrunk["conv/kernel"] == [3, 3, 2, 2]
    small = spec.abstract()
    assert (small.conv.in_features, small.bn2.num_features, small.head.in_features) == (2, 2, 2)
    full = dataclasses.replace(spec, shrunk={}).abstract()
    assert models.count_params(small) < 0.2 * models.count_params(full)

    assert cli.main(["eval", "--workdir", student]) == 0
    with open(os.path.join(student, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(student, "eval.json")) as f:
        assert json.load(f)["eval/accuracy"] == pytest.approx(summary["eval/accuracy"])

    # Resumed from its step-4 checkpoint (the shrunk student rebuilt from init.workdir again).
    capsys.readouterr()
    assert cli.main(["distill", "--config", f"{EXP}/kd.py", "--workdir", student, *RUN, *data,
                     f"--config.teacher.workdir={teacher}", f"--config.init.workdir={teacher}",
                     *STRUCTURED, "--config.prune.schedule=init", "--config.prune.sparsity=0.75",
                     "--config.train.steps=8"]) == 0
    assert "kdjax: resumed from" in capsys.readouterr().out
    reader = checkpoint.RunReader(student, what="the test's run")
    try:
        assert list(reader.manager.all_steps()) == [4, 8] and reader.model_spec(8) == spec
    finally:
        reader.close()

    spec_json, shapes = _onnx_matches_kdjax(student, tmp_path)
    assert spec_json["shrunk"] == {k: list(v) for k, v in spec.shrunk.items()}
    assert [3, 3, 2, 2] in shapes.values() and [3, 3, 4, 4] not in shapes.values()

    # int8 (W8A8) on export, in ONNX Runtime's integer form: shrunk, its integers, checked
    int8 = str(tmp_path / "int8_onnx")
    assert cli.main(["export", "--workdir", student, "--out", int8, "--format", "onnx",
                     "--config.quant.mode=ptq", "--config.quant.calibration_examples=32",
                     *data]) == 0
    checked = json.load(open(os.path.join(int8, "kdjax_model.json")))["onnx"]
    assert checked["form"].startswith("int8 weights and activations in QDQ form")
    assert checked["max_abs_diff"] <= checked["tolerance"]
    kernels = [list(i.dims) for i in onnx.load(os.path.join(int8, "model.onnx")).graph.initializer
               if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]
    assert sorted(kernels) == [[2, 1, 3, 3], [2, 2, 3, 3], [2, 10]]  # OIHW; the head [in, out]


def test_a_spec_whose_model_changed_since_pruning_is_refused():
    spec = ModelSpec("_user_models:PoolResNet", 10, (8, 8, 3), {"width": 8}, "float32",
                     shrunk={"conv/kernel": [3, 3, 4, 4], "gone/kernel": [4, 10]})
    with pytest.raises(ValueError, match=r"ModelSpec.shrunk of '_user_models:PoolResNet' records "
                                         r"a shrunk 'gone/kernel', which the model built from "
                                         r"the spec does not have"):
        spec.abstract()
    wider = dataclasses.replace(spec, shrunk={"conv/kernel": [3, 3, 4, 16]})
    with pytest.raises(ValueError, match=r"records 'conv/kernel' as \[3, 3, 4, 16\], and the "
                                         r"model built from the spec has it \[3, 3, 8, 8\]: "
                                         r"shrinking only narrows a variable"):
        wider.abstract()


def test_a_model_its_spec_does_not_build_is_not_recorded():
    model = PoolResNet(3, 10, width=8, rngs=nnx.Rngs(0))
    spec = ModelSpec("_user_models:TinyNet", 10, (8, 8, 3), {}, "float32")
    with pytest.raises(ValueError, match=r"structured pruning cannot record the shrunk PoolResNet "
                                         r"in its ModelSpec \(_user_models:TinyNet with kwargs "
                                         r"\{\}\): that spec builds a model with other variables"):
        structured.shrink(model, spec)
