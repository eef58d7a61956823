"""Quantization with Qwix and integer exports (kdjax.compress.quantize, kdjax.compress.encode)."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize_batchnorms
from flax import nnx

from kdjax import plan
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
        return enc, encode.decode(spec, enc.record, dict(z))


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
    with pytest.raises(ValueError, match="Qwix cannot intercept a Linear: kdjax quantizes the "
                                         "model's `features"):
        quantize.for_training(nnx.Linear(784, 10, rngs=nnx.Rngs(0)), quant_config(mode="qat"),
                              SHAPE)
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
