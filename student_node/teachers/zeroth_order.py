"""A zeroth-order estimate of a teacher's input VJP from its logits alone (black-box teachers).

For ``f(x) = <v, t(x)>``, which splits into one term per image, random-direction forward
differences give, per image b and Gaussian directions u_1..u_q,

    g_b = (1/q) sum_j [ (v_b . t(x_b + eps u_j) - v_b . t(x_b)) / eps ] u_j,

an estimate of d f / d x_b whose bias shrinks with eps and variance with q (as in data-free
model extraction). It costs q + 1 teacher queries per image, counted against the caller's
budget by the node. The BatchNorm-prior term is not available from a black-box teacher.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def zeroth_order_input_grad(
    logits_of: Callable[[Tensor], Tensor],
    images: Tensor,
    grad_logits: Tensor,
    directions: int,
    step: float,
    generator: torch.Generator,
    max_batch: int,
) -> Tensor:
    """Estimate d/dx <grad_logits, t(x)> with ``directions`` random directions per image.

    Args:
        logits_of: The teacher's logits for a batch (one query; batches up to ``max_batch``).
        images: float32 (B, C, H, W).
        grad_logits: float32 (B, K), the cotangent v.
        directions: q, the number of random directions.
        step: eps, the finite-difference step in normalized pixel units.
        generator: Randomness of the directions.
        max_batch: Largest batch one query may carry.

    Returns:
        float32 (B, C, H, W), the estimated input gradient.
    """
    batch = images.shape[0]
    noise = torch.randn((directions, *images.shape), generator=generator, dtype=images.dtype).to(
        images.device
    )
    probes = torch.cat([images.unsqueeze(0), images.unsqueeze(0) + step * noise]).flatten(0, 1)
    parts = math.ceil(probes.shape[0] / max(2, max_batch))
    logits = torch.cat([logits_of(part) for part in probes.tensor_split(parts)])
    logits = logits.view(directions + 1, batch, -1)
    values = (logits * grad_logits.unsqueeze(0)).sum(dim=2)  # (q + 1, B)
    slopes = (values[1:] - values[0]) / step  # (q, B)
    return (slopes.view(directions, batch, 1, 1, 1) * noise).mean(dim=0)
