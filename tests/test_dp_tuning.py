"""bench/dp_tuning.py and the epsilon table's recipe plumbing, without training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.dp_tuning import GRID, split_owner
from bench.privacy import dp_jobs, reused_reference
from bench.quality import keyed_directories
from cdfkd.teacher_node.zoo import Architecture


def _pixels(images: torch.Tensor) -> torch.Tensor:
    return (images * 255).round().to(torch.uint8)


def test_the_validation_split_is_carved_from_owner_one_only_and_fixed() -> None:
    train, validation = split_owner(0.1)
    again_train, again_validation = split_owner(0.1)
    assert len(train) == 18_000
    assert len(validation) == 2_000
    assert torch.equal(validation.images, again_validation.images)
    assert torch.equal(train.labels, again_train.labels)
    # No validation image is also a training image (Fashion-MNIST has few exact duplicates).
    seen = {bytes(row.numpy()) for row in _pixels(train.images)}
    assert sum(bytes(row.numpy()) in seen for row in _pixels(validation.images)) <= 5


def test_the_grid_names_are_unique_and_start_with_the_tables_recipe() -> None:
    names = [recipe.name for recipe in GRID]
    assert len(set(names)) == len(names)
    first = GRID[0]
    assert (first.epochs, first.batch_size, first.learning_rate) == (8, 256, 2e-3)
    assert Architecture.LENET5_GN_TANH in {recipe.architecture for recipe in GRID}


def test_each_recipe_caches_its_teachers_apart(tmp_path: Path) -> None:
    table = dp_jobs(8.0, 1e-5, 8, 256)
    tuned = dp_jobs(8.0, 1e-5, 16, 512, 3e-3, 1.0, Architecture.LENET5_GN_TANH)
    assert tuned[0].privacy is not None
    assert tuned[0].privacy.max_grad_norm == 1.0
    assert tuned[0].model_architecture is Architecture.LENET5_GN_TANH
    assert not set(keyed_directories(tmp_path, table)) & set(keyed_directories(tmp_path, tuned))


def test_a_reused_reference_row_must_match_the_budget(tmp_path: Path) -> None:
    row = {"epsilon": None, "student_mean": 0.87}
    earlier = {"distill_iterations": 900, "teacher_epochs_non_private": 6, "rows": [row]}
    path = tmp_path / "epsilon_table.json"
    path.write_text(json.dumps(earlier))
    assert reused_reference(path, 900, 6)["reused_from"] == str(path)
    with pytest.raises(SystemExit, match="other distillation iterations"):
        reused_reference(path, 300, 6)
    earlier["rows"] = [{"epsilon": 8.0}]
    path.write_text(json.dumps(earlier))
    with pytest.raises(SystemExit, match="no inf row"):
        reused_reference(path, 900, 6)
