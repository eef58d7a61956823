"""Flax NNX model zoo for knowledge distillation.

Architectures mirror the reference PyTorch implementations used by the KD
literature (Hinton et al. MLPs, RepDistiller / CRD CIFAR models, torchvision
ImageNet ResNets) so that parameter counts match exactly.

Every model is an :class:`FeatureModel`:

* constructor takes ``num_classes``, ``rngs`` and ``dtype`` (compute dtype;
  parameters are always float32);
* inputs are NHWC float images (already normalised by the caller), MLPs flatten
  whatever they get;
* ``features(x, *, train=False)`` returns a dict of named intermediate tensors
  (keys listed in ``model.feature_names``), ending with ``"embedding"`` (pooled
  pre-logit vector ``[B, D]``) and ``"logits"`` (``[B, num_classes]`` in the
  compute dtype);
* ``__call__(x, *, train=False)`` is exactly ``features(x, train=train)["logits"]``
  (under ``jit`` the unused taps are dead-code eliminated).

State consists only of ``nnx.Param`` and ``nnx.BatchStat`` (no dropout, no
stored rngs), BatchNorm uses ``momentum=0.9, epsilon=1e-5`` (PyTorch defaults)
and the ``train`` flag is passed explicitly on every call.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx

from kdjax import conv as conv_lib
from kdjax.lm.models import registry as lm_registry
from kdjax.step import compute_dtype

__all__ = [
    "MODELS",
    "FeatureModel",
    "MLP",
    "SmallCNN",
    "CifarResNet",
    "WideResNet",
    "VGG",
    "MobileNetV2",
    "ImageNetResNet",
    "create_model",
    "resolve",
    "ModelSpec",
    "model_names",
    "count_params",
]

# kaiming_normal_(mode="fan_out", nonlinearity="relu"), as in RepDistiller/torchvision.
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


# ----------------------------------------------------------------------------
# layer helpers
# ----------------------------------------------------------------------------
def _conv(in_c, out_c, k, *, stride=1, groups=1, bias=False, dtype, rngs) -> nnx.Conv:
    """k x k conv with PyTorch-style symmetric padding (k // 2).

    kdjax.conv's convolution: on the CPU the small-map tails of the ResNets and VGGs run as matrix
    products and depthwise convolutions as shifted multiply-adds, which XLA:CPU computes orders
    of magnitude faster; same kernel, same function.
    """
    p = k // 2
    return nnx.Conv(
        in_c, out_c, (k, k), strides=(stride, stride), padding=((p, p), (p, p)),
        feature_group_count=groups, use_bias=bias, kernel_init=_conv_init,
        dtype=dtype, param_dtype=jnp.float32, conv_general_dilated=conv_lib.conv_general_dilated,
        rngs=rngs,
    )


def _bn(c, *, dtype, rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, dtype=dtype,
                         param_dtype=jnp.float32, rngs=rngs)


def _linear(in_f, out_f, *, dtype, rngs) -> nnx.Linear:
    return nnx.Linear(in_f, out_f, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def _gap(x: jax.Array) -> jax.Array:
    """Global average pool NHWC -> NC (accumulated in float32)."""
    return jnp.mean(x, axis=(1, 2), dtype=jnp.float32).astype(x.dtype)


def _max_pool(x, k, stride, pad=0):
    b, h, w, c = x.shape
    if k == stride and not pad and h % k == 0 and w % k == 0:
        # Non-overlapping windows as a reshape + max: same values, but its gradient is an
        # elementwise mask, whereas reduce_window's (select_and_scatter) is very slow on XLA:CPU.
        return x.reshape(b, h // k, k, w // k, k, c).max(axis=(2, 4))
    return nnx.max_pool(x, (k, k), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


FOLDED_TRAINING = ("this model's BatchNorms were folded into its convolutions for inference "
                   "(kdjax.models.fold_batchnorm): it cannot run with train=True; train the "
                   "unfolded model")


def _fold_into(conv: nnx.Conv, bn: nnx.BatchNorm) -> None:
    """Fold an inference-mode BatchNorm into the convolution that feeds it, in float32.

    BN(conv(x)) = conv(x) * s + (b - mean) * s + beta with s = gamma / sqrt(var + eps), a
    per-output-channel affine map, so it is conv'(x) with kernel W * s (the kernel's last axis is
    the output channel) and bias (b - mean) * s + beta: one pass over the activation instead of
    two, and a bias epilogue the convolution kernel fuses.
    """
    def f32(v):
        return jnp.asarray(v[...], jnp.float32)

    s = jax.lax.rsqrt(f32(bn.var) + bn.epsilon)
    if bn.scale is not None:
        s = s * f32(bn.scale)
    b = (f32(conv.bias) if conv.bias is not None else 0.0) - f32(bn.mean)
    b = b * s + (f32(bn.bias) if bn.bias is not None else 0.0)
    conv.kernel[...] = (f32(conv.kernel) * s).astype(conv.kernel.dtype)
    conv.bias = nnx.Param(b.astype(conv.kernel.dtype))
    conv.use_bias = True


class ConvBN(nnx.Module):
    """conv -> BN (-> ReLU)."""

    def __init__(self, in_c, out_c, k, *, stride=1, groups=1, bias=False, act=True, dtype, rngs):
        self.conv = _conv(in_c, out_c, k, stride=stride, groups=groups, bias=bias, dtype=dtype, rngs=rngs)
        self.bn = _bn(out_c, dtype=dtype, rngs=rngs)
        self.act = act

    def __call__(self, x, train: bool):
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x, use_running_average=not train)
        elif train:
            raise ValueError(FOLDED_TRAINING)
        return nnx.relu(x) if self.act else x

    def fold_batchnorm(self) -> int:
        if self.bn is None:
            return 0
        _fold_into(self.conv, self.bn)
        self.bn = None
        return 1


def _run(blocks, x, train: bool):
    for b in blocks:
        x = b(x, train)
    return x


def _make_stage(block, in_c, planes, n, stride, *, widths=(), projection=None, out=None, dtype,
                rngs):
    """n blocks, the first one strided; returns (nnx.List, out_channels). `widths`, when given,
    are the blocks' inner widths (their `width`); `projection`, the first block's; `out`, the
    stage's output width when it is not planes * expansion (a pruned Bottleneck stage)."""
    blocks = []
    for j in range(n):
        extra = {"width": widths[j]} if widths else {}
        if j == 0 and projection is not None:
            extra["projection"] = projection
        if out is not None:
            extra["out"] = out
        blocks.append(block(in_c, planes, stride if j == 0 else 1, dtype=dtype, rngs=rngs,
                            **extra))
        in_c = out or planes * block.expansion
    return nnx.List(blocks), in_c


# ----------------------------------------------------------------------------
# base class
# ----------------------------------------------------------------------------
class FeatureModel(nnx.Module):
    """Base: subclasses implement ``features`` once; ``__call__`` returns its logits."""

    feature_names = ()  # overridden per class / instance

    def features(self, x, *, train: bool = False) -> dict[str, jax.Array]:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, x, *, train: bool = False) -> jax.Array:
        return self.features(x, train=train)["logits"]

    def _input(self, x) -> jax.Array:
        return jnp.asarray(x).astype(self.dtype)


# ----------------------------------------------------------------------------
# blocks
# ----------------------------------------------------------------------------
class BasicBlock(nnx.Module):
    """ResNet basic block (RepDistiller resnet.py / torchvision), post-activation output."""

    expansion = 1

    def __init__(self, in_c, planes, stride, *, width=None, projection=None, dtype, rngs):
        # width: the channels between c1 and c2 (default planes); projection: whether the
        # shortcut is a 1x1 convolution (default: where stride or width change). Structured
        # pruning (kdjax.compress.structured) shrinks both widths and records them here.
        kw = dict(dtype=dtype, rngs=rngs)
        width = width or planes
        self.c1 = ConvBN(in_c, width, 3, stride=stride, **kw)
        self.c2 = ConvBN(width, planes, 3, act=False, **kw)
        need = stride != 1 or in_c != planes if projection is None else projection
        self.shortcut = ConvBN(in_c, planes, 1, stride=stride, act=False, **kw) if need else None

    def __call__(self, x, train: bool):
        out = self.c2(self.c1(x, train), train)
        sc = x if self.shortcut is None else self.shortcut(x, train)
        return nnx.relu(out + sc)


class Bottleneck(nnx.Module):
    """torchvision ResNet v1.5 bottleneck (stride on the 3x3 conv)."""

    expansion = 4

    def __init__(self, in_c, planes, stride, *, width=None, projection=None, out=None, dtype,
                 rngs):
        # width: (c1's, c2's) output widths (default planes, planes); out: the block's output
        # width (default planes * 4); projection as BasicBlock's. Structured pruning sets them.
        kw = dict(dtype=dtype, rngs=rngs)
        out_c = out or planes * self.expansion
        w1, w2 = width or (planes, planes)
        self.c1 = ConvBN(in_c, w1, 1, **kw)
        self.c2 = ConvBN(w1, w2, 3, stride=stride, **kw)
        self.c3 = ConvBN(w2, out_c, 1, act=False, **kw)
        need = stride != 1 or in_c != out_c if projection is None else projection
        self.shortcut = ConvBN(in_c, out_c, 1, stride=stride, act=False, **kw) if need else None

    def __call__(self, x, train: bool):
        out = self.c3(self.c2(self.c1(x, train), train), train)
        sc = x if self.shortcut is None else self.shortcut(x, train)
        return nnx.relu(out + sc)


class WideBlock(nnx.Module):
    """Pre-activation wide basic block (RepDistiller wrn.py, dropRate=0)."""

    expansion = 1

    def __init__(self, in_c, out_c, stride, *, width=None, projection=None, dtype, rngs):
        # width: conv1's output width (default out_c); projection as BasicBlock's.
        kw = dict(dtype=dtype, rngs=rngs)
        width = width or out_c
        self.bn1 = _bn(in_c, **kw)
        self.conv1 = _conv(in_c, width, 3, stride=stride, **kw)
        self.bn2 = _bn(width, **kw)
        self.conv2 = _conv(width, out_c, 3, **kw)
        self.equal_in_out = in_c == out_c if projection is None else not projection
        self.shortcut = None if self.equal_in_out else _conv(in_c, out_c, 1, stride=stride, **kw)

    def __call__(self, x, train: bool):
        o = nnx.relu(self.bn1(x, use_running_average=not train))
        out = self.conv1(o)
        if self.bn2 is not None:
            out = self.bn2(out, use_running_average=not train)
        elif train:
            raise ValueError(FOLDED_TRAINING)
        out = self.conv2(nnx.relu(out))
        # RepDistiller: identity on the raw input, projection on the activated input.
        sc = x if self.shortcut is None else self.shortcut(o)
        return sc + out

    def fold_batchnorm(self) -> int:
        # Only bn2 follows a convolution directly; bn1 normalises the block's input, a sum of
        # residual branches, and stays.
        if self.bn2 is None:
            return 0
        _fold_into(self.conv1, self.bn2)
        self.bn2 = None
        return 1


class InvertedResidual(nnx.Module):
    """MobileNetV2 block as in RepDistiller (pw conv present even for t=1)."""

    def __init__(self, in_c, out_c, stride, expand, *, hidden=None, residual=None, dtype, rngs):
        # hidden: the expansion width (default in_c * expand); residual: whether the block adds
        # its input (default: where stride and width allow). Structured pruning sets them.
        kw = dict(dtype=dtype, rngs=rngs)
        hid = hidden or in_c * expand
        self.pw = ConvBN(in_c, hid, 1, **kw)
        self.dw = ConvBN(hid, hid, 3, stride=stride, groups=hid, **kw)
        self.pwl = ConvBN(hid, out_c, 1, act=False, **kw)
        self.use_res = stride == 1 and in_c == out_c if residual is None else residual

    def __call__(self, x, train: bool):
        out = self.pwl(self.dw(self.pw(x, train), train), train)
        return x + out if self.use_res else out


# ----------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------
class MLP(FeatureModel):
    """Flatten -> [Linear -> ReLU]* -> Linear.  Features hidden1.., embedding, logits."""

    def __init__(self, hidden: Sequence[int] = (1200, 1200), *, num_classes: int,
                 rngs: nnx.Rngs, dtype=jnp.float32, in_features: int = 784):
        self.dtype = dtype
        dims = (in_features, *hidden)
        self.hidden = nnx.List([_linear(a, b, dtype=dtype, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.out = _linear(dims[-1], num_classes, dtype=dtype, rngs=rngs)
        self.feature_names = tuple(f"hidden{i + 1}" for i in range(len(hidden))) + ("embedding", "logits")

    def features(self, x, *, train: bool = False):
        x = self._input(x)
        x = x.reshape(x.shape[0], -1)
        feats = {}
        for i, layer in enumerate(self.hidden):
            x = nnx.relu(layer(x))
            feats[f"hidden{i + 1}"] = x
        feats["embedding"] = x
        feats["logits"] = self.out(x)
        return feats


class SmallCNN(FeatureModel):
    """conv-bn-relu-pool x2 -> dense -> relu -> out, for small (28x28x1) images.

    stem = first conv/bn/relu (pre-pool), stage1/stage2 = pooled outputs of the
    two conv blocks, embedding = dense hidden activation.
    """

    feature_names = ("stem", "stage1", "stage2", "embedding", "logits")

    def __init__(self, channels: Sequence[int] = (32, 64), dense: int = 128, *, num_classes: int,
                 rngs: nnx.Rngs, dtype=jnp.float32, in_channels: int = 1, input_size: int = 28):
        kw = dict(dtype=dtype, rngs=rngs)
        self.dtype = dtype
        c1, c2 = channels
        self.conv1 = ConvBN(in_channels, c1, 3, **kw)
        self.conv2 = ConvBN(c1, c2, 3, **kw)
        s = input_size // 4
        self.fc = _linear(s * s * c2, dense, **kw)
        self.out = _linear(dense, num_classes, **kw)

    def features(self, x, *, train: bool = False):
        stem = self.conv1(self._input(x), train)
        s1 = _max_pool(stem, 2, 2)
        s2 = _max_pool(self.conv2(s1, train), 2, 2)
        emb = nnx.relu(self.fc(s2.reshape(s2.shape[0], -1)))
        return {"stem": stem, "stage1": s1, "stage2": s2, "embedding": emb, "logits": self.out(emb)}


class CifarResNet(FeatureModel):
    """RepDistiller CIFAR ResNet (BasicBlock, 3 stages, depth = 6n + 2)."""

    feature_names = ("stem", "stage1", "stage2", "stage3", "embedding", "logits")

    def __init__(self, depth: int = 20, channels: Sequence[int] = (16, 16, 32, 64), *, num_classes: int,
                 rngs: nnx.Rngs, dtype=jnp.float32, in_channels: int = 3,
                 block_widths: Sequence[int] = (), stem_projection: bool | None = None):
        # channels: the stem's and each stage's residual width; block_widths: each block's inner
        # width (between its two convolutions), all 3n blocks in order, () = the stage's width;
        # stem_projection: whether stage 1's first block projects its shortcut (default: where
        # the stem's width differs). Structured pruning records its result in these.
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        if block_widths and len(block_widths) != 3 * n:
            raise ValueError(f"block_widths has {len(block_widths)} entries but a depth-{depth} "
                             f"CIFAR ResNet has {3 * n} blocks; give one width per block or ()")
        kw = dict(dtype=dtype, rngs=rngs)
        self.dtype = dtype
        self.stem = ConvBN(in_channels, channels[0], 3, **kw)
        stages, c = [], channels[0]
        for i, (planes, stride) in enumerate(zip(channels[1:], (1, 2, 2))):
            stage, c = _make_stage(BasicBlock, c, planes, n, stride,
                                   widths=tuple(block_widths[i * n:(i + 1) * n]),
                                   projection=stem_projection if i == 0 else None, **kw)
            stages.append(stage)
        self.stages = nnx.List(stages)
        self.fc = _linear(c, num_classes, **kw)

    def features(self, x, *, train: bool = False):
        x = self.stem(self._input(x), train)
        feats = {"stem": x}
        for i, stage in enumerate(self.stages):
            x = _run(stage, x, train)
            feats[f"stage{i + 1}"] = x
        feats["embedding"] = _gap(x)
        feats["logits"] = self.fc(feats["embedding"])
        return feats


class ImageNetResNet(FeatureModel):
    """torchvision ResNet (7x7/2 conv, 3x3/2 maxpool, 4 stages, fc).

    stem = conv/bn/relu output (before the max pool).
    """

    feature_names = ("stem", "stage1", "stage2", "stage3", "stage4", "embedding", "logits")

    def __init__(self, block: str = "basic", layers: Sequence[int] = (2, 2, 2, 2), *, num_classes: int,
                 rngs: nnx.Rngs, dtype=jnp.float32, in_channels: int = 3,
                 channels: Sequence[int] = (), block_widths: Sequence[Any] = (),
                 stem_projection: bool | None = None):
        # channels: the stem's and each stage's output (residual) width; block_widths: each
        # block's inner width(s) in order (a BasicBlock's c1 width, a Bottleneck's (c1, c2)
        # widths); stem_projection as CifarResNet's. () = torchvision's widths. Structured
        # pruning (kdjax.compress.structured) records its result here.
        blk = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
        kw = dict(dtype=dtype, rngs=rngs)
        self.dtype = dtype
        outs = tuple(channels) or (64, *(p * blk.expansion for p in (64, 128, 256, 512)))
        self.stem = ConvBN(in_channels, outs[0], 7, stride=2, **kw)
        stages, c, first = [], outs[0], 0
        for i, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), layers, (1, 2, 2, 2))):
            widths = tuple(tuple(w) if isinstance(w, (list, tuple)) else w
                           for w in block_widths[first:first + n])
            first += n
            if blk is BasicBlock:
                planes, out = outs[i + 1], None
            else:
                out = outs[i + 1] if channels else None
            stage, c = _make_stage(blk, c, planes, n, stride, widths=widths, out=out,
                                   projection=stem_projection if i == 0 else None, **kw)
            stages.append(stage)
        self.stages = nnx.List(stages)
        self.fc = _linear(c, num_classes, **kw)

    def features(self, x, *, train: bool = False):
        x = self.stem(self._input(x), train)
        feats = {"stem": x}
        x = _max_pool(x, 3, 2, 1)
        for i, stage in enumerate(self.stages):
            x = _run(stage, x, train)
            feats[f"stage{i + 1}"] = x
        feats["embedding"] = _gap(x)
        feats["logits"] = self.fc(feats["embedding"])
        return feats


class WideResNet(FeatureModel):
    """RepDistiller WRN-depth-width (pre-activation, dropout 0).

    stem = first conv (no BN/ReLU in this architecture), stage1..3 = raw block
    group outputs (as RepDistiller's f1..f3), embedding = pooled relu(bn(stage3)).
    """

    feature_names = ("stem", "stage1", "stage2", "stage3", "embedding", "logits")

    def __init__(self, depth: int = 16, widen_factor: int = 1, *, num_classes: int,
                 rngs: nnx.Rngs, dtype=jnp.float32, in_channels: int = 3,
                 channels: Sequence[int] = (), block_widths: Sequence[int] = (),
                 stem_projection: bool | None = None):
        # channels: conv1's and each stage's residual width (default 16 and (16, 32, 64) *
        # widen_factor); block_widths: each block's conv1 width; stem_projection as
        # CifarResNet's. Structured pruning (kdjax.compress.structured) records them.
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        kw = dict(dtype=dtype, rngs=rngs)
        self.dtype = dtype
        chans = tuple(channels) or (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = _conv(in_channels, chans[0], 3, **kw)
        stages, c = [], chans[0]
        for i, (planes, stride) in enumerate(zip(chans[1:], (1, 2, 2))):
            stage, c = _make_stage(WideBlock, c, planes, n, stride,
                                   widths=tuple(block_widths[i * n:(i + 1) * n]),
                                   projection=stem_projection if i == 0 else None, **kw)
            stages.append(stage)
        self.stages = nnx.List(stages)
        self.bn = _bn(c, **kw)
        self.fc = _linear(c, num_classes, **kw)

    def features(self, x, *, train: bool = False):
        x = self.conv1(self._input(x))
        feats = {"stem": x}
        for i, stage in enumerate(self.stages):
            x = _run(stage, x, train)
            feats[f"stage{i + 1}"] = x
        x = nnx.relu(self.bn(x, use_running_average=not train))
        feats["embedding"] = _gap(x)
        feats["logits"] = self.fc(feats["embedding"])
        return feats


_VGG_CFG = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class VGG(FeatureModel):
    """RepDistiller CIFAR VGG with BN (conv bias=True, 5 conv groups, GAP, one fc).

    stem = group 0 output, stage1..stage4 = groups 1..4 (post-ReLU, pre-pool).
    Max-pool after groups 0-2; after group 3 only for 64 px inputs (RepDistiller: `h == 64`).
    """

    feature_names = ("stem", "stage1", "stage2", "stage3", "stage4", "embedding", "logits")

    def __init__(self, depth: int = 13, *, num_classes: int, rngs: nnx.Rngs, dtype=jnp.float32,
                 in_channels: int = 3, widths: Sequence[Sequence[int]] = ()):
        # widths: each group's convolution widths (default _VGG_CFG[depth]); structured pruning
        # (kdjax.compress.structured) records its result here.
        kw = dict(dtype=dtype, rngs=rngs)
        self.dtype = dtype
        groups, c = [], in_channels
        for cfg in widths or _VGG_CFG[depth]:
            layers = []
            for v in cfg:
                layers.append(ConvBN(c, v, 3, bias=True, **kw))
                c = v
            groups.append(nnx.List(layers))
        self.groups = nnx.List(groups)
        self.fc = _linear(c, num_classes, **kw)

    def features(self, x, *, train: bool = False):
        x = self._input(x)
        h = x.shape[1]
        feats = {}
        for i, (name, group) in enumerate(zip(self.feature_names[:5], self.groups)):
            x = _run(group, x, train)
            feats[name] = x
            if i < 3 or (i == 3 and h == 64):
                x = _max_pool(x, 2, 2)
        feats["embedding"] = _gap(x)
        feats["logits"] = self.fc(feats["embedding"])
        return feats


class MobileNetV2(FeatureModel):
    """RepDistiller MobileNetV2 (CIFAR: stride-2 stem; ``mobile_half`` = width 0.5, t=6).

    stem = first conv/bn/relu; stage1..4 = outputs of block groups 1, 2, 4, 6
    (RepDistiller f1..f4); embedding = pooled 1x1-conv (1280-d) features.
    """

    feature_names = ("stem", "stage1", "stage2", "stage3", "stage4", "embedding", "logits")
    _SETTING = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
                (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1))  # t, c, n, s (None -> expand)
    _TAPS = {1: "stage1", 2: "stage2", 4: "stage3", 6: "stage4"}

    def __init__(self, width_mult: float = 0.5, expand: int = 6, *, num_classes: int,
                 rngs: nnx.Rngs, dtype=jnp.float32, in_channels: int = 3,
                 channels: Sequence[int] = (), hidden: Sequence[int] = ()):
        # channels: the stem's, each block group's and the head's widths; hidden: each block's
        # expansion width. () = width_mult's. Structured pruning (kdjax.compress.structured)
        # records them; which blocks add their input stays width_mult's architecture.
        kw = dict(dtype=dtype, rngs=rngs)
        self.dtype = dtype
        default = [int(32 * width_mult), *(int(ch * width_mult) for _, ch, _, _ in self._SETTING),
                   int(1280 * width_mult) if width_mult > 1.0 else 1280]
        widths = list(channels) or default
        c, c_default = widths[0], default[0]
        self.stem = ConvBN(in_channels, c, 3, stride=2, **kw)
        groups, block = [], 0
        for g, (t, _, n, s) in enumerate(self._SETTING):
            out_c = widths[g + 1]
            blocks = []
            for j in range(n):
                stride = s if j == 0 else 1
                blocks.append(InvertedResidual(
                    c, out_c, stride, t or expand, hidden=hidden[block] if hidden else None,
                    residual=stride == 1 and c_default == default[g + 1], **kw))
                c, c_default, block = out_c, default[g + 1], block + 1
            groups.append(nnx.List(blocks))
        self.groups = nnx.List(groups)
        last = widths[-1]
        self.head = ConvBN(c, last, 1, **kw)
        self.fc = _linear(last, num_classes, **kw)

    def features(self, x, *, train: bool = False):
        x = self.stem(self._input(x), train)
        feats = {"stem": x}
        for i, group in enumerate(self.groups):
            x = _run(group, x, train)
            if i in self._TAPS:
                feats[self._TAPS[i]] = x
        feats["embedding"] = _gap(self.head(x, train))
        feats["logits"] = self.fc(feats["embedding"])
        return feats


# ----------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------
_p = functools.partial

MODELS: dict[str, Callable[..., nnx.Module]] = {
    # MLPs (Hinton et al. 2015)
    "mlp": MLP,
    "mlp_1200": _p(MLP, hidden=(1200, 1200)),
    "mlp_800": _p(MLP, hidden=(800, 800)),
    "mlp_tiny": _p(MLP, hidden=(64,)),
    # small CNNs for 28x28x1
    "cnn_small": _p(SmallCNN, channels=(32, 64), dense=128),
    "cnn_tiny": _p(SmallCNN, channels=(8, 16), dense=32),
    # CIFAR ResNets (CRD benchmark)
    **{f"resnet{d}": _p(CifarResNet, depth=d) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": _p(CifarResNet, depth=8, channels=(32, 64, 128, 256)),
    "resnet32x4": _p(CifarResNet, depth=32, channels=(32, 64, 128, 256)),
    # Wide ResNets
    "wrn": WideResNet,
    **{f"wrn_{d}_{w}": _p(WideResNet, depth=d, widen_factor=w) for d, w in ((16, 1), (16, 2), (40, 1), (40, 2))},
    # VGG-BN (CIFAR)
    **{f"vgg{d}": _p(VGG, depth=d) for d in _VGG_CFG},
    # MobileNetV2 (RepDistiller mobile_half)
    "mobilenetv2": _p(MobileNetV2, width_mult=0.5),
    # ImageNet ResNets (torchvision)
    "resnet18": _p(ImageNetResNet, block="basic", layers=(2, 2, 2, 2)),
    "resnet34": _p(ImageNetResNet, block="basic", layers=(3, 4, 6, 3)),
    "resnet50": _p(ImageNetResNet, block="bottleneck", layers=(3, 4, 6, 3)),
}
# The language models of kdjax.lm.models (num_classes is their vocabulary size), so that one
# ModelSpec serves checkpoints, teachers, eval and export of both kinds.
MODELS.update(lm_registry())


def fold_batchnorm(model: nnx.Module) -> int:
    """Fold, in place, every BatchNorm that directly follows a convolution into that convolution.

    For a frozen model (a distillation teacher): inference outputs are unchanged up to float
    rounding, with one elementwise pass per folded layer fewer. Returns how many were folded;
    BatchNorms that follow a sum or a pooling (WRN's pre-activations) stay. The model is
    inference-only afterwards: calling a folded layer with train=True raises.
    """
    blocks = [node for _, node in nnx.iter_graph(model) if hasattr(node, "fold_batchnorm")
              and isinstance(node, nnx.Module)]
    return sum(block.fold_batchnorm() for block in blocks)


def count_batchnorms(model: nnx.Module) -> int:
    return sum(isinstance(node, nnx.BatchNorm) for _, node in nnx.iter_graph(model))


def model_names() -> list[str]:
    """Sorted list of registered model names."""
    return sorted(MODELS)


def _constructor_params(ctor: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """The keyword parameters of a constructor (a class, a functools.partial of one, a function).

    Read from ``__init__``: nnx's metaclass makes ``inspect.signature(cls)`` ``(*args, **kwargs)``.
    """
    func = ctor.func if isinstance(ctor, functools.partial) else ctor
    params = dict(inspect.signature(func.__init__ if isinstance(func, type) else func).parameters)
    params.pop("self", None)
    return params


#: The ModelSpec name of a PyTorch module run through torchax (kdjax.torchbridge), and what to
#: install for it; named here, without importing torch, for the config, the CLI and the errors.
TORCH_MODEL = "kdjax.torchbridge:TorchModel"
TORCH_EXTRA = "pip install 'kdjax[torch]'"


def import_named(module_name: str, where: str) -> Any:
    """The module a user named (`where` names the argument for the message): any error raised
    while importing it is the user's to fix, so it becomes one message, never a traceback."""
    try:
        return importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{where}: cannot import module {module_name!r} "
                         f"({type(e).__name__}: {e}); install the package that defines it, put "
                         f"its folder on PYTHONPATH, or fix the error in it") from None


def resolve(name: str) -> Callable[..., Any]:
    """The constructor of ``name``: a registry name, or an importable ``package.module:Object``
    (an NNX module class, a function returning one, or a Flax Linen module class)."""
    if name in MODELS:
        return MODELS[name]
    module_name, colon, attr = name.partition(":")
    if not colon or not module_name or not attr:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(model_names())}, or "
                         f"your own model as an importable 'package.module:ClassName'")
    if module_name == TORCH_MODEL.partition(":")[0]:
        try:
            importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"model {name!r} (model.torch) runs a PyTorch module through "
                             f"torchax, which is not installed ({e}): {TORCH_EXTRA}") from None
    obj = import_named(module_name, f"model {name!r}")
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model {name!r}: module {module_name!r} has no attribute {attr!r}; "
                             f"name the NNX module class (or a function returning one) after "
                             f"the colon")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model {name!r} is not a class or function but {type(obj).__name__}")
    return obj


def _is_linen(ctor: Any) -> bool:
    return isinstance(ctor, type) and issubclass(ctor, linen.Module)


def _linen_model(ctor: type, kwargs: dict[str, Any], *, rngs: nnx.Rngs,
                 input_shape: Sequence[int] | None, name: str) -> nnx.Module:
    """A Linen module class as an NNX module through Flax's bridge, initialised on one example."""
    if input_shape is None:
        raise ValueError(f"model {name!r} is a Flax Linen module: its variables are created by "
                         f"running it once, so it needs the input shape (input_shape)")
    model = nnx.bridge.ToNNX(ctor(**kwargs), rngs=rngs)
    takes_train = "train" in inspect.signature(ctor.__call__).parameters
    nnx.bridge.lazy_init(model, jnp.zeros((1, *input_shape), jnp.float32),
                         **({"train": False} if takes_train else {}))
    return model


def create_model(name: str, *, num_classes: int, rngs: nnx.Rngs, dtype=jnp.float32,
                 input_shape: Sequence[int] | None = None, **kwargs: Any) -> nnx.Module:
    """Instantiate model ``name`` (see `resolve`); extra kwargs go to its constructor.

    ``input_shape`` (H, W, C) of the images sets whichever input-size arguments the architecture
    has (``in_features`` of an MLP, ``in_channels`` of a CNN, ``input_size`` of the small CNNs),
    so one config serves greyscale 28x28 and RGB 32x32 data; explicit kwargs win. A user's model
    gets each of ``num_classes``, ``rngs``, ``dtype`` and those input-size arguments only if its
    constructor takes it (a Linen module: if it has that field).
    """
    ctor = resolve(name)
    if _is_linen(ctor):
        params = {f.name: f for f in dataclasses.fields(ctor)}
    else:
        params = _constructor_params(ctor)
    offered = {"num_classes": num_classes, "dtype": dtype}
    if input_shape is not None and len(input_shape) == 3:  # images; an LM's is (length,)
        h, _, c = input_shape
        offered.update(in_features=int(np.prod(input_shape)), in_channels=c, input_size=h)
    kwargs = {**{k: v for k, v in offered.items() if k in params}, **kwargs}
    unknown = sorted(set(kwargs) - set(params))
    if unknown and not any(getattr(p, "kind", None) is inspect.Parameter.VAR_KEYWORD
                           for p in params.values()):
        valid = sorted(set(params) - {"num_classes", "rngs", "dtype", "parent", "name"})
        raise ValueError(f"model {name!r} takes no argument(s) {unknown} (model.kwargs); valid: "
                         f"{valid}")
    if _is_linen(ctor):
        return _linen_model(ctor, kwargs, rngs=rngs, input_shape=input_shape, name=name)
    if "rngs" in params:
        kwargs["rngs"] = rngs
    model = ctor(**kwargs)
    if not isinstance(model, nnx.Module):
        raise ValueError(f"model {name!r} built a {type(model).__name__}, not a Flax NNX module "
                         f"(flax.nnx.Module)")
    return model


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model: recorded in each checkpoint and export.

    A teacher, `kdjax eval` and `kdjax export` rebuild the network from the spec saved next to its
    weights, so they do not depend on a config.json that a later run may have rewritten.
    `compute_dtype` stays a policy name ("auto") and is resolved where the model is rebuilt.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    compute_dtype: str = "auto"
    # A structured-pruned model whose constructor cannot take its widths (a user's NNX model):
    # {variable path: its shape after shrinking}, the variables whose shape the shrink changed.
    # The kept channels are re-indexed 0..n-1, so shapes suffice: `build` builds the model, then
    # slices each of them to its recorded shape (kdjax.compress.structured.resize); the weights
    # come from the checkpoint.
    shrunk: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    def build(self, seed: int = 0) -> nnx.Module:
        model = create_model(self.name, num_classes=self.num_classes, rngs=nnx.Rngs(seed),
                             input_shape=self.input_shape,
                             dtype=compute_dtype(self.compute_dtype), **self.kwargs)
        if self.shrunk:
            # Imported here: kdjax.compress.structured imports this module.
            from kdjax.compress import structured

            structured.resize(model, self.shrunk, self.name)
        return model

    def abstract(self) -> nnx.Module:
        """The model with ShapeDtypeStructs for arrays: a restore target that allocates nothing."""
        return nnx.eval_shape(self.build)

    def to_json(self) -> dict[str, Any]:
        d = {**dataclasses.asdict(self), "input_shape": list(self.input_shape)}
        if not self.shrunk:  # an unshrunk model's spec reads as before the field existed
            del d["shrunk"]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ModelSpec":
        return cls(**{**d, "input_shape": tuple(d["input_shape"])})


def count_params(model_or_state) -> int:
    """Number of ``nnx.Param`` scalars in a module or a State (abstract shapes ok).

    Non-Param variables (BatchStat, ...) are ignored; a plain pytree without any
    ``nnx.Variable`` (e.g. a pure dict of arrays) is counted leaf by leaf.
    """
    obj = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state
    leaves = jax.tree.leaves(obj, is_leaf=lambda v: isinstance(v, nnx.Variable))
    if any(isinstance(v, nnx.Variable) for v in leaves):
        leaves = jax.tree.leaves([v for v in leaves if isinstance(v, nnx.Param)])
    return int(sum(int(np.prod(v.shape if hasattr(v, "shape") else np.shape(v))) for v in leaves))
