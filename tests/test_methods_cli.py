"""The method zoo through `kdjax distill` on tiny data: a feature method end to end (and `kdjax
eval` of its connector-free export), born-again generations, mutual learning, several teachers,
and the CIFAR-100 recipes: every method x pair builds against the real models, and one runs on
mock data."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kdjax import checkpoint, cli, config as config_lib, connectors, data, models, objectives
from kdjax import classification
from kdjax.step import init_train_state

pytestmark = pytest.mark.usefixtures("quick_compiles")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = os.path.join(ROOT, "experiments", "fashion_mnist")
CIFAR = os.path.join(ROOT, "experiments", "cifar100")
TINY = ["--config.train.steps=8", "--config.train.batch_size=16", "--config.eval.every_steps=8",
        "--config.train.log_every_steps=4", "--config.checkpoint.every_steps=8",
        "--config.eval.batch_size=64", "--no-progress"]


def summary(workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny prepared Fashion-MNIST look-alike and a teacher trained on it."""
    root = tmp_path_factory.mktemp("zoo")
    src = data.make_synthetic_idx_dir(str(root / "src"), 160, 64, seed=1)
    data_dir = str(root / "tfds")
    assert cli.main(["prepare", "fashion_mnist", "--from", src, "--data-dir", data_dir,
                     "--skip-checksums"]) == 0
    common = [*TINY, f"--config.data.data_dir={data_dir}"]
    teacher = str(root / "teacher")
    assert cli.main(["train", "--config", f"{FMNIST}/teacher.py", "--workdir", teacher,
                     "--config.model.name=mlp_tiny", *common]) == 0
    return {"root": root, "data_dir": data_dir, "common": common, "teacher": teacher}


@pytest.fixture(scope="module")
def crd_runs(env):
    """CRD through `kdjax distill`, once with device-resident data and once streamed, both read
    by the tests below (one training each)."""
    runs = {}
    for mode in ("device", "stream"):
        work = str(env["root"] / f"crd_{mode}")
        assert cli.main(["distill", "--config", f"{FMNIST}/crd.py", "--workdir", work,
                         f"--config.teacher.workdir={env['teacher']}",
                         "--config.loss.kwargs={'num_negatives': 32, 'embed_dim': 16}",
                         f"--config.data.mode={mode}", *env["common"]]) == 0
        runs[mode] = work
    return runs


def test_crd_through_the_cli_and_eval_of_its_export(crd_runs):
    work = crd_runs["device"]
    s = summary(work)
    assert s["steps"] == 8 and np.isfinite(s["train/loss"]) and 0 <= s["eval/accuracy"] <= 1
    records = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))]
    assert all(np.isfinite(r["train/feature"]) for r in records if "train/feature" in r)
    # `kdjax eval` rebuilds the bare student from config.json: the export has no connectors
    assert cli.main(["eval", "--workdir", work]) == 0
    with open(os.path.join(work, "eval.json")) as f:
        assert json.load(f)["eval/accuracy"] == pytest.approx(s["eval/accuracy"])


def test_crd_streamed_trains_as_on_device(crd_runs):
    """Streamed batches carry the rows' dataset indices, so CRD's memory reads and writes the
    same rows as with device-resident data: the same seed gives the same run in both modes."""
    runs = {mode: [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))]
            for mode, work in crd_runs.items()}
    device, stream = ([(r["step"], r["train/feature"]) for r in runs[m] if "train/feature" in r]
                      for m in ("device", "stream"))
    assert [s for s, _ in device] == [4, 8] and [s for s, _ in stream] == [4, 8]
    np.testing.assert_allclose([f for _, f in stream], [f for _, f in device], rtol=1e-5)
    assert device[0][1] > 0
    accuracy = [r["eval/accuracy"] for m in ("device", "stream") for r in runs[m]
                if "eval/accuracy" in r]
    assert accuracy[0] == pytest.approx(accuracy[1])


def test_born_again_generations_teach_each_other(env):
    work = str(env["root"] / "ban")
    assert cli.main(["distill", "--config", f"{FMNIST}/born_again.py", "--workdir", work,
                     f"--config.teacher.workdir={env['teacher']}", "--config.model.name=mlp_tiny",
                     "--generations", "2", *env["common"]]) == 0
    s = summary(work)
    assert [g["generation"] for g in s["generations"]] == [1, 2]
    assert summary(os.path.join(work, "gen_1"))["teacher"] == env["teacher"]
    assert summary(os.path.join(work, "gen_2"))["teacher"] == os.path.join(work, "gen_1")
    assert s["eval/accuracy"] == summary(os.path.join(work, "gen_2"))["eval/accuracy"]


def test_mutual_learning_reports_every_student(env):
    work = str(env["root"] / "dml")
    assert cli.main(["distill", "--config", f"{FMNIST}/dml.py", "--workdir", work,
                     *env["common"]]) == 0
    s = summary(work)
    assert 0 <= s["eval/peer1/accuracy"] <= 1 and s["teacher"] is None
    assert 0 <= s["eval/peer1/ece"] <= 1 and 0 <= s["eval/ece"] <= 1  # every student's ECE
    with pytest.raises(ValueError, match="learns from peer students, not a teacher"):
        cli.main(["distill", "--config", f"{FMNIST}/dml.py", "--workdir", work + "2",
                  f"--config.teacher.workdir={env['teacher']}", *env["common"]])


def test_two_teachers_per_teacher_combination(env):
    work = str(env["root"] / "multi")
    assert cli.main(["distill", "--config", f"{FMNIST}/multi_teacher.py", "--workdir", work,
                     f"--config.teacher.workdirs=('{env['teacher']}', '{env['teacher']}')",
                     "--config.teacher.weights=(3, 1)", "--config.teacher.combine=per_teacher",
                     *env["common"]]) == 0
    assert summary(work)["teacher"] == f"{env['teacher']}, {env['teacher']}"
    with pytest.raises(ValueError, match="teacher.workdir .* or teacher.workdirs .* not both"):
        cli.main(["distill", "--config", f"{FMNIST}/multi_teacher.py", "--workdir", work + "2",
                  f"--config.teacher.workdir={env['teacher']}",
                  f"--config.teacher.workdirs=('{env['teacher']}',)", *env["common"]])


@pytest.mark.parametrize("path", sorted(glob.glob(f"{FMNIST}/*.py")))
def test_every_fashion_mnist_config_builds_its_objective_and_model(path):
    """Configs derive from each other: a loss.kwargs or model.kwargs left over from the parent
    (e.g. kd.py's temperature in a feature method) must not survive."""
    c = config_lib.load(path)
    objectives.from_config(c.loss, c.teacher, total_steps=c.train.steps)
    nnx.eval_shape(lambda: models.create_model(c.model.name, num_classes=10,
                                               input_shape=(28, 28, 1), rngs=nnx.Rngs(0),
                                               **c.model.kwargs))


CIFAR_METHODS = sorted(os.path.basename(p)[:-3] for p in glob.glob(f"{CIFAR}/*.py")
                       if not p.endswith("vanilla.py"))


def test_every_cifar_recipe_loads_for_every_pair():
    import sys
    sys.path.insert(0, CIFAR)
    try:
        import vanilla
    finally:
        sys.path.pop(0)
    assert len(vanilla.PAIRS) == 5
    for method in CIFAR_METHODS:
        for pair, (teacher, student) in vanilla.PAIRS.items():
            c = config_lib.load(f"{CIFAR}/{method}.py:{pair}")
            objectives.from_config(c.loss, c.teacher)  # its loss.kwargs are the method's
            assert (c.data.name, c.train.batch_size, c.train.steps) == ("cifar100", 64, 187440)
            assert c.optimizer.decay_boundaries == (117150, 140580, 164010)
            assert (c.optimizer.learning_rate, c.optimizer.weight_decay) == (0.05, 5e-4)
            assert c.model.name == student
            if method not in ("dml", "born_again"):
                assert c.teacher.workdir == f"workdirs/cifar100/{teacher}"
    assert config_lib.load(f"{CIFAR}/vanilla.py:mobilenetv2").optimizer.learning_rate == 0.01
    with pytest.raises(ValueError, match="unknown teacher-student pair 'resnet8-vgg8'"):
        config_lib.load(f"{CIFAR}/crd.py:resnet8-vgg8")


def _abstract_taps(name):
    """A CIFAR model's taps for a batch of 64, traced abstractly (nothing computed)."""
    model = nnx.eval_shape(lambda: models.create_model(name, num_classes=100,
                                                       input_shape=(32, 32, 3),
                                                       rngs=nnx.Rngs(0)))
    shapes = connectors.feature_shapes(*nnx.split(model), (32, 32, 3))
    return {k: jax.ShapeDtypeStruct((64, *v[1:]), jnp.float32) for k, v in shapes.items()}


@pytest.mark.parametrize("pair", ["resnet32x4-resnet8x4", "wrn_40_2-wrn_16_2",
                                  "resnet56-resnet20", "vgg13-vgg8", "resnet110-resnet32"])
def test_cifar_feature_recipes_connect_the_real_models(pair):
    """Every feature method's connectors and loss, traced abstractly on the pair's real taps."""
    teacher_name, student_name = pair.split("-")
    s_taps, t_taps = _abstract_taps(student_name), _abstract_taps(teacher_name)
    shape = lambda taps: {k: v.shape for k, v in taps.items()}  # noqa: E731
    labels = np.arange(50_000) % 100
    for method in sorted(objectives.FEATURE_METHODS):
        c = config_lib.load(f"{CIFAR}/{method}.py:{pair}")

        def loss(s, t):
            pairs = objectives.connectors_for_shapes(c.loss, shape(s), [shape(t)],
                                                     rngs=nnx.Rngs(0), dataset_labels=labels)[0]
            out = {**s, "connectors": (tuple(p(s, t, train=True, index=jnp.arange(64),
                                                 key=jax.random.key(0)) for p in pairs),)}
            return objectives.from_config(c.loss, c.teacher)(out, (t,), jnp.zeros(64, jnp.int32),
                                                             jnp.int32(0))

        total, metrics = jax.eval_shape(loss, s_taps, t_taps)
        assert total.shape == () and metrics["feature"].shape == (), method


def test_a_cifar_recipe_runs_on_mock_data(env):
    """crd.py:vgg13-vgg8 through `kdjax distill` on mock data (1-channel 28x28, 10 classes,
    data.name overridden), from a vgg13 teacher workdir written without training it."""
    common = ["--config.data.name=fashion_mnist", f"--config.data.data_dir={env['data_dir']}"]
    teacher = str(env["root"] / "vgg13")
    config = config_lib.load(f"{CIFAR}/vanilla.py:vgg13", common)
    os.makedirs(teacher)
    with open(os.path.join(teacher, "config.json"), "w") as f:
        f.write(config_lib.to_json(config))
    spec = data.dataset_info("fashion_mnist", data_dir=env["data_dir"])
    model = classification.model_spec(config.model, spec)
    _, state = init_train_state(model.build(config.seed), optax.identity(), seed=0,
                                num_examples=spec.splits["train"])
    ckpt = checkpoint.Checkpointer(teacher, max_to_keep=1)
    ckpt.save(state, {"config": json.loads(config_lib.to_json(config)), "model": model.to_json()})
    ckpt.close()
    work = str(env["root"] / "cifar_crd")
    assert cli.main(["distill", "--config", f"{CIFAR}/crd.py:vgg13-vgg8", "--workdir", work,
                     f"--config.teacher.workdir={teacher}", *common,
                     "--config.loss.kwargs={'num_negatives': 16}", "--config.train.steps=2",
                     "--config.train.batch_size=4", "--config.train.log_every_steps=1",
                     "--config.eval.every_steps=2", "--config.eval.batch_size=64",
                     "--no-progress"]) == 0
    s = summary(work)
    assert s["steps"] == 2 and s["model"] == "vgg8" and np.isfinite(s["train/loss"])
