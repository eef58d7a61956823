"""The PyTorch module of a zoo architecture that has no reference class: an export's model.py.

The MLPs and the small CNNs are kdjax's own, so no torchvision or RepDistiller class loads their
state_dict. `source` writes one: an `nn.Module` whose attributes are the NNX module paths
("hidden.0", "conv1.bn"), which is the "pytorch" layout (kdjax.interop.layouts), with the widths
read off the model (a structurally pruned one included) and a forward that computes kdjax's
logits from PyTorch's NCHW input. kdjax flattens NHWC, so the forward permutes to NHWC before
flattening: the flattened feature order, and with it every Linear's columns, stays kdjax's.
"""

from __future__ import annotations

from flax import nnx

from kdjax import models

__all__ = ["FILE", "source", "supports"]

FILE = "model.py"

_HEAD = '''"""kdjax's {name} as a PyTorch module: `build()` makes the module that the export's state_dict
loads into (model.load_state_dict), whose forward gives kdjax's logits for float32 NCHW images
normalised as the export's README.md says. Written by kdjax.interop.torch_code."""

import torch
from torch import nn
from torch.nn import functional as F

'''

_MLP = '''
class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU]* -> Linear."""

    def __init__(self, widths, num_classes):
        super().__init__()
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.out = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        x = x.permute(0, 2, 3, 1).flatten(1)  # kdjax's feature order: NHWC
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.out(x)


def build():
    return MLP({widths!r}, {num_classes})
'''

_CNN = '''
class ConvBN(nn.Module):
    """3x3 convolution (padding 1) -> BatchNorm (absent once folded into the convolution) -> ReLU."""

    def __init__(self, in_channels, out_channels, *, bias, batchnorm):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)
        if batchnorm:
            self.bn = nn.BatchNorm2d(out_channels, eps={eps})

    def forward(self, x):
        x = self.conv(x)
        return torch.relu(self.bn(x) if hasattr(self, "bn") else x)


class SmallCNN(nn.Module):
    """[ConvBN -> 2x2 max pool] x2 -> Linear -> ReLU -> Linear."""

    def __init__(self, convs, flat, dense, num_classes):
        super().__init__()
        self.conv1 = ConvBN(*convs[0][:2], bias=convs[0][2], batchnorm=convs[0][3])
        self.conv2 = ConvBN(*convs[1][:2], bias=convs[1][2], batchnorm=convs[1][3])
        self.fc = nn.Linear(flat, dense)
        self.out = nn.Linear(dense, num_classes)

    def forward(self, x):
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        x = torch.relu(self.fc(x.permute(0, 2, 3, 1).flatten(1)))  # kdjax's order: NHWC
        return self.out(x)


def build():
    return SmallCNN({convs!r}, {flat}, {dense}, {num_classes})
'''


def supports(model: nnx.Module) -> bool:
    return isinstance(model, (models.MLP, models.SmallCNN))


def _conv(block: models.ConvBN) -> tuple[int, int, bool, bool]:
    return (block.conv.in_features, block.conv.out_features, block.conv.bias is not None,
            block.bn is not None)


def source(model: nnx.Module, name: str) -> str:
    """model.py for `model` (the zoo architecture `name`); `supports(model)` must hold."""
    head = _HEAD.format(name=name)
    if isinstance(model, models.MLP):
        widths = (*(layer.in_features for layer in model.hidden), model.out.in_features)
        return head + _MLP.format(widths=widths, num_classes=model.out.out_features)
    if isinstance(model, models.SmallCNN):
        eps = next((b.bn.epsilon for b in (model.conv1, model.conv2) if b.bn is not None), 1e-5)
        return head + _CNN.format(eps=eps, convs=(_conv(model.conv1), _conv(model.conv2)),
                                  flat=model.fc.in_features, dense=model.fc.out_features,
                                  num_classes=model.out.out_features)
    raise ValueError(f"kdjax writes no PyTorch module for a {type(model).__name__} ({name}); "
                     f"it writes one for the zoo's MLPs and small CNNs")
