"""Datasets: Fashion-MNIST from Debian's IDX files, digits, owner shards."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch

from cdfkd.teacher_node.datasets import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_PACKAGE,
    DatasetName,
    Normalization,
    Split,
    dirichlet_shards,
    iid_shards,
    load_dataset,
    load_fashion_mnist,
    stratified_sample,
)
from cdfkd.teacher_node.errors import DatasetError

needs_fashion = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
    reason=f"Debian package {FASHION_MNIST_PACKAGE} is not installed (.ci/run installs it)",
)


@needs_fashion
def test_fashion_mnist_test_split_is_read_and_padded() -> None:
    test = load_fashion_mnist(Split.TEST)
    assert test.images.shape == (10_000, 1, 32, 32)
    assert test.images.dtype == torch.float32
    assert test.images.min() >= 0.0
    assert test.images.max() <= 1.0
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert test.images[:, :, :2].abs().sum() == 0  # the padding


def test_missing_fashion_mnist_names_the_debian_package(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=f"apt-get install {FASHION_MNIST_PACKAGE}"):
        load_fashion_mnist(Split.TEST, root=tmp_path)


def _write_idx(path: Path, magic: int, dims: list[int], payload: bytes) -> None:
    with gzip.open(path, "wb") as handle:
        handle.write(struct.pack(f">{1 + len(dims)}I", magic, *dims) + payload)


def test_malformed_idx_files_are_refused(tmp_path: Path) -> None:
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 0x803, [2, 28, 28], b"\x00" * 100)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 0x801, [2], b"\x00\x01")
    with pytest.raises(DatasetError, match="expected"):
        load_fashion_mnist(Split.TEST, root=tmp_path)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 0x999, [2, 28, 28], b"\x00" * 1568)
    with pytest.raises(DatasetError, match="magic"):
        load_fashion_mnist(Split.TEST, root=tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match="gzip"):
        load_fashion_mnist(Split.TEST, root=tmp_path)


def test_small_fashion_like_files_load(tmp_path: Path) -> None:
    images = bytes(range(256)) * 6 + bytes(range(32))  # 2 x 28 x 28 = 1568 bytes
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 0x803, [2, 28, 28], images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 0x801, [2], b"\x03\x07")
    data = load_fashion_mnist(Split.TEST, root=tmp_path, pad_to=None)
    assert data.images.shape == (2, 1, 28, 28)
    assert data.labels.tolist() == [3, 7]
    assert data.images[0, 0, 0, 1].item() == pytest.approx(1 / 255)


def test_digits_split_is_fixed_and_disjoint() -> None:
    train = load_dataset(DatasetName.DIGITS, Split.TRAIN)
    test = load_dataset(DatasetName.DIGITS, Split.TEST)
    assert train.input_shape == (1, 16, 16)
    assert len(train) + len(test) == 1797
    again = load_dataset(DatasetName.DIGITS, Split.TEST)
    assert torch.equal(test.images, again.images)


def test_iid_shards_are_disjoint_and_cover_everything() -> None:
    shards = iid_shards(100, 3, seed=4)
    joined = torch.cat(shards)
    assert sorted(joined.tolist()) == list(range(100))
    assert [len(s) for s in shards] == [34, 33, 33]
    assert all(torch.equal(a, b) for a, b in zip(shards, iid_shards(100, 3, seed=4), strict=True))
    assert not torch.equal(shards[0], iid_shards(100, 3, seed=5)[0])


def test_dirichlet_shards_are_disjoint_and_label_skewed() -> None:
    labels = torch.arange(10).repeat(200)
    shards = dirichlet_shards(labels, 3, alpha=0.1, seed=0)
    joined = torch.cat(shards)
    assert sorted(joined.tolist()) == list(range(len(labels)))
    # With alpha 0.1 some shard holds most of some class: far from the IID 1/3.
    fractions = (
        torch.stack([torch.bincount(labels[s], minlength=10) for s in shards]).double() / 200
    )
    assert fractions.max() > 0.8
    iid = dirichlet_shards(labels, 3, alpha=1000.0, seed=0)
    iid_fractions = (
        torch.stack([torch.bincount(labels[s], minlength=10) for s in iid]).double() / 200
    )
    assert iid_fractions.max() < 0.45


def test_stratified_sample_balances_classes() -> None:
    labels = torch.arange(10).repeat(50)
    chosen = stratified_sample(labels, 60, seed=0)
    assert len(set(chosen.tolist())) == 60
    assert torch.bincount(labels[chosen], minlength=10).tolist() == [6] * 10


def test_normalization_round_trips() -> None:
    data = load_dataset(DatasetName.DIGITS, Split.TEST)
    norm = Normalization.of(data)
    normalized = norm.apply(data.images)
    assert abs(normalized.mean().item()) < 0.01
    assert torch.allclose(norm.invert(normalized), data.images, atol=1e-5)
