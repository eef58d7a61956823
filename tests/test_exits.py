"""BYOT's exits (kdjax.exits): built from the tapped shapes (zoo stages, MLP layers, module paths),
trained in the fused step, each exit's accuracy in the evaluation, and absent from the checkpoint's
student and from the export."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from _user_models import TinyNet
from conftest import EXP
from kdjax import checkpoint, cli, config as config_lib, export, exits, models, objectives
from kdjax.step import Distillee, make_eval_step, pad_batch

pytestmark = pytest.mark.usefixtures("quick_compiles")


def byot_loss(**kw):
    loss = config_lib.base_config().loss
    loss.update(**{"name": "byot", "kwargs": {}, **kw})
    return loss


def abstract(fn, *args, **kwargs):
    """`fn(*args, rngs=..., **kwargs)` traced abstractly: modules of shapes, nothing computed."""
    return nnx.eval_shape(lambda: fn(*args, rngs=nnx.Rngs(0), **kwargs))


def shapes_of(built, x):
    """Each exit's (logits, feature, target) shapes on `x`'s student taps, traced abstractly."""
    graphdef, state = nnx.split(built[0])

    def run(state, x):
        out = nnx.merge(graphdef, state).features(x, train=True)
        return out["exits"]

    return {k: tuple(v.shape for v in o) for k, o in jax.eval_shape(run, state, x).items()}


def test_exits_follow_the_taps_shapes_and_refuse_the_rest():
    shape = (8, 8, 1)
    cnn = abstract(models.create_model, "cnn_tiny", num_classes=10, input_shape=shape)
    built = abstract(objectives.build_exits, byot_loss(), cnn, image_shape=shape)
    # by default every stage but the last, as the reference: stage1 (4x4x8) -> a 2x2 stride-2
    # conv to stage2's 2x2, 1x1 convs to the embedding's 32 through 32 // 4 = 8 channels
    assert [e.exit_name for e in built] == ["exit_stage1"]
    assert built[0].layers[1].kernel_size == (2, 2) and built[0].layers[1].strides == (2, 2)
    assert [layer.out_features for layer in built[0].layers] == [8, 8, 32]
    both = abstract(objectives.build_exits, byot_loss(student_taps=("stage1", "stage2"),
                                                      kwargs={"width": 4}),
                    cnn, image_shape=shape)
    assert both[1].layers[1].kernel_size == (1, 1) and both[0].layers[0].out_features == 4
    x = jax.ShapeDtypeStruct((3, *shape), jnp.float32)
    assert shapes_of((Distillee(cnn, exits=both), cnn), x) == {
        "exit_stage1": ((3, 10), (3, 32), (3, 32)), "exit_stage2": ((3, 10), (3, 32), (3, 32))}
    # an MLP's hidden layer gets linear exits; a plain NNX model's sub-module by its path
    mlp = abstract(models.create_model, "mlp", hidden=(16, 12), num_classes=10, in_features=64)
    (on_mlp,) = abstract(objectives.build_exits, byot_loss(), mlp, image_shape=shape)
    assert [layer.out_features for layer in on_mlp.layers] == [3, 12]
    user = abstract(TinyNet, 64, 10, hidden=8)
    on_path = abstract(objectives.build_exits, byot_loss(student_taps=("blocks.0",),
                                                         kwargs={"hint_tap": "blocks.1"}),
                       user, image_shape=shape)
    assert shapes_of((Distillee(user, exits=on_path), user), x) == {
        "exit_blocks.0": ((3, 10), (3, 8), (3, 8))}
    with pytest.raises(ValueError, match=r"loss.student_taps 'stage7' matches no module of "
                                         r"SmallCNN.*its own feature names"):
        objectives.build_exits(byot_loss(student_taps=("stage7",)), cnn, image_shape=shape,
                               rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"has only \['hidden1'\]; name the layers in "
                                         r"loss.student_taps"):
        objectives.build_exits(byot_loss(), models.create_model(
            "mlp", hidden=(16,), num_classes=10, in_features=64, rngs=nnx.Rngs(0)),
            image_shape=shape, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"loss.kwargs.hint_tap 'embedding' matches no module of "
                                         r"TinyNet; tap one of its module paths: 'blocks'"):
        objectives.build_exits(byot_loss(student_taps=("blocks.0",)), user, image_shape=shape,
                               rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"exit attaches to an NHWC feature map or a \[B, D\]"):
        exits.Exit("t", "h", (2, 3, 4), (2, 5), 10, rngs=nnx.Rngs(0))


TINY = ["--config.train.steps=8", "--config.train.batch_size=32", "--config.eval.every_steps=8",
        "--config.train.log_every_steps=4", "--config.checkpoint.every_steps=8",
        "--config.eval.batch_size=150", "--no-progress"]


@pytest.fixture(scope="module")
def byot_run(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("byot") / "byot")
    # byot.py on an MLP student (XLA:CPU compiles it much faster than the file's cnn_tiny, which
    # test_methods and the eval test above train): linear exits on its first hidden layer
    assert cli.main(["distill", "--config", f"{EXP}/byot.py", "--workdir", workdir,
                     f"--config.data.data_dir={data_dir}", "--config.model.name=mlp",
                     "--config.model.kwargs={'hidden': (32, 16)}",
                     "--config.loss.student_taps=('hidden1',)", *TINY]) == 0
    return workdir


def test_byot_trains_its_exits_and_evaluates_each(byot_run):
    with open(os.path.join(byot_run, "summary.json")) as f:
        summary = json.load(f)
    assert summary["teacher"] is None and summary["model"] == "mlp"
    records = [json.loads(line) for line in open(os.path.join(byot_run, "metrics.jsonl"))]
    train = [r for r in records if "train/kd" in r]
    assert all(r["train/feature"] > 0 and np.isfinite(r["train/kd"]) for r in train)
    assert "train/exit_hidden1/accuracy" in train[-1]
    assert 0 <= summary["eval/exit_hidden1/accuracy"] <= 1
    assert summary["eval/exit_hidden1/loss"] > 0


def test_eval_step_reports_each_exits_accuracy():
    student = models.create_model("mlp", hidden=(12, 8), num_classes=4, in_features=64,
                                  rngs=nnx.Rngs(0))
    loss = byot_loss(student_taps=("hidden1", "hidden2"))
    model = Distillee(student, exits=objectives.build_exits(loss, student, image_shape=(8, 8, 1),
                                                            rngs=nnx.Rngs(1)))
    for e in model.exits:  # a trained-looking head, so that accuracies differ from chance
        e.head.kernel[...] = jnp.asarray(np.random.default_rng(2).normal(
            0, 3, e.head.kernel.shape), jnp.float32)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 255, (12, 8, 8, 1)).astype(np.uint8)
    labels = rng.integers(0, 4, 12).astype(np.int32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    sums = jax.device_get(make_eval_step(graphdef)(params, rest, pad_batch(
        {"image": images, "label": labels}, 16)))
    x = (jnp.asarray(images, jnp.float32) / 255.0 - 0.5) / 0.5  # Preprocess()'s defaults
    # jitted: on XLA:CPU each eager op compiles a kernel of its own
    heads, own = jax.jit(lambda p, r, x: (nnx.merge(graphdef, p, r).eval_logits(x),
                                          nnx.merge(graphdef, p, r)(x)))(params, rest, x)
    assert set(heads) == {"", "exit_hidden1/", "exit_hidden2/"} and sums["count"] == 12
    for name, z in heads.items():
        correct = np.asarray(z).argmax(-1) == labels
        assert sums[f"{name}accuracy"] == correct.sum()
        z = np.float64(z) - np.float64(z).max(-1, keepdims=True)
        ce = -(z - np.log(np.exp(z).sum(-1, keepdims=True)))[np.arange(12), labels]
        assert sums[f"{name}loss"] == pytest.approx(ce.sum(), rel=1e-5)
    own = np.asarray(own).argmax(-1) == labels
    assert sums["accuracy"] == own.sum()  # the student's own, as without exits


def test_the_export_is_the_student_without_its_exits(byot_run, tmp_path):
    reader = checkpoint.RunReader(byot_run)
    saved = reader.manager.item_metadata(8)
    reader.close()
    flat = lambda tree: set(ocp.tree.to_flat_dict(tree, sep="/"))
    assert not any("exits" in k for k in flat(saved["model"].tree))
    assert any(k.startswith("extras/params/exits/") for k in flat(saved["train"].tree))
    out = str(tmp_path / "export")
    assert cli.main(["export", "--workdir", byot_run, "--out", out]) == 0
    model, _ = export.load(out)
    assert type(model).__name__ == "MLP" and not hasattr(model, "exits")
    bare = nnx.eval_shape(lambda: models.create_model("mlp", hidden=(32, 16), num_classes=10,
                                                      rngs=nnx.Rngs(0)))
    assert jax.tree.structure(nnx.state(model)) == jax.tree.structure(nnx.state(bare))
    # the student's parameters, not one of its exit's more
    assert models.count_params(model) == 784 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
