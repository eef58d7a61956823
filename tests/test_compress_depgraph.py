"""Coupled channel groups traced from the model (kdjax.compress.coupling), pruned as a whole and
removed physically (kdjax.compress.structured): residual widths shrink."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _float32 import assert_close
from _user_models import NormNet, PoolResNet
from conftest import randomize_batchnorms
from flax import nnx

from kdjax import models, plan as plan_lib
from kdjax.compress import prune, structured, training
from kdjax.compress.coupling import layer_name
from kdjax.models import ModelSpec

pytestmark = pytest.mark.usefixtures("quick_compiles")
RGB = (8, 8, 3)


def prune_config(**kw) -> plan_lib.Prune:
    return dataclasses.replace(plan_lib.as_plan({}).prune, **{"method": "structured", **kw})


def abstract(name, shape=RGB):
    return nnx.eval_shape(lambda: models.create_model(name, num_classes=10, rngs=nnx.Rngs(0),
                                                      input_shape=shape))


def groups_of(model, shape=RGB):
    st = structured.structure(model, shape)
    return st, {g.name: g for g in st.groups}


def members(group):
    return {(layer_name(m.path), m.axis) for m in group.members}


def logits(model, x):
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))


# -- group derivation ------------------------------------------------------------------------

def test_a_cifar_resnet_stage_residual_channels_are_one_group():
    st, groups = groups_of(abstract("resnet8"))
    assert list(groups) == ["stem/conv", "stages/0/0/c1/conv", "stages/1/0/c1/conv",
                            "stages/1/0/c2/conv", "stages/2/0/c1/conv", "stages/2/0/c2/conv"]
    # Stage 1 (stride 1, 16 -> 16: identity shortcut) shares the stem's channels.
    assert [layer_name(p) for p in groups["stem/conv"].producers] == [
        "stem/conv", "stages/0/0/c2/conv"]
    # Stage 2: both convolutions feeding the add (c2 and the shortcut projection), their
    # BatchNorms, and every reader of the sum (stage 3's c1 and its projection).
    stage2 = groups["stages/1/0/c2/conv"]
    assert [layer_name(p) for p in stage2.producers] == ["stages/1/0/c2/conv",
                                                          "stages/1/0/shortcut/conv"]
    assert members(stage2) == {
        *{(f"stages/1/0/{layer}/{name}", 0) for layer in ("c2/bn", "shortcut/bn")
          for name in ("scale", "bias", "mean", "var")},
        ("stages/1/0/c2/conv/kernel", 3), ("stages/1/0/shortcut/conv/kernel", 3),
        ("stages/2/0/c1/conv/kernel", 2), ("stages/2/0/shortcut/conv/kernel", 2)}
    assert stage2.size == 32
    assert members(groups["stages/2/0/c2/conv"]) >= {("fc/kernel", 0)}
    assert st.refused == {"fc": "its channels are the model's output"}
    assert st.unfollowed == {}


def test_flatten_before_a_dense_layer_maps_a_channel_to_strided_inputs():
    _, groups = groups_of(abstract("cnn_tiny", (8, 8, 1)), (8, 8, 1))
    fc = [m for m in groups["conv2/conv"].members if layer_name(m.path) == "fc/kernel"]
    # A 2x2 map of 16 channels flattened NHWC: input (h * 2 + w) * 16 + c.
    assert [(m.axis, m.offset, m.outer, m.inner) for m in fc] == [(0, 0, 4, 1)]
    np.testing.assert_array_equal(fc[0].channel_map(64, 16), np.tile(np.arange(16), 4))


@pytest.mark.parametrize("name, shape, expect", [
    # MobileNetV2: the depthwise convolution shares its expansion's channels; the narrow
    # outputs of a stage's blocks are one residual group.
    ("mobilenetv2", (16, 16, 3), {"groups/1/0/pw/conv": ["groups/1/0/pw/conv",
                                                         "groups/1/0/dw/conv"],
                                  "groups/2/0/pwl/conv": ["groups/2/0/pwl/conv",
                                                          "groups/2/1/pwl/conv",
                                                          "groups/2/2/pwl/conv"]}),
    # WRN's pre-activation blocks: the residual stream through both blocks of a stage.
    ("wrn_16_1", RGB, {"stages/1/0/conv2": ["stages/1/0/conv2", "stages/1/0/shortcut",
                                            "stages/1/1/conv2"]}),
    ("vgg8", (16, 16, 3), {"groups/3/0/conv": ["groups/3/0/conv"]}),
    # torchvision's ResNet: the stem and stage 1's blocks, through the max-pool.
    ("resnet18", (16, 16, 3), {"stem/conv": ["stem/conv", "stages/0/0/c2/conv",
                                             "stages/0/1/c2/conv"]}),
])
def test_groups_of_the_other_zoo_cnns(name, shape, expect):
    st, groups = groups_of(abstract(name, shape), shape)
    for group, producers in expect.items():
        assert [layer_name(p) for p in groups[group].producers] == producers
    assert st.refused == {"fc": "its channels are the model's output"}


def test_a_user_nnx_residual_model_couples_the_stem_with_the_residual_branch():
    model = nnx.eval_shape(lambda: PoolResNet(3, 10, width=6, rngs=nnx.Rngs(0)))
    _, groups = groups_of(model)
    assert list(groups) == ["stem"]
    assert [layer_name(p) for p in groups["stem"].producers] == ["stem", "conv"]
    assert members(groups["stem"]) == {
        ("stem/kernel", 3), ("stem/bias", 0), ("conv/kernel", 2), ("conv/kernel", 3),
        ("head/kernel", 0), *{(f"{bn}/{n}", 0) for bn in ("bn", "bn2")
                              for n in ("scale", "bias", "mean", "var")}}


def test_a_user_model_in_training_mode_is_traced_in_inference_mode():
    # Its Dropout's random mask would otherwise meet the channels as data without structure.
    model = NormNet(64, 10, rngs=nnx.Rngs(0))
    _, groups = groups_of(model, (8, 8, 1))
    assert [layer_name(p) for p in groups["fc"].producers] == ["fc"]
    assert members(groups["fc"]) >= {("bn/scale", 0), ("head/kernel", 0)}
    assert model.drop.deterministic is False  # the model itself is left as it was


class Branches(nnx.Module):
    """Two convolutions concatenated along channels, read by a third."""

    def __init__(self, rngs):
        self.a = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.b = nnx.Conv(3, 6, (1, 1), rngs=rngs)
        self.c = nnx.Conv(10, 8, (3, 3), rngs=rngs)
        self.head = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(jnp.concatenate([self.a(x), self.b(x)], axis=-1))
        return self.head(nnx.relu(self.c(x)).mean(axis=(1, 2)))


def test_a_concatenation_maps_each_branch_to_its_offset_in_the_reader():
    model = Branches(nnx.Rngs(0))
    _, groups = groups_of(model)
    reader = {name: [(m.offset, m.outer, m.inner) for m in g.members
                     if (layer_name(m.path), m.axis) == ("c/kernel", 2)]
              for name, g in groups.items()}
    assert reader == {"a": [(0, 1, 1)], "b": [(4, 1, 1)], "c": []}
    plan = prune.make_plan(prune_config(sparsity=0.5), model, RGB, 10)
    model = prune.apply_masks(model, plan)
    small, sizes = structured.shrink_in_place(model, RGB)
    assert sizes == {"a": (4, 2), "b": (6, 3), "c": (8, 4)}
    assert small.c.kernel.shape == (3, 3, 5, 4) and small.c.in_features == 5
    x = np.random.default_rng(0).normal(size=(2, *RGB)).astype(np.float32)
    assert_close(logits(small, x), logits(model, x), n=9 * 10 + 8)


class Unfollowed(nnx.Module):
    """A sort along channels (the tracer does not follow it) and a grouped convolution."""

    def __init__(self, rngs):
        self.a = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.b = nnx.Conv(8, 8, (3, 3), feature_group_count=2, rngs=rngs)
        self.c = nnx.Conv(8, 6, (3, 3), rngs=rngs)
        self.head = nnx.Linear(6, 10, rngs=rngs)

    def __call__(self, x):
        x = jnp.sort(self.a(x), axis=-1)
        x = nnx.relu(self.c(nnx.relu(self.b(x))))
        return self.head(x.mean(axis=(1, 2)))


def test_layers_the_tracer_cannot_follow_are_named_and_left_dense(capsys):
    model = nnx.eval_shape(lambda: Unfollowed(nnx.Rngs(0)))
    st, groups = groups_of(model)
    assert list(groups) == ["c"]
    assert st.unfollowed == {"a": "the operation 'sort', which the channel tracer does not follow"}
    assert st.refused["b"] == "a grouped convolution (feature_group_count=2)"
    plan = prune.make_plan(prune_config(sparsity=0.5), model, RGB, 10)
    assert [t.name for t in plan.targets] == ["c"]
    assert ("structured pruning leaves dense the channels of layers the channel tracer cannot "
            "follow: a (the operation 'sort', which the channel tracer does not follow)"
            in capsys.readouterr().out)
    with pytest.raises(ValueError, match="prune.targets pattern 'a' names layer 'a', whose output "
                                         "channels structured pruning leaves dense: the operation "
                                         "'sort'"):
        prune.make_plan(prune_config(sparsity=0.5, targets={"a": 0.5}), model, RGB, 10)


def test_a_sparsity_that_removes_a_whole_group_is_refused_before_training():
    model = abstract("resnet8")
    with pytest.raises(ValueError) as e:
        prune.make_plan(prune_config(sparsity=0.5, targets={"stages/1/0/shortcut": 0.99}),
                        model, RGB, 10)
    assert str(e.value) == (
        "structured sparsity 0.99 (prune.sparsity, or prune.targets) removes all 32 channels of "
        "group 'stages/1/0/c2/conv' (layers stages/1/0/c2/conv, stages/1/0/shortcut/conv): a "
        "group keeps at least one; give it at most 0.9688 (prune.targets) or add it to "
        "prune.exclude")


# -- masks and the physical shrink -----------------------------------------------------------

def test_pruned_channels_are_zero_in_every_member_of_their_group():
    spec = ModelSpec("resnet8", 10, RGB, {}, "float32")
    model = randomize_batchnorms(nnx.jit(lambda: spec.build(0))())
    plan = prune.make_plan(prune_config(sparsity=0.5, criterion="group_l2"), model, RGB, 10)
    model = prune.apply_masks(model, plan)
    params = {tuple(k): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))}
    assert len(plan.targets) == 6
    for t in plan.targets:
        g = t.group
        alive = [np.asarray(g.per_channel(params[m.path], m) != 0).any(axis=(0, 2, 3))
                 for m in g.masked]
        # Every Param member agrees channel by channel: all zero or (almost surely) all not.
        assert all((a == alive[0]).all() for a in alive), g.name
        assert int((~alive[0]).sum()) == g.size // 2, g.name


def test_a_shrunk_cifar_resnet_has_narrower_residual_stages_and_the_masked_logits():
    spec = ModelSpec("resnet8", 10, RGB, {}, "float32")
    model = randomize_batchnorms(nnx.jit(lambda: spec.build(0))())
    plan = prune.make_plan(prune_config(sparsity=0.5, criterion="group_l2"), model, RGB, 10)
    model = prune.apply_masks(model, plan)
    small, small_spec, sizes = structured.shrink(model, spec)
    assert small_spec.kwargs == {"channels": (8, 8, 16, 32), "block_widths": (8, 16, 32)}
    assert sizes["stages/1/0/c2/conv"] == (32, 16)
    assert small.stem.conv.kernel.shape == (3, 3, 3, 8)
    assert small.stages[1][0].c2.conv.kernel.shape == (3, 3, 16, 16)
    assert small.stages[1][0].shortcut.conv.kernel.shape == (1, 1, 8, 16)
    assert small.stages[2][0].c1.conv.kernel.shape == (3, 3, 16, 32)
    assert small.fc.kernel.shape == (32, 10)
    assert models.count_params(small) < 0.3 * models.count_params(model)
    x = np.random.default_rng(0).normal(size=(4, *RGB)).astype(np.float32)
    # Removing a channel removes additions of exact zeros: equal up to summation order (the
    # widest reduction: a 3x3 convolution over 64 channels, then the 64-wide classifier).
    assert_close(logits(small, x), logits(model, x), n=9 * 64 + 64)
    rebuilt = ModelSpec.from_json(small_spec.to_json()).abstract()
    assert jax.tree.map(np.shape, nnx.state(rebuilt)) == jax.tree.map(np.shape, nnx.state(small))


def test_pruning_to_equal_widths_keeps_the_stem_projection():
    # resnet8x4: stem 32, stage 1 64 (a projection). Pruned to 8 and 8, the rebuilt model must
    # still project, although the widths now match.
    spec = ModelSpec("resnet8x4", 10, RGB, {}, "float32")
    model = nnx.jit(lambda: spec.build(0))()
    plan = prune.make_plan(prune_config(sparsity=0.5, criterion="l1", targets={
        "stem": 0.75, "stages/0/0/c2": 0.875}), model, RGB, 10)
    model = prune.apply_masks(model, plan)
    small, small_spec, _ = structured.shrink(model, spec)
    assert small_spec.kwargs["channels"] == (8, 8, 64, 128)
    assert small_spec.kwargs["stem_projection"] is True
    assert small.stages[0][0].shortcut.conv.kernel.shape == (1, 1, 8, 8)
    rebuilt = ModelSpec.from_json(small_spec.to_json()).abstract()
    assert jax.tree.map(np.shape, nnx.state(rebuilt)) == jax.tree.map(np.shape, nnx.state(small))


def test_a_user_residual_model_is_shrunk_in_place_with_the_masked_logits():
    model = randomize_batchnorms(PoolResNet(3, 10, width=8, rngs=nnx.Rngs(0)))
    plan = prune.make_plan(prune_config(sparsity=0.5, criterion="group_l2"), model, RGB, 10)
    model = prune.apply_masks(model, plan)
    small, sizes = structured.shrink_in_place(model, RGB)
    assert sizes == {"stem": (8, 4)}
    assert small.conv.kernel.shape == (3, 3, 4, 4) and small.head.kernel.shape == (4, 10)
    assert (small.conv.in_features, small.bn2.num_features, small.head.in_features) == (4, 4, 4)
    x = np.random.default_rng(0).normal(size=(4, *RGB)).astype(np.float32)
    assert_close(logits(small, x), logits(model, x), n=9 * 8 + 8)


def test_a_user_models_spec_records_its_shrunk_shapes_and_rebuilds_it():
    spec = ModelSpec("_user_models:PoolResNet", 10, RGB, {"width": 8}, "float32")
    model = randomize_batchnorms(spec.build(0))
    plan = prune.make_plan(prune_config(sparsity=0.5, criterion="group_l2"), model, RGB, 10)
    model = prune.apply_masks(model, plan)
    small, small_spec, sizes = structured.shrink(model, spec)
    assert sizes == {"stem": (8, 4)}
    assert small_spec.kwargs == {"width": 8}  # the constructor's arguments stay as they were
    assert small_spec.shrunk == {
        "stem/kernel": [3, 3, 3, 4], "stem/bias": [4], "conv/kernel": [3, 3, 4, 4],
        "head/kernel": [4, 10], **{f"{bn}/{n}": [4] for bn in ("bn", "bn2")
                                   for n in ("scale", "bias", "mean", "var")}}
    rebuilt = ModelSpec.from_json(small_spec.to_json()).build(1)
    assert (rebuilt.conv.in_features, rebuilt.bn2.num_features, rebuilt.head.in_features) == (
        4, 4, 4)
    assert jax.tree.map(np.shape, nnx.state(rebuilt)) == jax.tree.map(np.shape, nnx.state(small))
    # With the shrunk model's weights, the rebuilt model computes the masked model's logits.
    nnx.update(rebuilt, nnx.state(small))
    x = np.random.default_rng(0).normal(size=(4, *RGB)).astype(np.float32)
    assert_close(logits(rebuilt, x), logits(model, x), n=9 * 8 + 8)
    assert "shrunk" not in spec.to_json()  # an unshrunk spec's json is as before


def test_layers_kdjax_cannot_resize_are_refused_before_training():
    model = models.create_model("_user_models:LinenMLP", num_classes=10, rngs=nnx.Rngs(0),
                                input_shape=(8, 8, 1))
    with pytest.raises(ValueError) as e:
        prune.make_plan(prune_config(sparsity=0.5), model, (8, 8, 1), 10)
    assert str(e.value).startswith(
        "prune.method='structured' found no channel group of the ToNNX that can be removed: "
        "Dense_1: its channels are the model's output; Dense_0: its channels reach "
        "BatchNorm_0 (not an NNX layer), Dense_0 (not an NNX layer), Dense_1 (not an NNX "
        "layer), which kdjax cannot resize")


def test_a_shrunk_residual_model_runs_in_onnx_runtime_with_kdjax_logits():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("jax2onnx")
    from kdjax.interop import onnx as kdjax_onnx

    spec = ModelSpec("resnet8", 10, RGB, {}, "float32")
    model = randomize_batchnorms(nnx.jit(lambda: spec.build(0))())
    plan = prune.make_plan(prune_config(sparsity=0.5, criterion="group_l2"), model, RGB, 10)
    small, small_spec, _ = structured.shrink(prune.apply_masks(model, plan), spec)
    preprocess = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    model_bytes, checked = kdjax_onnx.build(small, small_spec, preprocess)
    images = np.random.default_rng(1).integers(0, 256, (5, *RGB), np.uint8)
    got = kdjax_onnx.session(model_bytes).run(None, {"images": images})[0]
    want = np.asarray(jax.jit(kdjax_onnx.inference_fn(small, preprocess))(images))
    assert got.shape == (5, 10)
    assert_close(got, want, n=9 * 32 + 32)
    assert checked["batchnorms_folded"] == 9


def test_round_to_keeps_multiples_of_its_channels():
    spec = ModelSpec("cnn_tiny", 10, (8, 8, 1), {}, "float32")  # groups of 8, 16 and 32
    build = nnx.jit(lambda: spec.build(0))
    _, small_spec = training.prune_once(build(), spec, prune_config(sparsity=0.3, round_to=8))
    # 30 % of 8, 16, 32 keeps 6, 11, 22 (rounded: 5.6, 11.2, 22.4); to multiples of 8: 8, 8, 24.
    assert small_spec.kwargs == {"channels": (8, 8), "dense": 24}
    _, small_spec = training.prune_once(build(), spec, prune_config(sparsity=0.3))
    assert small_spec.kwargs == {"channels": (6, 11), "dense": 22}


@pytest.mark.parametrize("kw, message", [
    (dict(round_to=0), "prune.round_to=0: each structured group keeps a multiple of round_to "
                       "channels: an integer >= 1"),
    (dict(method="magnitude", round_to=8), "prune.round_to=8: rounding counts channels of "
                                           "structured pruning; set prune.method='structured'"),
])
def test_bad_round_to_is_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        prune.check_config(prune_config(sparsity=0.5, **kw), 10)
