"""The shared image space of a federation, and each teacher's own input space.

Teachers of one federation may differ in input height and width and in normalization. What
crosses the wire, and what the student and the generator work in, is one *run image space*:
float32 ``(B, C, H, W)`` at the run's image shape, in pixel intensities on the [0, 1] scale
(an owner's raw image divided by 255; synthetic images may leave that range). Each teacher
brings such an image to its own size and normalization *inside* its node, with differentiable
operations, so input gradients stay exact and an in-process teacher computes bit for bit what
a remote one does.
"""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F

from cdfkd.teacher_node.datasets import Normalization


def resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``images`` float (B, C, H, W) to ``size`` (H', W'); identity if equal.

    ``align_corners=False`` and no antialiasing, so the operation is differentiable and the
    same on every node.
    """
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def to_model_input(
    pixels: Tensor, input_shape: tuple[int, int, int], normalization: Normalization
) -> Tensor:
    """What a model with ``input_shape`` and ``normalization`` sees of run-space ``pixels``.

    Args:
        pixels: float (B, C, H, W) on the [0, 1] pixel scale, any H, W.
        input_shape: ``(C, H', W')`` the model expects.
        normalization: the model's per-channel mean and std.

    Returns:
        float (B, C, H', W'), resized then normalized.
    """
    return normalization.apply(resize(pixels, input_shape[1:]))
