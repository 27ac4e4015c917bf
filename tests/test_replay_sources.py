"""bench/replay_sources.py: its variants, a tiny real run of each at one image budget, its table."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bench.replay_sources import (
    VARIANTS,
    batches_per_iteration,
    markdown,
    plot,
    run_variant,
    summarize,
    variant_config,
)
from cdfkd.student_node.config import Method
from tests.helpers import random_validation_file, untrained_lenet_package


@pytest.fixture
def own_threads() -> Iterator[None]:
    """run_variant sets one torch thread, as in its worker processes: restored afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_is_the_demo_recipe_with_its_memory(variant: str) -> None:
    config = variant_config(variant, seed=4, iterations=90, batch_size=128)
    assert config.method is Method.CDFKD_MFS
    assert config.seed == 4
    assert config.batch_size == 128
    assert config.student_steps_per_generator_step == 5
    assert config.total_iterations == 90
    assert config.optimizer.milestones == (6,)  # 9 epochs of 10: decay at 2/3
    replay = VARIANTS[variant]
    if replay is None:
        assert config.replay is None
        assert batches_per_iteration(variant) == 7
    else:
        assert config.replay is not None
        given = config.replay.model_dump()
        assert {k: given[k] for k in replay} == replay
        assert given["sampling"] == "uniform"
        assert given["keep_generator_batch"] == ("generator_batch" in variant)
        assert batches_per_iteration(variant) == replay["new_batches"] + 2


def test_runs_spend_one_image_budget(tmp_path: Path, own_threads: None) -> None:
    packages = [
        untrained_lenet_package(tmp_path / f"t{i}", name=f"t{i}", mean=0.3, std=0.4)
        for i in range(2)
    ]
    random_validation_file(tmp_path / "validation.npz", 40)
    batch = 8
    budget = 42 * batch
    runs = [
        run_variant(
            {
                "variant": variant,
                "seed": seed,
                "images": budget,
                "probe_every": 2,
                "batch_size": batch,
                "teachers": [str(p) for p in packages],
                "validation": str(tmp_path / "validation.npz"),
            }
        )
        for variant in VARIANTS
        for seed in (0, 1)
    ]
    by_variant = {r["variant"]: r for r in runs if r["seed"] == 0}
    # Each spends the budget in whole iterations; the memory-only one its warm-up batch too.
    assert by_variant["paper"]["iterations"] == 6
    assert by_variant["paper"]["teacher_images"] == 42 * batch
    assert by_variant["replay"]["teacher_images"] == 14 * 3 * batch
    assert by_variant["replay_generator_batch"]["teacher_images"] == 14 * 3 * batch
    assert by_variant["generator_batch_only"]["teacher_images"] == (21 * 2 + 1) * batch
    # The generator step's batch joins the memory: twice the inflow at the same images.
    assert by_variant["replay"]["memory_samples"] == 14 * batch
    assert by_variant["replay_generator_batch"]["memory_samples"] == 28 * batch
    assert by_variant["generator_batch_only"]["memory_samples"] == 22 * batch
    for run in runs:
        assert run["probes"][-1]["iteration"] == run["iterations"]
        assert run["probes"][-1]["teacher_images"] == run["teacher_images"]
        assert run["accuracy"] == run["probes"][-1]["validation_accuracy"]

    variants = summarize(runs)
    assert list(variants) == list(VARIANTS)
    assert variants["replay"]["per_seed"] == [
        r["accuracy"] for r in runs if r["variant"] == "replay"
    ]
    plot(variants, tmp_path / "replay_sources.png")
    assert (tmp_path / "replay_sources.png").stat().st_size > 1000
    report = {
        "images": budget,
        "batch_size": batch,
        "seeds": [0, 1],
        "workers": 1,
        "validation_samples": 40,
        "variants": variants,
        "total_seconds": 1.0,
    }
    table = markdown(report, "python bench/replay_sources.py --out x")
    assert "| generator_batch_only | 2 | 21 | 344 |" in table
    assert table.count("\n| paper | 7 | 6 | 336 |") == 1


def test_the_last_probe_is_the_last_iteration_of_whole_epochs(
    tmp_path: Path, own_threads: None
) -> None:
    """A budget of 33 paper iterations plans 3 epochs of 10: the run and last probe end at 30."""
    package = untrained_lenet_package(tmp_path / "t", name="t", mean=0.3, std=0.4)
    random_validation_file(tmp_path / "validation.npz", 20)
    batch = 4
    run = run_variant(
        {
            "variant": "paper",
            "seed": 0,
            "images": 33 * 7 * batch,
            "probe_every": 20,
            "batch_size": batch,
            "teachers": [str(package)],
            "validation": str(tmp_path / "validation.npz"),
        }
    )
    assert run["iterations"] == 30
    assert [p["iteration"] for p in run["probes"]] == [20, 30]
    assert run["teacher_images"] == 30 * 7 * batch
