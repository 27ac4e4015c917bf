"""Classifier architectures for teachers (and the residual blocks students reuse).

Every classifier maps a normalized image batch ``float32 (B, C, H, W)`` to a
:class:`ClassifierOutput` holding the logits and the penultimate feature, so no caller
ever depends on a bool flag that changes the return type.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)


class ClassifierOutput(NamedTuple):
    """Logits ``(B, num_classes)`` and penultimate feature ``(B, feature_dim)``."""

    logits: Tensor
    features: Tensor


class Architecture(enum.StrEnum):
    """Teacher architectures a teacher package may name."""

    LENET5_BN = "lenet5_bn"
    #: LeNet-5 with GroupNorm: the differentially private variant (``--dp-epsilon``). BatchNorm
    #: mixes the samples of a batch, so per-sample gradients, and DP-SGD, do not exist for it.
    LENET5_GN = "lenet5_gn"
    #: LeNet-5-GN with tanh for ReLU: bounded activations keep DP-SGD's clipped per-sample
    #: gradients informative (tempered sigmoids, Papernot et al., AAAI 2021).
    LENET5_GN_TANH = "lenet5_gn_tanh"
    RESNET = "resnet"


class ArchitectureSpec(BaseModel):
    """What is needed to rebuild a classifier: no code paths, only an enum and numbers.

    Attributes:
        architecture: Which family.
        input_shape: ``(C, H, W)`` of the normalized input.
        num_classes: Size of the label space.
        depth: ResNet only: number of BasicBlocks per stage (the CIFAR ResNet-(6n+2) has n).
        width: ResNet only: channels of the first stage; stages use width, 2*width, 4*width.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: Architecture
    input_shape: tuple[int, int, int]
    num_classes: int = Field(ge=2)
    depth: int = Field(default=1, ge=1, le=18)
    width: int = Field(default=16, ge=4, le=512)

    @model_validator(mode="after")
    def _check_shape(self) -> ArchitectureSpec:
        channels, height, width = self.input_shape
        if channels < 1 or height < 8 or width < 8:
            raise ValueError(f"input_shape {self.input_shape} must be (C>=1, H>=8, W>=8)")
        return self


#: Groups of a GroupNorm over C channels: the largest divisor of C up to this.
MAX_NORM_GROUPS = 4


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm over ``channels`` with the largest group count <= 4 that divides them."""
    groups = max(g for g in range(1, MAX_NORM_GROUPS + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class LeNet5BN(nn.Module):
    """LeNet-5 with BatchNorm after every convolution and hidden linear layer.

    For a 1x32x32 input this is the classic 6-16-120-84 network (61,706 parameters
    plus BN); other sizes adapt the first linear layer to the flattened width.

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: Logits' width.
        norm2d: Normalization after each convolution (BatchNorm2d; GroupNorm for DP).
        norm1d: Normalization after each hidden linear layer (BatchNorm1d; GroupNorm for DP).
        activation: The nonlinearity after each normalization (ReLU; tanh is an option for DP).
    """

    feature_dim = 84

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        norm2d: Callable[[int], nn.Module] = nn.BatchNorm2d,
        norm1d: Callable[[int], nn.Module] = nn.BatchNorm1d,
        activation: Callable[[], nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.features_extractor = nn.Sequential(
            nn.Conv2d(channels, 6, kernel_size=5),
            norm2d(6),
            activation(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            norm2d(16),
            activation(),
            nn.MaxPool2d(2),
        )
        flat_height = ((height - 4) // 2 - 4) // 2
        flat_width = ((width - 4) // 2 - 4) // 2
        if flat_height < 1 or flat_width < 1:
            raise ValueError(f"LeNet-5 needs inputs of at least 16x16, got {height}x{width}")
        flat = 16 * flat_height * flat_width
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 120),
            norm1d(120),
            activation(),
            nn.Linear(120, self.feature_dim),
            norm1d(self.feature_dim),
            activation(),
        )
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def forward(self, images: Tensor) -> ClassifierOutput:
        """Classify ``images`` float32 (B, C, H, W)."""
        features = self.head(self.features_extractor(images))
        return ClassifierOutput(self.classifier(features), features)


class BasicBlock(nn.Module):
    """The two-convolution residual block of the CIFAR ResNets."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        """Residual forward pass."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, three stages of ``depth`` BasicBlocks, GAP, linear.

    ``depth`` blocks per stage gives the ResNet-(6*depth+2); stages have ``width``,
    ``2*width`` and ``4*width`` channels, and the last two halve the spatial size.
    """

    def __init__(
        self, input_shape: tuple[int, int, int], num_classes: int, depth: int, width: int
    ) -> None:
        super().__init__()
        channels = input_shape[0]
        self.stem = nn.Sequential(
            nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        stages: list[nn.Module] = []
        in_channels = width
        for index, out_channels in enumerate((width, 2 * width, 4 * width)):
            blocks: list[nn.Module] = []
            for block in range(depth):
                stride = 2 if (index > 0 and block == 0) else 1
                blocks.append(BasicBlock(in_channels, out_channels, stride))
                in_channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.feature_dim = in_channels
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, images: Tensor) -> ClassifierOutput:
        """Classify ``images`` float32 (B, C, H, W)."""
        features = self.stages(self.stem(images)).mean(dim=(2, 3))
        return ClassifierOutput(self.classifier(features), features)


def build_classifier(spec: ArchitectureSpec) -> nn.Module:
    """Build an untrained classifier for ``spec``."""
    match spec.architecture:
        case Architecture.LENET5_BN:
            return LeNet5BN(spec.input_shape, spec.num_classes)
        case Architecture.LENET5_GN:
            return LeNet5BN(spec.input_shape, spec.num_classes, group_norm, group_norm)
        case Architecture.LENET5_GN_TANH:
            return LeNet5BN(spec.input_shape, spec.num_classes, group_norm, group_norm, nn.Tanh)
        case Architecture.RESNET:
            return CifarResNet(spec.input_shape, spec.num_classes, spec.depth, spec.width)


def feature_dim_of(model: nn.Module) -> int:
    """The penultimate feature width of a classifier built by :func:`build_classifier`."""
    return int(model.feature_dim)  # type: ignore[arg-type]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "Architecture",
    "ArchitectureSpec",
    "BasicBlock",
    "CifarResNet",
    "ClassifierOutput",
    "LeNet5BN",
    "MAX_NORM_GROUPS",
    "build_classifier",
    "count_parameters",
    "feature_dim_of",
    "group_norm",
]
