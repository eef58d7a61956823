"""Objectives: the config's loss section -> the scalar the step differentiates."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import _float32 as f32
from kdjax import config as config_lib, losses, objectives

pytestmark = pytest.mark.usefixtures("quick_compiles")  # what is computed, not its speed

RNG = np.random.default_rng(0)
S, T1, T2 = (jnp.asarray(RNG.normal(size=(6, 5)), jnp.float32) for _ in range(3))
Y = jnp.asarray(RNG.integers(0, 5, 6), jnp.int32)
# An objective and the loss functions it combines, called here, are two programs: equal up to
# float32 reassociation (_float32.py) along the 5 classes and 6 examples they sum.
N = 5 + 6


def test_kd_is_hintons_mix():
    obj = objectives.logit_distillation("kd", ce_weight=0.1, kd_weight=0.9, temperature=4.0)
    total, m = obj({"logits": S}, ({"logits": T1},), Y, jnp.int32(0))
    expected = losses.hinton_kd(S, T1, Y, temperature=4.0, alpha=0.9).mean()
    f32.assert_close(total, expected, n=N)
    np.testing.assert_allclose(m["accuracy"], np.mean(np.argmax(S, -1) == Y))


def test_dkd_gets_labels_and_warmup_ramps():
    obj = objectives.logit_distillation("dkd", ce_weight=1.0, kd_weight=1.0, kd_warmup_steps=10,
                                        alpha=1.0, beta=8.0, temperature=4.0)
    dkd = losses.dkd(S, T1, Y, alpha=1.0, beta=8.0, temperature=4.0).mean()
    ce = losses.cross_entropy(S, Y).mean()
    for step, ramp in ((0, 0.1), (4, 0.5), (9, 1.0), (50, 1.0)):
        total, _ = obj({"logits": S}, ({"logits": T1},), Y, jnp.int32(step))
        np.testing.assert_allclose(total, ce + ramp * dkd, rtol=1e-5)


def test_several_teachers_are_averaged_at_the_loss_temperature():
    obj = objectives.logit_distillation("kd", ce_weight=0.0, kd_weight=1.0, temperature=3.0)
    total, _ = obj({"logits": S}, ({"logits": T1}, {"logits": T2}), Y, jnp.int32(0))
    p = lambda z: np.exp(z / 3) / np.exp(z / 3).sum(-1, keepdims=True)  # noqa: E731
    target = (p(np.asarray(T1)) + p(np.asarray(T2))) / 2
    ps = p(np.asarray(S))
    expected = 9 * np.mean(np.sum(target * (np.log(target) - np.log(ps)), -1))
    np.testing.assert_allclose(total, expected, rtol=1e-5)


def test_supervised_and_from_config():
    c = config_lib.base_config()
    total, _ = objectives.from_config(c.loss)({"logits": S}, (), Y, jnp.int32(0))
    f32.assert_close(total, losses.cross_entropy(S, Y).mean(), n=N)
    c.loss.name, c.loss.kwargs = "jsd", {"beta": 0.3}
    c.loss.ce_weight = 0.0
    total, _ = objectives.from_config(c.loss)({"logits": S}, ({"logits": T1},), Y, jnp.int32(0))
    f32.assert_close(total, losses.generalized_jsd(S, T1, beta=0.3).mean(), n=N)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown loss.name='kld'.*'kd'"):
        objectives.logit_distillation("kld", ce_weight=1.0, kd_weight=1.0)
    with pytest.raises(ValueError, match=r"\['temp'\] are not hyperparameters.*'temperature'"):
        objectives.logit_distillation("kd", ce_weight=1.0, kd_weight=1.0, temp=2.0)
    with pytest.raises(ValueError, match="loss.ce_weight must be >= 0, got ce_weight=-1"):
        objectives.logit_distillation("kd", ce_weight=-1.0, kd_weight=1.0)
    c = config_lib.base_config()
    c.loss.kwargs = {"temperature": 2.0}
    with pytest.raises(ValueError, match="loss.name='ce' takes no loss.kwargs"):
        objectives.from_config(c.loss)
    obj = objectives.logit_distillation("kd", ce_weight=1.0, kd_weight=1.0)
    with pytest.raises(ValueError, match="distils from a teacher, but none was given"):
        obj({"logits": S}, (), Y, jnp.int32(0))


def test_losses_import_alone():
    """`import kdjax.losses` pulls in neither Flax, Orbax nor TFDS."""
    code = ("import sys, kdjax.losses; "
            "print(sorted(m for m in ('flax', 'orbax', 'tensorflow_datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _feature_out(pairs_per_teacher):
    return {"logits": S, "connectors": pairs_per_teacher}


F1, F2, F3 = (jnp.asarray(RNG.normal(size=(6, 3)), jnp.float32) for _ in range(3))


def test_feature_objective_is_repdistillers_mix_summed_over_pairs_and_weighted_over_teachers():
    obj = objectives.feature_distillation("fitnet", ce_weight=0.5, kd_weight=0.25,
                                          feature_weight=10.0, kd_temperature=2.0,
                                          teacher_weights=(3.0, 1.0))
    out = _feature_out((((F1, F2), (F2, F3)), ((F1, F3),)))
    total, m = obj(out, ({"logits": T1}, {"logits": T2}), Y, jnp.int32(0))
    fit = lambda a, b: float(losses.fitnet(a, b).mean())  # noqa: E731
    feature = 0.75 * (fit(F1, F2) + fit(F2, F3)) + 0.25 * fit(F1, F3)
    kd = losses.soft_target_kl(S, losses.ensemble_teacher([T1, T2], weights=(3.0, 1.0),
                                                          temperature=2.0),
                               temperature=2.0).mean()
    ce = losses.cross_entropy(S, Y).mean()
    f32.assert_close(m["feature"], feature, n=N)
    np.testing.assert_allclose(total, 0.5 * ce + 0.25 * kd + 10.0 * feature, rtol=1e-5)


def test_hint_steps_train_the_hint_alone_first():
    obj = objectives.feature_distillation("fitnet", ce_weight=1.0, feature_weight=2.0,
                                          hint_steps=5)
    out = _feature_out((((F1, F2),),))
    hint = float(losses.fitnet(F1, F2).mean())
    early, _ = obj(out, ({"logits": T1},), Y, jnp.int32(4))
    late, _ = obj(out, ({"logits": T1},), Y, jnp.int32(5))
    f32.assert_close(early, hint, n=N)
    f32.assert_close(late, losses.cross_entropy(S, Y).mean() + 2.0 * hint, n=N)


def test_per_teacher_logit_losses_are_weighted():
    obj = objectives.logit_distillation("kd", ce_weight=0.0, kd_weight=1.0, temperature=2.0,
                                        teacher_weights=(1.0, 3.0), combine="per_teacher")
    total, _ = obj({"logits": S}, ({"logits": T1}, {"logits": T2}), Y, jnp.int32(0))
    kl = lambda t: losses.soft_target_kl(S, t, temperature=2.0).mean()  # noqa: E731
    f32.assert_close(total, 0.25 * kl(T1) + 0.75 * kl(T2), n=N)


def test_mutual_learning_sums_every_students_loss():
    obj = objectives.mutual_learning(ce_weight=1.0, kd_weight=0.5, temperature=1.0)
    total, m = obj({"logits": S, "peers": ({"logits": T1},)}, (), Y, jnp.int32(0))
    kl = losses.mutual_learning([S, T1])
    ce = [losses.cross_entropy(z, Y).mean() for z in (S, T1)]
    f32.assert_close(total, sum(ce) + 0.5 * kl.mean(axis=-1).sum(), n=N)
    assert set(m) == {"ce", "kd", "accuracy", "peer1/accuracy"}


def test_method_errors_name_the_problem():
    c = config_lib.base_config().loss
    c.update(name="crd", kwargs={"num_negative": 5})
    with pytest.raises(ValueError, match=r"\['num_negative'\] are not hyperparameters of "
                                         r"loss.name='crd'; valid: \['temperature'\] \(loss\) "
                                         r"and \[.*'num_negatives'.*\] \(connector\)"):
        objectives.from_config(c)
    c.update(name="kd", kwargs={}, student_taps=("stage1",), teacher_taps=("stage1",))
    with pytest.raises(ValueError, match="belong to feature methods"):
        objectives.from_config(c)
    c.name = "fitnets"
    with pytest.raises(ValueError, match=r"unknown loss.name='fitnets'.*'fitnet'"):
        objectives.from_config(c)
    with pytest.raises(ValueError, match="teacher.combine must be one of"):
        objectives.logit_distillation("kd", ce_weight=1.0, kd_weight=1.0, combine="vote")
    obj = objectives.feature_distillation("at")
    with pytest.raises(ValueError, match="needs the student's connectors"):
        obj({"logits": S}, ({"logits": T1},), Y, jnp.int32(0))
    with pytest.raises(ValueError, match="needs peer students: set model.peers"):
        objectives.mutual_learning()({"logits": S}, (), Y, jnp.int32(0))
    with pytest.raises(ValueError, match=r"teacher.weights must be 2 non-negative numbers"):
        objectives.logit_distillation("kd", ce_weight=1.0, kd_weight=1.0, combine="per_teacher",
                                      teacher_weights=(1.0,))(
            {"logits": S}, ({"logits": T1}, {"logits": T2}), Y, jnp.int32(0))


def np_log_softmax(z):
    z = np.float64(z) - np.max(z, -1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kd(s, t, temperature):
    """T^2 KL(softmax(t / T) || softmax(s / T)) per row, float64."""
    lt, ls = np_log_softmax(np.float64(t) / temperature), np_log_softmax(np.float64(s) / temperature)
    return temperature**2 * np.sum(np.exp(lt) * (lt - ls), -1)


def np_ce(z, y):
    return -np_log_softmax(z)[np.arange(len(y)), np.asarray(y)]


def test_tfkd_virtual_and_self_are_the_papers_mixes():
    c = config_lib.base_config().loss
    c.update(name="tfkd", ce_weight=0.9, kd_weight=0.1,
             kwargs={"variant": "virtual", "correct_prob": 0.9, "temperature": 5.0})
    total, m = objectives.from_config(c)({"logits": S}, (), Y, jnp.int32(0))
    virtual = np.where(np.arange(5) == np.asarray(Y)[:, None], np.log(0.9), np.log(0.1 / 4))
    expected = 0.9 * np_ce(S, Y).mean() + 0.1 * np_kd(S, virtual, 5.0).mean()
    np.testing.assert_allclose(total, expected, rtol=1e-5)
    np.testing.assert_allclose(m["kd"], np_kd(S, virtual, 5.0).mean(), rtol=1e-5)
    with pytest.raises(ValueError, match=r"variant='virtual' has a virtual teacher: run it "
                                         r"without teacher.workdir"):
        objectives.from_config(c)({"logits": S}, ({"logits": T1},), Y, jnp.int32(0))
    c.kwargs = {"variant": "self", "temperature": 6.0}  # Hinton's KD from a copy of the student
    c.update(ce_weight=0.05, kd_weight=0.95)
    total, _ = objectives.from_config(c)({"logits": S}, ({"logits": T1},), Y, jnp.int32(0))
    np.testing.assert_allclose(total, 0.05 * np_ce(S, Y).mean() + 0.95 * np_kd(S, T1, 6.0).mean(),
                               rtol=1e-5)
    assert objectives.needs_teacher("tfkd", c.kwargs)
    assert not objectives.needs_teacher("tfkd", {"variant": "virtual"})
    assert not objectives.needs_teacher("byot")
    for kwargs, match in [({"variant": "teacher"}, r"variant of loss.name='tfkd' must be one of "
                                                   r"\['virtual', 'self'\], got 'teacher'"),
                          ({"variant": "self", "correct_prob": 0.9}, r"correct_prob is the "
                                                                     r"virtual teacher's"),
                          ({"alpha": 0.1}, r"loss.kwargs \['alpha'\] are not hyperparameters "
                                           r"of loss.name='tfkd'")]:
        c.kwargs = kwargs
        with pytest.raises(ValueError, match=match):
            objectives.from_config(c)


def test_byot_is_the_references_mix_over_its_exits():
    rng = np.random.default_rng(5)
    e1, e2 = (jnp.asarray(rng.normal(size=(6, 5)), jnp.float32) for _ in range(2))
    f1, f2, deep = (jnp.asarray(rng.normal(size=(6, 3)), jnp.float32) for _ in range(3))
    out = {"logits": S, "exits": {"exit_stage1": (e1, f1, deep), "exit_stage2": (e2, f2, deep)}}
    c = config_lib.base_config().loss
    c.update(name="byot", ce_weight=0.7, kd_weight=0.3, feature_weight=0.05,
             kwargs={"temperature": 3.0}, student_taps=("stage1", "stage2"))
    total, m = objectives.from_config(c)(out, (), Y, jnp.int32(0))

    def hint(f):
        f, g = np.float64(f), np.float64(deep)
        return np.sum(np.where((f > 0) | (g > 0), (f - g) ** 2, 0.0), -1).mean()

    kd = sum(np_kd(e, S, 3.0).mean() for e in (e1, e2))
    expected = (0.7 * (np_ce(S, Y).mean() + np_ce(e1, Y).mean() + np_ce(e2, Y).mean())
                + 0.3 * kd + 0.05 * (hint(f1) + hint(f2)))
    np.testing.assert_allclose(total, expected, rtol=1e-5)
    np.testing.assert_allclose(m["kd"], kd, rtol=1e-5)
    assert m["exit_stage2/accuracy"] == pytest.approx(
        np.mean(np.asarray(e2).argmax(-1) == np.asarray(Y)))
    with pytest.raises(ValueError, match=r"needs the student's exits"):
        objectives.from_config(c)({"logits": S}, (), Y, jnp.int32(0))
    with pytest.raises(ValueError, match=r"teaches the student's exits from its own deepest"):
        objectives.from_config(c)(out, ({"logits": T1},), Y, jnp.int32(0))
