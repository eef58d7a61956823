"""The convolution of kdjax's zoo layers: XLA's own, except where XLA:CPU is known to be slow.

XLA:CPU (jaxlib 0.10.2) runs a convolution whose output map is tiny (at most 2x2) orders of
magnitude below its own matrix products: a 3x3 256->256 convolution on a 2x2 map, batch 128,
takes 150-450 ms in `lax.conv_general_dilated` against 8-20 ms as one matrix product (measured
in benchmarks/results/perf_notes.md, "Small-map convolutions on the CPU"). Those are the last
stages of every ResNet and VGG at CIFAR or Fashion-MNIST resolution.

`conv_general_dilated` is a drop-in for `lax.conv_general_dilated` (nnx.Conv takes it as its
`conv_general_dilated`): the same function of the same kernel, so parameters, checkpoints and
exports are unchanged. On the CPU, for a 2-D NHWC/HWIO convolution without dilation or groups
whose output map is at most 2x2, it computes the convolution as one `dot_general` of explicit
patches with the kernel, restricted to the kernel taps that ever see the image (on a 1x1 map a
3x3 convolution is the centre tap's matrix product; the other eight only multiply padding).
XLA:CPU's depthwise convolutions (MobileNetV2) are slow at every map size measured (1x1 to
32x32: 10-60x forward, 2.4-30x forward + backward): on the CPU a depthwise convolution is the sum
over its live taps of the shifted input times the tap's per-channel weights. Everything else,
and every other backend (`lax.platform_dependent`: GPU and TPU lower the native convolution,
also in a multi-platform `jax.export`), stays on the native convolution.

Turn it off with the environment variable KDJAX_CPU_CONV=native (read when a function is traced).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["ENV", "MAX_OUTPUT_SIDE", "as_depthwise", "as_matmul", "conv_general_dilated",
           "native"]

ENV = "KDJAX_CPU_CONV"
_MODES = ("auto", "native")
# The largest output map (each side) given to the matrix-product form: at 2x2 and below it was
# up to 160x faster than XLA:CPU's convolution (47x forward + backward) and at worst within the
# timing noise; larger outputs are mixed (3.5x slower at 8x8 stride 1), and a limit of 4 or 8
# made resnet18's forward slower than 2 (perf_notes.md).
MAX_OUTPUT_SIDE = 2

# NHWC input, HWIO kernel, NHWC output, as lax.conv_dimension_numbers canonicalises them.
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                 out_spec=(0, 3, 1, 2))
_NATIVE = lax.conv_general_dilated
_NATIVE_CODE = _NATIVE.__code__


def _mode() -> str:
    mode = os.environ.get(ENV, "auto") or "auto"
    if mode not in _MODES:
        raise ValueError(f"{ENV}={mode!r}: expected one of {', '.join(_MODES)} ('native' runs "
                         f"XLA's convolution everywhere)")
    return mode


def _intercepted() -> bool:
    # Qwix quantizes a model by rewriting lax.conv_general_dilated while the model runs, and
    # expects the kernel Param itself as an operand: a matrix product would hide the convolution.
    f = lax.conv_general_dilated
    return f is not _NATIVE or getattr(f, "__code__", None) is not _NATIVE_CODE


@contextlib.contextmanager
def native() -> Iterator[None]:
    """XLA's own convolution in every function traced inside: one conv_general_dilated per layer,
    as its kernel's axes are (the ONNX export and the channel tracer read them). The variable is
    read at trace time."""
    old = os.environ.get(ENV)
    os.environ[ENV] = "native"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old


def _live_taps(k: int, size: int, out: int, stride: int, pad_lo: int) -> list[int]:
    """The kernel offsets along one axis that read a real (not padding) input at some output."""
    return [i for i in range(k) if any(0 <= o * stride + i - pad_lo < size for o in range(out))]


def _plan(lhs_shape: Sequence[int], rhs_shape: Sequence[int], window_strides: Sequence[int],
          padding: Any, lhs_dilation: Sequence[int] | None, rhs_dilation: Sequence[int] | None,
          dimension_numbers: Any, feature_group_count: int, batch_group_count: int,
          preferred_element_type: Any) -> tuple[Any, tuple[int, int], Any] | None:
    """(form, strides, padding) when a faster CPU form applies to this convolution, else None."""
    if len(lhs_shape) != 4 or len(rhs_shape) != 4 or batch_group_count != 1 \
            or any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
        return None
    if lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers) != _NHWC:
        return None
    _, h, w, c = lhs_shape
    kh, kw, _, out_c = rhs_shape
    if isinstance(padding, str):
        padding = lax.padtype_to_pads((h, w), (kh, kw), window_strides, padding)
    (pt, pb), (pl, pr) = padding
    sh, sw = window_strides
    ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    if ho < 1 or wo < 1:
        return None
    plan = (sh, sw), ((pt, pb), (pl, pr))
    if feature_group_count == c == out_c and c > 1 and preferred_element_type is None:
        return (as_depthwise, *plan)
    if feature_group_count == 1 and ho <= MAX_OUTPUT_SIDE and wo <= MAX_OUTPUT_SIDE:
        return (as_matmul, *plan)
    return None


def _patches(x: jax.Array, kh: int, kw: int, strides: tuple[int, int],
             padding: tuple[tuple[int, int], tuple[int, int]]
             ) -> tuple[list[tuple[int, int]], list[jax.Array]]:
    """The kernel taps that read the image somewhere (the others multiply only padding) and, for
    each, the input pixels it multiplies at every output position: (B, Ho, Wo, Cin)."""
    b, h, w, c = x.shape
    (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
    ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    # No live tap (padding so wide that every output reads only padding): any one tap gives the
    # zeros the convolution computes.
    taps = [(i, j) for i in _live_taps(kh, h, ho, sh, pt)
            for j in _live_taps(kw, w, wo, sw, pl)] or [(0, 0)]
    # lax.pad, not jnp.pad: lax.conv_general_dilated takes negative padding (a crop), so must this.
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
    return taps, [lax.slice(xp, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                            (1, sh, sw, 1)) for i, j in taps]


def as_matmul(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
              padding: tuple[tuple[int, int], tuple[int, int]], precision: Any = None,
              preferred_element_type: Any = None) -> jax.Array:
    """An NHWC/HWIO convolution as patches (B, Ho, Wo, taps * Cin) times the kernel (taps * Cin,
    Cout), on every backend, over the taps that read the image somewhere."""
    taps, patches = _patches(x, *kernel.shape[:2], strides, padding)
    lhs = patches[0] if len(patches) == 1 else jnp.concatenate(patches, axis=-1)
    rhs = kernel[taps[0]] if len(taps) == 1 else jnp.concatenate([kernel[t] for t in taps], 0)
    return lax.dot_general(lhs, rhs, (((3,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=preferred_element_type)


def as_depthwise(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                 padding: tuple[tuple[int, int], tuple[int, int]], precision: Any = None,
                 preferred_element_type: Any = None) -> jax.Array:
    """A depthwise NHWC convolution (kernel (kh, kw, 1, C), one group per channel) as a sum over
    the live taps of the shifted input times that tap's per-channel weights, on every backend.
    Elementwise, so `precision` has nothing to select; `preferred_element_type` must be None."""
    del precision, preferred_element_type
    taps, patches = _patches(x, *kernel.shape[:2], strides, padding)
    out = patches[0] * kernel[taps[0]][0]
    for t, p in zip(taps[1:], patches[1:]):
        out = out + p * kernel[t][0]
    return out


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]],
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None, out_sharding: Any = None
                         ) -> jax.Array:
    """`lax.conv_general_dilated`, as a matrix product on the CPU where that is faster (above)."""
    native = functools.partial(
        lax.conv_general_dilated, window_strides=window_strides, padding=padding,
        lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type,
        **({} if out_sharding is None else {"out_sharding": out_sharding}))
    plan = None
    if out_sharding is None and _mode() == "auto" and not _intercepted():
        plan = _plan(lhs.shape, rhs.shape, window_strides, padding, lhs_dilation, rhs_dilation,
                     dimension_numbers, feature_group_count, batch_group_count,
                     preferred_element_type)
    if plan is None:
        return native(lhs, rhs)
    form, strides, pads = plan
    cpu = functools.partial(form, strides=strides, padding=pads, precision=precision,
                            preferred_element_type=preferred_element_type)
    return lax.platform_dependent(lhs, rhs, cpu=cpu, default=native)
