"""Owners' own classifiers, written as an organization would, outside the cdfkd package.

Each factory returns a plain ``nn.Module`` whose forward gives a logits tensor. Teacher
packages made by ``cdfkd teacher package --factory tests.owner_models:NAME`` name them; the
node imports this module (the repository root is on ``sys.path`` under pytest, and node
processes get it through ``PYTHONPATH``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def small_bn_net(channels: int = 3, num_classes: int = 4) -> nn.Module:
    """A small network with BatchNorm for 20x20 inputs (any size: it pools globally)."""
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 12),
        nn.ReLU(),
        nn.Linear(12, num_classes),
    )


class Bottleneckless(nn.Module):
    """torchvision's ``BasicBlock``: conv-bn-relu-conv-bn plus a (downsampled) shortcut."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        """Residual forward pass."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TinyResNet(nn.Module):
    """A torchvision-style ResNet (conv1/bn1/layer1..layer4/avgpool/fc), narrow and shallow."""

    def __init__(self, num_classes: int = 4, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        widths = (width, 2 * width, 4 * width, 8 * width)
        layers = []
        inplanes = width
        for index, planes in enumerate(widths):
            layers.append(nn.Sequential(Bottleneckless(inplanes, planes, 1 if index == 0 else 2)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, num_classes) of normalized images (B, 3, H, W)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def tiny_resnet(num_classes: int = 4, width: int = 8) -> nn.Module:
    """Factory of :class:`TinyResNet`."""
    return TinyResNet(num_classes, width)


class PlainNet(nn.Module):
    """A network without any BatchNorm (so without a BN prior), for 24x24 inputs."""

    def __init__(self, channels: int = 3, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 5, stride=2)
        self.hidden = nn.Linear(8 * 10 * 10, 16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, num_classes); needs exactly 24x24 inputs (a flattening layer)."""
        x = F.relu(self.conv(x)).flatten(1)
        return self.head(torch.tanh(self.hidden(x)))


def plain_net(channels: int = 3, num_classes: int = 4) -> nn.Module:
    """Factory of :class:`PlainNet`."""
    return PlainNet(channels, num_classes)


def not_a_module() -> object:
    """A factory that returns something else (refused by packaging)."""
    return {"weights": []}
