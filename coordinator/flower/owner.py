"""What an organization computes in its ClientApp: local attention training and evaluation.

Pure torch on top of ``student_node``: the Flower adapters in ``client_app.py`` only move the
attention module's parameters and the resulting counts and accuracies.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from cdfkd.coordinator.flower.data import owner_data
from cdfkd.coordinator.flower.settings import FederatedAttentionSettings
from cdfkd.student_node.artifact import load_student, student_image_space
from cdfkd.student_node.evaluate import header_logits
from cdfkd.student_node.models.aggregator import (
    AttentionAggregator,
    AttentionConfig,
    train_attention,
)
from cdfkd.teacher_node.metrics import accuracy


@dataclass(frozen=True)
class OwnerLogits:
    """The frozen student's header logits ``(N, n, K)`` on an owner's samples and test split."""

    sample_logits: Tensor
    sample_labels: Tensor
    test_logits: Tensor
    test_labels: Tensor
    num_classes: int


@functools.lru_cache(maxsize=4)
def owner_logits(settings: FederatedAttentionSettings, owner: int) -> OwnerLogits:
    """Run the frozen student once over the owner's data (cached across rounds)."""
    student, _, _, infos = load_student(settings.student_dir)
    space = student_image_space(settings.student_dir)
    data = owner_data(settings, owner, space, infos[0].num_classes)
    return OwnerLogits(
        sample_logits=header_logits(student, data.sample_images),
        sample_labels=data.sample_labels,
        test_logits=header_logits(student, data.test_images),
        test_labels=data.test_labels,
        num_classes=infos[0].num_classes,
    )


def train_locally(
    settings: FederatedAttentionSettings,
    owner: int,
    state: dict[str, Tensor],
    server_round: int,
) -> tuple[dict[str, Tensor], int, float]:
    """Train the received attention module on the owner's k samples, student frozen.

    Returns:
        The new parameters, the number of samples and the last epoch's mean loss.
    """
    local = owner_logits(settings, owner)
    aggregator = AttentionAggregator(local.num_classes)
    aggregator.load_state_dict(state)
    config = AttentionConfig(
        samples=settings.samples_per_owner,
        epochs=settings.local_epochs,
        learning_rate=settings.learning_rate,
        batch_size=settings.batch_size,
    )
    rng = torch.Generator().manual_seed(settings.seed * 1_000_003 + owner * 1009 + server_round)
    history = train_attention(aggregator, local.sample_logits, local.sample_labels, config, rng)
    return aggregator.state_dict(), len(local.sample_labels), history[-1]


def evaluate_locally(
    settings: FederatedAttentionSettings, owner: int, state: dict[str, Tensor]
) -> dict[str, float | int]:
    """Accuracy of the mean of headers, of the attention and of each header on the owner's test."""
    local = owner_logits(settings, owner)
    aggregator = AttentionAggregator(local.num_classes)
    aggregator.load_state_dict(state)
    aggregator.eval()
    with torch.no_grad():
        attention = accuracy(aggregator(local.test_logits), local.test_labels)
    metrics: dict[str, float | int] = {
        "num-examples": len(local.test_labels),
        "accuracy-mean": accuracy(local.test_logits.mean(dim=0), local.test_labels),
        "accuracy-attention": attention,
    }
    for index, logits in enumerate(local.test_logits):
        metrics[f"accuracy-header-{index}"] = accuracy(logits, local.test_labels)
    return metrics
