"""Any Flax NNX model as student or teacher, end to end: logit methods without features(),
feature methods on tapped module paths, importable models on the command line (checkpoints,
eval, export), a Linen model through the NNX bridge, per-teacher normalisation, teachers from
another dataset, and the errors."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import _float32 as f32
import _user_models as user
from conftest import EXP
from kdjax import augment, checkpoint, cli, data, export, losses, models, objectives, plan, taps
from kdjax.compress import encode, quantize
from kdjax.step import Distillee, freeze, init_train_state, make_distill_step

C, D = 4, 12
TINY = ["--config.train.steps=8", "--config.train.batch_size=32", "--config.eval.every_steps=8",
        "--config.train.log_every_steps=4", "--config.checkpoint.every_steps=8",
        "--config.eval.batch_size=50", "--no-progress"]


def _batch(seed=0, n=16):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (n, 3, 4, 1), dtype=np.uint8),
            "label": rng.integers(0, C, n).astype(np.int32)}


def _zoo_mlp(seed):
    return models.create_model("mlp", hidden=(8, 8), in_features=D, num_classes=C,
                               rngs=nnx.Rngs(seed))


def _user_copy(zoo):
    """A TinyNet computing exactly what the zoo MLP computes, with its weights."""
    net = user.TinyNet(D, C, hidden=8, rngs=nnx.Rngs(0))
    for mine, theirs in ((net.blocks[0], zoo.hidden[0]), (net.blocks[1], zoo.hidden[1]),
                         (net.head, zoo.out)):
        mine.kernel[...] = jnp.array(theirs.kernel[...], copy=True)  # own buffers: donated
        mine.bias[...] = jnp.array(theirs.bias[...], copy=True)
    return net


def _run(student, teacher, objective, steps=3, student_taps=(), teacher_taps=()):
    tx = optax.sgd(0.1, momentum=0.9)
    loss = plan.as_plan({"loss": {"name": "rkd", "student_taps": student_taps,
                                  "teacher_taps": teacher_taps}}).loss
    parts = {"connectors": objectives.build_connectors(
        loss, student, [freeze(teacher, taps=teacher_taps)], image_shape=(3, 4, 1),
        rngs=nnx.Rngs(0))} if student_taps else {}
    distillee = Distillee(student, taps=student_taps, **parts)
    graphdef, state = init_train_state(distillee, tx, seed=0)
    step = make_distill_step(graphdef, tx, objective,
                             teachers=[freeze(teacher, taps=teacher_taps)])
    history = []
    for i in range(steps):
        state, metrics = step(state, _batch(i))
        history.append(jax.device_get(metrics))
    return state, history


@pytest.mark.parametrize("name", sorted(objectives.LOGIT_LOSSES))
def test_every_logit_method_trains_a_model_without_features(name, quick_compiles):
    """Student and teacher are plain NNX modules (logits from __call__): the run equals the one
    of zoo models with the same weights, step for step."""
    objective = objectives.logit_distillation(name, ce_weight=0.5, kd_weight=0.5)
    zoo_student, zoo_teacher = _zoo_mlp(1), _zoo_mlp(2)
    user_student, user_teacher = _user_copy(zoo_student), _user_copy(zoo_teacher)
    _, expected = _run(zoo_student, zoo_teacher, objective)
    _, got = _run(user_student, user_teacher, objective)
    for e, g in zip(expected, got):
        assert set(e) == set(g)
        for k in e:
            np.testing.assert_allclose(g[k], e[k], rtol=2e-5, atol=1e-6, err_msg=f"{name} {k}")
    assert np.isfinite(got[-1]["kd"]) and got[-1]["kd"] > 0


def test_a_feature_method_on_tapped_module_paths(quick_compiles):
    """RKD between the student's blocks.1 and the teacher's hidden.0 (module paths of models
    that name no features): the step's feature term is losses.rkd of exactly those outputs."""
    student, teacher = user.TinyNet(D, C, hidden=6, rngs=nnx.Rngs(1)), _zoo_mlp(2)
    objective = objectives.feature_distillation("rkd", ce_weight=1.0, feature_weight=1.0)
    x = augment.preprocess(jnp.asarray(_batch(0)["image"]), augment.Preprocess(), key=None,
                           dtype=jnp.float32)
    s_tap = student.blocks[1](nnx.relu(student.blocks[0](x.reshape(16, -1))))
    t_tap = teacher.hidden[0](x.reshape(16, -1))
    _, history = _run(student, teacher, objective, steps=1, student_taps=("blocks.1",),
                      teacher_taps=("hidden.0",))
    np.testing.assert_allclose(history[0]["feature"], losses.rkd(s_tap, t_tap), rtol=1e-5)


@pytest.fixture(scope="module")
def user_runs(data_dir, tmp_path_factory):
    """A user-model teacher and a user-model student distilled from it, by the CLI."""
    work = tmp_path_factory.mktemp("user")
    common = TINY + [f"--config.data.data_dir={data_dir}"]
    teacher, student = str(work / "teacher"), str(work / "student")
    assert cli.main(["train", "--config", f"{EXP}/teacher.py", "--workdir", teacher,
                     "--config.model.name=_user_models:TinyNet",
                     "--config.model.kwargs={'hidden': 24}", *common]) == 0
    assert cli.main(["distill", "--config", f"{EXP}/kd.py", "--workdir", student,
                     f"--config.teacher.workdir={teacher}",
                     "--config.teacher.model.name=_user_models:TinyNet",
                     "--config.teacher.model.kwargs={'hidden': 24}",
                     "--config.model.name=_user_models:make_tiny", "--config.model.kwargs={}",
                     *common]) == 0
    return {"teacher": teacher, "student": student, "work": work, "data_dir": data_dir}


def _summary(workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


def test_importable_models_train_distil_evaluate_and_export(user_runs, data_dir):
    summary = _summary(user_runs["student"])
    assert summary["model"] == "_user_models:make_tiny"
    assert "eval/teacher_agreement" in summary and summary["teacher"] == user_runs["teacher"]
    assert cli.main(["eval", "--workdir", user_runs["student"]]) == 0
    with open(os.path.join(user_runs["student"], "eval.json")) as f:
        assert json.load(f)["eval/accuracy"] == pytest.approx(summary["eval/accuracy"])
    out = str(user_runs["work"] / "export")
    assert cli.main(["export", "--workdir", user_runs["student"], "--out", out]) == 0
    with open(os.path.join(out, export.META_FILE)) as f:
        assert json.load(f)["model"]["name"] == "_user_models:make_tiny"
    model, preprocess = export.load(out)
    assert isinstance(model, user.TinyNet) and model.head.in_features == 8
    images = data.load_arrays("fashion_mnist", "test", data_dir=data_dir)
    logits = np.asarray(model(preprocess(images["image"])))
    # eager here, jit in the run's eval: an accuracy equal but for rows whose top two logits
    # tie within float32 reassociation (_float32.py) along 784 inputs, 8 + 8 hidden, 10 classes
    # (+ eps: the summary holds it in float32)
    accuracy = np.mean(logits.argmax(-1) == images["label"])
    assert (abs(accuracy - summary["eval/accuracy"])
            <= f32.near_ties(logits, 784 + 16 + 10) + f32.EPS)


def _test_images(data_dir, n=64):
    return data.load_arrays("fashion_mnist", "test", data_dir=data_dir)["image"][:n]


def test_a_plain_nnx_student_distils_quantization_aware_and_exports_int8(user_runs, tmp_path):
    """NormNet (BatchNorm and Dropout switched by NNX's train()/eval(), no features(), no train
    argument) distilled with Qwix's fake quantization in the step, exported W8A8, loaded."""
    work, out = str(tmp_path / "qat"), str(tmp_path / "int8")
    assert cli.main(["distill", "--config", f"{EXP}/kd.py", "--workdir", work,
                     f"--config.teacher.workdir={user_runs['teacher']}",
                     "--config.model.name=_user_models:NormNet", "--config.model.kwargs={}",
                     "--config.quant.mode=qat", f"--config.data.data_dir={user_runs['data_dir']}",
                     *TINY]) == 0
    assert cli.main(["export", "--workdir", work, "--out", out,
                     "--config.quant.calibration_examples=128"]) == 0
    with open(os.path.join(out, export.META_FILE)) as f:
        record = json.load(f)["compression"]
    assert record["activations"] == "int8" and record["layers"]["fc/kernel"]["encoding"] == "int8"
    model, preprocess = export.load(out)
    assert isinstance(model, user.NormNet)
    x = preprocess(_test_images(user_runs["data_dir"]))
    got = np.asarray(model(x))
    np.testing.assert_array_equal(got, np.asarray(model(x)))  # inference: no dropout
    # Against the run's student as it trained, fake-quantized (dynamic activation scales): the
    # export's static, calibrated scales differ from them by int8's error.
    _, _, run, _, float_student = checkpoint.read_model(work)
    quant = plan.as_plan(run["config"]).quant
    fake = np.asarray(taps.call(quantize.for_training(float_student, quant, (28, 28, 1)), x,
                                train=False))
    assert np.abs(got - fake).mean() <= 0.02 * np.ptp(fake), (np.abs(got - fake).mean(),
                                                              np.ptp(fake))
    assert np.mean(got.argmax(-1) == fake.argmax(-1)) >= 0.9
    # ...and exactly the PTQ model calibrated on the images the export drew.
    images = encode.calibration_images(dataclasses.replace(
        plan.as_plan(run["config"]).data, data_dir=user_runs["data_dir"]), run["preprocess"],
        128, seed=run["config"]["seed"])
    calibrated = quantize.calibrated(float_student, dataclasses.replace(
        quant, calibration_examples=128), images)
    np.testing.assert_array_equal(got, np.asarray(taps.call(calibrated, x, train=False)))


@pytest.mark.parametrize("quant", [["--config.quant.mode=ptq",
                                    "--config.quant.calibration_examples=128"],
                                   ["--config.quant.mode=ptq", "--config.quant.weights=int4",
                                    "--config.quant.activations=none"]], ids=["w8a8", "int4"])
def test_a_float_plain_nnx_student_is_quantized_on_export(user_runs, tmp_path, quant):
    out = str(tmp_path / "ptq")
    assert cli.main(["export", "--workdir", user_runs["student"], "--out", out, *quant]) == 0
    model, preprocess = export.load(out)
    float_model, _ = export.load(str(user_runs["work"] / "export"))
    x = preprocess(_test_images(user_runs["data_dir"]))
    got, ref = np.asarray(model(x)), np.asarray(float_model(x))
    # Weight-only int4 is within its rounding of the float model; W8A8's static activation
    # scales (Qwix's: the calibration batches' mean of each example's max |x|) clip the larger
    # activations of about half the examples, a few % of the logits' range for this small MLP.
    tolerance = 0.1 if "--config.quant.weights=int4" in quant else 0.05
    assert np.abs(got - ref).mean() <= tolerance * np.ptp(ref), (np.abs(got - ref).mean(),
                                                                 np.ptp(ref))


def test_a_linen_student_trains_and_exports(data_dir, tmp_path):
    work = str(tmp_path / "linen")
    assert cli.main(["train", "--config", f"{EXP}/student_scratch.py", "--workdir", work,
                     "--config.model.name=_user_models:LinenMLP", "--config.model.kwargs={}",
                     f"--config.data.data_dir={data_dir}", *TINY]) == 0
    summary = _summary(work)
    out = str(tmp_path / "export")
    assert cli.main(["export", "--workdir", work, "--out", out]) == 0
    model, preprocess = export.load(out)
    assert isinstance(model, nnx.bridge.ToNNX)
    images = data.load_arrays("fashion_mnist", "test", data_dir=data_dir)
    logits = np.asarray(model(preprocess(images["image"])))
    assert (abs(np.mean(logits.argmax(-1) == images["label"]) - summary["eval/accuracy"])
            <= f32.near_ties(logits, 784 + 24 + 10) + f32.EPS)  # as above (_float32.py)


def test_a_teacher_sees_the_students_view_in_its_own_normalisation(quick_compiles):
    """The teacher returns its input pixels as logits, so the step's KD target is exactly what
    the teacher saw: the augmented batch normalised with the teacher's statistics."""

    class Pixels(nnx.Module):
        def __call__(self, x):
            return x.reshape(x.shape[0], -1)[:, :C]

    def objective(out, teacher_out, labels, step):
        return jnp.mean(out["logits"]), {"teacher_mean": jnp.mean(teacher_out[0]["logits"])}

    student_recipe = augment.Preprocess(mean=(0.5,), std=(0.5,), crop_padding=1, flip=True)
    teacher_norm = ((0.2,), (0.3,))
    student = user.TinyNet(D, C, rngs=nnx.Rngs(0))
    tx = optax.sgd(0.1)
    graphdef, state = init_train_state(student, tx, seed=3)
    step = make_distill_step(graphdef, tx, objective, preprocess=student_recipe,
                             teachers=[freeze(Pixels(), normalization=teacher_norm)])
    batch = _batch(0)
    key = jax.random.fold_in(jax.random.wrap_key_data(jnp.array(state.rng, copy=True)), 0)
    _, metrics = step(state, batch)
    own = augment.preprocess(jnp.asarray(batch["image"]),
                             dataclasses.replace(student_recipe, mean=(0.2,), std=(0.3,)),
                             key=key, dtype=jnp.float32)
    expected = np.asarray(own).reshape(16, -1)[:, :C].mean()
    np.testing.assert_allclose(metrics["teacher_mean"], expected, rtol=1e-5, atol=1e-6)


def test_renormalize_is_the_teachers_own_normalisation():
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 5, 5, 3), np.uint8))
    student = augment.Preprocess(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = augment.preprocess(images, student, key=None, dtype=jnp.float32)
    np.testing.assert_allclose(augment.renormalize(x, student, (mean, std)),
                               augment.normalize(images, mean, std, jnp.float32), atol=2e-6)
    assert augment.renormalize(x, student, None) is x
    with pytest.raises(ValueError, match=r"normalisation mean=\(0.1, 0.2\) has 2 values for "
                                         r"3-channel images; give one per channel"):
        augment.renormalize(x, student, ((0.1, 0.2), (1.0, 1.0)))


def test_a_teacher_from_another_dataset_with_the_same_classes(user_runs, tmp_path, capsys):
    """Trained on fashion_mnist, distilling on an mnist copy: accepted on the class count, with
    a note saying whose job the class order is; the teacher's normalisation travels with it."""
    src = data.make_synthetic_idx_dir(str(tmp_path / "src"), 96, 50, seed=1)
    other = str(tmp_path / "tfds")
    assert cli.main(["prepare", "mnist", "--from", src, "--data-dir", other,
                     "--skip-checksums"]) == 0
    assert cli.main(["distill", "--config", f"{EXP}/kd.py", "--workdir", str(tmp_path / "kd"),
                     f"--config.teacher.workdir={user_runs['teacher']}",
                     "--config.data.name=mnist", f"--config.data.data_dir={other}",
                     *TINY]) == 0
    out = capsys.readouterr().out
    assert ("was trained on 'fashion_mnist', this run distils on 'mnist'; both have 10 classes, "
            "which must be the same classes in the same order") in out


def test_a_model_whose_output_is_not_logits_is_refused(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"the model model.name='_user_models:WrongOutput' returns "
                                         r"an output of shape \(2, 5\) for a batch of 2 images, "
                                         r"but kdjax needs logits of shape \[batch, classes\] = "
                                         r"\(2, 10\)"):
        cli.main(["train", "--config", f"{EXP}/student_scratch.py", "--workdir",
                  str(tmp_path / "w"), "--config.model.name=_user_models:WrongOutput",
                  "--config.model.kwargs={}", f"--config.data.data_dir={data_dir}", *TINY])


def test_tap_errors_name_the_config_key(user_runs, tmp_path):
    common = ["distill", "--config", f"{EXP}/fitnet.py", "--workdir", str(tmp_path / "w"),
              f"--config.teacher.workdir={user_runs['teacher']}",
              f"--config.data.data_dir={user_runs['data_dir']}", "--config.model.name=mlp",
              "--config.model.kwargs={'hidden': (16,)}", *TINY]
    with pytest.raises(ValueError, match="loss.teacher_taps 'layer3' matches no module of "
                                         "TinyNet; tap one of its module paths"):
        cli.main([*common, "--config.loss.student_taps=('hidden1',)",
                  "--config.loss.teacher_taps=('layer3',)"])
    with pytest.raises(ValueError, match=r"loss.teacher_taps 'blocks\.\*' matches 2 modules"):
        cli.main([*common, "--config.loss.student_taps=('hidden1',)",
                  "--config.loss.teacher_taps=('blocks.*',)"])


def test_unimportable_model_names_say_how_to_fix_them():
    with pytest.raises(ValueError, match=r"model 'no_such_pkg\.models:Net': cannot import module "
                                         r"'no_such_pkg\.models'.*put its folder on PYTHONPATH"):
        models.resolve("no_such_pkg.models:Net")
    with pytest.raises(ValueError, match=r"module '_user_models' has no attribute 'Nope'"):
        models.resolve("_user_models:Nope")
    with pytest.raises(ValueError, match=r"unknown model 'resnet9'; valid names: .* or your own "
                                         r"model as an importable 'package.module:ClassName'"):
        models.resolve("resnet9")
