"""kdjax.conv: the zoo's convolution, as a matrix product on the CPU for small output maps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from kdjax import conv, models, plan
from kdjax.compress import quantize

pytestmark = pytest.mark.usefixtures("quick_compiles")

DN = ("NHWC", "HWIO", "NHWC")
EPS = float(jnp.finfo(jnp.float32).eps)

# (input H, W, kernel side, strides, padding): every one has an output map of at most 2x2.
SMALL = [
    ((1, 1), 3, (1, 1), ((1, 1), (1, 1))),  # 1x1 map: only the centre tap sees the image
    ((2, 2), 3, (1, 1), ((1, 1), (1, 1))),
    ((2, 2), 3, (2, 2), ((1, 1), (1, 1))),  # 2x2 -> 1x1: four live taps
    ((4, 4), 3, (2, 2), ((1, 1), (1, 1))),
    ((2, 2), 1, (2, 2), ((0, 0), (0, 0))),  # a strided 1x1 shortcut
    ((3, 2), 3, (2, 1), ((1, 0), (2, -1))),  # rectangular, asymmetric and negative padding
    ((2, 2), 3, (1, 1), "SAME"),
    ((4, 4), 3, (2, 2), "VALID"),
    ((1, 1), 3, (4, 4), ((3, 3), (3, 3))),  # every output reads only padding: zeros
]


def _args(hw, k, cin=5, cout=4, batch=3, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    return (jax.random.normal(kx, (batch, *hw, cin), jnp.float32),
            jax.random.normal(kw, (k, k, cin, cout), jnp.float32))


def _stablehlo(f, *args) -> str:
    return jax.jit(f).lower(*args).as_text()


# Depthwise (groups = channels) at any map size.
DEPTHWISE = [((5, 5), 3, (1, 1), ((1, 1), (1, 1))), ((6, 5), 3, (2, 2), ((1, 1), (1, 1))),
             ((1, 1), 3, (1, 1), ((1, 1), (1, 1))), ((4, 4), 5, (2, 1), "SAME")]


@pytest.mark.parametrize("hw,k,strides,padding,groups",
                         [(*c, 1) for c in SMALL] + [(*c, 5) for c in DEPTHWISE])
def test_the_cpu_forms_are_the_same_convolution_forward_and_backward(hw, k, strides, padding,
                                                                     groups):
    x, w = _args(hw, k, cout=4 if groups == 1 else 5)
    w = w[:, :, :x.shape[-1] // groups]

    def ours(x, w):
        return conv.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN,
                                         feature_group_count=groups)

    def native(x, w):
        return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN,
                                        feature_group_count=groups)

    assert "convolution" not in _stablehlo(ours, x, w)  # the matrix product ran, not XLA's conv
    y, y_ref = jax.jit(ours)(x, w), jax.jit(native)(x, w)
    g = jax.random.normal(jax.random.key(1), y_ref.shape, jnp.float32)
    # Both sum the same products in another order: |difference| <= 2 n eps sum|products|, where
    # n bounds the terms of each sum and sum|products| is the same computation on |operands|.
    n = max(x.shape[0] * y.shape[1] * y.shape[2], k * k * max(x.shape[-1], w.shape[-1]))
    bound = 2 * n * EPS
    np.testing.assert_array_less(np.abs(y - y_ref), bound * native(jnp.abs(x), jnp.abs(w)) + 1e-30)
    dx, dw = jax.jit(lambda x, w, g: jax.vjp(ours, x, w)[1](g))(x, w, g)
    dx_ref, dw_ref = jax.vjp(native, x, w)[1](g)
    dx_abs, dw_abs = jax.vjp(native, jnp.abs(x), jnp.abs(w))[1](jnp.abs(g))
    np.testing.assert_array_less(np.abs(dx - dx_ref), bound * dx_abs + 1e-30)
    np.testing.assert_array_less(np.abs(dw - dw_ref), bound * dw_abs + 1e-30)


def test_larger_maps_groups_and_other_backends_keep_the_native_convolution():
    x, w = _args((4, 4), 3)
    assert "convolution" in _stablehlo(  # a 4x4 output: XLA:CPU's own convolution is as fast
        lambda x, w: conv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                               dimension_numbers=DN), x, w)
    x, w = _args((2, 2), 3, cin=4)
    assert "convolution" in _stablehlo(  # grouped, not depthwise
        lambda x, w: conv.conv_general_dilated(x, w[:, :, :2], (1, 1), ((1, 1), (1, 1)),
                                               dimension_numbers=DN, feature_group_count=2),
        x, w)
    exported = jax.export.export(jax.jit(
        lambda x, w: conv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                               dimension_numbers=DN)),
        platforms=("cuda", "tpu"))(x, w)
    assert "stablehlo.convolution" in exported.mlir_module()


def test_the_environment_variable_turns_it_off(monkeypatch):
    x, w = _args((2, 2), 3)
    monkeypatch.setenv(conv.ENV, "native")
    assert "convolution" in _stablehlo(
        lambda x, w: conv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                               dimension_numbers=DN), x, w)
    monkeypatch.setenv(conv.ENV, "fast")
    with pytest.raises(ValueError, match="KDJAX_CPU_CONV='fast'.*auto, native"):
        conv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)


def test_zoo_layers_use_it_and_keep_their_parameters_and_folding():
    # resnet18 at 16x16: stage 3 and 4 convolutions see 2x2 and 1x1 maps.
    spec = models.ModelSpec("resnet18", 10, (16, 16, 3), {}, "float32")
    model = spec.build(0)
    plain = nnx.Conv(256, 512, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                     use_bias=False, rngs=nnx.Rngs(0))
    layer = model.stages[3][0].c1.conv
    assert jax.tree.map(jnp.shape, nnx.state(layer)) == jax.tree.map(jnp.shape, nnx.state(plain))
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3), jnp.float32)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=False))
    assert "convolution" not in jax.jit(lambda s, x: nnx.merge(graphdef, s)(
        x[:, :2, :2], train=False)).lower(state, x).as_text()  # a 2x2 input: no conv is left
    from kdjax import teacher

    folded, prep = teacher.prepare(model, spec, dtype=jnp.float32)
    assert prep.folded == prep.batchnorms == 20
    ref, out = fwd(state, x), jax.jit(lambda m, x: m(x, train=False))(folded, x)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))


def test_qwix_still_sees_the_convolutions_it_quantizes():
    # cnn_tiny at 4x4: conv1 on a 4x4 map, conv2 on the pooled 2x2 map, which kdjax.conv would
    # otherwise compute as a matrix product that Qwix could not recognise as the conv's kernel.
    spec = models.ModelSpec("cnn_tiny", 10, (4, 4, 1), {}, "float32")
    qat = quantize.for_training(spec.build(0), plan.as_plan({"quant": {"mode": "qat"}}).quant,
                                spec.input_shape)
    x = jnp.ones((2, 4, 4, 1))
    assert jax.jit(lambda x: qat(x)).lower(x).as_text().count("stablehlo.convolution") == 2
    assert str(jax.make_jaxpr(lambda x: qat(x))(x)).count("i8[") >= 8  # 4 layers, as at 28x28
