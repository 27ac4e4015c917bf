"""Real, shipped datasets and owner shards.

Fashion-MNIST is read from the gzipped IDX files of Debian's ``dataset-fashion-mnist``;
scikit-learn's bundled ``load_digits`` serves very fast tests. Nothing is downloaded.
Images are kept raw in [0, 1]; :class:`Normalization` maps them to what a teacher expects.
"""

from __future__ import annotations

import enum
import gzip
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor
from torch.nn import functional as F

from cdfkd.teacher_node.errors import DatasetError

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}


class DatasetName(enum.StrEnum):
    """Datasets the project can load."""

    FASHION_MNIST = "fashion_mnist"
    DIGITS = "digits"


class Split(enum.StrEnum):
    """Dataset split."""

    TRAIN = "train"
    TEST = "test"


@dataclass(frozen=True)
class ImageDataset:
    """Images ``float32 (N, C, H, W)`` in [0, 1] and labels ``int64 (N,)``."""

    images: Tensor
    labels: Tensor
    num_classes: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        channels, height, width = self.images.shape[1:]
        return int(channels), int(height), int(width)

    def subset(self, indices: Tensor) -> ImageDataset:
        """The samples at ``indices`` (int64)."""
        return ImageDataset(self.images[indices], self.labels[indices], self.num_classes)


class Normalization(BaseModel):
    """Per-channel ``(x - mean) / std`` applied to raw [0, 1] images."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def apply(self, images: Tensor) -> Tensor:
        """Normalize ``images`` float32 (N, C, H, W) in [0, 1]."""
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.mean, dtype=images.dtype).view(shape)
        std = torch.tensor(self.std, dtype=images.dtype).view(shape)
        return (images - mean) / std

    def invert(self, images: Tensor) -> Tensor:
        """Map normalized images back to pixel space (for pictures of generator samples)."""
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.mean, dtype=images.dtype).view(shape)
        std = torch.tensor(self.std, dtype=images.dtype).view(shape)
        return images * std + mean

    @classmethod
    def of(cls, dataset: ImageDataset) -> Normalization:
        """Mean and std per channel of ``dataset``, rounded to 4 digits so configs stay readable."""
        images = dataset.images.double()
        mean = images.mean(dim=(0, 2, 3))
        std = images.std(dim=(0, 2, 3))
        return cls(
            mean=tuple(round(float(v), 4) for v in mean),
            std=tuple(round(float(v), 4) for v in std),
        )


def _read_idx(path: Path, rank: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError as error:
        raise DatasetError(
            f"{path} is missing: install the Debian package with "
            f"'apt-get install {FASHION_MNIST_PACKAGE}', or point the data path at a folder "
            "holding the gzipped IDX files"
        ) from error
    except (OSError, EOFError) as error:
        raise DatasetError(f"{path} is not a readable gzip file: {error}") from error
    header_size = 4 * (1 + rank)
    if len(data) < header_size:
        raise DatasetError(f"{path} is truncated (no IDX header)")
    magic, *dims = struct.unpack(f">{1 + rank}I", data[:header_size])
    if magic != _IDX_MAGIC[rank]:
        raise DatasetError(f"{path} is not an IDX file of rank {rank} (magic {magic:#010x})")
    expected = int(np.prod(dims)) + header_size
    if len(data) != expected:
        raise DatasetError(f"{path} has {len(data)} bytes, expected {expected} from its header")
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(dims)


def load_fashion_mnist(
    split: Split, root: Path = FASHION_MNIST_DIR, pad_to: int | None = 32
) -> ImageDataset:
    """Fashion-MNIST from gzipped IDX files.

    Args:
        split: train (60,000) or test (10,000).
        root: folder with the four ``*-ubyte.gz`` files.
        pad_to: zero-pad the 28x28 images to this size (32 for LeNet-5); None keeps 28x28.

    Raises:
        DatasetError: a file is missing or malformed (the message names the Debian package).
    """
    image_file, label_file = _FASHION_FILES[Split(split)]
    raw_images = _read_idx(Path(root) / image_file, rank=3)
    raw_labels = _read_idx(Path(root) / label_file, rank=1)
    if raw_images.shape[0] != raw_labels.shape[0]:
        raise DatasetError(f"{root}: {raw_images.shape[0]} images but {raw_labels.shape[0]} labels")
    images = torch.from_numpy(raw_images.astype(np.float32) / 255.0).unsqueeze(1)
    if pad_to is not None and pad_to > images.shape[-1]:
        total = pad_to - images.shape[-1]
        images = F.pad(images, (total // 2, total - total // 2, total // 2, total - total // 2))
    labels = torch.from_numpy(raw_labels.astype(np.int64))
    return ImageDataset(images.contiguous(), labels, num_classes=10)


def load_digits_dataset(split: Split, test_fraction: float = 0.25) -> ImageDataset:
    """scikit-learn's 8x8 digits, upsampled to 1x16x16, with a fixed seeded train/test split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(images, scale_factor=2, mode="nearest")
    labels = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    num_test = int(round(len(labels) * test_fraction))
    chosen = order[:num_test] if Split(split) is Split.TEST else order[num_test:]
    return ImageDataset(images[chosen].contiguous(), labels[chosen], num_classes=10)


def load_dataset(name: DatasetName, split: Split, root: Path | None = None) -> ImageDataset:
    """Load a dataset by name; ``root`` overrides the Fashion-MNIST folder."""
    match DatasetName(name):
        case DatasetName.FASHION_MNIST:
            return load_fashion_mnist(split, root or FASHION_MNIST_DIR)
        case DatasetName.DIGITS:
            return load_digits_dataset(split)


def iid_shards(num_samples: int, num_shards: int, seed: int) -> list[Tensor]:
    """Disjoint, equally sized, seeded random shards of ``range(num_samples)``."""
    if num_shards < 1 or num_shards > num_samples:
        raise ValueError(f"cannot cut {num_samples} samples into {num_shards} shards")
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return [chunk.sort().values for chunk in order.tensor_split(num_shards)]


def dirichlet_shards(labels: Tensor, num_shards: int, alpha: float, seed: int) -> list[Tensor]:
    """Disjoint label-skewed shards: each class is split over shards by Dirichlet(alpha) weights.

    Small ``alpha`` (e.g. 0.1) gives owners that see few classes; large ``alpha`` tends to IID.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    rng = np.random.default_rng(seed)
    shards: list[list[Tensor]] = [[] for _ in range(num_shards)]
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.from_numpy(rng.permutation(len(members)))]
        weights = rng.dirichlet([alpha] * num_shards)
        cuts = (np.cumsum(weights)[:-1] * len(members)).astype(int).tolist()
        for shard, part in zip(shards, torch.tensor_split(members, cuts), strict=True):
            shard.append(part)
    return [torch.cat(parts).sort().values for parts in shards]


def stratified_sample(labels: Tensor, count: int, seed: int) -> Tensor:
    """``count`` indices, classes as balanced as the data allows (the k real samples)."""
    generator = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    per_class = [
        torch.nonzero(labels == c).flatten()[
            torch.randperm(int((labels == c).sum()), generator=generator)
        ]
        for c in classes.tolist()
    ]
    chosen: list[int] = []
    rank = 0
    while len(chosen) < count and any(rank < len(p) for p in per_class):
        for members in per_class:
            if rank < len(members) and len(chosen) < count:
                chosen.append(int(members[rank]))
        rank += 1
    return torch.tensor(sorted(chosen), dtype=torch.int64)


def mirrored_shards(
    train_labels: Tensor, train_shards: list[Tensor], test_labels: Tensor
) -> list[Tensor]:
    """Cut ``test_labels`` into disjoint shards whose class mix mirrors ``train_shards``.

    Each class of the test set is split over the owners in proportion to how many training
    samples of that class each owner holds, so an owner's private test split is skewed the way
    its private training data is (label-skewed owners then show where a model is weak for them).
    """
    shards: list[list[Tensor]] = [[] for _ in train_shards]
    for label in torch.unique(test_labels).tolist():
        members = torch.nonzero(test_labels == label).flatten()
        held = torch.tensor(
            [int((train_labels[shard] == label).sum()) for shard in train_shards],
            dtype=torch.float64,
        )
        if held.sum() == 0:
            held = torch.ones_like(held)
        cuts = (torch.cumsum(held, 0)[:-1] / held.sum() * len(members)).round().long().tolist()
        for shard, part in zip(shards, torch.tensor_split(members, cuts), strict=True):
            shard.append(part)
    return [torch.cat(parts).sort().values for parts in shards]
