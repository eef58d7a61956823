"""`kdjax export --format onnx` (kdjax.interop.onnx) and `kdjax report --runtime onnxruntime`
(kdjax.report.runtime): every kind of student ONNX Runtime runs as kdjax does.

Each export is compared here with kdjax's own forward of the same student, in ONNX Runtime, at
batch 1 and 5 (the batch dimension is dynamic), on uint8 images, within the tolerance the export
states (float32 reassociation over the graph's reductions, tests/_float32.py's rule; W8A8 adds
its activation-tie allowance, kdjax.interop.onnx.quantization_slack).
"""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("onnxruntime")
pytest.importorskip("jax2onnx")
import onnx  # noqa: E402  (after the skip: installed with onnxruntime's extra)

from kdjax import cli, export  # noqa: E402
from kdjax.interop import formats, onnx as kdjax_onnx  # noqa: E402
from kdjax.models import ModelSpec  # noqa: E402
from conftest import ROOT, uint8_images  # noqa: E402



def _kdjax_logits(path, images):
    """kdjax's own forward of the student an ONNX export holds: the same run exported in kdjax's
    format (with the same overrides) and loaded with kdjax.export.load."""
    model, preprocess = export.load(path)
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(preprocess(x)))(state, images))


def _ort_logits(path, images):
    return kdjax_onnx.session(open(os.path.join(path, "model.onnx"), "rb").read()).run(
        None, {"images": images})[0]


def _export_both(workdir, tmp_path, *extra):
    ours, theirs = str(tmp_path / "onnx"), str(tmp_path / "kdjax")
    assert cli.main(["export", "--workdir", workdir, "--out", ours, "--format", "onnx",
                     *extra]) == 0
    assert cli.main(["export", "--workdir", workdir, "--out", theirs, *extra]) == 0
    return ours, theirs


def _assert_runs_as_kdjax(ours, theirs):
    meta = json.load(open(os.path.join(ours, "kdjax_model.json")))
    checked = meta["onnx"]
    assert meta["format"] == "kdjax.export.onnx/1" and checked["opset"] == 21
    graph = onnx.load(os.path.join(ours, "model.onnx")).graph
    (given,) = graph.input
    assert given.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = given.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [28, 28, 1]
    for n in (1, 5):  # the dynamic batch: the check ran 5 and 1; here other images
        images = uint8_images(n)
        got, want = _ort_logits(ours, images), _kdjax_logits(theirs, images)
        assert got.shape == (n, 10) and got.dtype == np.float32
        assert np.abs(got - want).max() <= checked["tolerance"], (n, checked)
    assert checked["max_abs_diff"] <= checked["tolerance"]
    return meta, {node.op_type for node in graph.node}


def _formats_export(spec, tmp_path, model=None):
    """formats.export of `model` (default: `spec`'s with random weights, its BatchNorm
    statistics moved off their init), as `kdjax export --format onnx` writes a float student."""
    from conftest import randomize_batchnorms

    model = model or randomize_batchnorms(spec.build(0))
    model.eval()
    run = {"preprocess": {"mean": [0.3], "std": [0.4]},
           "config": {"data": {"name": "fashion_mnist"}}}
    out = formats.export(model, spec, run, str(tmp_path / "onnx"), fmt="onnx", layout=None,
                         step=0, source="test")
    meta = json.load(open(os.path.join(out, "kdjax_model.json")))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)((x / 255.0 - 0.3) / 0.4))
    for n in (1, 5):
        images = uint8_images(n)
        got, want = _ort_logits(out, images), np.asarray(forward(state, images))
        assert got.shape == (n, 10)
        assert np.abs(got - want).max() <= meta["onnx"]["tolerance"]
    graph = onnx.load(os.path.join(out, "model.onnx")).graph
    return meta, {node.op_type for node in graph.node}


def test_a_user_model_with_batchnorm_max_pool_and_residual(tmp_path):
    # model.name="pkg.mod:Class": a user's NNX module, BatchNorm switched by eval()
    meta, ops = _formats_export(ModelSpec("_user_models:PoolResNet", 10, (28, 28, 1)), tmp_path)
    # the padded 3x3/2 max-pool is one MaxPool (not jax2onnx's 4-axis pooling ORT refuses)
    assert {"Conv", "MaxPool", "Add", "Gemm"} <= ops
    assert meta["onnx"]["form"] == "float32"
    # float32: 4 eps sqrt(n) max|logit| with n the graph's summed terms, stated in the file
    assert "4 * eps * sqrt(" in meta["onnx"]["tolerance_rule"]
    readme = open(tmp_path / "onnx" / "README.md").read()
    assert "opset 21" in readme and "uint8 images" in readme and "InferenceSession" in readme


def test_a_pytorch_defined_student(tmp_path):
    pytest.importorskip("torchax")
    from kdjax.torchbridge import TorchModel

    # GroupNorm, GELU, a depthwise convolution, BatchNorm and a residual, run by torchax
    model = TorchModel("_torch_nets:Net", {"width": 4}, num_classes=10, rngs=nnx.Rngs(0))
    meta, ops = _formats_export(ModelSpec("_torch_nets:Net", 10, (28, 28, 1)), tmp_path, model)
    assert "Conv" in ops and meta["onnx"]["form"] == "float32"


def test_zoo_mlp(tmp_path):
    meta, ops = _formats_export(ModelSpec("mlp", 10, (28, 28, 1), {"hidden": (16, 8)}),
                                tmp_path)
    assert "Gemm" in ops and meta["model"]["name"] == "mlp"


def test_a_structured_pruned_student_is_exported_shrunk(tmp_path, pruned_run):
    meta, _ = _assert_runs_as_kdjax(*_export_both(pruned_run, tmp_path))
    assert meta["model"]["kwargs"] == {"channels": [4, 8], "dense": 16}  # cnn_tiny: 8, 16, 32
    shapes = {i.name: list(i.dims) for i in onnx.load(tmp_path / "onnx" / "model.onnx")
              .graph.initializer}
    assert [3, 3, 1, 4] in shapes.values() and [3, 3, 4, 8] in shapes.values()


@pytest.mark.parametrize("activations", ["none", "int8"])
def test_int8_students_keep_their_integers(tmp_path, pruned_run, data_dir, activations):
    _, ops = _assert_runs_as_kdjax(*_export_both(
        pruned_run, tmp_path, "--config.quant.mode=ptq", "--config.quant.weights=int8",
        f"--config.quant.activations={activations}", "--config.quant.calibration_examples=32",
        f"--config.data.data_dir={data_dir}"))
    graph = onnx.load(tmp_path / "onnx" / "model.onnx").graph
    int8 = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8) == 4  # conv1, conv2, fc, out: every kernel stored as integers
    assert not any(i.data_type == onnx.TensorProto.FLOAT and len(i.dims) >= 2 and
                   np.prod(i.dims) >= 36 for i in graph.initializer)  # no float kernel left
    if activations == "none":  # QDQ weights: DequantizeLinear per output channel
        assert "DequantizeLinear" in ops and "ConvInteger" not in ops
    else:  # W8A8: ONNX Runtime's integer kernels
        assert {"ConvInteger", "MatMulInteger"} <= ops and "Conv" not in ops


def test_a_file_that_disagrees_is_refused_and_nothing_is_written(tmp_path, pruned_run,
                                                                monkeypatch):
    real = kdjax_onnx.convert

    def corrupted(*args, **kwargs):
        proto, terms = real(*args, **kwargs)
        gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")
        init = next(i for i in proto.graph.initializer if i.name == gemm.input[1])
        w = onnx.numpy_helper.to_array(init).copy()
        w[0, 0] += 0.5  # one weight of the classifier off
        init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
        return proto, terms

    monkeypatch.setattr(kdjax_onnx, "convert", corrupted)
    out = tmp_path / "bad"
    with pytest.raises(kdjax_onnx.Mismatch, match=r"ONNX Runtime's logits differ from kdjax's by "
                                                  r"up to [0-9.e-]+ on 5 images, beyond the "
                                                  r"tolerance [0-9.e-]+ \(float32 "
                                                  r"reassociation over \d+ summed terms"):
        export.export(pruned_run, str(out), format="onnx")
    assert os.listdir(tmp_path) == []


def test_formats_that_cannot_hold_the_student_are_refused(tmp_path, pruned_run):
    out = str(tmp_path / "x")
    with pytest.raises(ValueError, match=r"--format onnx cannot represent this student: "
                                         r"quant.weights='int4' \(int4 weights packed two per "
                                         r"byte\) is stored by kdjax's own export format only; "
                                         r"the formats that can: kdjax"):
        export.export(pruned_run, out, format="onnx",
                      overrides=["--config.quant.mode=ptq", "--config.quant.weights=int4",
                                 "--config.quant.activations=none"])
    with pytest.raises(ValueError, match=r"--format safetensors cannot represent integer "
                                         r"weights and scales; the formats that can: kdjax "
                                         r"\(drop --format\) and, for int8, onnx"):
        export.export(pruned_run, out, format="safetensors",
                      overrides=["--config.quant.mode=ptq", "--config.quant.activations=none"])
    with pytest.raises(ValueError, match=r"--format must be kdjax or one of \('safetensors', "
                                         r"'torch', 'stablehlo', 'onnx', 'litert'\), got 'tflite'"):
        export.export(pruned_run, out, format="tflite")
    with pytest.raises(ValueError, match="--format onnx has none"):
        export.export(pruned_run, out, format="onnx", layout="crd")
    assert os.listdir(tmp_path) == []


def test_report_times_onnxruntime_beside_xla(tmp_path, pruned_run, data_dir):
    from kdjax import report
    from kdjax.report import runtime

    exported = str(tmp_path / "onnx")
    assert cli.main(["export", "--workdir", pruned_run, "--out", exported, "--format",
                     "onnx"]) == 0
    result = report.make_report([pruned_run, exported], out=str(tmp_path / "r"),
                                data_dir=data_dir, runtime="onnxruntime",
                                speed_settings={"latency_calls": 3, "throughput_windows": 2,
                                                "warmup_s": 0.0, "window_s": 0.01})
    run_row, onnx_row = result["models"]
    # the ONNX file evaluated in ONNX Runtime: the run's accuracy (a near-tie may move one of
    # the 150 examples), timed alone (its XLA peer is the run)
    assert onnx_row["kind"] == "onnx" and onnx_row["size"]["flops_per_example"] is None
    assert onnx_row["metrics"]["accuracy"] == pytest.approx(run_row["metrics"]["accuracy"],
                                                            abs=1 / 150)
    assert [b["speedup"] for b in onnx_row["runtime"]["batches"]] == [None] * 4
    r = run_row["runtime"]
    assert r["runtime"] == "onnxruntime" and [b["batch"] for b in r["batches"]] == [1, 8, 64, 256]
    for b in r["batches"]:
        assert b["speedup"] == pytest.approx(b["xla_ms"]["median"] / b["runtime_ms"]["median"])
    assert r["slower_than_xla"] == [b["batch"] for b in r["batches"] if b["speedup"] < 1]
    md = open(tmp_path / "r" / "report.md").read()
    assert "## Speed in onnxruntime beside XLA" in md
    section = md.split("## Speed in onnxruntime beside XLA")[1].split("\n\n")[1]
    for m in (run_row, onnx_row):
        assert len([row for row in section.splitlines()
                    if row.startswith(f"| {m['name']} | ")]) == 4
    assert ("slower than XLA" in md) == bool(r["slower_than_xla"])
    with pytest.raises(ValueError, match=r"--runtime must be one of \('onnxruntime', "
                                         r"'litert'\), got 'tensorrt'"):
        runtime.check("tensorrt")


def test_a_language_model_runs_on_tokens():
    spec = ModelSpec("lm_tiny", 64, (16,), {"d_model": 16, "d_ff": 32})
    model = spec.build(0)
    model.eval()
    graphdef, state = nnx.split(model)

    def forward(tokens):
        return nnx.merge(graphdef, state)(tokens)

    model_bytes, checked = kdjax_onnx.build_fn(forward, spec.input_shape, spec.name, state,
                                               inputs=kdjax_onnx.tokens(64))
    assert checked["input"] == "tokens" and checked["max_abs_diff"] <= checked["tolerance"]
    tokens = np.random.default_rng(2).integers(0, 64, (3, 16)).astype(np.int32)
    got = kdjax_onnx.session(model_bytes).run(None, {"tokens": tokens})[0]
    assert got.shape == (3, 16, 64)
    assert np.abs(got - np.asarray(jax.jit(forward)(tokens))).max() <= checked["tolerance"]


def test_a_language_model_run_exports_with_its_tokenizer(text_dir, tmp_path):
    run, out = str(tmp_path / "lm"), str(tmp_path / "lm_onnx")
    assert cli.main(["train", "--config", f"{ROOT}/experiments/lm/teacher.py", "--workdir", run,
                     f"--config.data.data_dir={text_dir}", "--config.data.name=tiny",
                     "--config.model.name=lm_tiny", "--config.train.steps=2",
                     "--config.train.batch_size=4", "--config.eval.every_steps=2",
                     "--config.checkpoint.every_steps=2", "--config.eval.batch_size=8",
                     "--config.lm.eval_rows=8", "--config.lm.prompts=()", "--no-progress"]) == 0
    assert cli.main(["export", "--workdir", run, "--out", out, "--format", "onnx"]) == 0
    assert sorted(os.listdir(out)) == ["README.md", "kdjax_model.json", "kdjax_tokenizer.json",
                                       "model.onnx"]
    theirs = str(tmp_path / "lm_kdjax")
    assert cli.main(["export", "--workdir", run, "--out", theirs]) == 0
    model, _ = export.load(theirs)
    meta = json.load(open(os.path.join(out, "kdjax_model.json")))
    vocab = meta["model"]["num_classes"]
    tokens = np.random.default_rng(3).integers(0, vocab, (2, 16)).astype(np.int32)
    got = kdjax_onnx.session(open(os.path.join(out, "model.onnx"), "rb").read()).run(
        None, {"tokens": tokens})[0]
    assert got.shape == (2, 16, vocab)  # the byte tokenizer's 256 + 3 special tokens
    assert vocab == 259
    assert np.abs(got - np.asarray(model(tokens))).max() <= meta["onnx"]["tolerance"]
