"""Students with one header per teacher: MFS (the paper), simple multi-header (CDFKD), single head.

Every student returns :class:`StudentOutputs`; ``features[i]`` is header i's feature f_i,
already projected to teacher i's feature width where the two differ (a learned linear
projection: an extension that is not in the paper, needed for heterogeneous federations).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, cast

import torch
from torch import Tensor, nn

from cdfkd.student_node.models.backbones import ConvTrunk, to_channels_last


class StudentOutputs(NamedTuple):
    """Per-header logits ``(B, num_classes)`` and features ``(B, teacher feature width)``."""

    logits: list[Tensor]
    features: list[Tensor]

    def mean_logits(self) -> Tensor:
        """(1/N) sum_i s_i: the inference output without real data."""
        return torch.stack(self.logits).mean(dim=0)


class SeparableConv(nn.Module):
    """The encoder A_i^l of METHOD.md 1 (authors' ``SepConv``).

    depthwise 3x3 (stride) -> pointwise 1x1 -> BN -> ReLU -> depthwise 3x3 -> pointwise
    -> BN -> ReLU.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, in_channels, 1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, in_channels, 3, 1, 1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Encode ``x`` (B, C_in, H, W)."""
        return self.layers(x)


def _projections(width: int, teacher_feature_dims: Sequence[int]) -> nn.ModuleList:
    return nn.ModuleList(
        nn.Identity() if dim == width else nn.Linear(width, dim) for dim in teacher_feature_dims
    )


class MFSStudent(nn.Module):
    """Multi-header student with multi-level feature sharing (METHOD.md section 1).

    a_i^1 = A_i^1(u_1); a_i^l = A_i^l(concat(u_l, a_i^{l-1})); f_i = GAP(a_i^L); s_i = W_i f_i.
    Encoder l downsamples by the stride of trunk stage l+1 so a_i^l matches u_{l+1}; the
    last level keeps the spatial size.

    Args:
        trunk: The shared trunk.
        num_classes: Label-space size.
        teacher_feature_dims: Feature width of each teacher; one header per entry.
    """

    def __init__(
        self, trunk: ConvTrunk, num_classes: int, teacher_feature_dims: Sequence[int]
    ) -> None:
        super().__init__()
        self.trunk = trunk
        widths = trunk.widths
        levels = len(widths)
        encoders = []
        for _ in teacher_feature_dims:
            header = []
            for level in range(levels):
                in_channels = widths[0] if level == 0 else widths[level] + widths[level]
                last = level == levels - 1
                out_channels = widths[level] if last else widths[level + 1]
                stride = 1 if last else trunk.strides[level + 1]
                header.append(SeparableConv(in_channels, out_channels, stride))
            encoders.append(nn.ModuleList(header))
        self.encoders = nn.ModuleList(encoders)
        self.classifiers = nn.ModuleList(nn.Linear(widths[-1], num_classes) for _ in encoders)
        self.projections = _projections(widths[-1], teacher_feature_dims)

    @property
    def num_headers(self) -> int:
        """N, the number of headers."""
        return len(self.encoders)

    def forward(self, images: Tensor) -> StudentOutputs:
        """Per-header logits and (projected) features for ``images`` float32 (B, C, H, W)."""
        levels = self.trunk(images)
        logits, features = [], []
        for encoders, classifier, projection in zip(
            self.encoders, self.classifiers, self.projections, strict=True
        ):
            header = cast(nn.ModuleList, encoders)
            encoded = header[0](levels[0])
            for level in range(1, len(levels)):
                encoded = header[level](torch.cat((levels[level], encoded), dim=1))
            feature = encoded.mean(dim=(2, 3))
            logits.append(classifier(feature))
            features.append(projection(feature))
        return StudentOutputs(logits, features)


class SimpleMultiHeaderStudent(nn.Module):
    """CDFKD (ICME'21) student: shared trunk up to the last stage, one last stage per header."""

    def __init__(
        self, trunk: ConvTrunk, num_classes: int, teacher_feature_dims: Sequence[int]
    ) -> None:
        super().__init__()
        last = len(trunk.widths) - 1
        self.shared = nn.ModuleList(trunk.stages[:last])
        self.last_stages = nn.ModuleList(trunk.build_stage(last) for _ in teacher_feature_dims)
        self.classifiers = nn.ModuleList(
            nn.Linear(trunk.widths[-1], num_classes) for _ in teacher_feature_dims
        )
        self.projections = _projections(trunk.widths[-1], teacher_feature_dims)

    @property
    def num_headers(self) -> int:
        """N, the number of headers."""
        return len(self.last_stages)

    def forward(self, images: Tensor) -> StudentOutputs:
        """Per-header logits and (projected) features for ``images``."""
        x = to_channels_last(images)
        for stage in self.shared:
            x = stage(x)
        logits, features = [], []
        for stage, classifier, projection in zip(
            self.last_stages, self.classifiers, self.projections, strict=True
        ):
            feature = stage(x).mean(dim=(2, 3))
            logits.append(classifier(feature))
            features.append(projection(feature))
        return StudentOutputs(logits, features)


class SingleHeadStudent(nn.Module):
    """An ordinary student: trunk, GAP, one linear layer (DFAD; it has no feature loss)."""

    def __init__(self, trunk: ConvTrunk, num_classes: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.classifier = nn.Linear(trunk.widths[-1], num_classes)

    @property
    def num_headers(self) -> int:
        """Always 1."""
        return 1

    def forward(self, images: Tensor) -> StudentOutputs:
        """One header's logits and (unprojected) feature for ``images``."""
        feature = self.trunk(images)[-1].mean(dim=(2, 3))
        return StudentOutputs([self.classifier(feature)], [feature])


def inference_parameters(student: nn.Module) -> int:
    """Parameters the student's logits use: all but the training-only feature projections.

    The projections map header features to the teachers' feature widths for the feature
    loss (METHOD.md 2); an exported student does not run them.
    """
    projections = getattr(student, "projections", None)
    excluded = (
        {id(p) for p in projections.parameters()} if isinstance(projections, nn.Module) else set()
    )
    return sum(p.numel() for p in student.parameters() if id(p) not in excluded)
