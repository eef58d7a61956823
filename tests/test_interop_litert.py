"""`kdjax export --format litert` (kdjax.interop.litert): float students the LiteRT interpreter
runs as kdjax does.

Each export is compared here with kdjax's own forward of the same student, in the LiteRT
interpreter, at batch 1 and 5 (the batch dimension is dynamic), on uint8 images, within the
float32 tolerance the export states. Skipped without the litert extra (tensorflow-cpu,
ai-edge-litert).
"""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("tensorflow")
pytest.importorskip("ai_edge_litert")

from kdjax import cli, export  # noqa: E402
from kdjax.interop import formats, litert  # noqa: E402
from kdjax.models import ModelSpec  # noqa: E402
from conftest import uint8_images  # noqa: E402



def _interpreter(path):
    """The LiteRT interpreter of the export in directory `path`."""
    with open(os.path.join(path, litert.FILE), "rb") as f:
        return litert.interpreter(f.read())


def _litert_logits(path, images):
    it = _interpreter(path)
    it.allocate_tensors()
    return litert.run(it, images)


def _formats_export(spec, tmp_path, model=None):
    """formats.export of `model` (default: `spec`'s with random weights, its BatchNorm
    statistics moved off their init), checked here against kdjax's forward on other images."""
    from conftest import randomize_batchnorms

    model = model or randomize_batchnorms(spec.build(0))
    model.eval()
    run = {"preprocess": {"mean": [0.3], "std": [0.4]},
           "config": {"data": {"name": "fashion_mnist"}}}
    out = formats.export(model, spec, run, str(tmp_path / "litert"), fmt="litert", layout=None,
                         step=0, source="test")
    meta = json.load(open(os.path.join(out, "kdjax_model.json")))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)((x / 255.0 - 0.3) / 0.4))
    for n in (1, 5):
        images = uint8_images(n)
        got, want = _litert_logits(out, images), np.asarray(forward(state, images))
        assert got.shape == (n, 10) and got.dtype == np.float32
        assert np.abs(got - want).max() <= meta["litert"]["tolerance"], (n, meta["litert"])
    it = _interpreter(out)
    (given,) = it.get_input_details()
    assert given["dtype"] == np.uint8 and list(given["shape_signature"]) == [-1, 28, 28, 1]
    return meta, {op["op_name"] for op in it._get_ops_details()}


def test_a_user_model_with_batchnorm_max_pool_and_residual(tmp_path):
    meta, ops = _formats_export(ModelSpec("_user_models:PoolResNet", 10, (28, 28, 1)), tmp_path)
    # TFLite builtin kernels only: no Flex (TensorFlow) or custom op the plain interpreter lacks
    assert {"CONV_2D", "ADD", "FULLY_CONNECTED"} <= ops
    assert not any(op.startswith(("FLEX", "CUSTOM", "STABLEHLO")) for op in ops), ops
    checked = meta["litert"]
    assert meta["format"] == "kdjax.export.litert/1" and checked["form"] == "float32"
    assert checked["max_abs_diff"] <= checked["tolerance"]
    assert "4 * eps * sqrt(" in checked["tolerance_rule"]
    readme = open(tmp_path / "litert" / "README.md").read()
    assert "uint8 images" in readme and "Interpreter(model_path=" in readme


def test_zoo_mlp(tmp_path):
    meta, ops = _formats_export(ModelSpec("mlp", 10, (28, 28, 1), {"hidden": (16, 8)}),
                                tmp_path)
    assert "FULLY_CONNECTED" in ops and meta["model"]["name"] == "mlp"


def test_a_structured_pruned_run_is_exported_shrunk(tmp_path, pruned_run):
    ours, theirs = str(tmp_path / "litert"), str(tmp_path / "kdjax")
    assert cli.main(["export", "--workdir", pruned_run, "--out", ours, "--format", "litert"]) == 0
    assert cli.main(["export", "--workdir", pruned_run, "--out", theirs]) == 0
    meta = json.load(open(os.path.join(ours, "kdjax_model.json")))
    assert meta["model"]["kwargs"] == {"channels": [4, 8], "dense": 16}  # cnn_tiny: 8, 16, 32
    model, preprocess = export.load(theirs)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(preprocess(x)))
    for n in (1, 5):
        images = uint8_images(n)
        got, want = _litert_logits(ours, images), np.asarray(forward(state, images))
        assert np.abs(got - want).max() <= meta["litert"]["tolerance"]
    it = _interpreter(ours)
    shapes = [list(t["shape"]) for t in it.get_tensor_details()]
    # the shrunk kernels, in TFLite's layouts: conv1 (one input channel) a DEPTHWISE_CONV_2D's
    # [1, H, W, out], conv2 a CONV_2D's [out, H, W, in], fc a FULLY_CONNECTED's [out, in]
    assert [1, 3, 3, 4] in shapes and [8, 3, 3, 4] in shapes and [16, 392] in shapes


def test_a_file_that_disagrees_is_refused_and_nothing_is_written(tmp_path, pruned_run,
                                                                monkeypatch):
    real = litert.convert

    def corrupted(fn, *args, **kwargs):
        # the converted function's logits shifted by 0.5 in one class: a file that disagrees
        return real(lambda x: fn(x) + np.eye(10, dtype=np.float32)[0] * 0.5, *args, **kwargs)

    monkeypatch.setattr(litert, "convert", corrupted)
    with pytest.raises(litert.Mismatch, match=r"LiteRT interpreter's logits differ from kdjax's "
                                              r"by up to 0.5 on 5 images, beyond the tolerance "
                                              r"[0-9.e-]+ \(float32 reassociation over \d+ "
                                              r"summed terms"):
        export.export(pruned_run, str(tmp_path / "bad"), format="litert")
    assert os.listdir(tmp_path) == []


def test_students_litert_cannot_hold_are_refused(tmp_path, pruned_run):
    out = str(tmp_path / "x")
    with pytest.raises(ValueError, match=r"--format litert cannot represent integer weights and "
                                         r"scales; the formats that can: kdjax \(drop --format\) "
                                         r"and, for int8, onnx"):
        export.export(pruned_run, out, format="litert",
                      overrides=["--config.quant.mode=ptq", "--config.quant.activations=none"])
    with pytest.raises(ValueError, match="--format litert has none"):
        export.export(pruned_run, out, format="litert", layout="crd")
    assert os.listdir(tmp_path) == []


def test_missing_extra_names_the_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ai_edge_litert" else real(name, *a))
    with pytest.raises(ValueError, match=r"--format litert needs ai_edge_litert: install kdjax's "
                                         r"litert extra \(pip install 'kdjax\[litert\]'"):
        litert.require()


def test_a_file_the_interpreter_cannot_run_is_refused(tmp_path):
    import jax.numpy as jnp

    # an indexed add, x.at[:, 0].add: the converter keeps the scatter as STABLEHLO_SCATTER,
    # which the interpreter then refuses to prepare (measured with ai-edge-litert 2.3.0)
    def fn(images):
        x = jnp.broadcast_to(images.astype(jnp.float32).mean(axis=(1, 2)),
                             (images.shape[0], 10))
        return x.at[:, 0].add(0.5)

    with pytest.raises(litert.Mismatch, match=r"the LiteRT interpreter cannot run the converted "
                                              r"file \(.*stablehlo.scatter"):
        litert.build_fn(fn, (28, 28, 1))


def test_a_model_the_converter_cannot_convert_is_refused_naming_the_op():
    import jax.numpy as jnp

    # a slice of a flattened batch-polymorphic array: jax2tf writes a dynamic gather, which
    # tensorflow 2.21's converter does not legalise
    def fn(images):
        return images.reshape(images.shape[0], -1)[:, :10].astype(jnp.float32)

    with pytest.raises(ValueError, match=r"--format litert: TensorFlow's converter cannot "
                                         r"convert this model: .*'vhlo.dynamic_gather_v1' op is "
                                         r"not part of the vhlo support yet"):
        litert.build_fn(fn, (28, 28, 1))


def test_report_times_litert_beside_xla(tmp_path, pruned_run, data_dir):
    from kdjax import report

    exported = str(tmp_path / "litert")
    assert cli.main(["export", "--workdir", pruned_run, "--out", exported, "--format",
                     "litert"]) == 0
    result = report.make_report([pruned_run, exported], out=str(tmp_path / "r"),
                                data_dir=data_dir, runtime="litert",
                                speed_settings={"latency_calls": 3, "throughput_windows": 2,
                                                "warmup_s": 0.0, "window_s": 0.01})
    row, file_row = result["models"]
    # the .tflite evaluated in the LiteRT interpreter: the run's accuracy (a near-tie may move
    # one of the 150 examples), timed alone (its XLA peer is the run)
    assert file_row["kind"] == "litert" and file_row["size"]["flops_per_example"] is None
    assert file_row["metrics"]["accuracy"] == pytest.approx(row["metrics"]["accuracy"],
                                                            abs=1 / 150)
    assert [b["speedup"] for b in file_row["runtime"]["batches"]] == [None] * 4
    assert file_row["runtime"]["graph"]["form"] == "float32"
    r = row["runtime"]
    assert "skipped" not in r, r
    assert r["runtime"] == "litert" and r["version"] == "2.3.0"
    assert r["graph"]["form"] == "float32" and r["graph"]["max_abs_diff"] <= r["graph"][
        "tolerance"]
    assert [b["batch"] for b in r["batches"]] == [1, 8, 64, 256]
    for b in r["batches"]:
        assert b["runtime_ms"]["median"] > 0
        assert b["speedup"] == pytest.approx(b["xla_ms"]["median"] / b["runtime_ms"]["median"])
    assert r["slower_than_xla"] == [b["batch"] for b in r["batches"] if b["speedup"] < 1]
    md = open(tmp_path / "r" / "report.md").read()
    section = md.split("## Speed in litert beside XLA")[1]
    for m in (row, file_row):
        assert len([line for line in section.splitlines()
                    if line.startswith(f"| {m['name']} | ")]) == 4
    assert "`kdjax export --format litert`'s" in section
