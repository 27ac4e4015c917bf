"""Teacher packages: round trip, corruption, truncation, another architecture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cdfkd.teacher_node.datasets import DatasetName, Split, load_dataset
from cdfkd.teacher_node.errors import PackageError
from cdfkd.teacher_node.package import METADATA_FILE, WEIGHTS_FILE, load_package, read_metadata


@pytest.fixture
def package(digits_teachers, tmp_path: Path) -> Path:
    copy = tmp_path / "package"
    shutil.copytree(digits_teachers.packages[0], copy)
    return copy


def test_round_trip_gives_the_same_outputs_and_metadata(package: Path) -> None:
    metadata, model = load_package(package)
    again_metadata, again = load_package(package)
    assert metadata == again_metadata
    assert metadata.spec.architecture.value == "lenet5_bn"
    assert metadata.spec.input_shape == (1, 16, 16)
    assert metadata.feature_dim == 84
    assert metadata.num_parameters == sum(p.numel() for p in model.parameters())
    assert metadata.test_accuracy is not None
    assert metadata.test_accuracy > 0.85
    images = torch.randn(5, 1, 16, 16)
    assert torch.equal(model(images).logits, again(images).logits)


def test_saved_accuracy_is_the_real_test_accuracy(package: Path) -> None:
    metadata, model = load_package(package)
    test = load_dataset(DatasetName.DIGITS, Split.TEST)
    images = metadata.normalization.apply(test.images)
    with torch.no_grad():
        accuracy = (model(images).logits.argmax(1) == test.labels).double().mean().item()
    assert accuracy == pytest.approx(metadata.test_accuracy)


def test_corrupt_weights_are_detected(package: Path) -> None:
    weights = package / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="corrupt or truncated"):
        load_package(package)


def test_truncated_weights_are_detected(package: Path) -> None:
    weights = package / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(PackageError, match="corrupt or truncated"):
        load_package(package)


def test_garbage_with_a_matching_digest_is_still_refused(package: Path) -> None:
    import hashlib

    weights = package / WEIGHTS_FILE
    weights.write_bytes(b"\x00" * 64)
    meta = json.loads((package / METADATA_FILE).read_text())
    meta["weights_sha256"] = hashlib.sha256(b"\x00" * 64).hexdigest()
    (package / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(PackageError, match="safetensors"):
        load_package(package)


def test_weights_of_another_architecture_are_refused(package: Path) -> None:
    meta = json.loads((package / METADATA_FILE).read_text())
    meta["spec"]["architecture"] = "resnet"
    (package / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(PackageError, match="another architecture"):
        load_package(package)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: (p / METADATA_FILE).unlink(), "not found"),
        (lambda p: (p / METADATA_FILE).write_text("{not json"), "not valid JSON"),
        (lambda p: (p / METADATA_FILE).write_text('{"name": "x"}'), "not valid teacher metadata"),
        (lambda p: (p / WEIGHTS_FILE).unlink(), "incomplete"),
    ],
)
def test_broken_packages_give_clear_errors(package: Path, mutate, message: str) -> None:
    mutate(package)
    with pytest.raises(PackageError, match=message):
        load_package(package)


def test_unknown_metadata_keys_are_refused(package: Path) -> None:
    meta = json.loads((package / METADATA_FILE).read_text())
    meta["code"] = "import os"
    (package / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(PackageError, match="code"):
        read_metadata(package)
