"""The method registry (kdjax.methods): one record per loss.name, the weighted combinator, and
the Distillee's parts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax import config as config_lib, losses, methods, models, objectives
from kdjax.distillee import Distillee

RNG = np.random.default_rng(0)
S, T = (jnp.asarray(RNG.normal(size=(6, 5)), jnp.float32) for _ in range(2))
Y = jnp.asarray(RNG.integers(0, 5, 6), jnp.int32)


@pytest.mark.parametrize("task", sorted(methods.TASKS))
def test_every_registered_name_resolves(task):
    names = methods.names(task)
    assert names and "ce" in names
    for name in names:
        method = methods.get(name, task=task)
        assert method.name == name and method.task == task and method.family in methods.FAMILIES
    assert set(methods.names("lm")) == {"ce", *losses.TOKEN_DIVERGENCES}


def test_needs_teacher_by_family():
    for name in methods.names():
        method = methods.get(name)
        expected = {"supervised": False, "mutual": False, "logit": True, "feature": True}.get(
            method.family)
        if expected is not None:
            assert method.needs_teacher({}) is expected, name
    assert methods.get("tfkd").needs_teacher({"variant": "self"})
    assert not methods.get("tfkd").needs_teacher({"variant": "virtual"})
    assert not methods.get("byot").needs_teacher({})
    assert methods.get("crd").needs_dataset_labels and not methods.get("at").needs_dataset_labels


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown loss.name='kld'; valid names: \[.*'kd'.*\]"):
        methods.get("kld")
    with pytest.raises(ValueError, match=r"unknown loss.name='kd'; valid names: \[.*'forward_kl'"):
        methods.get("kd", task="lm")
    with pytest.raises(ValueError, match=r"already registered"):
        methods.register(methods.Method("kd", "logit", objective=lambda *a, **k: None))


def test_combine_is_the_weighted_sum_and_logs_each_term():
    a, b = RNG.normal(size=3), RNG.normal(size=3)
    mix = methods.combine(
        methods.Term("first", 0.3, lambda x, y, step: jnp.sum(x * y)),
        methods.Term("second", methods.ramp(2.0, 4), lambda x, y, step: (jnp.sum(x - y),
                                                                          {"extra": x[0]})),
        methods.Term("hidden", 0.5, lambda x, y, step: jnp.sum(y), log=False))
    for step in (0, 1, 3, 10):
        total, metrics = jax.jit(mix)(jnp.asarray(a), jnp.asarray(b), jnp.int32(step))
        w = 2.0 * min(1.0, (step + 1) / 4)
        expected = 0.3 * np.sum(a * b) + w * np.sum(a - b) + 0.5 * np.sum(b)
        np.testing.assert_allclose(total, expected, rtol=1e-5)
        np.testing.assert_allclose(metrics["first"], np.sum(a * b), rtol=1e-5)
        np.testing.assert_allclose(metrics["second"], np.sum(a - b), rtol=1e-5)
        np.testing.assert_allclose(metrics["second_weight"], w, rtol=1e-6)
        assert set(metrics) == {"first", "second", "second_weight", "extra"}
    with pytest.raises(ValueError, match="distinct names"):
        methods.combine(methods.Term("a", 1.0, len), methods.Term("a", 1.0, len))


def test_a_registered_method_runs_through_from_config():
    def objective(loss, teacher=None, *, total_steps=None):
        scale = loss.kwargs["scale"]
        return methods.combine(methods.Term(
            "l2", scale, lambda out, teachers, labels, step: jnp.mean(
                (out["logits"] - teachers[0]["logits"]) ** 2)))

    def check(loss):
        if loss.kwargs.get("scale", 0) <= 0:
            raise ValueError(f"loss.kwargs.scale must be > 0, got {loss.kwargs.get('scale')}")

    methods.register(methods.Method("test_l2", "logit", objective=objective, check=check))
    try:
        c = config_lib.base_config().loss
        c.update(name="test_l2", kwargs={"scale": 0.5})
        assert objectives.needs_teacher("test_l2")
        total, metrics = objectives.from_config(c)({"logits": S}, ({"logits": T},), Y,
                                                   jnp.int32(0))
        np.testing.assert_allclose(total, 0.5 * np.mean((np.asarray(S) - np.asarray(T)) ** 2),
                                   rtol=1e-6)
        assert set(metrics) == {"l2"}
        c.kwargs = {"scale": -1.0}
        with pytest.raises(ValueError, match="scale must be > 0"):
            objectives.from_config(c)
    finally:
        del methods.REGISTRY["image"]["test_l2"]


def test_a_distillee_without_parts_is_the_plain_student():
    student = models.create_model("mlp", hidden=(8,), in_features=12, num_classes=5,
                                  rngs=nnx.Rngs(0))
    x = jnp.asarray(RNG.normal(size=(4, 12)), jnp.float32)
    bundle = Distillee(student)
    np.testing.assert_array_equal(bundle(x), student(x))
    feats = bundle.features(x, train=False)
    assert set(feats) == set(student.features(x, train=False))
    np.testing.assert_array_equal(feats["logits"], student(x))
    params = nnx.state(bundle, nnx.Param)
    assert set(params) == {"student"}  # empty slots add nothing to the checkpointed tree
    with pytest.raises(ValueError, match=r"slots \['connectors', 'peers', 'exits', "
                                         r"'temperature'\]"):
        Distillee(student, projector=bundle)


def test_build_distillee_adds_the_methods_parts_and_refuses_stray_peers():
    spec = models.ModelSpec("mlp", 5, (4, 4, 1), kwargs={"hidden": (8,)})
    student = spec.build(0)
    c = config_lib.base_config().loss
    c.update(name="byot", student_taps=("hidden.0",))
    bundle = methods.build_distillee(c, student, spec, (), image_shape=(4, 4, 1), seed=0)
    assert len(bundle.exits) == 1 and not len(bundle.peers) and not len(bundle.connectors)
    c.update(name="kd", student_taps=())
    with pytest.raises(ValueError, match=r"model.peers=\('mlp',\).*not by loss.name='kd'"):
        methods.build_distillee(c, student, spec, (), image_shape=(4, 4, 1), seed=0,
                                peers=(spec,))
    c.name = "dml"
    bundle = methods.build_distillee(c, student, spec, (), image_shape=(4, 4, 1), seed=0,
                                     peers=(spec,))
    assert len(bundle.peers) == 1
