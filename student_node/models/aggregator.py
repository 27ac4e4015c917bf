"""Attention aggregation over headers (METHOD.md section 3)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.nn import functional as F


class AttentionAggregator(nn.Module):
    """alpha_i(x) = softmax_i(w . s_i(x) + b); prediction sum_i alpha_i(x) s_i(x).

    The scoring layer is shared across headers, as in the authors' code.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.score = nn.Linear(num_classes, 1)

    def reset_parameters(self) -> None:
        """Re-draw the scoring layer's initial weights from the global RNG."""
        self.score.reset_parameters()

    def weights(self, header_logits: Tensor) -> Tensor:
        """Alpha ``(B, N)`` for stacked header logits ``(N, B, K)``."""
        return F.softmax(self.score(header_logits).squeeze(-1).transpose(0, 1), dim=1)

    def forward(self, header_logits: Tensor) -> Tensor:
        """Aggregate stacked header logits ``(N, B, K)`` into ``(B, K)``."""
        alpha = self.weights(header_logits)
        return torch.einsum("bn,nbk->bk", alpha, header_logits)


def new_aggregator(num_classes: int, seed: int) -> AttentionAggregator:
    """A module whose scorer is drawn from ``seed`` (the global RNG is left as it was)."""
    aggregator = AttentionAggregator(num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        aggregator.reset_parameters()
    return aggregator


class AttentionConfig(BaseModel):
    """Training of the attention module on the k real samples (student frozen)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    samples: int = Field(default=60, ge=1)
    epochs: int = Field(default=200, ge=1, le=100_000)
    learning_rate: float = Field(default=0.01, gt=0.0)
    batch_size: int = Field(default=64, ge=1)


def train_attention(
    aggregator: AttentionAggregator,
    header_logits: Tensor,
    labels: Tensor,
    config: AttentionConfig,
    generator: torch.Generator,
) -> list[float]:
    """Fit ``aggregator`` with cross-entropy, Adam; the student is not touched.

    Args:
        aggregator: The module to train.
        header_logits: float32 (N, k, K) the frozen student's header logits on the k samples.
        labels: int64 (k,).
        config: Epochs, learning rate, batch size.
        generator: RNG for the batch order.

    Returns:
        The mean loss of each epoch.
    """
    header_logits = header_logits.detach()
    optimizer = torch.optim.Adam(aggregator.parameters(), lr=config.learning_rate)
    count = labels.shape[0]
    history = []
    aggregator.train()
    for _ in range(config.epochs):
        order = torch.randperm(count, generator=generator)
        total = 0.0
        for chosen in order.split(config.batch_size):
            loss = F.cross_entropy(aggregator(header_logits[:, chosen]), labels[chosen])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(chosen)
        history.append(total / count)
    return history
