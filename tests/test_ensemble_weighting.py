"""bench/ensemble_weighting.py without training: its federations, summary and report."""

from __future__ import annotations

import argparse

import pytest

from bench.ensemble_weighting import (
    FEDERATIONS,
    budget_of,
    markdown,
    summarise,
    teacher_attention,
)
from bench.quality import heterogeneous_jobs
from cdfkd.student_node.evaluate import evaluate_teachers
from cdfkd.teacher_node.datasets import DatasetName, Split, load_dataset
from cdfkd.teacher_node.training import Partition


def _run(weighting: str, seed: int, student: float, ensemble: float = 0.80) -> dict:
    return {
        "weighting": weighting,
        "seed": seed,
        "student_mean": student,
        "student_attention": student + 0.05,
        "teacher_attention": 0.83 + seed / 100,
        "ensemble": ensemble,
        "teachers": [0.6, 0.7, 0.75],
        "iterations": 100 + seed,
        "ended_by": "completed" if seed else "max_seconds",
    }


def test_the_heterogeneous_federation_can_be_label_skewed_without_moving_the_iid_one() -> None:
    iid = heterogeneous_jobs(3)
    skewed = FEDERATIONS["heterogeneous"][1](3, None, Partition.DIRICHLET)
    assert [j.architecture for j in skewed] == [j.architecture for j in iid]
    assert {j.partition for j in skewed} == {Partition.DIRICHLET}
    assert {j.alpha for j in skewed} == {0.3}
    # The IID jobs keep their defaults, so their cached teachers (keyed by the job) stay valid.
    assert iid == heterogeneous_jobs(3, None, Partition.IID)
    assert {j.alpha for j in iid} == {type(iid[0]).model_fields["alpha"].default}


def test_summary_pairs_the_weightings_by_seed_and_measures_the_gap_to_the_ensemble() -> None:
    runs = [
        _run("equal", 0, 0.76),
        _run("confidence", 0, 0.75),
        _run("equal", 1, 0.74),
        _run("confidence", 1, 0.77),
    ]
    summary = summarise(runs, ["equal", "confidence"])
    assert summary["mean_student"] == pytest.approx({"equal": 0.75, "confidence": 0.76})
    assert summary["std_student"]["equal"] == pytest.approx(0.01)
    assert summary["gap_to_ensemble"]["equal"]["mean"] == pytest.approx(-0.05)
    assert summary["mean_difference_confidence_minus_equal"] == pytest.approx(0.01)
    alone = summarise([_run("equal", 0, 0.70, ensemble=0.76)], ["equal"])
    assert alone["std_student"]["equal"] == 0.0
    assert alone["gap_to_ensemble"]["equal"]["mean"] == pytest.approx(-0.06)
    assert "mean_difference_confidence_minus_equal" not in alone


def test_the_budget_is_iterations_or_calibrated_minutes_and_the_table_says_which() -> None:
    args = argparse.Namespace(
        iterations=100,
        minutes=15.0,
        calibration_iterations=6,
        federation="heterogeneous",
        weightings=["equal"],
        teacher_epochs=3,
        temperature=0.1,
        seeds=2,
    )
    assert budget_of(args) == {"seconds": 900.0, "calibration": 6}
    runs = [_run("equal", 0, 0.76), _run("equal", 1, 0.78)]
    text = markdown(args, {"runs": runs, **summarise(runs, ["equal"])})
    assert "15 minutes of wall-clock" in text
    assert "ResNet-14" in text
    assert "| 83.00 | 76.00 / 81.00 (100, stopped by max_seconds)" in text
    assert "| 84.00 | 78.00 / 83.00 (101)" in text
    assert "-3.00 ± 1.00 points from the ensemble over 2 seed(s)" in text
    assert "attention aggregate 82.00 ± 1.00 %, +2.00 ± 1.00 points from the ensemble" in text
    assert "weighted by attention on the same samples: 83.50 ± 0.50 %" in text
    assert budget_of(argparse.Namespace(iterations=300, minutes=None)) == {"iterations": 300}


def test_the_teachers_attention_reference_is_reproducible_and_not_below_its_teachers(
    digits_teachers,
) -> None:
    test = load_dataset(DatasetName.DIGITS, Split.TEST)
    alone = evaluate_teachers(digits_teachers.load(), test.images, test.labels)
    references = teacher_attention(digits_teachers.packages, [0, 1], DatasetName.DIGITS)
    assert set(references) == {0, 1}
    # Wrongly scaled pixels or mismatched labels would drop it to chance (10 classes).
    assert min(references.values()) >= min(alone.teachers) - 0.02
    assert teacher_attention(digits_teachers.packages, [0], DatasetName.DIGITS) == {
        0: references[0]
    }
