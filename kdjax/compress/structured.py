"""Channel (filter) groups of the zoo's architectures, and physically removing pruned channels.

A channel group is one layer's output channels together with every parameter they touch: the
producing kernel's output axis, its bias and the BatchNorm after it (masked while training, so a
pruned channel outputs exactly 0 after its BatchNorm and ReLU), and the consuming layer's input
axis (only removed when shrinking: it multiplies zeros). Removing a pruned channel is then exact:
the shrunk model computes the masked model's logits, with fewer channels and fewer FLOPs.

Channels that feed a residual sum (x + F(x)) are not groups: the identity shortcut ties them to
every other block's output in the stage, so they could only be pruned as the stage's whole
residual stream, which kdjax does not do. Those layers are listed as refused, with the reason, and
naming one in prune.targets is an error. In a CIFAR ResNet that leaves each block's inner layer
(c1: between its two convolutions), the channels Li et al. (2017) prune in residual networks.

Supported: MLP (hidden widths), SmallCNN (both convolutions and the dense layer) and the CIFAR
ResNets (each block's inner width, recorded as `block_widths`). The shrunk ModelSpec records the
new widths in its kwargs, so checkpoints and exports rebuild the smaller model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import models

Path = tuple  # a parameter's path inside the student, e.g. ("stages", 0, 1, "c1", "conv", "kernel")
CRITERIA = ("bn_scale", "l1")


def layer_name(path: Path) -> str:
    return "/".join(str(p) for p in path)


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """One layer's `size` output channels (`name` is the layer's path)."""

    name: str
    size: int
    producers: tuple[tuple[Path, int], ...]  # (parameter, channel axis): masked in training
    stats: tuple[Path, ...]  # BatchNorm statistics of those channels (axis 0): sliced on shrink
    consumers: tuple[tuple[Path, int], ...]  # (parameter, input axis, a multiple of size)
    kernel: Path  # the producing kernel (its output channels are its last axis): criterion l1
    bn_scale: Path | None  # the BatchNorm scale after it: criterion bn_scale

    def score(self, params: Mapping[Path, jnp.ndarray], criterion: str) -> jnp.ndarray:
        """Per-channel importance [size]: |gamma| (network slimming) or the mean |w| of each
        output filter (L1 per weight, so that global pruning compares layers fairly). A layer
        with no BatchNorm after it (a Linear) is scored by L1 under either criterion."""
        if criterion == "bn_scale" and self.bn_scale is not None:
            return jnp.abs(params[self.bn_scale])
        w = params[self.kernel]
        return jnp.abs(w).reshape(-1, w.shape[-1]).mean(axis=0)


@dataclasses.dataclass(frozen=True)
class Structure:
    """An architecture's channel groups, the layers refused (name -> why), and how its
    constructor's kwargs express the channel counts."""

    groups: tuple[ChannelGroup, ...]
    refused: dict[str, str]
    widths: Callable[[dict[str, int]], dict]  # {group name: kept channels} -> model kwargs


def _conv_bn(path: Path, conv_bn) -> dict:
    producers = [(path + ("conv", "kernel"), 3), (path + ("bn", "scale"), 0),
                 (path + ("bn", "bias"), 0)]
    if conv_bn.conv.bias is not None:
        producers.append((path + ("conv", "bias"), 0))
    return dict(producers=tuple(producers), stats=(path + ("bn", "mean"), path + ("bn", "var")),
                kernel=path + ("conv", "kernel"), bn_scale=path + ("bn", "scale"))


def _linear(path: Path) -> dict:
    return dict(producers=((path + ("kernel",), 1), (path + ("bias",), 0)), stats=(),
                kernel=path + ("kernel",), bn_scale=None)


def _mlp(model: models.MLP) -> Structure:
    n = len(model.hidden)
    consumers = [("hidden", i + 1) for i in range(n - 1)] + [("out",)]
    groups = tuple(ChannelGroup(name=f"hidden/{i}", size=model.hidden[i].out_features,
                                consumers=((consumers[i] + ("kernel",), 0),),
                                **_linear(("hidden", i))) for i in range(n))
    return Structure(groups, {}, lambda keep: {"hidden": tuple(keep[g.name] for g in groups)})


def _small_cnn(model: models.SmallCNN) -> Structure:
    groups = (
        ChannelGroup(name="conv1", size=model.conv1.conv.out_features,
                     consumers=((("conv2", "conv", "kernel"), 2),), **_conv_bn(("conv1",),
                                                                                model.conv1)),
        # fc reads the flattened NHWC map: its input index is (h * W + w) * C + c.
        ChannelGroup(name="conv2", size=model.conv2.conv.out_features,
                     consumers=((("fc", "kernel"), 0),), **_conv_bn(("conv2",), model.conv2)),
        ChannelGroup(name="fc", size=model.fc.out_features, consumers=((("out", "kernel"), 0),),
                     **_linear(("fc",))),
    )
    return Structure(groups, {}, lambda keep: {"channels": (keep["conv1"], keep["conv2"]),
                                               "dense": keep["fc"]})


RESIDUAL = ("its output channels feed a residual sum (x + F(x)), tied by the identity "
            "shortcuts to the whole stage's channels, which kdjax prunes only inside blocks")


def _cifar_resnet(model: models.CifarResNet) -> Structure:
    groups, refused = [], {"stem": RESIDUAL}
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage):
            path = ("stages", i, j)
            groups.append(ChannelGroup(
                name=layer_name(path + ("c1",)), size=block.c1.conv.out_features,
                consumers=((path + ("c2", "conv", "kernel"), 2),),
                **_conv_bn(path + ("c1",), block.c1)))
            refused[layer_name(path + ("c2",))] = RESIDUAL
            if block.shortcut is not None:
                refused[layer_name(path + ("shortcut",))] = RESIDUAL
    return Structure(tuple(groups), refused,
                     lambda keep: {"block_widths": tuple(keep[g.name] for g in groups)})


ARCHITECTURES: dict[type, Callable[[nnx.Module], Structure]] = {
    models.MLP: _mlp, models.SmallCNN: _small_cnn, models.CifarResNet: _cifar_resnet}


def structure(model: nnx.Module) -> Structure:
    for cls, fn in ARCHITECTURES.items():
        if isinstance(model, cls):
            return fn(model)
    raise ValueError(
        f"prune.method='structured' cannot shrink a {type(model).__name__}: kdjax knows the "
        f"channel structure of {', '.join(c.__name__ for c in ARCHITECTURES)} only (the zoo's "
        f"mlp*, cnn_*, resnet8..resnet110 and resnet8x4/resnet32x4); use unstructured pruning "
        f"(prune.method='magnitude') or N:M (prune.method='nm') for this model")


def _params(model: nnx.Module) -> dict[Path, np.ndarray]:
    return {tuple(k): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))}


def kept_channels(model: nnx.Module, groups) -> dict[str, np.ndarray]:
    """Per group, the indices of the channels that are not pruned. A pruned channel has all its
    producing parameters exactly 0 (its output is 0 whatever the input), so removing it changes
    no output."""
    params = _params(model)
    keep = {}
    for g in groups:
        alive = np.zeros(g.size, bool)
        for path, axis in g.producers:
            p = np.moveaxis(params[path], axis, 0).reshape(g.size, -1)
            alive |= (p != 0).any(axis=1)
        if not alive.any():  # a layer cannot have no channels: keep one (it outputs 0)
            alive[0] = True
        keep[g.name] = np.flatnonzero(alive)
    return keep


def _take(array: np.ndarray, axis: int, size: int, idx: np.ndarray) -> np.ndarray:
    # The axis holds (length // size) blocks of `size` channels (a flattened NHWC map): keep
    # channels idx of every block.
    shape = array.shape
    blocks = array.reshape(shape[:axis] + (shape[axis] // size, size) + shape[axis + 1:])
    out = np.take(blocks, idx, axis=axis + 1)
    return out.reshape(shape[:axis] + (-1,) + shape[axis + 1:])


def shrink(model: nnx.Module, spec: models.ModelSpec) -> tuple[nnx.Module, models.ModelSpec,
                                                               dict[str, tuple[int, int]]]:
    """The model without its pruned channels: (the smaller model, its spec, {group: (channels
    before, after)}). Its logits equal `model`'s (up to float summation order)."""
    st = structure(model)
    keep = kept_channels(model, st.groups)
    new_spec = dataclasses.replace(spec, kwargs={**spec.kwargs, **st.widths(
        {name: len(idx) for name, idx in keep.items()})})
    params = _params(model)
    for g in st.groups:
        idx = keep[g.name]
        for path, axis in g.producers + tuple((p, 0) for p in g.stats) + g.consumers:
            params[path] = _take(params[path], axis, g.size, idx)
    small = nnx.eval_shape(lambda: new_spec.build())
    state = nnx.state(small)
    for key, var in nnx.to_flat_state(state):
        value = params[tuple(key)]
        if value.shape != var.shape:
            raise AssertionError(f"shrinking {spec.name}: {layer_name(key)} is {value.shape}, the "
                                 f"rebuilt model expects {var.shape}")
        var.set_value(jnp.asarray(value, var.dtype))
    nnx.update(small, state)
    sizes = {g.name: (g.size, len(keep[g.name])) for g in st.groups}
    return small, new_spec, sizes
