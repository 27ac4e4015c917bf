"""A short real distillation on digits: the student must beat chance by a wide margin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cdfkd.coordinator.config import parse_run_config
from cdfkd.coordinator.training_run import run_training


@pytest.mark.integration
@pytest.mark.slow
def test_cdfkd_mfs_distills_digits_teachers(digits_teachers, tmp_path: Path) -> None:
    config = parse_run_config(
        {
            "data": {"dataset": "digits", "eval_samples": 450},
            "teachers": [{"package": str(p)} for p in digits_teachers.packages],
            "train": {
                "batch_size": 64,
                "epochs": 8,
                "iterations_per_epoch": 10,
                "optimizer": {"milestones": [6]},
                "student": {"widths": [16, 32, 32]},
                "generator": {"latent_dim": 64, "width": 16},
                "attention": {"samples": 60},
            },
            "run": {"device": "cpu", "checkpoint_every": 40, "eval_every": 20},
        }
    )
    result = run_training(config, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "result.json").read_text())
    assert summary["iterations"] == 80
    assert min(summary["teacher_accuracies"]) > 0.85
    # 10 classes: chance is 10 %.
    assert result.student.mean >= 0.6, summary
    assert result.student.attention is not None
    assert result.student.attention >= 0.55, summary
