"""The CRD benchmark's CIFAR architectures in PyTorch, with the module names and the forward pass
of HobbitLong/RepDistiller's models/{resnet,wrn,vgg,mobilenetv2}.py (written here from them, only
what inference needs: no feature/preact outputs, no dropout), so that the "crd" layout of
kdjax.interop is tested against the state_dicts those classes produce and load.

Imported only by tests that have torch (pytest.importorskip) and by make_interop_fixtures.py.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


# --- models/resnet.py: ResNet(depth, num_filters, 'basicblock') ---------------------------------
class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class ResNet(nn.Module):
    def __init__(self, depth: int, num_filters, num_classes: int = 10):
        super().__init__()
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.layer1 = self._make_layer(num_filters[1], n, 1)
        self.layer2 = self._make_layer(num_filters[2], n, 2)
        self.layer3 = self._make_layer(num_filters[3], n, 2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(num_filters[3], num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


RESNETS = {**{f"resnet{d}": (d, (16, 16, 32, 64)) for d in (8, 14, 20, 32, 44, 56, 110)},
           "resnet8x4": (8, (32, 64, 128, 256)), "resnet32x4": (32, (32, 64, 128, 256))}


# --- models/wrn.py: WideResNet(depth, num_classes, widen_factor) --------------------------------
class WideBasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (None if self.equalInOut else
                             nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False))

    def forward(self, x):
        # The shortcut of a changing block projects the activated input; an identity one adds x.
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return (x if self.equalInOut else self.convShortcut(act)) + out


class NetworkBlock(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[WideBasicBlock(in_planes if i == 0 else out_planes,
                                                    out_planes, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, widen_factor: int = 1):
        super().__init__()
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.fc = nn.Linear(ch[3], num_classes)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.avg_pool2d(F.relu(self.bn1(out)), 8)
        return self.fc(out.flatten(1))


WRNS = {"wrn_16_1": (16, 1), "wrn_16_2": (16, 2), "wrn_40_1": (40, 1), "wrn_40_2": (40, 2)}


# --- models/vgg.py: VGG(cfg, batch_norm=True) ---------------------------------------------------
VGG_CFG = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def _vgg_block(cfg, in_channels: int) -> nn.Sequential:
    layers = []
    for v in cfg:
        layers += [nn.Conv2d(in_channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
        in_channels = v
    return nn.Sequential(*layers[:-1])  # the block's last ReLU is applied in forward


class VGG(nn.Module):
    def __init__(self, cfg, num_classes: int):
        super().__init__()
        ins = [3] + [c[-1] for c in cfg[:-1]]
        for i, (c, cin) in enumerate(zip(cfg, ins)):
            setattr(self, f"block{i}", _vgg_block(c, cin))
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        h = x.shape[2]
        for i in range(5):
            x = F.relu(getattr(self, f"block{i}")(x))
            if i < 3 or (i == 3 and h == 64):
                x = F.max_pool2d(x, 2, 2)
        return self.classifier(self.pool4(x).flatten(1))


# --- models/mobilenetv2.py: mobile_half = MobileNetV2(T=6, width_mult=0.5) ----------------------
class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hid = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hid, 1, 1, 0, bias=False), nn.BatchNorm2d(hid), nn.ReLU(),
            nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False), nn.BatchNorm2d(hid),
            nn.ReLU(),
            nn.Conv2d(hid, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup))

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    SETTING = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1],
               [6, 160, 3, 2], [6, 320, 1, 1]]

    def __init__(self, num_classes: int, width_mult: float = 0.5, input_size: int = 32):
        super().__init__()
        c = int(32 * width_mult)
        self.conv1 = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c),
                                   nn.ReLU())
        self.blocks = nn.ModuleList()
        for t, ch, n, s in self.SETTING:
            out = int(ch * width_mult)
            layers = []
            for j in range(n):
                layers.append(InvertedResidual(c, out, s if j == 0 else 1, t))
                c = out
            self.blocks.append(nn.Sequential(*layers))
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = nn.Sequential(nn.Conv2d(c, last, 1, 1, 0, bias=False),
                                   nn.BatchNorm2d(last), nn.ReLU())
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        self.avgpool = nn.AvgPool2d(input_size // 16, ceil_mode=True)

    def forward(self, x):
        for block in [self.conv1, *self.blocks, self.conv2]:
            x = block(x)
        return self.classifier(self.avgpool(x).flatten(1))


def build(name: str, num_classes: int) -> nn.Module:
    """The RepDistiller model of the zoo name `name` (resnet8..., wrn_16_2, vgg13, mobilenetv2)."""
    if name in RESNETS:
        depth, filters = RESNETS[name]
        return ResNet(depth, filters, num_classes)
    if name in WRNS:
        depth, widen = WRNS[name]
        return WideResNet(depth, num_classes, widen)
    if name in VGG_CFG:
        return VGG(VGG_CFG[name], num_classes)
    if name == "mobilenetv2":
        return MobileNetV2(num_classes)
    raise KeyError(name)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics/affines far from their init, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                m.num_batches_tracked.fill_(123)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()
