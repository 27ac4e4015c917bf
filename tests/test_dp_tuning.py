"""bench/dp_tuning.py and the epsilon table's recipe plumbing, without training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench.dp_tuning import GRID, split_owner
from bench.privacy import SHARED_SETTINGS, dp_jobs, reused_row
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


def _table(rows: list[dict], **settings) -> dict:
    shared = dict.fromkeys(SHARED_SETTINGS, 1)
    return {**shared, **settings, "rows": rows}


def test_rows_are_taken_from_the_first_table_with_the_same_settings(tmp_path: Path) -> None:
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(_table([{"epsilon": 8.0, "student_mean": 0.8}])))
    second.write_text(
        json.dumps(_table([{"epsilon": 8.0, "student_mean": 0.7}, {"epsilon": None}]))
    )
    ours = _table([])
    row = reused_row([first, second], ours, 8.0)
    assert row is not None
    assert (row["student_mean"], row["reused_from"]) == (0.8, str(first))
    reference = reused_row([first, second], ours, math.inf)
    assert reference is not None
    assert reference["reused_from"] == str(second)
    assert reused_row([first, tmp_path / "not-yet.json"], ours, 3.0) is None
    with pytest.raises(SystemExit, match="other settings \\(distill_iterations\\)"):
        reused_row([first], _table([], distill_iterations=300), 8.0)
