"""``run.max_seconds``: a run stops once its time budget is spent, measured on an injected clock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cdfkd.coordinator.config import parse_run_config
from cdfkd.coordinator.training_run import run_training
from cdfkd.student_node.checkpoint import list_checkpoints
from cdfkd.student_node.trainer import IterationMetrics, TrainState
from tests.helpers import packages, small_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class SteppedClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("budget", "iterations"), [(25.0, 3), (30.0, 3), (30.5, 4)])
def test_a_run_stops_when_its_time_budget_is_spent(
    digits_teachers, tmp_path: Path, budget: float, iterations: int
) -> None:
    clock = SteppedClock()

    def ten_seconds_per_iteration(state: TrainState, metrics: IterationMetrics) -> None:
        clock.now += 10.0

    run = small_run(packages(digits_teachers.packages), {"epochs": 100}, max_seconds=budget)
    del run["data"]  # data-free: nothing but the loop and its checkpoints
    config = parse_run_config(run)
    assert config.train.total_iterations == 300
    out = tmp_path / "out"
    result = run_training(
        config, out, callbacks=[ten_seconds_per_iteration], show_progress=False, clock=clock
    )
    # The budget is checked after every iteration: the first one that ends at or past it stops.
    assert result.iterations == iterations
    assert result.stopped_early
    assert result.train_seconds == 10.0 * iterations
    summary = json.loads((out / "result.json").read_text())
    assert summary["iterations"] == iterations
    assert summary["stopped_early"] is True
    assert summary["train_seconds"] == 10.0 * iterations
    # The last completed iteration is checkpointed: --resume continues from there.
    assert list_checkpoints(out / "checkpoints")[-1].name == f"checkpoint-{iterations:08d}.pt"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r["type"] == "iteration"]
    assert [r["iteration"] for r in logged] == list(range(1, iterations + 1))
    # Elapsed times are the run's clock, not the wall clock (logged before this test's callback).
    assert [r["elapsed"] for r in logged] == [10.0 * i for i in range(iterations)]
