"""Compression in real runs (kdjax.compress.training, kdjax.export): masks through checkpoints and
resume, the pruned and quantized exports, the prune-the-teacher recipe."""

import contextlib
import io
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import EXP
from kdjax import checkpoint, cli, data, export, plan
from kdjax.compress import encode

pytestmark = pytest.mark.usefixtures("quick_compiles")

RUN = ["--config.train.steps=30", "--config.train.batch_size=32", "--config.eval.every_steps=30",
       "--config.train.log_every_steps=10", "--config.checkpoint.every_steps=10",
       "--config.checkpoint.max_to_keep=5", "--config.eval.batch_size=150", "--no-progress"]
PRUNE = ["--config.model.name=mlp", "--config.model.kwargs={'hidden': (32, 32)}",
         "--config.prune.method=magnitude", "--config.prune.sparsity=0.75",
         "--config.prune.schedule=cubic", "--config.prune.begin_step=4",
         "--config.prune.end_step=24", "--config.prune.every_steps=4"]


def _kdjax(*args):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert cli.main(list(args)) == 0
    return out.getvalue()


def _train(workdir, data_dir, *extra):
    return _kdjax("train", "--config", f"{EXP}/teacher.py", "--workdir", str(workdir),
                  f"--config.data.data_dir={data_dir}", *RUN, *extra)


def _final_items(workdir, step=30):
    reader = checkpoint.RunReader(str(workdir))
    items = reader.manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(), train=ocp.args.StandardRestore()))
    reader.close()
    return {k: items[k] for k in ("model", "train")}


@pytest.fixture(scope="module")
def pruned(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("compress") / "pruned"
    out = _train(workdir, data_dir, *PRUNE)
    assert ("kdjax: pruning 1 layer(s) (magnitude, per_layer, cubic to 0.75): hidden/1/kernel"
            in out)
    return str(workdir)


def test_resume_with_masks_is_bit_identical(pruned, data_dir, tmp_path):
    # Resume at step 10: the masks change at 12, 16, 20 and 24 after it.
    work = str(tmp_path / "resumed")
    shutil.copytree(pruned, work)
    for step in (20, 30):
        shutil.rmtree(os.path.join(work, "checkpoints", str(step)))
    os.remove(os.path.join(work, "summary.json"))
    out = _train(work, data_dir, *PRUNE)
    assert f"resumed from {work}/checkpoints/10 at step 10 of 30" in out
    a, b = _final_items(pruned), _final_items(work)
    masks = b["train"]["opt_state"]["masks"]
    assert len(masks) == 1 and np.asarray(masks[0]).mean() == 0.25  # the masks are saved
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):  # parameters, masks, optimizer state, PRNG, data order
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sparse_export_stores_the_nonzeros_and_loads_the_same_model(pruned, tmp_path):
    out = _kdjax("export", "--workdir", pruned, "--out", str(tmp_path / "exp"))
    assert "hidden/1/kernel" in out and "75.0%" in out and "bitmap" in out
    with open(tmp_path / "exp" / "kdjax_model.json") as f:
        record = json.load(f)["compression"]
    layer = record["layers"]["hidden/1/kernel"]
    assert layer["nonzeros"] == 256 and layer["sparsity"] == 0.75
    assert layer["bytes"] == 1024 // 8 + 256 * 4  # a bitmap + the values: smaller than indices
    model, preprocess = export.load(str(tmp_path / "exp"))
    trained = checkpoint.RunReader(pruned)
    reference = trained.load_model(30, trained.model_spec(30))
    trained.close()
    x = preprocess(np.random.default_rng(0).integers(0, 255, (8, 28, 28, 1), np.uint8))
    np.testing.assert_array_equal(model(x), reference(x))


def test_quantization_aware_distillation_exports_an_int8_model(pruned, data_dir, tmp_path):
    work = tmp_path / "qat"
    _kdjax("distill", "--config", f"{EXP}/kd.py", "--workdir", str(work),
           f"--config.data.data_dir={data_dir}", f"--config.teacher.workdir={pruned}", *RUN,
           "--config.quant.mode=qat")
    # Weight-only on export (--config.quant.*): the W8A8 export with calibration is
    # test_compress_quantize's, which costs Qwix's eager calibration.
    _kdjax("export", "--workdir", str(work), "--out", str(tmp_path / "int8"),
           "--config.quant.activations=none")
    with open(tmp_path / "int8" / "kdjax_model.json") as f:
        record = json.load(f)["compression"]
    assert record["encoding"] == "int" and record["layers"]["hidden/0/kernel"]["encoding"] == "int8"
    assert record["activations"] == "none"
    assert os.path.getsize(tmp_path / "int8" / "weights.npz") * 3.5 <= record["float32_bytes"]
    model, preprocess = export.load(str(tmp_path / "int8"))
    reader = checkpoint.RunReader(str(work))
    float_student = reader.load_model(30, reader.model_spec(30))
    reader.close()
    x = preprocess(np.random.default_rng(0).integers(0, 255, (64, 28, 28, 1), np.uint8))
    assert (np.asarray(model(x)).argmax(-1) == np.asarray(float_student(x)).argmax(-1)).mean() > 0.9


def test_structured_pruning_of_the_teacher_gives_the_student_its_architecture(
        pruned, data_dir, tmp_path):
    # Minitron: the trained teacher, its channels pruned, is the student's initial model.
    work = tmp_path / "minitron"
    out = _kdjax("distill", "--config", f"{EXP}/kd.py", "--workdir", str(work),
                 f"--config.data.data_dir={data_dir}", f"--config.teacher.workdir={pruned}",
                 f"--config.init.workdir={pruned}", "--config.model.name=mlp",
                 "--config.model.kwargs={}", "--config.prune.method=structured",
                 "--config.prune.schedule=init", "--config.prune.sparsity=0.5", *RUN)
    assert f"the student starts from {pruned}/checkpoints/30" in out
    reader = checkpoint.RunReader(str(work))
    assert reader.model_spec(30).kwargs == {"hidden": [16, 16]}
    reader.close()
    with pytest.raises(ValueError, match="prune.schedule='init' prunes the initial weights, and "
                                         "with no init.workdir they are random"):
        _kdjax("train", "--config", f"{EXP}/teacher.py", "--workdir", str(tmp_path / "bad"),
               f"--config.data.data_dir={data_dir}", "--config.prune.method=structured",
               "--config.prune.schedule=init", "--config.prune.sparsity=0.5", *RUN)
    with pytest.raises(ValueError, match=f"init.workdir={pruned!r} holds a 'mlp' student but "
                                         f"model.name='mlp_tiny'"):
        _kdjax("train", "--config", f"{EXP}/teacher.py", "--workdir", str(tmp_path / "bad2"),
               f"--config.data.data_dir={data_dir}", f"--config.init.workdir={pruned}",
               "--config.model.name=mlp_tiny", *RUN)


def test_export_overrides_are_quant_and_the_calibration_data_only(pruned, tmp_path):
    with pytest.raises(ValueError, match=r"kdjax export takes --config.quant.\* \(quantize on "
                                         r"export\) and --config.data.data_dir .* got "
                                         r"'--config.train.steps=5'"):
        export.export(pruned, str(tmp_path / "x"), overrides=["--config.train.steps=5"])
    assert not os.path.exists(tmp_path / "x")


def test_calibration_images_are_training_images_as_the_model_sees_them(data_dir):
    run = plan.as_plan({"data": {"data_dir": data_dir}})
    images = encode.calibration_images(run.data, {"mean": [0.5], "std": [0.25]}, 16, seed=run.seed)
    train = data.load_arrays("fashion_mnist", "train", data_dir=data_dir)["image"]
    assert images.shape == (16, 28, 28, 1) and images.dtype == np.float32
    raw = np.rint((images * 0.25 + 0.5) * 255).astype(np.uint8)
    assert all((raw[i] == train).all(axis=(1, 2, 3)).any() for i in range(16))


def test_integer_weights_go_to_kdjax_and_onnx_only(pruned, tmp_path):
    with pytest.raises(ValueError, match=r"quant.mode='ptq': --format safetensors cannot "
                                         r"represent integer weights and scales; the formats that "
                                         r"can: kdjax \(drop --format\) and, for int8, onnx"):
        export.export(pruned, str(tmp_path / "x"), format="safetensors",
                      overrides=["--config.quant.mode=ptq"])


def test_structured_pruning_in_the_step_exports_the_shrunk_model(data_dir, tmp_path):
    work = tmp_path / "structured"
    _train(work, data_dir, "--config.model.name=mlp", "--config.model.kwargs={'hidden': (32, 24)}",
           "--config.prune.method=structured", "--config.prune.criterion=l1",
           "--config.prune.sparsity=0.5", "--config.prune.schedule=cubic",
           "--config.prune.begin_step=4", "--config.prune.end_step=24",
           "--config.prune.every_steps=4")
    reader = checkpoint.RunReader(str(work))
    masked = reader.load_model(30, reader.model_spec(30))
    reader.close()
    w, b = np.asarray(masked.hidden[0].kernel[...]), np.asarray(masked.hidden[0].bias[...])
    dead = ~(w != 0).any(axis=0)
    assert dead.sum() == 16 and (b[dead] == 0).all()  # whole neurons, bias included, exactly 0
    out = _kdjax("export", "--workdir", str(work), "--out", str(tmp_path / "exp"))
    assert "channels kept: hidden/0 16/32, hidden/1 12/24" in out
    small, preprocess = export.load(str(tmp_path / "exp"))
    assert small.hidden[0].kernel.shape == (784, 16) and small.out.kernel.shape == (12, 10)
    x = preprocess(np.random.default_rng(0).integers(0, 255, (8, 28, 28, 1), np.uint8))
    np.testing.assert_allclose(small(x), masked(x), rtol=1e-5, atol=1e-5)
