"""Tests for kdjax.models (Flax NNX model zoo).

Big models are only checked abstractly (nnx.eval_shape: parameter counts and
feature shapes, no compute); real forward passes run on tiny models only.
"""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT, randomize_batchnorms
from kdjax.lm.models import LM_MODELS
from kdjax.models import MODELS, count_params, create_model, model_names

pytestmark = pytest.mark.usefixtures("quick_compiles")  # what is computed, not its speed

# name -> (num_classes, exact parameter count incl. BN scale/bias, input HWC)
# Reference counts: RepDistiller / CRD paper (resnet20 278,324; resnet56 861,620;
# resnet110 1.74M; resnet8x4 1,233,540; resnet32x4 7,433,860; wrn_40_2 2,255,156;
# wrn_16_2 703,284; vgg8 3.96M; vgg13 9.46M; mobile_half 0.81M) and torchvision
# (resnet18 11,689,512; resnet34 21,797,672; resnet50 25,557,032).
CIFAR = (32, 32, 3)
MNIST = (28, 28, 1)
EXPECTED = {
    # MLPs: 784-1200-1200-10 = 784*1200+1200 + 1200*1200+1200 + 1200*10+10
    "mlp": (10, 2_395_210, MNIST),
    "mlp_1200": (10, 2_395_210, MNIST),
    "mlp_800": (10, 1_276_810, MNIST),
    "mlp_tiny": (10, 784 * 64 + 64 + 64 * 10 + 10, MNIST),
    # conv 3x3 (no bias) + BN, x2; dense 7*7*C2 -> D -> 10
    "cnn_small": (10, 288 + 64 + 18_432 + 128 + 3136 * 128 + 128 + 1290, MNIST),
    "cnn_tiny": (10, 72 + 16 + 1152 + 32 + 784 * 32 + 32 + 330, MNIST),
    # CIFAR ResNets (RepDistiller resnet.py), 100 classes.
    # resnet8 by hand: stem 432+32, layer1 4608+64, layer2 4608+9216+128+512+64,
    # layer3 18432+36864+256+2048+128, fc 6500 = 83,892.
    "resnet8": (100, 83_892, CIFAR),
    "resnet14": (100, 181_108, CIFAR),
    "resnet20": (100, 278_324, CIFAR),
    "resnet32": (100, 472_756, CIFAR),
    "resnet44": (100, 667_188, CIFAR),
    "resnet56": (100, 861_620, CIFAR),
    "resnet110": (100, 1_736_564, CIFAR),
    "resnet8x4": (100, 1_233_540, CIFAR),
    "resnet32x4": (100, 7_433_860, CIFAR),
    # WRNs (RepDistiller wrn.py); generic "wrn" defaults to depth 16, width 1
    "wrn": (100, 180_916, CIFAR),
    "wrn_16_1": (100, 180_916, CIFAR),
    "wrn_16_2": (100, 703_284, CIFAR),
    "wrn_40_1": (100, 569_780, CIFAR),
    "wrn_40_2": (100, 2_255_156, CIFAR),
    # VGG-BN (RepDistiller vgg.py): vgg8 by hand = convs 3,910,784 + BN 2,944 + fc 51,300
    "vgg8": (100, 3_965_028, CIFAR),
    "vgg11": (100, 9_277_284, CIFAR),
    "vgg13": (100, 9_462_180, CIFAR),
    "vgg16": (100, 14_774_436, CIFAR),
    "vgg19": (100, 20_086_692, CIFAR),
    "mobilenetv2": (100, 812_836, CIFAR),
    # torchvision ImageNet ResNets, 1000 classes (input size irrelevant for counts)
    "resnet18": (1000, 11_689_512, CIFAR),
    "resnet34": (1000, 21_797_672, CIFAR),
    "resnet50": (1000, 25_557_032, CIFAR),
}

# Published (rounded) reference numbers; measured counts must be within 1%.
REFERENCE_APPROX = {
    "resnet110": 1.74e6, "vgg8": 3.96e6, "vgg13": 9.46e6, "mobilenetv2": 0.81e6,
    "wrn_40_2": 2.26e6, "wrn_16_2": 0.70e6, "resnet56": 0.86e6, "resnet20": 0.28e6,
    "resnet8x4": 1.23e6, "resnet32x4": 7.43e6,
}

CNN_KEYS = ("stem", "stage1", "stage2", "stage3", "embedding", "logits")
CNN4_KEYS = ("stem", "stage1", "stage2", "stage3", "stage4", "embedding", "logits")

# Exact feature shapes (without batch dim) at 32x32x3 for representative CIFAR models:
# keys in order, shapes of every key except logits.
CIFAR_FEATURES = {
    "resnet8x4": (CNN_KEYS, [(32, 32, 32), (32, 32, 64), (16, 16, 128), (8, 8, 256), (256,)]),
    "resnet32x4": (CNN_KEYS, [(32, 32, 32), (32, 32, 64), (16, 16, 128), (8, 8, 256), (256,)]),
    "resnet110": (CNN_KEYS, [(32, 32, 16), (32, 32, 16), (16, 16, 32), (8, 8, 64), (64,)]),
    "wrn_40_2": (CNN_KEYS, [(32, 32, 16), (32, 32, 32), (16, 16, 64), (8, 8, 128), (128,)]),
    "vgg13": (CNN4_KEYS, [(32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512), (512,)]),
    "mobilenetv2": (CNN4_KEYS, [(16, 16, 16), (16, 16, 12), (8, 8, 16), (4, 4, 48), (2, 2, 160), (1280,)]),
}


_ABSTRACT = {}


def _abstract(name, num_classes, **kw):
    """Abstract model (ShapeDtypeStruct state, no compute); cached since tracing deep nets takes seconds."""
    key = (name, num_classes, tuple(sorted(kw.items())))
    if key not in _ABSTRACT:
        _ABSTRACT[key] = nnx.eval_shape(
            lambda: create_model(name, num_classes=num_classes, rngs=nnx.Rngs(0), **kw))
    return _ABSTRACT[key]


def _abstract_features(model, shape, dtype=jnp.float32):
    return nnx.eval_shape(lambda m, x: m.features(x), model, jax.ShapeDtypeStruct(shape, dtype))


_BUILT = {}


def _fill(path, leaf, rng):
    """Deterministic numpy init for an abstract state leaf (no XLA compilation)."""
    name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
    shape = tuple(leaf.shape)
    if name == "kernel":
        value = rng.normal(size=shape) * np.sqrt(2.0 / max(1, int(np.prod(shape[:-1]))))
    elif name in ("scale", "var"):
        value = np.ones(shape) if name == "var" else rng.uniform(0.8, 1.2, size=shape)
    elif name in ("bias", "mean"):
        value = np.zeros(shape) if name == "mean" else 0.05 * rng.normal(size=shape)
    else:
        raise AssertionError(f"unexpected state leaf {path}")
    return jnp.asarray(value, leaf.dtype)


def _make(name, num_classes=10, **kw):
    """Fresh (mutable) concrete model with numpy-initialised state.

    Eager nnx construction compiles every distinct random-initializer shape with
    XLA:CPU, which costs seconds each on a slow CPU; real init is covered by
    test_real_initialisation.  Cached per config; nnx.merge would share the cached
    Variable objects, so the result is cloned (tests mutate BN statistics).
    """
    key = (name, num_classes, tuple(sorted(kw.items())))
    if key not in _BUILT:
        abstract = _abstract(name, num_classes, **kw)
        graphdef, state = nnx.split(abstract)
        rng = np.random.default_rng(0)
        state = jax.tree_util.tree_map_with_path(lambda p, l: _fill(p, l, rng), state)
        _BUILT[key] = (graphdef, state)
    return nnx.clone(nnx.merge(*_BUILT[key]))


def _jit_apply(model, method="__call__", **call_kw):
    """Pure jitted function of (state, x) built from nnx.split / nnx.merge."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, x: getattr(nnx.merge(graphdef, s), method)(x, **call_kw))
    return lambda x: fn(state, x)


def _images(shape, seed=0):
    # numpy, not jax.random: XLA:CPU compiles threefry sampling slowly (seconds per shape)
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# ---------------------------------------------------------------------------
# registry / abstract checks (no compute)
# ---------------------------------------------------------------------------
def test_registry_covers_expected():
    # the language models register here too; their sizes are tested in test_lm_models
    assert set(model_names()) == set(EXPECTED) | set(LM_MODELS)
    assert model_names() == sorted(MODELS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_param_count_and_feature_shapes(name):
    num_classes, expected, hwc = EXPECTED[name]
    model = _abstract(name, num_classes)
    n = count_params(model)
    assert n == expected, f"{name}: {n} != {expected}"
    if name in REFERENCE_APPROX:
        assert abs(n - REFERENCE_APPROX[name]) / REFERENCE_APPROX[name] < 0.01
    # only Param and BatchStat state, all float32
    state = nnx.state(model)
    variables = jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    assert variables and all(isinstance(v, (nnx.Param, nnx.BatchStat)) for v in variables)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state))
    # feature taps (abstract forward)
    feats = _abstract_features(model, (2, *hwc))
    assert set(feats) == set(model.feature_names)
    assert feats["logits"].shape == (2, num_classes)
    assert feats["logits"].dtype == jnp.float32
    assert feats["embedding"].ndim == 2 and feats["embedding"].shape[0] == 2
    if not name.startswith("mlp"):
        assert feats["stem"].ndim == 4
        assert {"stage1", "stage2"} <= set(feats)
    if name in CIFAR_FEATURES:
        keys, shapes = CIFAR_FEATURES[name]
        assert tuple(model.feature_names) == keys
        assert [tuple(feats[k].shape) for k in keys[:-1]] == [(2, *shape) for shape in shapes]


def test_imagenet_resnet_feature_shapes():
    feats = _abstract_features(_abstract("resnet50", 1000), (1, 224, 224, 3))
    assert set(feats) == set(CNN4_KEYS)
    got = {k: tuple(v.shape) for k, v in feats.items()}
    assert got == {
        "stem": (1, 112, 112, 64), "stage1": (1, 56, 56, 256), "stage2": (1, 28, 28, 512),
        "stage3": (1, 14, 14, 1024), "stage4": (1, 7, 7, 2048), "embedding": (1, 2048), "logits": (1, 1000),
    }
    feats = _abstract_features(_abstract("resnet18", 1000), (1, 224, 224, 3))
    assert feats["stage4"].shape == (1, 7, 7, 512) and feats["embedding"].shape == (1, 512)


def test_vgg_pools_after_group3_only_for_64px():
    m = _abstract("vgg8", 200)
    assert _abstract_features(m, (1, 32, 32, 3))["stage4"].shape == (1, 4, 4, 512)
    assert _abstract_features(m, (1, 64, 64, 3))["stage4"].shape == (1, 4, 4, 512)
    assert _abstract_features(m, (1, 64, 64, 3))["stage3"].shape == (1, 8, 8, 512)
    # RepDistiller pools there only at exactly 64 px (`if h == 64`), not for larger inputs
    assert _abstract_features(m, (1, 128, 128, 3))["stage4"].shape == (1, 16, 16, 512)


def test_constructor_kwargs():
    m = _abstract("mlp", 5, hidden=(100, 50, 20), in_features=30)
    assert count_params(m) == 30 * 100 + 100 + 100 * 50 + 50 + 50 * 20 + 20 + 20 * 5 + 5
    assert m.feature_names == ("hidden1", "hidden2", "hidden3", "embedding", "logits")
    assert count_params(_abstract("wrn", 100, depth=16, widen_factor=2)) == EXPECTED["wrn_16_2"][1]
    assert count_params(_abstract("cnn_tiny", 10, in_channels=3, input_size=32)) == (
        216 + 16 + 1152 + 32 + 8 * 8 * 16 * 32 + 32 + 330)
    with pytest.raises(ValueError):
        _abstract("wrn", 10, depth=15)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as exc:
        create_model("resnet9000", num_classes=10, rngs=nnx.Rngs(0))
    msg = str(exc.value)
    assert "resnet9000" in msg
    for name in model_names():
        assert re.search(rf"\b{re.escape(name)}\b", msg), name


def test_count_params_module_state_and_dict():
    m = _make("cnn_tiny")
    n = count_params(m)
    assert n == EXPECTED["cnn_tiny"][1]
    _, state = nnx.split(m)
    assert count_params(state) == n
    assert count_params(nnx.state(m, nnx.Param)) == n
    # BatchStats (mean/var of 8 + 16 channels) are excluded
    total = sum(x.size for x in jax.tree.leaves(state))
    assert total - n == 2 * (8 + 16)
    assert count_params({"w": np.zeros((3, 4)), "b": np.zeros(4)}) == 16


# ---------------------------------------------------------------------------
# real forward passes on tiny models
# ---------------------------------------------------------------------------
TINY = {
    "mlp_tiny": ((2, 28, 28, 1), {"hidden1": (2, 64), "embedding": (2, 64), "logits": (2, 10)}),
    "cnn_tiny": ((2, 28, 28, 1), {"stem": (2, 28, 28, 8), "stage1": (2, 14, 14, 8), "stage2": (2, 7, 7, 16),
                                  "embedding": (2, 32), "logits": (2, 10)}),
    "resnet8": ((2, 32, 32, 3), {"stem": (2, 32, 32, 16), "stage1": (2, 32, 32, 16), "stage2": (2, 16, 16, 32),
                                 "stage3": (2, 8, 8, 64), "embedding": (2, 64), "logits": (2, 10)}),
    "wrn_16_1": ((2, 32, 32, 3), {"stem": (2, 32, 32, 16), "stage1": (2, 32, 32, 16), "stage2": (2, 16, 16, 32),
                                  "stage3": (2, 8, 8, 64), "embedding": (2, 64), "logits": (2, 10)}),
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_forward_features_and_jit(name):
    shape, expected = TINY[name]
    model = _make(name)
    x = _images(shape)
    graphdef, state = nnx.split(model)

    @jax.jit
    def pure(state, x):  # pure function of the state: merge, then call both entry points
        m = nnx.merge(graphdef, state)
        return m(x), m.features(x)

    logits, feats = pure(state, x)
    assert set(feats) == set(model.feature_names) == set(expected)
    assert {k: tuple(v.shape) for k, v in feats.items()} == expected
    for k, v in feats.items():
        assert v.dtype == jnp.float32, k
        assert bool(jnp.all(jnp.isfinite(v))), k
    assert float(jnp.std(feats["logits"])) > 1e-4  # not a constant output
    assert logits.shape == feats["logits"].shape and logits.dtype == feats["logits"].dtype
    np.testing.assert_allclose(np.asarray(logits), np.asarray(feats["logits"]), rtol=1e-5, atol=1e-5)
    # different inputs in a batch give different logits
    assert not np.allclose(np.asarray(logits[0]), np.asarray(logits[1]))


def test_mlp_matches_numpy():
    m = _make("mlp_tiny")
    x = np.asarray(_images((4, 28, 28, 1)))
    h = x.reshape(4, -1).astype(np.float64)
    for layer in m.hidden:
        h = np.maximum(h @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...]), 0)
    ref = h @ np.asarray(m.out.kernel[...]) + np.asarray(m.out.bias[...])
    np.testing.assert_allclose(np.asarray(_jit_apply(m)(x)), ref, rtol=1e-4, atol=1e-4)


def test_cnn_tiny_eval_matches_manual_reference():
    """Check padding ('same' 3x3 like PyTorch pad=1), eval-mode BN with running stats, pooling."""
    m = _make("cnn_tiny", num_classes=4)
    rng = np.random.default_rng(0)
    for block in (m.conv1, m.conv2):  # non-trivial running statistics / affine
        c = block.bn.mean.shape[0]
        block.bn.mean[...] = jnp.asarray(rng.normal(size=c), jnp.float32)
        block.bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, size=c), jnp.float32)
        block.bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, size=c), jnp.float32)
        block.bn.bias[...] = jnp.asarray(rng.normal(size=c), jnp.float32)
    x = _images((2, 28, 28, 1), seed=3)

    def conv_bn_relu(h, block):
        y = jax.lax.conv_general_dilated(h, block.conv.kernel[...], (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=jax.lax.Precision.HIGHEST)
        bn = block.bn
        y = (y - bn.mean[...]) / jnp.sqrt(bn.var[...] + 1e-5) * bn.scale[...] + bn.bias[...]
        return jnp.maximum(y, 0)

    def pool(h):
        b, hh, ww, c = h.shape
        return h.reshape(b, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))

    @jax.jit
    def reference(x):
        h = pool(conv_bn_relu(pool(conv_bn_relu(x, m.conv1)), m.conv2))
        e = jnp.maximum(h.reshape(2, -1) @ m.fc.kernel[...] + m.fc.bias[...], 0)
        return e @ m.out.kernel[...] + m.out.bias[...]

    out = _jit_apply(m, train=False)(x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference(x)), rtol=1e-4, atol=1e-4)


def test_residual_block_wiring():
    """Strided projection blocks vs the reference formulas, composed from their own layers.

    ResNet BasicBlock: relu(bn2(conv2(relu(bn1(conv1(x))))) + bn_s(conv_s(x))).
    WRN pre-act block (in != out): o = relu(bn1(x)); conv_s(o) + conv2(relu(bn2(conv1(o)))).
    """
    res = _make("resnet8").stages[1][0]
    wrn = _make("wrn_16_1").stages[1][0]
    assert res.shortcut is not None and wrn.shortcut is not None and not wrn.equal_in_out
    x = _images((2, 8, 8, 16), seed=5)

    def bn(layer, h):  # eval-mode batch norm with running statistics
        return (h - layer.mean[...]) / jnp.sqrt(layer.var[...] + 1e-5) * layer.scale[...] + layer.bias[...]

    def cbn(m, h, act=True):
        h = bn(m.bn, m.conv(h))
        return jax.nn.relu(h) if act else h

    @jax.jit
    def check(x):
        ref_res = jax.nn.relu(cbn(res.c2, cbn(res.c1, x), act=False) + cbn(res.shortcut, x, act=False))
        o = jax.nn.relu(bn(wrn.bn1, x))
        ref_wrn = wrn.shortcut(o) + wrn.conv2(jax.nn.relu(bn(wrn.bn2, wrn.conv1(o))))
        return res(x, False), ref_res, wrn(x, False), ref_wrn

    out_res, ref_res, out_wrn, ref_wrn = check(x)
    assert out_res.shape == (2, 4, 4, 32) and out_wrn.shape == (2, 4, 4, 32)
    np.testing.assert_allclose(np.asarray(out_res), np.asarray(ref_res), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out_wrn), np.asarray(ref_wrn), rtol=1e-4, atol=1e-4)


def test_batchstats_update_only_in_train_mode():
    model = _make("resnet8")
    x = _images((2, 32, 32, 3)) * 2.0 + 1.0
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    stem_mean0 = np.asarray(stats["stem"]["bn"]["mean"][...])
    assert np.all(stem_mean0 == 0)

    def step(params, stats, x, train):
        m = nnx.merge(graphdef, params, stats)
        return m(x, train=train), nnx.state(m, nnx.BatchStat)

    step = jax.jit(step, static_argnums=3)
    _, stats_eval = step(params, stats, x, False)
    for a, b in zip(jax.tree.leaves(stats_eval), jax.tree.leaves(stats)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    logits_train, stats_train = step(params, stats, x, True)
    new_mean = np.asarray(stats_train["stem"]["bn"]["mean"][...])
    # momentum 0.9: running = 0.9 * 0 + 0.1 * batch_mean(stem conv output)
    conv_out = model.stem.conv(x)
    np.testing.assert_allclose(new_mean, 0.1 * np.asarray(conv_out.mean(axis=(0, 1, 2))), rtol=1e-4, atol=1e-6)
    new_var = np.asarray(stats_train["stem"]["bn"]["var"][...])
    assert not np.allclose(new_var, 1.0)
    changed = [not np.allclose(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(stats_train), jax.tree.leaves(stats))]
    assert all(changed)
    # train-mode (batch statistics) and eval-mode (running statistics) differ
    logits_eval, _ = step(params, stats, x, False)
    assert not np.allclose(np.asarray(logits_train), np.asarray(logits_eval))


def test_batchstats_eager_stateful_api():
    """Eager module call: running stats change in place only with train=True."""
    model = _make("cnn_tiny")
    x = _images((2, 28, 28, 1)) + 0.5
    before = [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]
    params_before = [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, nnx.Param))]
    model(x, train=False)
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.BatchStat)), before):
        np.testing.assert_array_equal(np.asarray(a), b)
    model(x, train=True)
    np.testing.assert_allclose(np.asarray(model.conv1.bn.mean[...]),
                               0.1 * np.asarray(model.conv1.conv(x).mean(axis=(0, 1, 2))), rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.BatchStat)), before):
        assert not np.allclose(np.asarray(a), b)
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), params_before):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize("name", ["cnn_tiny", "resnet8"])
def test_bf16_compute_dtype(name):
    shape = TINY[name][0]
    model = _make(name, dtype=jnp.bfloat16)
    graphdef, state = nnx.split(model)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state))
    x = _images(shape)
    feats = jax.jit(lambda s, x: nnx.merge(graphdef, s).features(x, train=True))(state, x)
    for k, v in feats.items():
        assert v.dtype == jnp.bfloat16, k
    assert feats["logits"].shape == (2, 10)
    assert bool(jnp.all(jnp.isfinite(feats["logits"].astype(jnp.float32))))
    if name != "cnn_tiny":
        return
    # same parameters in float32 give close logits
    ref = _jit_apply(_make(name), train=True)(x)
    np.testing.assert_allclose(np.asarray(feats["logits"], np.float32), np.asarray(ref), rtol=0.1, atol=0.1)


def test_real_initialisation():
    """The models' own initializers: PyTorch-like statistics.

    Built under nnx.jit with rbg keys: on XLA:CPU, threefry random init of cnn_tiny
    costs ~12 s of compilation (eager or jitted) vs ~1.5 s here.
    """
    build = nnx.jit(lambda key: create_model("cnn_tiny", num_classes=10, rngs=nnx.Rngs(key)))
    cnn = build(jax.random.key(0, impl="rbg"))
    w = np.asarray(cnn.conv2.conv.kernel[...])  # kaiming normal (fan_out = 3*3*16), like RepDistiller
    assert w.shape == (3, 3, 8, 16)
    np.testing.assert_allclose(w.std(), np.sqrt(2.0 / (9 * 16)), rtol=0.1)
    assert abs(w.mean()) < 0.02
    k = np.asarray(cnn.fc.kernel[...])  # lecun normal (flax default) for Linear
    assert k.shape == (784, 32) and 0.7 / np.sqrt(784) < k.std() < 1.3 / np.sqrt(784)
    np.testing.assert_array_equal(np.asarray(cnn.fc.bias[...]), 0)
    other = build(jax.random.key(1, impl="rbg"))
    assert not np.allclose(np.asarray(other.conv2.conv.kernel[...]), w)  # seed matters
    bn = cnn.conv2.bn
    np.testing.assert_array_equal(np.asarray(bn.scale[...]), 1)
    np.testing.assert_array_equal(np.asarray(bn.bias[...]), 0)
    np.testing.assert_array_equal(np.asarray(bn.mean[...]), 0)
    np.testing.assert_array_equal(np.asarray(bn.var[...]), 1)
    assert cnn.conv2.conv.bias is None
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(cnn)))


def test_input_shape_sets_the_input_arguments_and_kwargs_are_checked():
    mlp = create_model("mlp_tiny", num_classes=3, input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
    assert mlp.hidden[0].kernel.shape == (64, 64)
    net = nnx.eval_shape(lambda: create_model("resnet8", num_classes=3, input_shape=(28, 28, 1),
                                              rngs=nnx.Rngs(0)))
    assert net.stem.conv.kernel.shape == (3, 3, 1, 16)
    explicit = create_model("mlp", hidden=(4,), in_features=10, num_classes=3,
                            input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
    assert explicit.hidden[0].kernel.shape == (10, 4)  # explicit kwargs win
    with pytest.raises(ValueError, match=r"model 'mlp' takes no argument\(s\) \['width'\].*hidden"):
        create_model("mlp", width=3, num_classes=3, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------------
# BatchNorm folding (frozen teachers)
# ---------------------------------------------------------------------------
# name -> (input shape, BatchNorms folded, BatchNorms in the model)
FOLDABLE = {
    "cnn_tiny": ((2, 28, 28, 1), 2, 2),
    "resnet8": ((2, 32, 32, 3), 9, 9),  # stem + 3 blocks x 2 + the projection shortcuts of stages 2, 3
    "wrn_16_1": ((2, 32, 32, 3), 6, 13),  # bn2 of 6 blocks; 6 bn1 + the final bn stay
    "vgg8": ((2, 32, 32, 3), 5, 5),
    "mlp_tiny": ((2, 28, 28, 1), 0, 0),
}


@pytest.mark.parametrize("name", sorted(FOLDABLE))
def test_fold_batchnorm_keeps_every_feature_and_counts_what_it_folded(name):
    from kdjax.models import count_batchnorms, fold_batchnorm
    shape, n_folded, n_bn = FOLDABLE[name]
    model = randomize_batchnorms(_make(name))
    x = _images(shape)
    before = _jit_apply(model, "features", train=False)(x)
    assert count_batchnorms(model) == n_bn
    assert fold_batchnorm(model) == n_folded
    assert count_batchnorms(model) == n_bn - n_folded
    assert fold_batchnorm(model) == 0  # idempotent
    after = _jit_apply(model, "features", train=False)(x)
    assert set(after) == set(before)
    for k in before:
        scale = float(jnp.abs(before[k]).max())
        assert scale > 1e-3, k  # a vanishing feature would make the comparison empty
        np.testing.assert_allclose(np.asarray(after[k]), np.asarray(before[k]),
                                   atol=2e-5 * scale, rtol=1e-4, err_msg=k)


def test_folded_kernel_and_bias_are_the_batchnorm_formula():
    from kdjax.models import fold_batchnorm
    model = randomize_batchnorms(_make("cnn_tiny"))
    conv, bn = model.conv1.conv, model.conv1.bn
    w, eps = np.asarray(conv.kernel[...], np.float64), bn.epsilon
    mean, var, gamma, beta = (np.asarray(v[...], np.float64)
                              for v in (bn.mean, bn.var, bn.scale, bn.bias))
    fold_batchnorm(model)
    s = gamma / np.sqrt(var + eps)
    np.testing.assert_allclose(np.asarray(model.conv1.conv.kernel[...]), w * s, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(model.conv1.conv.bias[...]), beta - mean * s,
                               rtol=1e-5, atol=1e-7)
    assert model.conv1.bn is None


def test_folded_model_refuses_training_mode():
    from kdjax.models import fold_batchnorm
    for name in ("cnn_tiny", "wrn_16_1"):
        model = _make(name)
        fold_batchnorm(model)
        with pytest.raises(ValueError, match=r"BatchNorms were folded into its convolutions for "
                                             r"inference .*cannot run with train=True; train the "
                                             r"unfolded model"):
            model(_images(FOLDABLE[name][0]), train=True)


def test_a_torch_student_without_the_torch_extra_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['torch'] = None; sys.modules['torchax'] = None\n"
            "from kdjax import cli\n"
            "try:\n"
            "    cli.main(['train', '--config', sys.argv[1], '--workdir', sys.argv[2],\n"
            "              '--config.model.torch=timm:create_model'])\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    experiment = os.path.join(ROOT, "experiments", "fashion_mnist", "student_scratch.py")
    r = subprocess.run([sys.executable, "-c", code, experiment, str(tmp_path / "run")],
                       capture_output=True, text=True, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert ("model 'kdjax.torchbridge:TorchModel' (model.torch) runs a PyTorch module through "
            "torchax, which is not installed") in r.stdout
    assert "pip install 'kdjax[torch]'" in r.stdout
    assert not os.path.exists(tmp_path / "run")
