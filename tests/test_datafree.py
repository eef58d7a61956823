"""kdjax.datafree: BatchNorm statistics read during a forward pass, DeepInversion's loss and
priors, and data-free runs through the CLI that provably read no training image: every split
kdjax opens goes through kdjax.data.SplitReader, which these tests make raise for the training
split."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _float32 as f32
from conftest import EXP, randomize_batchnorms
from kdjax import augment, cli, config as config_lib, data, models
from kdjax.datafree import bn_stats, deepinversion, run
from kdjax.step import freeze

pytestmark = pytest.mark.usefixtures("quick_compiles")  # compile speed only

TINY = ["--config.model.kwargs={'hidden': (16,)}", "--config.train.batch_size=16",
        "--config.eval.batch_size=50", "--no-progress"]


def _cnn(seed=0):
    return randomize_batchnorms(models.create_model("cnn_tiny", num_classes=10,
                                                    rngs=nnx.Rngs(seed),
                                                    input_shape=(28, 28, 1)), seed)


def test_batchnorm_inputs_are_recorded_during_the_forward_and_the_model_left_as_it_was():
    model = _cnn()
    x = jax.random.normal(jax.random.key(0), (6, 28, 28, 1))

    @jax.jit
    def forward(m, x):
        with bn_stats.recording(m) as records:
            logits = m(x, train=False)
        return logits, records, m.conv1.conv(x)

    logits, records, conv1 = forward(model, x)  # conv1: what the first BatchNorm receives
    assert [type(b) for b in bn_stats.batchnorms(model)] == [nnx.BatchNorm] * 2  # restored
    # recording changes nothing
    # (two programs: float32 reassociation (_float32.py) along the convolutions' 3*3*1 and 3*3*8
    # inputs and the dense layers' 7*7*16 and 32)
    f32.assert_close(logits, jax.jit(lambda m, x: m(x))(model, x), n=9 + 72 + 784 + 32)
    conv1 = np.asarray(conv1)
    np.testing.assert_allclose(records[0].mean, conv1.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(records[0].var, conv1.var((0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(records[1].running_var, model.conv2.bn.var[...])
    loss = bn_stats.statistics_loss(records)
    expected = sum(np.linalg.norm(np.asarray(r.mean) - np.asarray(r.running_mean))
                   + np.linalg.norm(np.asarray(r.var) - np.asarray(r.running_var))
                   for r in records)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match=r"MLP has no BatchNorm layer .*fold_batchnorm=False"):
        with bn_stats.recording(models.create_model("mlp", hidden=(4,), num_classes=3,
                                                    rngs=nnx.Rngs(0))):
            pass


def test_image_priors_and_pixel_round_trip():
    x = np.random.default_rng(0).normal(size=(2, 5, 4, 1))
    tv = (np.square(x[:, 1:] - x[:, :-1]).mean() + np.square(x[:, :, 1:] - x[:, :, :-1]).mean())
    assert float(deepinversion.total_variation(jnp.asarray(x))) == pytest.approx(tv, rel=1e-5)
    recipe = augment.Preprocess(mean=(0.286,), std=(0.353,))
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    normalised = augment.normalize(jnp.asarray(pixels), recipe.mean, recipe.std, jnp.float32)
    np.testing.assert_array_equal(deepinversion.to_uint8(normalised, recipe), pixels)
    lo, hi = deepinversion.pixel_range(recipe)
    assert float(lo[0]) == pytest.approx(-0.286 / 0.353) and float(hi[0]) == pytest.approx(
        0.714 / 0.353)


def _teacher_with_stats_of(images):
    """cnn_tiny whose BatchNorm running statistics are those of `images`: as after training on
    them, so that an inversion can match them."""
    model = _cnn()

    @jax.jit
    def stats(m, x):
        with bn_stats.recording(m) as records:
            m(x, train=False)
        return records

    records = stats(model, images)
    for layer, r in zip(bn_stats.batchnorms(model), records):
        layer.mean[...], layer.var[...] = r.mean, r.var
    return freeze(model)


def test_inversion_matches_the_batchnorm_statistics_and_stays_in_the_pixel_range():
    recipe = augment.Preprocess(mean=(0.286,), std=(0.353,))
    pixels = jax.random.uniform(jax.random.key(5), (64, 28, 28, 1))  # "training data"
    teacher = _teacher_with_stats_of((pixels - 0.286) / 0.353)
    targets = jnp.arange(8) % 10
    settings = deepinversion.Recipe(steps=30, learning_rate=0.1)
    x, end = deepinversion.make_inverter(teacher, settings, recipe)(jax.random.key(0), targets,
                                                                    (28, 28, 1))
    # the loss at the starting point, which `invert` draws from the first half of its key
    init_key, loop_key = jax.random.split(jax.random.key(0))
    start = jax.jit(lambda v, x0: deepinversion.inversion_loss(
        nnx.merge(teacher.graphdef, v), x0, targets, jax.random.fold_in(loop_key, 0),
        settings)[1])(teacher.variables, jax.random.normal(init_key, (8, 28, 28, 1)))
    assert float(end["bn"]) < 0.6 * float(start["bn"])  # 6.2 -> 3.2
    assert float(end["ce"]) < float(start["ce"])
    lo, hi = deepinversion.pixel_range(recipe)
    assert float(x.min()) >= float(lo[0]) - 1e-6 and float(x.max()) <= float(hi[0]) + 1e-6


@pytest.fixture(scope="module")
def bn_teacher(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("datafree") / "teacher")
    assert cli.main(["train", "--config", os.path.join(EXP, "teacher_cnn.py"), "--workdir",
                     workdir, f"--config.data.data_dir={data_dir}", "--config.model.name=cnn_tiny",
                     "--config.train.steps=10", "--config.train.batch_size=32",
                     "--config.eval.every_steps=10", "--config.eval.batch_size=50",
                     "--no-progress"]) == 0
    return workdir


@pytest.fixture
def no_training_data(monkeypatch):
    """Every split kdjax reads is opened through SplitReader: refuse the training split, and
    record what was opened."""
    opened = []
    original = data.SplitReader.__init__

    def guarded(self, name, split, data_dir=None):
        opened.append(split)
        if split.partition("[")[0] == "train":
            raise AssertionError(f"the training split {split!r} of {name} was opened")
        original(self, name, split, data_dir)

    monkeypatch.setattr(data.SplitReader, "__init__", guarded)
    data._ARRAYS_CACHE.clear()  # a split cached by an earlier test would not be reopened
    return opened


def test_the_guard_catches_a_run_that_reads_the_training_split(data_dir, bn_teacher,
                                                              no_training_data, tmp_path):
    with pytest.raises(AssertionError, match="the training split 'train' of fashion_mnist"):
        cli.main(["distill", "--config", os.path.join(EXP, "kd.py"), "--workdir",
                  str(tmp_path / "kd"), f"--config.data.data_dir={data_dir}",
                  f"--config.teacher.workdir={bn_teacher}", "--config.train.steps=2", *TINY])


def test_deepinversion_student_never_reads_a_training_image(data_dir, bn_teacher,
                                                           no_training_data, tmp_path):
    workdir = str(tmp_path / "di")
    assert cli.main(["distill", "--config", os.path.join(EXP, "datafree_deepinversion.py"),
                     "--workdir", workdir, f"--config.data.data_dir={data_dir}",
                     f"--config.teacher.workdir={bn_teacher}", "--config.datafree.num_images=40",
                     "--config.datafree.synthesis_batch_size=20",
                     "--config.datafree.synthesis_steps=6", "--config.train.steps=12",
                     "--config.teacher.agreement_examples=0",
                     "--config.eval.every_steps=12", *TINY]) == 0
    assert set(no_training_data) == {"test"}  # the eval split alone (teacher check, eval)
    with open(os.path.join(workdir, "summary.json")) as f:
        s = json.load(f)
    assert s["datafree/method"] == "deepinversion" and s["datafree/images"] == 40
    assert s["steps"] == 12 and 0 <= s["eval/accuracy"] <= 1
    pool = np.load(os.path.join(workdir, "synthetic.npz"))
    assert pool["image"].shape == (40, 28, 28, 1) and pool["image"].dtype == np.uint8
    np.testing.assert_array_equal(pool["label"], np.arange(40) % 10)  # balanced targets


def test_zskt_student_never_reads_a_training_image(data_dir, bn_teacher, no_training_data,
                                                   tmp_path):
    workdir = str(tmp_path / "zskt")
    assert cli.main(["distill", "--config", os.path.join(EXP, "datafree_zskt.py"),
                     "--workdir", workdir, f"--config.data.data_dir={data_dir}",
                     f"--config.teacher.workdir={bn_teacher}", "--config.datafree.student_steps=1",
                     "--config.datafree.generator_channels=(4, 4)", "--config.train.steps=3",
                     "--config.eval.every_steps=3", "--config.train.log_every_steps=3",
                     *TINY]) == 0
    assert set(no_training_data) == {"test"}
    with open(os.path.join(workdir, "summary.json")) as f:
        s = json.load(f)
    assert s["datafree/generator_steps"] == 3 and np.isfinite(s["train/generator/kl"])
    assert np.load(os.path.join(workdir, "generated.npz"))["image"].shape == (64, 28, 28, 1)
    # the student is a kdjax checkpoint: `kdjax eval` reproduces its accuracy
    assert cli.main(["eval", "--workdir", workdir]) == 0
    with open(os.path.join(workdir, "eval.json")) as f:
        assert json.load(f)["eval/accuracy"] == pytest.approx(s["eval/accuracy"])


def _config(file="datafree_zskt.py", **overrides):
    c = config_lib.load(os.path.join(EXP, file))
    for key, value in overrides.items():
        section, _, leaf = key.partition("__")
        c[section][leaf] = value
    return c


@pytest.mark.parametrize("file, overrides, match", [
    ("datafree_zskt.py", dict(datafree__method="dafl"), r"datafree.method='dafl': valid values"),
    ("datafree_zskt.py", dict(teacher__aggregation="gnmax"), r"do not combine"),
    ("datafree_zskt.py", dict(teacher__workdir=""), r"set teacher.workdir"),
    ("datafree_zskt.py", dict(teacher__workdirs=("a", "b")), r"set teacher.workdir"),
    ("datafree_deepinversion.py", dict(loss__name="fitnet"),
     r"loss.name must be a logit loss .* got 'fitnet'"),
    ("datafree_zskt.py", dict(loss__name="dkd"), r"datafree.method='zskt' plays its game on"),
    ("datafree_zskt.py", dict(loss__kwargs={"temperature": 2.0, "alpha": 1.0}),
     r"only 'temperature' in loss.kwargs, got \['alpha'\]"),
    ("datafree_zskt.py", dict(datafree__student_steps=7),
     r"train.steps=2340 must be a positive multiple of datafree.student_steps=7"),
    ("datafree_zskt.py", dict(datafree__bn_weight=-1.0), r"must be >= 0"),
])
def test_configuration_errors(file, overrides, match):
    with pytest.raises(ValueError, match=match):
        run.check_config(_config(file, **overrides))


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "datafree.synthesis_steps must be >= 1"),
    (dict(learning_rate=0.0), "datafree.synthesis_lr must be > 0"),
    (dict(tv_weight=-1.0), "datafree.tv_weight must be >= 0"),
    (dict(jitter=-1), "datafree.jitter must be >= 0"),
])
def test_recipe_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        deepinversion.Recipe(**kwargs)


def test_steps_per_call_must_divide_the_steps():
    with pytest.raises(ValueError, match="synthesis_steps=10 must be a multiple of "
                                         "datafree.synthesis_steps_per_call=4"):
        deepinversion.make_inverter(freeze(_cnn()), deepinversion.Recipe(steps=10,
                                                                         steps_per_call=4),
                                    augment.Preprocess())
