"""PyTorch modules for tests/test_torch_bridge.py, importable as `_torch_nets:Name` (the tests
folder is on the path) the way a user's own module is."""

import torch
from torch import nn


class Net(nn.Module):
    """GroupNorm, GELU, a depthwise convolution, a residual, BatchNorm and dropout."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 8,
                 drop: float = 0.0):
        super().__init__()
        self.stem = nn.Conv2d(in_chans, width, 3, padding=1)
        self.gn = nn.GroupNorm(2, width)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.bn = nn.BatchNorm2d(width)
        self.drop = nn.Dropout(drop)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.gelu(self.gn(self.stem(x)))
        x = x + self.bn(self.dw(x))
        return self.head(self.drop(x.mean((2, 3))))


class Unlowerable(nn.Module):
    """A layer whose op (fractional max pooling) torchax 0.0.13 has no lowering for."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.FractionalMaxPool2d(2, output_size=2)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.stem(x)).flatten(1))
