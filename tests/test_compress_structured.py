"""Structured pruning removes channels physically (kdjax.compress.structured)."""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from conftest import randomize_batchnorms
from flax import nnx

from kdjax import models, plan as plan_lib
from kdjax.compress import prune, structured, training
from kdjax.models import ModelSpec

SHAPE = (28, 28, 1)
pytestmark = pytest.mark.usefixtures("quick_compiles")


def prune_config(**kw) -> plan_lib.Prune:
    return dataclasses.replace(plan_lib.as_plan({}).prune, method="structured", **kw)


def logits(model, x):
    # One compiled forward instead of an eager one (dozens of per-operation compiles).
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)


@pytest.mark.parametrize("name, kwargs, criterion", [  # (MLPs: test_compress_training)
    ("cnn_tiny", {}, "bn_scale"),
    ("resnet8", {}, "l1"),
])
def test_shrunk_model_gives_the_masked_models_logits(name, kwargs, criterion):
    spec = ModelSpec(name, 10, SHAPE, kwargs, "float32")
    model = randomize_batchnorms(nnx.jit(lambda: spec.build(0))())
    plan = prune.make_plan(prune_config(sparsity=0.5, criterion=criterion), model, SHAPE, 10)
    model = prune.apply_masks(model, plan)
    small, small_spec, sizes = structured.shrink(model, spec)
    x = np.random.default_rng(0).normal(size=(4, *SHAPE)).astype(np.float32)
    # Removing a channel removes additions of exact zeros: equal up to the summation order XLA
    # picks for the narrower shapes.
    np.testing.assert_allclose(logits(small, x), logits(model, x), rtol=1e-5, atol=1e-5)
    assert all(after == before - round(0.5 * before) for before, after in sizes.values())
    assert models.count_params(small) < 0.75 * models.count_params(model)
    # The spec alone rebuilds the shrunk architecture (checkpoints and exports store it).
    rebuilt = ModelSpec.from_json(small_spec.to_json()).abstract()
    assert jax.tree.map(np.shape, nnx.state(rebuilt)) == jax.tree.map(np.shape, nnx.state(small))


def test_prune_once_shrinks_a_trained_model_for_its_student():
    spec = ModelSpec("cnn_tiny", 10, SHAPE, {}, "float32")
    model = randomize_batchnorms(nnx.jit(lambda: spec.build(0))())
    small, small_spec = training.prune_once(model, spec, prune_config(sparsity=0.75))
    assert small_spec.kwargs == {"channels": (2, 4), "dense": 8}
    assert small.conv2.conv.kernel.shape == (3, 3, 2, 4)


def test_a_residual_group_is_named_by_any_of_its_layers():
    model = nnx.eval_shape(lambda: models.create_model("resnet8", num_classes=10,
                                                       rngs=nnx.Rngs(0), input_shape=SHAPE))
    plan = prune.make_plan(prune_config(sparsity=0.5, targets={"stages/1/0/shortcut": 0.25}),
                           model, SHAPE, 10)
    assert {t.name: t.schedule.final for t in plan.targets} == {
        "stem/conv": 0.5, "stages/0/0/c1/conv": 0.5, "stages/1/0/c1/conv": 0.5,
        "stages/1/0/c2/conv": 0.25, "stages/2/0/c1/conv": 0.5, "stages/2/0/c2/conv": 0.5}
    plan = prune.make_plan(prune_config(sparsity=0.5, exclude=("stages/0/0/c2",)), model, SHAPE,
                           10)
    assert "stem/conv" not in [t.name for t in plan.targets]  # stage 1 shares the stem's group


def test_a_model_with_no_removable_channels_is_refused():
    model = nnx.eval_shape(lambda: nnx.Linear(784, 10, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="prune.method='structured' found no channel group of "
                                         "the Linear that can be removed: the model: its channels are the "
                                         "model's output"):
        prune.make_plan(prune_config(sparsity=0.5), model, (784,), 10)


def test_the_optimizer_keeps_a_residual_group_pruned_through_momentum():
    model = nnx.eval_shape(lambda: models.create_model("resnet8", num_classes=10,
                                                       rngs=nnx.Rngs(0), input_shape=(8, 8, 3)))
    plan = prune.make_plan(prune_config(sparsity=0.5, criterion="group_l2"), model, (8, 8, 3), 10)
    params = jax.tree.map(lambda v: np.random.default_rng(0).normal(size=v.shape).astype(
        np.float32), nnx.state(model, nnx.Param))
    tx = prune.wrap(optax.sgd(0.1, momentum=0.9), plan, prefix=())

    @jax.jit
    def steps(params):
        state = tx.init(params)
        for i in range(3):  # the masks are made at the first update, momentum builds after
            grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(i), p.shape), params)
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        return params

    flat = {tuple(k): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(steps(params))}
    group = next(t.group for t in plan.targets if t.name == "stages/1/0/c2/conv")
    dead = [~(group.per_channel(flat[m.path], m) != 0).any(axis=(0, 2, 3)) for m in group.masked]
    # Every Param slice of the stage's residual channels (both convolutions into the sum, their
    # BatchNorms, the next stage's readers) is exactly 0 on the same 16 channels.
    assert {structured.layer_name(m.path) for m in group.masked} >= {
        "stages/1/0/c2/conv/kernel", "stages/1/0/shortcut/conv/kernel",
        "stages/2/0/c1/conv/kernel", "stages/2/0/shortcut/conv/kernel"}
    assert all((d == dead[0]).all() for d in dead) and int(dead[0].sum()) == 16
