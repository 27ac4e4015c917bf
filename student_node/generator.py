"""The generator G: z ~ N(0, I) -> synthetic image (METHOD.md section 2, authors' ``Generator``)."""

from __future__ import annotations

import math

from torch import Tensor, nn
from torch.nn import functional as F


class Generator(nn.Module):
    """linear, BN, 2 x [upsample x2, conv, BN, LeakyReLU], conv, tanh, BN without affine.

    The final affine-free BN leaves images roughly standardized, i.e. in the teachers'
    normalized input space. ``width`` is the authors' ``ngf``: the two conv blocks have
    ``2*width`` and ``width`` channels (the paper's CIFAR generator is width 64, 128 before).
    The intermediate BNs use eps 0.8 as in the authors' (DCGAN-derived) code.

    Args:
        latent_dim: Dimension of z.
        image_shape: ``(C, H, W)`` of the images to make; any H, W >= 4.
        width: ngf.
    """

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], width: int) -> None:
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
        self.out = nn.Sequential(
            nn.Conv2d(width, channels, 3, 1, 1),
            nn.Tanh(),
            nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, latent: Tensor) -> Tensor:
        """Images float32 (B, C, H, W) for ``latent`` float32 (B, latent_dim)."""
        x = self.project(latent).view(latent.shape[0], self.init_channels, *self.init_size)
        x = F.interpolate(self.bn0(x), scale_factor=2)
        x = F.interpolate(self.block1(x), scale_factor=2)
        x = self.block2(x)
        if tuple(x.shape[-2:]) != self.image_shape[1:]:
            x = F.interpolate(x, size=self.image_shape[1:])
        convolution, tanh, batch_norm = self.out
        # The last BN runs on NCHW: on channels-last input, CPU BatchNorm's batch statistics
        # came out in another rounding in some fresh processes (3 of 10 for a (32, 1, 16, 16)
        # batch), so a restarted Ray worker could not resume bit-exactly; NCHW is reproducible.
        return batch_norm(tanh(convolution(x)).contiguous())
