"""The generator G: z ~ N(0, I) -> synthetic image (METHOD.md section 2, authors' ``Generator``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import assert_never

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cdfkd.student_node.config import GeneratorOutput


class PixelRange(nn.Module):
    """tanh output in [-1, 1] -> standardized images of [0, 1] pixels: ((t + 1) / 2 - mean) / std.

    Every image it makes is one a camera could: its pixels stay in [0, 1].
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        # Not in the state dict: they follow from the run's normalization, not from training.
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, tanh_output: Tensor) -> Tensor:
        """Standardized images for ``tanh_output`` (B, C, H, W) in [-1, 1]."""
        return ((tanh_output + 1) / 2 - self.mean) / self.std


class Generator(nn.Module):
    """linear, BN, 2 x [upsample x2, conv, BN, LeakyReLU], conv, tanh, then the output layer.

    ``output`` "batchnorm" (the authors'): a BN without affine, which leaves images roughly
    standardized, i.e. in the teachers' normalized input space, but bounds no pixel: in a batch
    whose pixels are mostly one value the rest land many standard deviations away. A generator
    that maximizes the student-teacher discrepancy with no BN prior to hold it (DFAD) goes
    there (bench/RESULTS.md, "DFAD at chance"). "pixel_range": :class:`PixelRange`, images
    whose pixels are in [0, 1] under ``normalization`` (mean, std per channel).

    ``width`` is the authors' ``ngf``: the two conv blocks have ``2*width`` and ``width``
    channels (the paper's CIFAR generator is width 64, 128 before).
    The intermediate BNs use eps 0.8 as in the authors' (DCGAN-derived) code.

    Args:
        latent_dim: Dimension of z.
        image_shape: ``(C, H, W)`` of the images to make; any H, W >= 4.
        width: ngf.
        output: "batchnorm" or "pixel_range".
        normalization: ``(mean, std)`` per channel of the standardized images; required for
            "pixel_range".
    """

    def __init__(
        self,
        latent_dim: int,
        image_shape: tuple[int, int, int],
        width: int,
        output: GeneratorOutput = "batchnorm",
        normalization: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> None:
        super().__init__()
        channels, height, image_width = image_shape
        self.latent_dim = latent_dim
        self.image_shape = (channels, height, image_width)
        self.init_size = (math.ceil(height / 4), math.ceil(image_width / 4))
        self.init_channels = 2 * width
        self.project = nn.Linear(
            latent_dim, self.init_channels * self.init_size[0] * self.init_size[1]
        )
        self.bn0 = nn.BatchNorm2d(self.init_channels)
        self.block1 = nn.Sequential(
            nn.Conv2d(2 * width, 2 * width, 3, 1, 1),
            nn.BatchNorm2d(2 * width, eps=0.8),
            nn.LeakyReLU(0.2),
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(2 * width, width, 3, 1, 1),
            nn.BatchNorm2d(width, eps=0.8),
            nn.LeakyReLU(0.2),
        )
        last: nn.Module
        match output:
            case "batchnorm":
                last = nn.BatchNorm2d(channels, affine=False)
            case "pixel_range":
                if normalization is None:
                    raise ValueError("a pixel_range generator needs the run's normalization")
                last = PixelRange(*normalization)
            case unknown:
                assert_never(unknown)
        self.out = nn.Sequential(nn.Conv2d(width, channels, 3, 1, 1), nn.Tanh(), last)

    def forward(self, latent: Tensor) -> Tensor:
        """Images float32 (B, C, H, W) for ``latent`` float32 (B, latent_dim)."""
        x = self.project(latent).view(latent.shape[0], self.init_channels, *self.init_size)
        x = F.interpolate(self.bn0(x), scale_factor=2)
        x = F.interpolate(self.block1(x), scale_factor=2)
        x = self.block2(x)
        if tuple(x.shape[-2:]) != self.image_shape[1:]:
            x = F.interpolate(x, size=self.image_shape[1:])
        convolution, tanh, last = self.out
        # The last layer runs on NCHW: on channels-last input, CPU BatchNorm's batch statistics
        # came out in another rounding in some fresh processes (3 of 10 for a (32, 1, 16, 16)
        # batch), so a restarted Ray worker could not resume bit-exactly; NCHW is reproducible.
        return last(tanh(convolution(x)).contiguous())
