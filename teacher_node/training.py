"""Supervised training of a teacher on one owner's private shard (``cdfkd teacher train``)."""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.nn import functional as F

from cdfkd.teacher_node.data_sources import DataSource, describe_source, load_train_and_test
from cdfkd.teacher_node.datasets import (
    DatasetName,
    ImageDataset,
    Normalization,
    dirichlet_shards,
    iid_shards,
)
from cdfkd.teacher_node.dp_training import train_private_classifier
from cdfkd.teacher_node.metrics import accuracy, batched
from cdfkd.teacher_node.package import TeacherMetadata, save_package, save_private_package
from cdfkd.teacher_node.privacy import PrivacySettings
from cdfkd.teacher_node.zoo import Architecture, ArchitectureSpec, build_classifier, feature_dim_of

logger = logging.getLogger(__name__)

#: Per-channel (mean, std) of a DP teacher's input: fixed, not measured on anyone's data, so
#: that it costs no privacy; it maps [0, 1] pixels to [-1, 1].
PRIVATE_NORMALIZATION = (0.5, 0.5)
#: A DP teacher's epochs, expected batch and learning rate unless the owner sets them: the
#: recipe ``bench/dp_tuning.py`` chose on a validation split of a third of Fashion-MNIST at
#: epsilon 8 (86.2 % validation accuracy against 82.5 % for 8 epochs at batch 256;
#: bench/RESULTS.md). DP-SGD wants large batches: its noise is added once per step.
DP_EPOCHS, DP_BATCH_SIZE, DP_LEARNING_RATE = 24, 1024, 4e-3
DP_RECIPE = {"epochs": DP_EPOCHS, "batch_size": DP_BATCH_SIZE, "learning_rate": DP_LEARNING_RATE}
#: Architectures with BatchNorm, which DP-SGD cannot train.
BATCHNORM_ARCHITECTURES = frozenset({Architecture.LENET5_BN, Architecture.RESNET})


class TeacherTrainConfig(BaseModel):
    """Hyper-parameters of supervised teacher training (Adam with cosine decay)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(default=8, ge=1, le=1000)
    batch_size: int = Field(default=128, ge=2, le=8192)
    learning_rate: float = Field(default=2e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(default=1e-4, ge=0.0, le=1.0)
    seed: int = 0


def train_classifier(
    model: nn.Module,
    train: ImageDataset,
    normalization: Normalization,
    config: TeacherTrainConfig,
    on_epoch: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Train ``model`` with cross-entropy on ``train``; returns it in eval mode.

    Args:
        model: A classifier returning ``ClassifierOutput``.
        train: Raw [0, 1] images of the owner's shard.
        normalization: Applied to every batch.
        config: Hyper-parameters.
        on_epoch: Called with (epoch, mean training loss) after each epoch.
    """
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    images = normalization.apply(train.images)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    steps_per_epoch = max(1, len(train) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs * steps_per_epoch
    )
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(train), generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            chosen = order[step * config.batch_size : (step + 1) * config.batch_size]
            loss = F.cross_entropy(model(images[chosen]).logits, train.labels[chosen])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item()
        if on_epoch is not None:
            on_epoch(epoch, total / steps_per_epoch)
    return model.eval()


def classifier_accuracy(
    model: nn.Module, dataset: ImageDataset, normalization: Normalization, batch_size: int = 1000
) -> float:
    """Top-1 accuracy of ``model`` on ``dataset``."""
    model.eval()
    logits = batched(lambda x: model(x).logits, normalization.apply(dataset.images), batch_size)
    return accuracy(logits, dataset.labels)


class Partition(enum.StrEnum):
    """How the training set is cut into owners' shards."""

    IID = "iid"
    DIRICHLET = "dirichlet"


class TeacherJob(BaseModel):
    """One owner's teacher: data shard, architecture and training (``cdfkd teacher train``).

    The data are a named ``dataset`` (``data_path``: the Fashion-MNIST folder) or the owner's
    own files, ``data``: an image folder or ``.npz`` pair with ``train`` and ``test`` splits
    (:mod:`cdfkd.teacher_node.data_sources`). Without either, Fashion-MNIST.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    dataset: DatasetName | None = None
    data_path: Path | None = None
    data: Path | None = None
    architecture: Architecture | None = None
    depth: int = Field(default=1, ge=1, le=18)
    width: int = Field(default=16, ge=4, le=512)
    shard: int = Field(default=0, ge=0)
    num_shards: int = Field(default=1, ge=1)
    partition: Partition = Partition.IID
    alpha: float = Field(default=0.5, gt=0.0)
    shard_seed: int = 0
    epochs: int = Field(default=6, ge=1)
    batch_size: int = Field(default=128, ge=2)
    learning_rate: float = Field(default=2e-3, gt=0.0)
    seed: int = 0
    privacy: PrivacySettings | None = None

    @model_validator(mode="before")
    @classmethod
    def _private_defaults(cls, data: Any) -> Any:
        """A DP job's unset epochs, batch and learning rate: :data:`DP_RECIPE`'s."""
        if isinstance(data, dict) and data.get("privacy") is not None:
            return {**DP_RECIPE, **{k: v for k, v in data.items() if v is not None}}
        return data

    @model_validator(mode="after")
    def _check(self) -> TeacherJob:
        if self.privacy is not None and self.model_architecture in BATCHNORM_ARCHITECTURES:
            raise ValueError(
                f"--architecture {self.model_architecture.value} has BatchNorm, which DP-SGD "
                "cannot train (it mixes the records of a batch, so per-sample gradients do not "
                f"exist): use {Architecture.LENET5_GN.value} with --dp-epsilon"
            )
        if self.shard >= self.num_shards:
            raise ValueError(f"shard {self.shard} is out of range for {self.num_shards} shards")
        if self.data is not None and (self.dataset is not None or self.data_path is not None):
            raise ValueError(
                "give the owner's files (data, --data) or a named dataset (dataset, --dataset; "
                "data_path, --data-path), not both"
            )
        return self

    @property
    def model_architecture(self) -> Architecture:
        """The architecture: as given, else LeNet-5-GN for a DP teacher and LeNet-5-BN."""
        if self.architecture is not None:
            return self.architecture
        return Architecture.LENET5_GN if self.privacy is not None else Architecture.LENET5_BN

    @property
    def source(self) -> DataSource:
        """Where the job's images come from."""
        if self.data is not None:
            return self.data
        return self.dataset or DatasetName.FASHION_MNIST


def owner_shard(job: TeacherJob, train: ImageDataset) -> ImageDataset:
    """The job's owner's private part of ``train``."""
    if job.num_shards == 1:
        return train
    if job.partition is Partition.IID:
        shards = iid_shards(len(train), job.num_shards, job.shard_seed)
    else:
        shards = dirichlet_shards(train.labels, job.num_shards, job.alpha, job.shard_seed)
    return train.subset(shards[job.shard])


def train_teacher_package(job: TeacherJob, out: Path) -> TeacherMetadata:
    """Train the job's teacher on its shard, measure it on the test split, write the package.

    The normalization is computed on the full training split of the dataset, so that all
    owners of a federation share it (the run checks that they do). A DP teacher
    (``job.privacy``) takes the data-independent :data:`PRIVATE_NORMALIZATION` instead: the
    package then holds nothing computed from the training data without noise.
    """
    train_full, test = load_train_and_test(job.source, root=job.data_path)
    channels = train_full.input_shape[0]
    normalization = (
        Normalization(
            mean=(PRIVATE_NORMALIZATION[0],) * channels, std=(PRIVATE_NORMALIZATION[1],) * channels
        )
        if job.privacy is not None
        else Normalization.of(train_full)
    )
    shard = owner_shard(job, train_full)
    spec = ArchitectureSpec(
        architecture=job.model_architecture,
        input_shape=shard.input_shape,
        num_classes=shard.num_classes,
        depth=job.depth,
        width=job.width,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.seed)
        model = build_classifier(spec)
    logger.info(
        "training teacher %s (%s) on %d samples for %d epochs",
        job.name,
        spec.architecture.value,
        len(shard),
        job.epochs,
    )

    def log_epoch(epoch: int, loss: float) -> None:
        logger.info("  epoch %d: loss %.4f", epoch + 1, loss)

    private = None
    if job.privacy is not None:
        private = train_private_classifier(
            model,
            shard,
            normalization,
            epochs=job.epochs,
            batch_size=job.batch_size,
            learning_rate=job.learning_rate,
            seed=job.seed,
            settings=job.privacy,
            on_epoch=log_epoch,
        )
        logger.info("teacher %s: %s", job.name, private.guarantee.describe())
    else:
        train_classifier(
            model,
            shard,
            normalization,
            TeacherTrainConfig(
                epochs=job.epochs,
                batch_size=job.batch_size,
                learning_rate=job.learning_rate,
                seed=job.seed,
            ),
            on_epoch=log_epoch,
        )
    test_accuracy = classifier_accuracy(model, test, normalization)
    logger.info("teacher %s: test accuracy %.2f %%", job.name, 100 * test_accuracy)
    if private is not None:
        return save_private_package(
            out,
            model,
            name=job.name,
            spec=spec,
            normalization=normalization,
            feature_dim=feature_dim_of(model),
            test_accuracy=test_accuracy,
            eval_data=f"the test split of {describe_source(job.source)} (not the training data)",
            train_samples=len(shard),
            privacy=private.guarantee,
            statistics=private.statistics,
        )
    return save_package(
        out,
        model,
        name=job.name,
        spec=spec,
        normalization=normalization,
        feature_dim=feature_dim_of(model),
        test_accuracy=test_accuracy,
        train_samples=len(shard),
    )
