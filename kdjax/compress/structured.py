"""Structured pruning by coupled channel groups, and physically removing the pruned channels.

A channel group is every parameter slice that must go when a channel goes (DepGraph, Fang et al.
2023): the kernels and biases producing it, the BatchNorms after it, the input axis of every layer
reading it and, across a residual sum, the same channel of every other tensor in the sum and of
their producers. kdjax derives the groups from the model itself by tracing its forward pass
(kdjax.compress.coupling), so a ResNet's residual width (the stem, each block's second
convolution and the shortcut projection of a stage, and the next stage's readers) is one group
and shrinks, as do the inner widths, MobileNetV2's expansions (with their depthwise
convolutions), VGG's and a user's NNX model's channels. Channels that cannot be removed stay
dense and are reported by layer (`Structure.refused`): the model's output channels, and those an
operation the tracer does not follow touches (`Structure.unfollowed`).

While training, the group's Param slices are masked (kdjax.compress.prune), so a pruned channel
is exactly 0 everywhere or multiplies exactly-0 weights; removing it is then exact: the shrunk
model computes the masked model's logits, with fewer channels and fewer FLOPs. The zoo's CNNs
and MLP record their new widths in the ModelSpec's kwargs; a user's NNX model, whose constructor
does not take them, is shrunk in place (its arrays sliced, its layers' feature counts updated)
and its spec records the shrunk shapes of the variables that changed (ModelSpec.shrunk), which
`ModelSpec.build` applies to the built model (`resize`). Either way checkpoints and exports
rebuild the smaller model.

Importance (prune.criterion), per channel of a group, over its Param members:
- "group_l2" (DepGraph's): the sum over members of the L2 norm of the channel's slice, divided by
  the number of members, so that groups of different sizes rank on one scale (global scope);
- "bn_scale": the mean |gamma| over the group's BatchNorm scales (network slimming);
- "l1": the mean |w| of the channel's output filters over the group's producing kernels.
A group with no BatchNorm is scored by "l1" under "bn_scale".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import models
from kdjax.compress import coupling
from kdjax.compress.coupling import Member, Path, layer_name

CRITERIA = ("bn_scale", "l1", "group_l2")


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """`size` channels pruned together: `members` (kdjax.compress.coupling.Member) are the array
    slices that hold them, `producers` the layers whose output they are; `name` is the first
    producer's path."""

    name: str
    size: int
    members: tuple[Member, ...]
    producers: tuple[Path, ...]
    bn_scales: tuple[Path, ...]  # the BatchNorm scales among the members

    @property
    def masked(self) -> tuple[Member, ...]:
        """The members masked while training: Params (BatchNorm statistics are only sliced)."""
        return tuple(m for m in self.members if m.param)

    def mask(self, keep: jnp.ndarray, member: Member, shape: Sequence[int]) -> jnp.ndarray:
        """The boolean mask (True = kept) of `member`'s parameter for kept channels `keep`."""
        channel = member.channel_map(shape[member.axis], self.size)
        along = jnp.where(channel >= 0, keep[np.maximum(channel, 0)], True)
        bshape = [1] * len(shape)
        bshape[member.axis] = shape[member.axis]
        return jnp.broadcast_to(along.reshape(bshape), shape)

    def per_channel(self, array: np.ndarray | jnp.ndarray, member: Member
                    ) -> np.ndarray | jnp.ndarray:
        """`member`'s slice of `array` (its parameter) as [outer, size, inner, rest]: channel c
        of the group on axis 1."""
        # Array methods only: a NumPy array on the host (shrinking), a traced one (scores).
        a = array.transpose((member.axis, *(k for k in range(array.ndim) if k != member.axis)))
        length = member.outer * self.size * member.inner
        a = a[member.offset:member.offset + length]
        return a.reshape(member.outer, self.size, member.inner, -1)

    def score(self, params: Mapping[Path, jnp.ndarray], criterion: str) -> jnp.ndarray:
        """Per-channel importance [size] (module docstring)."""
        if criterion == "group_l2":
            norms = [jnp.sqrt(jnp.sum(jnp.square(self.per_channel(params[m.path], m)),
                                      axis=(0, 2, 3))) for m in self.masked]
            return sum(norms) / len(norms)
        if criterion == "bn_scale" and self.bn_scales:
            return sum(jnp.abs(params[p]) for p in self.bn_scales) / len(self.bn_scales)
        kernels = [m for m in self.masked if m.path[:-1] in self.producers
                   and m.path[-1] == "kernel"]
        return sum(jnp.abs(self.per_channel(params[m.path], m)).mean(axis=(0, 2, 3))
                   for m in kernels) / len(kernels)


@dataclasses.dataclass(frozen=True)
class Structure:
    """A model's channel groups, and the layers whose output channels stay dense (name -> why;
    `unfollowed`: those an operation the tracer does not follow blocked)."""

    groups: tuple[ChannelGroup, ...]
    refused: dict[str, str]
    unfollowed: dict[str, str]


def _params(model: nnx.Module) -> dict[Path, np.ndarray]:
    return {tuple(k): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))}


def kept_channels(model: nnx.Module, groups: Sequence[ChannelGroup]) -> dict[str, np.ndarray]:
    """Per group, the indices of the channels that are not pruned: a pruned channel has every
    Param slice of its group exactly 0 (the masks make it so)."""
    params = _params(model)
    keep = {}
    for g in groups:
        alive = np.zeros(g.size, bool)
        for m in g.masked:
            alive |= (g.per_channel(params[m.path], m) != 0).any(axis=(0, 2, 3))
        if not alive.any():  # a layer cannot have no channels: keep one (it outputs 0)
            alive[0] = True
        keep[g.name] = np.flatnonzero(alive)
    return keep


def _module(model: nnx.Module, name: str) -> nnx.Module:
    node = model
    for key in name.split("/"):
        node = node[int(key)] if key.isdigit() else getattr(node, key)
    return node


def _widths(model: nnx.Module, kept: Mapping[str, int], name: str) -> int:
    # The channels layer `name` keeps: all its outputs when no group prunes it.
    return kept.get(name, _module(model, name).out_features)


def _mlp(model: models.MLP, kept: Mapping[str, int]) -> dict:
    return {"hidden": tuple(_widths(model, kept, f"hidden/{i}")
                            for i in range(len(model.hidden)))}


def _small_cnn(model: models.SmallCNN, kept: Mapping[str, int]) -> dict:
    return {"channels": (_widths(model, kept, "conv1/conv"), _widths(model, kept, "conv2/conv")),
            "dense": _widths(model, kept, "fc")}


def _residual(model, kept: Mapping[str, int], stem: str, last: str,
              inner: Callable[[str], int | tuple[int, ...]]) -> dict:
    """A ResNet's kwargs: the stem's and each stage's residual width (its first block's `last`
    layer), each block's inner width(s) (`inner(block path)`), and the first block's shortcut
    projection kept where pruning made the stem's width equal to stage 1's."""
    stages = [_widths(model, kept, f"stages/{i}/0/{last}") for i in range(len(model.stages))]
    out = {"channels": (_widths(model, kept, stem), *stages),
           "block_widths": tuple(inner(f"stages/{i}/{j}") for i, stage in enumerate(model.stages)
                                 for j in range(len(stage)))}
    if model.stages[0][0].shortcut is not None and out["channels"][0] == stages[0]:
        out["stem_projection"] = True
    return out


def _cifar_resnet(model: models.CifarResNet, kept: Mapping[str, int]) -> dict:
    return _residual(model, kept, "stem/conv", "c2/conv",
                     lambda block: _widths(model, kept, f"{block}/c1/conv"))


def _wide_resnet(model: models.WideResNet, kept: Mapping[str, int]) -> dict:
    return _residual(model, kept, "conv1", "conv2",
                     lambda block: _widths(model, kept, f"{block}/conv1"))


def _imagenet_resnet(model: models.ImageNetResNet, kept: Mapping[str, int]) -> dict:
    if isinstance(model.stages[0][0], models.Bottleneck):
        return _residual(model, kept, "stem/conv", "c3/conv", lambda block: (
            _widths(model, kept, f"{block}/c1/conv"), _widths(model, kept, f"{block}/c2/conv")))
    return _residual(model, kept, "stem/conv", "c2/conv",
                     lambda block: _widths(model, kept, f"{block}/c1/conv"))


def _vgg(model: models.VGG, kept: Mapping[str, int]) -> dict:
    return {"widths": tuple(tuple(_widths(model, kept, f"groups/{i}/{j}/conv")
                                  for j in range(len(group)))
                            for i, group in enumerate(model.groups))}


def _mobilenet_v2(model: models.MobileNetV2, kept: Mapping[str, int]) -> dict:
    groups = [_widths(model, kept, f"groups/{g}/0/pwl/conv") for g in range(len(model.groups))]
    return {"channels": (_widths(model, kept, "stem/conv"), *groups,
                         _widths(model, kept, "head/conv")),
            "hidden": tuple(_widths(model, kept, f"groups/{g}/{j}/pw/conv")
                            for g, group in enumerate(model.groups) for j in range(len(group)))}


# The zoo's architectures whose constructors take their widths: {group producer: kept channels}
# -> the kwargs that rebuild the shrunk model from its ModelSpec.
WIDTHS: dict[type, Callable[[nnx.Module, Mapping[str, int]], dict]] = {
    models.MLP: _mlp, models.SmallCNN: _small_cnn, models.CifarResNet: _cifar_resnet,
    models.WideResNet: _wide_resnet, models.ImageNetResNet: _imagenet_resnet, models.VGG: _vgg,
    models.MobileNetV2: _mobilenet_v2}


def recordable(model: nnx.Module) -> bool:
    """Whether `shrink` records the model's shrunk widths as constructor kwargs (a zoo CNN);
    other models record their shrunk variable shapes (ModelSpec.shrunk)."""
    return any(isinstance(model, cls) for cls in WIDTHS)


# The layers whose feature counts kdjax updates when it shrinks a model in place.
RESIZABLE = (nnx.Linear, nnx.Conv, nnx.BatchNorm)


def _kind(node) -> str:
    return type(node).__name__ if isinstance(node, nnx.Module) else "not an NNX layer"


def structure(model: nnx.Module, input_shape: Sequence[int]) -> Structure:
    """The channel groups of `model` (abstract or not) on `input_shape` inputs."""
    found = coupling.couple(model, input_shape)
    nodes = dict(nnx.iter_graph(model))
    bn_scales = {path + ("scale",) for path, node in nodes.items()
                 if isinstance(node, nnx.BatchNorm) and node.scale is not None}
    rebuilt = recordable(model)
    groups, refused = [], dict(found.refused)
    for g in found.groups:
        # A model shrunk in place must hold every member in a layer whose sizes kdjax updates.
        odd = sorted({f"{layer_name(m.path[:-1])} ({_kind(nodes.get(m.path[:-1]))})"
                      for m in g.members if not isinstance(nodes.get(m.path[:-1]), RESIZABLE)})
        if not rebuilt and odd:
            for p in g.producers:
                refused[layer_name(p)] = (f"its channels reach {', '.join(odd)}, which kdjax "
                                          f"cannot resize (it resizes "
                                          f"{', '.join(c.__name__ for c in RESIZABLE)})")
            continue
        scales = tuple(m.path for m in g.members if m.path in bn_scales)
        groups.append(ChannelGroup(g.name, g.size, g.members, g.producers, scales))
    if not groups:
        raise ValueError(
            f"prune.method='structured' found no channel group of the {type(model).__name__} "
            f"that can be removed: "
            + "; ".join(f"{name or 'the model'}: {why}" for name, why in refused.items())
            + ". Use unstructured pruning (prune.method='magnitude') or N:M (prune.method='nm')")
    return Structure(tuple(groups), refused, found.unfollowed)


def _sliced(model: nnx.Module, groups: Sequence[ChannelGroup], keep: Mapping[str, np.ndarray]
            ) -> dict[Path, np.ndarray]:
    params = _params(model)
    kept_along: dict[tuple[Path, int], np.ndarray] = {}
    for g in groups:
        for m in g.members:
            length = params[m.path].shape[m.axis]
            channel = m.channel_map(length, g.size)
            ok = (channel < 0) | np.isin(channel, keep[g.name])
            key = (m.path, m.axis)
            kept_along[key] = kept_along.get(key, np.ones(length, bool)) & ok
    for (path, axis), ok in kept_along.items():
        params[path] = np.take(params[path], np.flatnonzero(ok), axis=axis)
    return params


def _resize_layers(model: nnx.Module) -> None:
    # A layer's feature counts follow its (sliced) arrays.
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Linear):
            node.in_features, node.out_features = node.kernel.shape
        elif isinstance(node, nnx.Conv):
            depthwise = node.feature_group_count > 1 and node.kernel.shape[-2] == 1 \
                and node.feature_group_count == node.in_features
            node.out_features = node.kernel.shape[-1]
            node.in_features = node.kernel.shape[-2] * (1 if depthwise
                                                        else node.feature_group_count)
            if depthwise:
                node.feature_group_count = node.out_features
                node.in_features = node.out_features
            node.kernel_shape = tuple(node.kernel.shape)
        elif isinstance(node, nnx.BatchNorm):
            node.num_features = node.mean.shape[0]


def shrink_in_place(model: nnx.Module, input_shape: Sequence[int]
                    ) -> tuple[nnx.Module, dict[str, tuple[int, int]]]:
    """A copy of `model` without its pruned channels, its arrays sliced and its layers' feature
    counts updated, and {group: (channels before, after)}; its logits equal `model`'s (up to
    float summation order). In memory only: `shrink` also returns the spec that rebuilds it."""
    st = structure(model, input_shape)
    keep = kept_channels(model, st.groups)
    params = _sliced(model, st.groups, keep)
    small = nnx.clone(model)
    state = nnx.state(small)
    for key, var in nnx.to_flat_state(state):
        var.set_value(jnp.asarray(params[tuple(key)], var.dtype))
    nnx.update(small, state)
    _resize_layers(small)
    return small, {g.name: (g.size, len(keep[g.name])) for g in st.groups}


def resize(model: nnx.Module, shapes: Mapping[str, Sequence[int]], name: str) -> None:
    """Slice, in place, each variable `shapes` names ({path: shape}, ModelSpec.shrunk) to its
    first channels along each axis, and update its layer's feature counts: how a ModelSpec
    rebuilds a shrunk user model (`name`, for the errors) before its weights are restored. Works
    on an abstract model (ModelSpec.abstract)."""
    nodes = dict(nnx.iter_graph(model))
    state = nnx.state(model)
    variables = {layer_name(k): (tuple(k), v) for k, v in nnx.to_flat_state(state)}
    for path, shape in shapes.items():
        if path not in variables:
            raise ValueError(
                f"ModelSpec.shrunk of {name!r} records a shrunk {path!r}, which the model built "
                f"from the spec does not have (its variables: {', '.join(sorted(variables))}): the "
                f"model's code or model.kwargs changed since it was pruned; rebuild it with the "
                f"code and kwargs it was trained with")
        key, var = variables[path]
        layer = nodes.get(key[:-1])
        if not isinstance(layer, RESIZABLE):
            raise ValueError(
                f"ModelSpec.shrunk of {name!r} records a shrunk {path!r}, in a "
                f"{_kind(layer)}, which kdjax cannot resize (it resizes "
                f"{', '.join(c.__name__ for c in RESIZABLE)}); the model's code changed since it "
                f"was pruned")
        if len(shape) != len(var.shape) or any(n > m or n < 1 for n, m in zip(shape, var.shape)):
            raise ValueError(
                f"ModelSpec.shrunk of {name!r} records {path!r} as {list(shape)}, and the model "
                f"built from the spec has it {list(var.shape)}: shrinking only narrows a "
                f"variable, keeping its rank; the model's code or model.kwargs changed since it "
                f"was pruned")
        var.set_value(var[...][tuple(slice(0, n) for n in shape)])
    nnx.update(model, state)
    _resize_layers(model)


def _shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    return {layer_name(k): tuple(v.shape) for k, v in nnx.to_flat_state(nnx.state(model))}


def _recorded(small: nnx.Module, spec: models.ModelSpec) -> models.ModelSpec:
    """`spec` recording `small`'s (a shrunk user model's) shapes: those that differ from the
    model its constructor builds. Refused when the spec builds a model with other variables."""
    built = _shapes(dataclasses.replace(spec, shrunk={}).abstract())
    have = _shapes(small)
    if set(built) != set(have):
        raise ValueError(
            f"structured pruning cannot record the shrunk {type(small).__name__} in its "
            f"ModelSpec ({spec.name} with kwargs {dict(spec.kwargs)}): that spec builds a model "
            f"with other variables (only in the spec's: {sorted(set(built) - set(have))}; only "
            f"in the model's: {sorted(set(have) - set(built))}); pass the spec the model was "
            f"built from")
    return dataclasses.replace(spec, shrunk={p: list(s) for p, s in have.items()
                                             if s != built[p]})


def shrink(model: nnx.Module, spec: models.ModelSpec) -> tuple[nnx.Module, models.ModelSpec,
                                                               dict[str, tuple[int, int]]]:
    """The model without its pruned channels: (the smaller model, its spec, {group: (channels
    before, after)}). A zoo model is rebuilt from the spec, whose kwargs record the new widths;
    another model is shrunk in place and the spec records its shrunk variable shapes
    (ModelSpec.shrunk). Checkpoints and exports store the spec and rebuild the smaller model
    from it. Its logits equal `model`'s (up to float summation order)."""
    if not recordable(model):
        small, sizes = shrink_in_place(model, spec.input_shape)
        return small, _recorded(small, spec), sizes
    st = structure(model, spec.input_shape)
    keep = kept_channels(model, st.groups)
    params = _sliced(model, st.groups, keep)
    kept = {layer_name(p): len(keep[g.name]) for g in st.groups for p in g.producers}
    widths = next(fn for cls, fn in WIDTHS.items() if isinstance(model, cls))
    new_spec = dataclasses.replace(spec, kwargs={**spec.kwargs, **widths(model, kept)})
    small = nnx.eval_shape(lambda: new_spec.build())
    state = nnx.state(small)
    for key, var in nnx.to_flat_state(state):
        value = params[tuple(key)]
        if value.shape != var.shape:
            raise AssertionError(f"shrinking {spec.name}: {layer_name(key)} is {value.shape}, the "
                                 f"rebuilt model expects {var.shape}")
        var.set_value(jnp.asarray(value, var.dtype))
    nnx.update(small, state)
    return small, new_spec, {g.name: (g.size, len(keep[g.name])) for g in st.groups}
