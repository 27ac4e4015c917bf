"""bench/epsilon_seeds.py: the epsilon table's mean and spread over distillation seeds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.epsilon_seeds import aggregate
from bench.privacy import SHARED_SETTINGS

ROOT = Path(__file__).resolve().parents[1]


def _table(seed: int, students: dict[float | None, float], **settings: Any) -> dict[str, Any]:
    base: dict[str, Any] = {k: 1 for k in SHARED_SETTINGS}
    base.update(settings, distill_seed=seed, complete=True)
    base["rows"] = [
        {
            "epsilon": eps,
            "teachers": [0.8, 0.81, 0.79] if eps is not None else [0.89, 0.89, 0.89],
            "teacher_ensemble": 0.82 if eps is not None else 0.91,
            "student_mean": student,
        }
        for eps, student in students.items()
    ]
    return base


def test_the_gap_is_paired_by_seed_and_the_spread_is_the_sample_deviation() -> None:
    report = aggregate(
        [
            _table(0, {8.0: 0.80, None: 0.86}),
            _table(1, {8.0: 0.83, None: 0.87}),
            _table(2, {8.0: 0.82, None: 0.84, 1.0: 0.70}),
        ]
    )
    by_eps = {row["epsilon"]: row for row in report["rows"]}
    assert [row["epsilon"] for row in report["rows"]] == [1.0, 8.0, None]
    eight = by_eps[8.0]
    assert eight["seeds"] == [0, 1, 2]
    assert eight["student_mean"]["mean"] == pytest.approx(0.8166666, abs=1e-6)
    assert eight["student_mean"]["std"] == pytest.approx(0.0152752, abs=1e-6)
    # Paired: -0.06, -0.04, -0.02 (unpaired means would give the same mean, not this spread).
    assert eight["gap_to_non_private"]["mean"] == pytest.approx(-0.04)
    assert eight["gap_to_non_private"]["std"] == pytest.approx(0.02)
    one = by_eps[1.0]
    assert one["seeds"] == [2]
    assert one["student_mean"]["std"] is None
    assert one["gap_to_non_private"]["n"] == 1
    assert by_eps[None]["gap_to_non_private"] is None


def test_tables_that_differ_or_repeat_a_seed_are_refused() -> None:
    with pytest.raises(ValueError, match="dp_epochs"):
        aggregate([_table(0, {8.0: 0.8}), _table(1, {8.0: 0.8}, dp_epochs=2)])
    with pytest.raises(ValueError, match="seed twice"):
        aggregate([_table(0, {8.0: 0.8}), _table(0, {8.0: 0.8})])
    unfinished = _table(1, {8.0: 0.8})
    unfinished["complete"] = False
    with pytest.raises(ValueError, match="not complete"):
        aggregate([_table(0, {8.0: 0.8}), unfinished])


def test_the_command_exits_non_zero_naming_the_problem(tmp_path: Path) -> None:
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(_table(0, {8.0: 0.8})))
    second.write_text(json.dumps(_table(0, {8.0: 0.8})))
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "epsilon_seeds.py"),
            "--out",
            str(tmp_path),
            str(first),
            str(second),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "seed twice" in done.stderr
    assert not (tmp_path / "epsilon_seeds.json").exists()
