"""`kdjax export --format onnx` (kdjax.interop.onnx) and `kdjax report --runtime onnxruntime`
(kdjax.report.runtime): every kind of student ONNX Runtime runs as kdjax does.

Each export is compared here with kdjax's own forward of the same student, in ONNX Runtime, at
batch 1 and 5 (the batch dimension is dynamic), on uint8 images, within the tolerance the export
states (float32 reassociation over the graph's reductions, tests/_float32.py's rule). A W8A8
student is checked on its calibration images, within its own activation quantization error
(kdjax.interop.onnx._build_w8a8), and its file holds its integers in the QDQ form ONNX Runtime
fuses into integer kernels (kdjax.interop.onnx_qdq).
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
    assert "Add" not in ops  # each bias inside its Gemm (kdjax.interop.onnx._gemm_biases)


def test_a_structured_pruned_student_is_exported_shrunk(tmp_path, pruned_run):
    meta, _ = _assert_runs_as_kdjax(*_export_both(pruned_run, tmp_path))
    assert meta["model"]["kwargs"] == {"channels": [4, 8], "dense": 16}  # cnn_tiny: 8, 16, 32
    shapes = {i.name: list(i.dims) for i in onnx.load(tmp_path / "onnx" / "model.onnx")
              .graph.initializer}
    assert [3, 3, 1, 4] in shapes.values() and [3, 3, 4, 8] in shapes.values()


def test_a_weight_only_int8_student_keeps_its_integers(tmp_path, pruned_run, data_dir):
    _, ops = _assert_runs_as_kdjax(*_export_both(
        pruned_run, tmp_path, "--config.quant.mode=ptq", "--config.quant.weights=int8",
        "--config.quant.activations=none", f"--config.data.data_dir={data_dir}"))
    graph = onnx.load(tmp_path / "onnx" / "model.onnx").graph
    int8 = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8) == 4  # conv1, conv2, fc, out: every kernel stored as integers
    assert not any(i.data_type == onnx.TensorProto.FLOAT and len(i.dims) >= 2 and
                   np.prod(i.dims) >= 36 for i in graph.initializer)  # no float kernel left
    assert "DequantizeLinear" in ops and "QuantizeLinear" not in ops  # float activations


W8A8 = ("--config.quant.mode=ptq", "--config.quant.calibration_examples=32")


def _w8a8_export(pruned_run, tmp_path, data_dir):
    ours, theirs = _export_both(pruned_run, tmp_path, *W8A8, f"--config.data.data_dir={data_dir}")
    checked = json.load(open(os.path.join(ours, "kdjax_model.json")))["onnx"]
    return ours, theirs, checked


def _calibration_images(workdir, data_dir):
    """The images the export calibrated and checked the file on: the run's training images drawn
    with its seed (kdjax.compress.encode.training_images, tested in test_compress_training)."""
    from kdjax import plan as plan_lib
    from kdjax.compress import encode

    saved = json.load(open(os.path.join(workdir, "config.json")))
    plan = plan_lib.as_plan(saved, [f"--config.data.data_dir={data_dir}"])
    return encode.training_images(plan.data, 32, seed=plan.seed)


def test_a_w8a8_student_runs_as_kdjax_on_integer_kernels(tmp_path, pruned_run, data_dir):
    ours, theirs, checked = _w8a8_export(pruned_run, tmp_path, data_dir)
    # on the images it was checked on, and on one of them (the batch is dynamic)
    images = _calibration_images(pruned_run, data_dir)
    for batch in (images, images[:1]):
        got, want = _ort_logits(ours, batch), _kdjax_logits(theirs, batch)
        assert np.abs(got - want).max() <= checked["tolerance"]
    assert checked["checked_batches"] == [32, 1] and checked["max_abs_diff"] <= (
        checked["tolerance"])
    assert checked["tolerance_rule"].startswith("twice the student's own activation quantization")
    # QDQ: quantized inputs and int8 weights through DequantizeLinear around float operators,
    # which ONNX Runtime's graph optimizer fuses into its integer kernels: no float Conv left
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), options,
                         providers=["CPUExecutionProvider"])
    fused = {n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node}
    assert {"QLinearConv", "QGemm"} <= fused and not {"Conv", "ConvInteger"} & fused


def test_a_w8a8_file_holds_the_students_integers(tmp_path, pruned_run, data_dir):
    ours, theirs, _ = _w8a8_export(pruned_run, tmp_path, data_dir)
    model, _ = export.load(theirs)
    integers = {"/".join(map(str, k[:-3])): np.asarray(v.get_value(), np.int32)
                for k, v in nnx.to_flat_state(nnx.state(model)) if k[-1] == "qvalue"}
    stored = [onnx.numpy_helper.to_array(i).astype(np.int32)
              for i in onnx.load(os.path.join(ours, "model.onnx")).graph.initializer
              if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]
    assert len(integers) == len(stored) == 4  # conv1, conv2, fc, out
    for name, q in integers.items():
        # kdjax: HWIO / [in, out]; the file: OIHW / [in, out]; per output channel, the file's
        # integers are the student's times the sign of its folded BatchNorm's factor
        rows = q.transpose(3, 2, 0, 1) if q.ndim == 4 else q.T
        rows = rows.reshape(len(rows), -1)
        match = [f for f in stored if f.shape == (q.transpose(3, 2, 0, 1).shape if q.ndim == 4
                                                  else q.shape)]
        assert any(all(np.array_equal(a, b) or np.array_equal(a, -b) for a, b in zip(
            (f.reshape(len(f), -1) if f.ndim == 4 else f.T), rows)) for f in match), name
    assert any((q == -128).any() for q in integers.values())  # Qwix's range, kept
    # built without the images it is calibrated and checked on: refused, naming them
    meta = json.load(open(os.path.join(theirs, "kdjax_model.json")))
    with pytest.raises(ValueError, match=r"a W8A8 student's ONNX file is calibrated and checked "
                                         r"on the images its activation scales came from: pass "
                                         r"images \(uint8 training images"):
        kdjax_onnx.build(model, ModelSpec.from_json(meta["model"]), meta["preprocess"])


def test_a_w8a8_layer_called_twice_is_refused_naming_it():
    from kdjax import plan as plan_lib
    from kdjax.compress import quantize
    from kdjax.interop import onnx_qdq

    spec = ModelSpec("_user_models:SharedLayer", 10, (28, 28, 1))
    images = uint8_images(16).astype(np.float32) / 255
    quant = plan_lib.as_plan({"quant": {"mode": "ptq"}}).quant
    model = quantize.calibrated(spec.build(0), quant, images, batch_size=16)
    with pytest.raises(ValueError, match=r"--format onnx: the int8 layer 'mix' has 2 static "
                                         r"activation scales \(one per call of its kernel\); the "
                                         r"QDQ form holds one per layer"):
        onnx_qdq.float_twin(model, spec)


def test_a_w8a8_file_that_disagrees_is_refused(tmp_path, pruned_run, data_dir, monkeypatch):
    from kdjax.interop import onnx_qdq

    real_quantize = onnx_qdq.quantize

    def classifier_negated(*args):  # the last layer's integers negated: other logits
        proto = real_quantize(*args)
        last = [n for n in proto.graph.node if n.op_type == "Gemm"][-1]
        dq = next(n for n in proto.graph.node if last.input[1] in n.output)
        init = next(i for i in proto.graph.initializer if i.name == dq.input[0])
        q = onnx.numpy_helper.to_array(init).astype(np.int32)
        init.CopyFrom(onnx.numpy_helper.from_array(np.clip(-q, -128, 127).astype(np.int8),
                                                   init.name))
        return proto

    monkeypatch.setattr(onnx_qdq, "quantize", classifier_negated)
    with pytest.raises(kdjax_onnx.Mismatch, match=r"ONNX Runtime's logits differ from kdjax's by "
                                                  r"up to [0-9.e-]+ on 32 images, beyond the "
                                                  r"tolerance [0-9.e-]+ \(twice the student's "
                                                  r"own activation quantization error"):
        export.export(pruned_run, str(tmp_path / "bad"), format="onnx",
                      overrides=[*W8A8, f"--config.data.data_dir={data_dir}"])
    monkeypatch.undo()
    real = onnx_qdq._overrides

    def off_by_one_step(graph, layers, pinned):  # every weight scale 5 % off
        out = real(graph, layers, pinned)
        for channels in out.values():
            for c in channels:
                if "axis" in c:
                    c["scale"] = c["scale"] * np.float32(1.05)
        return out

    monkeypatch.setattr(onnx_qdq, "_overrides", off_by_one_step)
    with pytest.raises(ValueError, match=r"--format onnx: ONNX Runtime's quantizer did not store "
                                         r"the student's integers for conv1/conv/kernel, "):
        export.export(pruned_run, str(tmp_path / "bad"), format="onnx",
                      overrides=[*W8A8, f"--config.data.data_dir={data_dir}"])
    assert os.listdir(tmp_path) == []


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


def test_report_times_a_w8a8_student_in_its_integer_form(tmp_path, pruned_run, data_dir):
    from kdjax import report

    exported = str(tmp_path / "int8")
    assert cli.main(["export", "--workdir", pruned_run, "--out", exported, *W8A8,
                     f"--config.data.data_dir={data_dir}"]) == 0
    result = report.make_report([exported], data_dir=data_dir, runtime="onnxruntime",
                                speed_settings={"latency_calls": 3, "throughput_windows": 2,
                                                "warmup_s": 0.0, "window_s": 0.01})
    (row,) = result["models"]
    # converted as `kdjax export --format onnx` converts it (calibrated on the training split's
    # images: the report loads them only for a W8A8 student), checked, then timed
    assert "skipped" not in row["runtime"], row["runtime"]["skipped"]
    graph = row["runtime"]["graph"]
    assert "skipped" not in row["runtime"] and graph["form"].startswith("int8 weights and "
                                                                         "activations in QDQ")
    assert graph["max_abs_diff"] <= graph["tolerance"]
    assert [b["batch"] for b in row["runtime"]["batches"]] == [1, 8, 64, 256]


def test_a_language_model_runs_on_tokens():
    spec = ModelSpec("lm_tiny", 64, (16,), {"d_model": 16, "d_ff": 32})
    model = spec.build(0)
    model.eval()
    graphdef, state = nnx.split(model)

    def forward(tokens):
        return nnx.merge(graphdef, state)(tokens)

    model_bytes, checked = kdjax_onnx.build_fn(forward, spec.input_shape, spec.name,
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
