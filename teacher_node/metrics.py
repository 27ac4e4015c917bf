"""Accuracy and batched inference, shared by teacher training and student evaluation."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of ``logits`` (N, K) against ``labels`` int64 (N,), in [0, 1]."""
    if logits.shape[0] == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float((logits.argmax(dim=1) == labels).double().mean())


def batched(function: Callable[[Tensor], Tensor], images: Tensor, batch_size: int) -> Tensor:
    """Apply ``function`` to ``images`` in chunks under ``torch.no_grad`` and concatenate."""
    with torch.no_grad():
        return torch.cat([function(chunk) for chunk in images.split(batch_size)])
