"""Quantization with Qwix and integer exports (kdjax.compress.quantize, kdjax.compress.encode)."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize_batchnorms
from flax import nnx

import _user_models as user
from kdjax import plan, taps
from kdjax.compress import encode, quantize, structured
from kdjax.models import ModelSpec

SHAPE = (28, 28, 1)
pytestmark = pytest.mark.usefixtures("quick_compiles")


BASE = plan.as_plan({})  # the defaults


def quant_config(**kw) -> plan.Quant:
    return dataclasses.replace(BASE.quant, **kw)  # unchecked: check_config's errors are tested


@pytest.fixture(scope="module")
def cnn():
    spec = ModelSpec("cnn_tiny", 10, SHAPE, {}, "float32")
    model = randomize_batchnorms(spec.build(0))
    images = np.random.default_rng(1).normal(size=(128, *SHAPE)).astype(np.float32)
    return spec, model, images


def logits(model, x):
    graphdef, state = nnx.split(model)  # one compiled forward, not one compile per operation
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))


def _export(model, spec, quant, images, path):
    enc = encode.encode(model, spec, lambda n: images[:n], prune=BASE.prune, quant=quant)
    np.savez(path, **enc.arrays)
    with np.load(path, allow_pickle=False) as z:
        loaded = encode.decode(spec, enc.record, dict(z))
    loaded.eval()  # as export.load does
    return enc, loaded


def test_int8_export_round_trip_within_quantization_error(cnn, tmp_path):
    spec, model, images = cnn
    quant = quant_config(mode="ptq", calibration_examples=128)  # one calibration batch
    enc, loaded = _export(model, spec, quant, images, tmp_path / "w.npz")
    # Real integers and scales on disk (Qwix's PTQ arrays), at least 3.5x fewer bytes than the
    # same model's float32 arrays.
    arrays = encode.unpack(enc.arrays, enc.record["index"])
    assert arrays["fc/kernel/array/qvalue"].dtype == np.int8
    assert os.path.getsize(tmp_path / "w.npz") * 3.5 <= enc.record["float32_bytes"]
    assert enc.record["layers"]["fc/kernel"]["encoding"] == "int8"
    # The loaded model holds exactly the calibrated PTQ model's arrays (Qwix's, as encoded).
    loaded_arrays = {structured.layer_name(k): np.asarray(v.get_value())
                     for k, v in nnx.to_flat_state(nnx.state(loaded))}
    assert loaded_arrays.keys() == arrays.keys()
    for name, value in arrays.items():
        np.testing.assert_array_equal(loaded_arrays[name], value, err_msg=name)
    # Weights within half a quantization step of the float ones (symmetric rounding).
    q, s = arrays["fc/kernel/array/qvalue"], arrays["fc/kernel/array/scale"]
    assert np.abs(q * s - np.asarray(model.fc.kernel[...])).max() <= s.max() / 2 + 1e-7
    # ...and logits within int8's error of the float model's: on average ~1% of their range
    # (static activation scales clip the rare input beyond the calibrated range: max ~10%).
    ref, out = logits(model, images), logits(loaded, images)
    assert np.abs(out - ref).mean() <= 0.02 * np.ptp(ref), (np.abs(out - ref).mean(), np.ptp(ref))
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_weight_only_export_stores_integers_and_dequantizes_on_load(cnn, tmp_path, bits):
    spec, model, images = cnn
    enc, loaded = _export(model, spec, quant_config(mode="ptq", weights=bits,
                                                    activations="none"), images, tmp_path / "w.npz")
    arrays = encode.unpack(enc.arrays, enc.record["index"])
    stored, scale = arrays[f"fc/kernel:{bits}"], arrays["fc/kernel:scale"]
    assert stored.dtype == (np.int8 if bits == "int8" else np.uint8)
    assert stored.size == (784 * 32 if bits == "int8" else 784 * 32 // 2)  # int4: 2 per byte
    w, got = np.asarray(model.fc.kernel[...]), np.asarray(loaded.fc.kernel[...])
    assert np.abs(got - w).max() <= scale.max() / 2 + 1e-7
    levels = np.unique(np.round(got / scale))
    assert levels.min() >= (-128 if bits == "int8" else -8) and levels.max() <= 127
    if bits == "int4":
        assert len(levels) <= 16
    ratio = enc.record["float32_bytes"] / enc.record["bytes"]
    assert ratio >= (3.5 if bits == "int8" else 6.0)


def test_pruned_int8_weights_are_stored_sparse(cnn, tmp_path):
    spec, model, images = cnn
    pruned = nnx.clone(model)
    w = np.asarray(pruned.fc.kernel[...])
    pruned.fc.kernel[...] = np.where(np.abs(w) > np.quantile(np.abs(w), 0.9), w, 0.0)
    quant = quant_config(mode="ptq", activations="none")
    dense = encode.encode(pruned, spec, None, prune=BASE.prune, quant=quant)
    sparse = encode.encode(pruned, spec, None, quant=quant,
                           prune=dataclasses.replace(BASE.prune, method="magnitude"))
    layer = sparse.record["layers"]["fc/kernel"]
    assert layer["encoding"] == "int8+bitmap" and layer["nonzeros"] == round(0.1 * w.size)
    assert layer["bytes"] < dense.record["layers"]["fc/kernel"]["bytes"] / 3
    a, b = (np.asarray(encode.decode(spec, e.record, e.arrays).fc.kernel[...])
            for e in (dense, sparse))
    np.testing.assert_array_equal(a, b)


def test_qat_student_computes_in_int8_with_straight_through_gradients(cnn):
    spec, model, images = cnn
    qat = quantize.for_training(model, quant_config(mode="qat"), SHAPE)
    jaxpr = str(jax.make_jaxpr(lambda x: qat(x))(images[:2]))
    assert jaxpr.count("i8[") >= 8  # weights and activations of its 4 layers
    graphdef, params, rest = nnx.split(qat, nnx.Param, ...)
    grads = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p, rest, copy=True).features(
        images[:8], train=True)["logits"].sum()))(params)
    norms = [float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and min(norms) > 0  # every layer gets a gradient


def _user_spec(name):
    return ModelSpec(f"_user_models:{name}", 10, SHAPE, {}, "float32")


def _modes(model):
    return [(n.deterministic if isinstance(n, nnx.Dropout) else n.use_running_average)
            for _, n in nnx.iter_graph(model) if isinstance(n, (nnx.Dropout, nnx.BatchNorm))]


def test_qat_of_a_plain_nnx_model_through_call_and_its_own_train_eval_modes(cnn):
    """NormNet has no features() and no train argument: Qwix intercepts its __call__; the step's
    way of calling it (taps.call) switches its BatchNorm and Dropout with NNX's train()/eval()."""
    images = cnn[2]
    model = randomize_batchnorms(_user_spec("NormNet").build(0))
    before = _modes(model)
    qat = quantize.for_training(model, quant_config(mode="qat"), SHAPE)
    assert isinstance(qat, user.NormNet) and _modes(model) == before  # the caller's model as was
    graphdef, params, rest = nnx.split(qat, nnx.Param, ...)

    def forward(p, r, x, train):
        m = nnx.merge(graphdef, p, r, copy=True)
        return taps.call(m, x, train=train), nnx.state(m, nnx.BatchStat)

    jaxpr = str(jax.make_jaxpr(lambda x: forward(params, rest, x, False))(images[:2]))
    assert jaxpr.count("i8[") >= 4  # weights and activations of its 2 layers
    # Inference: running statistics, no dropout, repeatable; within int8's error of the float
    # model in eval mode.
    out, _ = jax.jit(forward, static_argnums=3)(params, rest, images, False)
    float_out = taps.call(nnx.clone(model), images, train=False)
    assert np.abs(out - float_out).mean() <= 0.02 * np.ptp(float_out)
    # Training: the batch's statistics update the running ones, dropout zeroes units, and every
    # layer gets a straight-through gradient.
    train_out, stats = jax.jit(forward, static_argnums=3)(params, rest, images, True)
    assert not np.allclose(stats["bn"]["mean"][...], rest["bn"]["mean"][...])
    assert not np.allclose(train_out, out)
    grads = jax.jit(jax.grad(lambda p: forward(p, rest, images[:8], True)[0].sum()))(params)
    norms = [float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and min(norms) > 0


@pytest.mark.parametrize("quant", [dict(mode="ptq", calibration_examples=128),
                                   dict(mode="ptq", activations="none"),
                                   dict(mode="ptq", weights="int4", activations="none")],
                         ids=["w8a8", "int8", "int4"])
def test_a_plain_nnx_model_exports_quantized_and_loads(cnn, tmp_path, quant):
    spec, images = _user_spec("NormNet"), cnn[2]
    model = randomize_batchnorms(spec.build(0))
    enc, loaded = _export(model, spec, quant_config(**quant), images, tmp_path / "w.npz")
    arrays = encode.unpack(enc.arrays, enc.record["index"])
    kernel = ("fc/kernel/array/qvalue" if quant.get("activations", "int8") == "int8"
              else f"fc/kernel:{quant.get('weights', 'int8')}")
    assert arrays[kernel].dtype == (np.uint8 if quant.get("weights") == "int4" else np.int8)
    assert isinstance(loaded, user.NormNet)
    # `model(x)` on what load returns is inference: repeatable (no dropout), running statistics.
    ref = np.asarray(taps.call(nnx.clone(model), images, train=False))
    got = logits(loaded, images)
    np.testing.assert_array_equal(got, logits(loaded, images))
    tolerance = 0.1 if quant.get("weights") == "int4" else 0.02
    assert np.abs(got - ref).mean() <= tolerance * np.ptp(ref), (np.abs(got - ref).mean(),
                                                                 np.ptp(ref))
    if quant.get("activations", "int8") == "int8":  # exactly the calibrated PTQ model
        ptq = quantize.calibrated(model, quant_config(**quant), images)
        np.testing.assert_array_equal(got, logits(ptq, images))


class Scale(nnx.Module):
    """A model with no matrix product or convolution for Qwix to intercept."""

    def __init__(self):
        self.w = nnx.Param(jnp.ones((10,)))

    def features(self, x, *, train=False):
        return {"logits": x.reshape(x.shape[0], -1)[:, :10] * self.w[...]}

    def __call__(self, x, *, train=False):
        return self.features(x, train=train)["logits"]


def test_a_model_qwix_cannot_intercept_is_refused(cnn):
    with pytest.raises(ValueError, match="quant.mode='qat': Qwix intercepted no layer of the "
                                         "Scale: it computes no matrix product or convolution"):
        quantize.for_training(Scale(), quant_config(mode="qat"), SHAPE)
    linen = nnx.bridge.ToNNX(user.LinenMLP(10), rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(linen, jnp.zeros((1, *SHAPE)))
    with pytest.raises(ValueError, match=r"quant.mode='qat': Qwix cannot quantize a Linen model "
                                         r"wrapped by nnx.bridge.ToNNX \(LinenMLP\); write the "
                                         r"model as a Flax NNX module"):
        quantize.for_training(linen, quant_config(mode="qat"), SHAPE)
    with pytest.raises(ValueError, match="quant.exclude pattern 'head' names no layer of the "
                                         "SmallCNN; its layers: conv1/conv, conv2/conv, fc, out"):
        quantize.for_training(cnn[1], quant_config(mode="qat", exclude=("head",)), SHAPE)


@pytest.mark.parametrize("kw, message", [
    (dict(mode="int8"), "quant.mode='int8': valid modes: ['none', 'qat', 'ptq']"),
    (dict(weights="int2"), "quant.weights='int2': valid weight types"),
    (dict(weights="int4"), "quant.activations='int8': int4 weights are weight-only here"),
    (dict(calibration_examples=0), "quant.calibration_examples=0: static activation scales"),
])
def test_bad_quant_config_names_the_key_value_and_fix(kw, message):
    with pytest.raises(ValueError) as e:
        quantize.check_config(quant_config(**kw))
    assert message in str(e.value)


class _Square(nnx.Module):
    """A user's MLP with a square hidden layer (8 x 8), as tests/_user_models.py:TinyNet."""

    def __init__(self, rngs: nnx.Rngs):
        self.a, self.b = nnx.Linear(16, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.b(nnx.relu(self.a(x.reshape(x.shape[0], -1))))))


def test_a_batch_as_wide_as_a_square_layer_is_refused_for_qat_and_avoided_in_calibration():
    model, quant = _Square(nnx.Rngs(0)), quant_config(mode="qat")
    assert quantize.square_layer_clash(model, 8) == "b"
    assert quantize.square_layer_clash(model, 7) is None
    # the hazard itself: Qwix 0.1.8 takes b's 8x8 input for its weight
    qat = quantize.for_training(model, quant, (4, 4, 1))
    with pytest.raises(AssertionError, match="lhs and rhs cannot be both weights"):
        jax.jit(lambda x: qat(x))(jnp.zeros((8, 4, 4, 1)))
    with pytest.raises(ValueError, match=r"train.batch_size=8 is the width of the square layer "
                                         r"'b' \(8x8\): with quant.mode='qat'.*set "
                                         r"train.batch_size to another size, e.g. 4"):
        quantize.for_training(model, quant, (4, 4, 1), batch_sizes=(("train.batch_size", 8),))
    # calibration picks its own batch: 8 images in batches that never clash
    ptq = quantize.calibrated(model, quant_config(mode="ptq"),
                              np.random.default_rng(0).normal(size=(8, 4, 4, 1)).astype(
                                  np.float32), batch_size=8)
    assert np.isfinite(np.asarray(ptq(jnp.zeros((3, 4, 4, 1))))).all()
