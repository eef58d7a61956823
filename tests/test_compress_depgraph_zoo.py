"""Every zoo CNN shrunk by coupled groups is rebuilt from its ModelSpec (kdjax.compress.structured
records the widths), with the masked model's logits."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _float32 import assert_close
from flax import nnx

from kdjax import models
from kdjax import plan as plan_lib
from kdjax.compress import prune, structured
from kdjax.models import ModelSpec

pytestmark = pytest.mark.usefixtures("quick_compiles")


def random_model(spec):
    """The spec's model with random values drawn on the host (no compiled initialiser: the
    ImageNet ResNet's and MobileNetV2's take most of a test's time), variances positive."""
    model = spec.abstract()
    rng = np.random.default_rng(0)
    state = nnx.state(model)
    for key, var in nnx.to_flat_state(state):
        value = rng.normal(0, 0.1, var.shape).astype(np.float32)
        var.set_value(jnp.asarray(np.abs(value) + 0.5 if key[-1] == "var" else value))
    nnx.update(model, state)
    return model


def shrunk(name, shape):
    spec = ModelSpec(name, 10, shape, {}, "float32")
    model = random_model(spec)
    config = dataclasses.replace(plan_lib.as_plan({}).prune, method="structured", sparsity=0.5,
                                 criterion="group_l2")
    prune.apply_masks(model, prune.make_plan(config, model, shape, 10))
    small, small_spec, _ = structured.shrink(model, spec)
    # Checkpoints store the spec as JSON (tuples become lists): the rebuilt shapes must match.
    rebuilt = ModelSpec.from_json(json.loads(json.dumps(small_spec.to_json()))).abstract()
    assert jax.tree.map(np.shape, nnx.state(rebuilt)) == jax.tree.map(np.shape, nnx.state(small))
    return model, small, small_spec


@pytest.mark.parametrize("name, shape, kwargs, terms", [
    ("wrn_16_1", (8, 8, 3), {"channels": (8, 8, 16, 32), "block_widths": (8, 8, 16, 16, 32, 32)},
     9 * 64 + 64),
    ("vgg8", (8, 8, 3), {"widths": ((32,), (64,), (128,), (256,), (256,))}, 9 * 512 + 512),
])
def test_a_shrunk_zoo_cnn_gives_the_masked_logits(name, shape, kwargs, terms):
    model, small, small_spec = shrunk(name, shape)
    assert small_spec.kwargs == kwargs
    assert models.count_params(small) < 0.3 * models.count_params(model)
    x = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
    graphdef, state = nnx.split(small)
    got = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    graphdef, state = nnx.split(model)
    want = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    assert_close(got, want, n=terms)


def test_imagenet_resnet_and_mobilenet_widths_rebuild_from_the_spec():
    _, small, spec = shrunk("resnet18", (16, 16, 3))
    assert spec.kwargs == {"channels": (32, 32, 64, 128, 256),
                           "block_widths": (32, 32, 64, 64, 128, 128, 256, 256)}
    assert small.stages[3][1].c2.conv.kernel.shape == (3, 3, 256, 256)
    _, small, spec = shrunk("mobilenetv2", (16, 16, 3))
    assert spec.kwargs["channels"] == (8, 4, 6, 8, 16, 24, 40, 80, 640)
    assert small.groups[2][1].dw.conv.kernel.shape == (3, 3, 1, 48)
    assert small.groups[2][1].use_res and not small.groups[2][0].use_res
