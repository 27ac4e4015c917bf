"""An organization's private data for Flower: its k labelled samples and its test split.

Two ways to get them:

* **Own files** (``owner-files = true``): each organization reads its own ``data-path`` (an
  image folder or ``.npz`` pair with ``train`` and ``test`` splits, see
  :mod:`cdfkd.teacher_node.data_sources`), set on its own SuperNode. Its k samples are drawn
  from its training split, class-balanced; it evaluates on its whole test split.
* **Shards of a named dataset** (the demo): the owners' parts are cut exactly as their
  teachers' shards are (``iid_shards`` or ``dirichlet_shards`` of the training set with the
  same seed); an owner's test split mirrors the class mix of its training shard
  (``mirrored_shards``), so label-skewed owners are evaluated on the classes they care about.

Either way the images are brought to the student's image size and normalization.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from cdfkd.coordinator.errors import ConfigError
from cdfkd.coordinator.flower.settings import FederatedAttentionSettings
from cdfkd.student_node.teachers.run_space import RunImageSpace
from cdfkd.teacher_node.data_sources import load_train_and_test
from cdfkd.teacher_node.datasets import (
    ImageDataset,
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
    """Images as the student takes them (float32, (n, C, H, W)) and int64 labels of one owner."""

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


def _own_files(
    settings: FederatedAttentionSettings, owner: int, num_classes: int
) -> tuple[ImageDataset, ImageDataset]:
    """The organization's own training and test splits from its ``data-path``."""
    if settings.data_path is None:
        raise ConfigError(
            f"organization {owner} has no data-path: with owner-files each organization sets "
            "its own (its SuperNode's --node-config 'data-path=\"...\"', or --owner-data)"
        )
    return load_train_and_test(settings.data_path, num_classes=num_classes)


def owner_data(
    settings: FederatedAttentionSettings, owner: int, space: RunImageSpace, num_classes: int
) -> OwnerData:
    """Organization ``owner``'s k samples (from its training data) and its test split.

    Raises:
        ConfigError: no ``data-path`` for an organization with its own files.
        DatasetError: its files are missing or malformed, or do not fit the student.
    """
    if not 0 <= owner < settings.num_owners:
        raise ValueError(f"owner {owner} is out of range for {settings.num_owners} owners")
    if settings.owner_files:
        shard, test = _own_files(settings, owner, num_classes)
        source = str(settings.data_path)
    else:
        train, full_test, train_shards, test_parts = _owner_parts(settings)
        shard = train.subset(train_shards[owner])
        test = full_test.subset(test_parts[owner])
        source = settings.dataset.value
    chosen = stratified_sample(
        shard.labels, settings.samples_per_owner, seed=settings.seed * 1000 + owner
    )
    return OwnerData(
        sample_images=space.prepare(shard.images[chosen], source),
        sample_labels=shard.labels[chosen],
        test_images=space.prepare(test.images, source),
        test_labels=test.labels,
    )
