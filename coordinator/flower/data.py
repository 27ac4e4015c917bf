"""An organization's private data for Flower: its k labelled samples and its test split.

The owners' parts are cut exactly as their teachers' shards are (``iid_shards`` or
``dirichlet_shards`` of the training set with the same seed); an owner's test split mirrors the
class mix of its training shard (``mirrored_shards``), so label-skewed owners are evaluated on
the classes they care about.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from cdfkd.coordinator.flower.settings import FederatedAttentionSettings
from cdfkd.teacher_node.datasets import (
    ImageDataset,
    Normalization,
    Split,
    dirichlet_shards,
    iid_shards,
    load_dataset,
    mirrored_shards,
    stratified_sample,
)
from cdfkd.teacher_node.training import Partition


@dataclass(frozen=True)
class OwnerData:
    """Normalized images (float32, (n, C, H, W)) and int64 labels of one organization."""

    sample_images: Tensor
    sample_labels: Tensor
    test_images: Tensor
    test_labels: Tensor


@functools.lru_cache(maxsize=1)  # one federation per process; a data set is large
def _owner_parts(
    settings: FederatedAttentionSettings,
) -> tuple[ImageDataset, ImageDataset, list[Tensor], list[Tensor]]:
    """Train and test sets with every owner's training shard and test part, cut once per process."""
    train = load_dataset(settings.dataset, Split.TRAIN, settings.data_path)
    test = load_dataset(settings.dataset, Split.TEST, settings.data_path)
    if settings.num_owners == 1:
        train_shards = [torch.arange(len(train))]
    elif settings.partition is Partition.IID:
        train_shards = iid_shards(len(train), settings.num_owners, settings.shard_seed)
    else:
        train_shards = dirichlet_shards(
            train.labels, settings.num_owners, settings.alpha, settings.shard_seed
        )
    return train, test, train_shards, mirrored_shards(train.labels, train_shards, test.labels)


def owner_data(
    settings: FederatedAttentionSettings, owner: int, normalization: Normalization
) -> OwnerData:
    """Organization ``owner``'s k samples (from its training shard) and its test split."""
    if not 0 <= owner < settings.num_owners:
        raise ValueError(f"owner {owner} is out of range for {settings.num_owners} owners")
    train, test, train_shards, test_parts = _owner_parts(settings)
    test_part = test_parts[owner]
    shard = train.subset(train_shards[owner])
    chosen = stratified_sample(
        shard.labels, settings.samples_per_owner, seed=settings.seed * 1000 + owner
    )
    return OwnerData(
        sample_images=normalization.apply(shard.images[chosen]),
        sample_labels=shard.labels[chosen],
        test_images=normalization.apply(test.images[test_part]),
        test_labels=test.labels[test_part],
    )
