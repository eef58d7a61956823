"""Parameter layouts: how a model's NNX variables are named and shaped in a PyTorch state_dict.

A layout maps each variable of a model (its `nnx.state` path) to one state_dict entry:
  "torchvision"  torchvision's ResNet naming (conv1, bn1, layer1.0.conv1, layer1.0.downsample.0,
                 fc) for the zoo's resnet18/34/50;
  "crd"          the CRD benchmark's (HobbitLong/RepDistiller models/*.py) for the CIFAR ResNets
                 (resnet8..110, resnet8x4, resnet32x4: the same names as torchvision's), WRN
                 (conv1, block1.layer.0.bn1, ...convShortcut, bn1, fc), VGG (block0.0, block0.1,
                 ..., classifier) and MobileNetV2 (conv1.0, blocks.0.0.conv.0..7, conv2.0,
                 classifier.0);
  "pytorch"      the NNX module paths ("hidden.0", "conv1.bn") in PyTorch's conventions, for the zoo
                 architectures with no reference PyTorch class (the MLPs, the small CNNs):
                 kdjax.interop.torch_code writes the nn.Module they load into (an export's
                 model.py);
  "hf"           Hugging Face transformers' causal-LM naming (model.layers.0.self_attn.q_proj,
                 ..., lm_head) for kdjax.lm.models' Transformer: Llama, Mistral, Qwen2, Qwen3,
                 Gemma 2 and Gemma 3 (text);
  "kdjax"        the NNX paths joined by dots ("stem.conv.kernel"), arrays as NNX holds them: the
                 layout of any model, zoo or not, which no PyTorch module loads (kdjax import
                 reads it back).
The torch layouts also convert the arrays: a convolution kernel is HWIO in NNX and OIHW in
PyTorch, a linear kernel [in, out] against PyTorch's [out, in]; BatchNorm's scale/bias/mean/var are
weight/bias/running_mean/running_var, and PyTorch's num_batches_tracked (which the zoo does not
keep) is accepted on import and written on export, as torch writes it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

import jax
import numpy as np
from flax import nnx

from kdjax import models
from kdjax.lm import models as lm_models

__all__ = ["LAYOUTS", "Entry", "LayoutMismatchError", "default_layout", "entries",
           "from_state_dict", "to_state_dict", "reference_class"]

LAYOUTS = ("torchvision", "crd", "pytorch", "hf", "kdjax")


class LayoutMismatchError(ValueError):
    """A state_dict does not fit a model: every unmapped, missing and misshapen name is listed."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One state_dict entry: its name, the NNX variable path it holds, how it is converted."""

    name: str
    path: tuple  # the variable's path in nnx.state(model), e.g. ("stem", "conv", "kernel")
    kind: str  # "conv" (HWIO <-> OIHW), "linear" ([in, out] <-> [out, in]) or "same"


def to_torch(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return np.transpose(x, (3, 2, 0, 1))
    if kind == "linear":
        return np.transpose(x)
    return x


def from_torch(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return np.transpose(x, (2, 3, 1, 0))
    if kind == "linear":
        return np.transpose(x)
    return x


def _torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "conv":
        return (shape[3], shape[2], shape[0], shape[1])
    if kind == "linear":
        return (shape[1], shape[0])
    return tuple(shape)


# ----------------------------------------------------------------------------
# module naming rules: a zoo module path (dotted) -> the reference's module name
# ----------------------------------------------------------------------------
Rule = tuple[str, Callable[[re.Match], str]]


def _plus1(s: str) -> int:
    return int(s) + 1


_RESNET: tuple[Rule, ...] = (
    (r"stem\.conv", lambda m: "conv1"),
    (r"stem\.bn", lambda m: "bn1"),
    (r"stages\.(\d+)\.(\d+)\.c(\d)\.conv", lambda m: f"layer{_plus1(m[1])}.{m[2]}.conv{m[3]}"),
    (r"stages\.(\d+)\.(\d+)\.c(\d)\.bn", lambda m: f"layer{_plus1(m[1])}.{m[2]}.bn{m[3]}"),
    (r"stages\.(\d+)\.(\d+)\.shortcut\.conv", lambda m: f"layer{_plus1(m[1])}.{m[2]}.downsample.0"),
    (r"stages\.(\d+)\.(\d+)\.shortcut\.bn", lambda m: f"layer{_plus1(m[1])}.{m[2]}.downsample.1"),
    (r"fc", lambda m: "fc"),
)
_WRN: tuple[Rule, ...] = (
    (r"conv1", lambda m: "conv1"),
    (r"stages\.(\d+)\.(\d+)\.(bn1|conv1|bn2|conv2)",
     lambda m: f"block{_plus1(m[1])}.layer.{m[2]}.{m[3]}"),
    (r"stages\.(\d+)\.(\d+)\.shortcut", lambda m: f"block{_plus1(m[1])}.layer.{m[2]}.convShortcut"),
    (r"bn", lambda m: "bn1"),
    (r"fc", lambda m: "fc"),
)
# RepDistiller's VGG blocks are nn.Sequential(conv, bn, relu, conv, bn, relu, ...): layer l of a
# group is conv 3l, bn 3l + 1.
_VGG: tuple[Rule, ...] = (
    (r"groups\.(\d+)\.(\d+)\.conv", lambda m: f"block{m[1]}.{3 * int(m[2])}"),
    (r"groups\.(\d+)\.(\d+)\.bn", lambda m: f"block{m[1]}.{3 * int(m[2]) + 1}"),
    (r"fc", lambda m: "classifier"),
)
# InvertedResidual.conv = Sequential(pw conv, bn, relu, dw conv, bn, relu, pw-linear conv, bn).
_MOBILENET_SLOT = {("pw", "conv"): 0, ("pw", "bn"): 1, ("dw", "conv"): 3, ("dw", "bn"): 4,
                   ("pwl", "conv"): 6, ("pwl", "bn"): 7}
_MOBILENET: tuple[Rule, ...] = (
    (r"stem\.(conv|bn)", lambda m: f"conv1.{0 if m[1] == 'conv' else 1}"),
    (r"groups\.(\d+)\.(\d+)\.(pw|dw|pwl)\.(conv|bn)",
     lambda m: f"blocks.{m[1]}.{m[2]}.conv.{_MOBILENET_SLOT[(m[3], m[4])]}"),
    (r"head\.(conv|bn)", lambda m: f"conv2.{0 if m[1] == 'conv' else 1}"),
    (r"fc", lambda m: "classifier.0"),
)

_HF_LAYER = r"layers\.(\d+)\."
_HF: tuple[Rule, ...] = (
    (r"embed", lambda m: "model.embed_tokens"),
    (_HF_LAYER + r"attention\.(q|k|v|o)", lambda m: f"model.layers.{m[1]}.self_attn.{m[2]}_proj"),
    (_HF_LAYER + r"attention\.(q_norm|k_norm)", lambda m: f"model.layers.{m[1]}.self_attn.{m[2]}"),
    (_HF_LAYER + r"attention_norm", lambda m: f"model.layers.{m[1]}.input_layernorm"),
    (_HF_LAYER + r"mlp_norm", lambda m: f"model.layers.{m[1]}.post_attention_layernorm"),
    # Gemma 2/3's four norms a block
    (_HF_LAYER + r"post_attention_norm", lambda m: f"model.layers.{m[1]}.post_attention_layernorm"),
    (_HF_LAYER + r"pre_mlp_norm", lambda m: f"model.layers.{m[1]}.pre_feedforward_layernorm"),
    (_HF_LAYER + r"post_mlp_norm", lambda m: f"model.layers.{m[1]}.post_feedforward_layernorm"),
    (_HF_LAYER + r"mlp\.(gate|up|down)", lambda m: f"model.layers.{m[1]}.mlp.{m[2]}_proj"),
    (r"norm", lambda m: "model.norm"),
    (r"lm_head", lambda m: "lm_head"),
)

# kdjax.interop.torch_code names each nn.Module attribute as the NNX module it mirrors.
_SAME_PATHS: tuple[Rule, ...] = ((r"(.+)", lambda m: m[1]),)

# (layout, zoo class) -> naming rules, and the reference class a user loads the weights into.
_RULES: dict[tuple[str, type], tuple[tuple[Rule, ...], str]] = {
    ("torchvision", models.ImageNetResNet): (_RESNET, "torchvision.models.{name}"),
    ("crd", models.CifarResNet): (_RESNET, "RepDistiller models.resnet.{name}"),
    ("crd", models.WideResNet): (_WRN, "RepDistiller models.wrn.{name}"),
    ("crd", models.VGG): (_VGG, "RepDistiller models.vgg.{name}_bn"),
    ("crd", models.MobileNetV2): (_MOBILENET, "RepDistiller models.mobilenetv2.mobile_half"),
    ("pytorch", models.MLP): (_SAME_PATHS, "the export's model.py"),
    ("pytorch", models.SmallCNN): (_SAME_PATHS, "the export's model.py"),
    ("hf", lm_models.Transformer): (_HF, "transformers.AutoModelForCausalLM"),
}

# variable name in NNX -> in PyTorch, per layer type (PyTorch's order within the module)
_VARIABLES = {
    nnx.Conv: (("kernel", "weight", "conv"), ("bias", "bias", "same")),
    nnx.Linear: (("kernel", "weight", "linear"), ("bias", "bias", "same")),
    nnx.BatchNorm: (("scale", "weight", "same"), ("bias", "bias", "same"),
                    ("mean", "running_mean", "same"), ("var", "running_var", "same")),
    nnx.Embed: (("embedding", "weight", "same"),),
    lm_models.RMSNorm: (("scale", "weight", "same"),),
}
NUM_BATCHES_TRACKED = "num_batches_tracked"


def layouts_for(model: nnx.Module) -> tuple[str, ...]:
    """The layouts `model` can be written in or read from."""
    return tuple(layout for layout in LAYOUTS
                 if layout == "kdjax" or (layout, type(model)) in _RULES)


def default_layout(model: nnx.Module) -> str:
    """The reference's layout for a zoo architecture that has one, else "kdjax"."""
    return next((layout for layout in LAYOUTS if (layout, type(model)) in _RULES), "kdjax")


def reference_class(model: nnx.Module, layout: str, name: str) -> str | None:
    """The PyTorch class whose state_dict `layout` is, e.g. "torchvision.models.resnet18"."""
    rule = _RULES.get((layout, type(model)))
    return rule[1].format(name=name) if rule else None


def _check_layout(model: nnx.Module, layout: str, what: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"{what}: layout must be one of {LAYOUTS}, got {layout!r}")
    if layout != "kdjax" and (layout, type(model)) not in _RULES:
        raise ValueError(f"{what}: the layout {layout!r} has no naming for "
                         f"{type(model).__name__} models; this model's layouts are "
                         f"{layouts_for(model)}")


def _rename(rules: tuple[Rule, ...], module_path: str) -> str:
    for pattern, name in rules:
        m = re.fullmatch(pattern, module_path)
        if m:
            return name(m)
    raise AssertionError(f"no naming rule for the zoo module {module_path!r}: the layout rules "
                         f"in kdjax/interop/layouts.py must follow kdjax/models.py")


def hf_module_name(module_path: str) -> str:
    """The transformers module name of a kdjax Transformer's module ("layers.0.attention.q" ->
    "model.layers.0.self_attn.q_proj"): PEFT's adapters are named after it."""
    return _rename(_HF, module_path)


def _natural(name: str) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def entries(model: nnx.Module, layout: str) -> list[Entry]:
    """Every state_dict entry of `model` in `layout`, in the reference's order."""
    _check_layout(model, layout, "--layout")
    if layout == "kdjax":
        return [Entry(".".join(map(str, path)), tuple(path), "same")
                for path, _ in nnx.to_flat_state(nnx.state(model))]
    rules = _RULES[(layout, type(model))][0]
    modules = []
    for path, node in nnx.iter_graph(model):
        variables = next((v for cls, v in _VARIABLES.items() if isinstance(node, cls)), None)
        if variables is None:
            continue
        prefix = _rename(rules, ".".join(map(str, path)))
        modules.append((prefix, [Entry(f"{prefix}.{torch_name}", (*path, nnx_name), kind)
                                 for nnx_name, torch_name, kind in variables
                                 if getattr(node, nnx_name, None) is not None]))
    modules.sort(key=lambda m: _natural(m[0]))
    return [e for _, group in modules for e in group]


def expected_shapes(model: nnx.Module, layout: str) -> dict[str, tuple[int, ...]]:
    """{state_dict name: the shape the file must have there} for `model` (abstract is fine)."""
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    return {e.name: _torch_shape(e.kind, tuple(flat[e.path].shape)) for e in entries(model, layout)}


def _batchnorm_prefixes(model: nnx.Module, layout: str) -> list[str]:
    if layout == "kdjax":
        return []
    rules = _RULES[(layout, type(model))][0]
    return sorted((_rename(rules, ".".join(map(str, path))) for path, node in
                   nnx.iter_graph(model) if isinstance(node, nnx.BatchNorm)), key=_natural)


def to_state_dict(model: nnx.Module, layout: str, *, num_batches_tracked: int = 0
                  ) -> dict[str, np.ndarray]:
    """`model`'s variables as a state_dict of numpy arrays in `layout` (float32 as held).

    The torch layouts add each BatchNorm's num_batches_tracked (an int64 scalar) as torch does;
    it counts the BatchNorm's training-mode calls, given here (e.g. the run's step).
    """
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    out = {e.name: to_torch(e.kind, np.asarray(jax.device_get(flat[e.path][...])))
           for e in entries(model, layout)}
    for prefix in _batchnorm_prefixes(model, layout):
        out[f"{prefix}.{NUM_BATCHES_TRACKED}"] = np.asarray(num_batches_tracked, np.int64)
    return dict(sorted(out.items(), key=lambda kv: _natural(kv[0])))


def from_state_dict(model: nnx.Module, tensors: Mapping[str, np.ndarray], layout: str, *,
                    source: str) -> nnx.State:
    """`model`'s state (nnx.state) with every variable taken from `tensors` in `layout`.

    `model` may be abstract (nnx.eval_shape): only its structure and shapes are read. Raises
    LayoutMismatchError listing, by name and with both shapes, every entry of the file the model
    has no place for, every variable the file lacks, and every shape that differs; nothing is
    returned partially. Floating arrays are cast to the variable's dtype (float32).
    """
    expected = entries(model, layout)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    shapes = expected_shapes(model, layout)
    tracked = {f"{p}.{NUM_BATCHES_TRACKED}" for p in _batchnorm_prefixes(model, layout)}
    unexpected = [k for k in tensors if k not in shapes and k not in tracked]
    missing, misshapen, values = [], [], {}
    for e in expected:
        variable, want = flat[e.path], shapes[e.name]
        if e.name not in tensors:
            missing.append(f"{e.name}: {want} expected, not in the file")
            continue
        have = np.asarray(tensors[e.name])
        if tuple(have.shape) != want:
            misshapen.append(f"{e.name}: {tuple(have.shape)} in the file, {want} expected")
            continue
        if not (np.issubdtype(have.dtype, np.floating) or have.dtype.name == "bfloat16"):
            misshapen.append(f"{e.name}: dtype {have.dtype} in the file, floating expected")
            continue
        values[e.path] = from_torch(e.kind, have).astype(variable.dtype)
    if unexpected or missing or misshapen:
        lines = ([f"{k}: {tuple(np.shape(tensors[k]))} in the file, not in the model"
                  for k in unexpected] + missing + misshapen)
        raise LayoutMismatchError(
            f"{source} does not fit the model in the {layout!r} layout: {len(unexpected)} "
            f"unmapped, {len(missing)} missing, {len(misshapen)} wrongly shaped or typed "
            f"tensor(s):\n  " + "\n  ".join(lines))
    return nnx.from_flat_state([(path, variable.replace(values[path]))
                                for path, variable in nnx.to_flat_state(nnx.state(model))])
