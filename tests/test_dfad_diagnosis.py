"""bench/dfad_diagnosis.py: its variants, a tiny real run of each kind, its summary."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.dfad_diagnosis import (
    VARIANTS,
    markdown,
    plot_curves,
    run_variant,
    summarize,
    variant_config,
)
from cdfkd.student_node.config import Method
from tests.helpers import random_validation_file, untrained_lenet_package


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_is_dfad_with_its_output_and_prior(variant: str) -> None:
    config = variant_config(variant, seed=3, iterations=40)
    output, bn = VARIANTS[variant]
    assert config.method is Method.DFAD
    assert config.seed == 3
    assert config.generator.output == output
    assert config.loss_weights().bn == bn
    assert config.loss_weights().ensemble == 0
    assert config.loss_weights().feature == 0
    assert config.total_iterations == 40
    assert config.optimizer.milestones == (41,)


def test_runs_probe_what_the_generator_makes(tmp_path: Path) -> None:
    packages = [
        untrained_lenet_package(tmp_path / f"t{i}", name=f"t{i}", mean=0.3, std=0.4)
        for i in range(2)
    ]
    random_validation_file(tmp_path / "validation.npz", 40)
    common = {
        "iterations": 2,
        "probe_every": 1,
        "batch_size": 8,
        "width": 4,
        "teachers": [str(p) for p in packages],
        "validation": str(tmp_path / "validation.npz"),
    }
    runs = [
        run_variant(
            {
                **common,
                "variant": variant,
                "seed": seed,
                "samples": str(tmp_path / "samples" / f"{variant}_seed{seed}.png"),
            }
        )
        for variant in ("authors", "pixel_range")
        for seed in (0, 1)
    ]
    assert len(list((tmp_path / "samples").glob("*.png"))) == 4
    for run in runs:
        assert [p["iteration"] for p in run["probes"]] == [0, 1, 2]
        assert run["accuracy"] == run["probes"][-1]["validation_accuracy"]
    bounded = [p for r in runs if r["variant"] == "pixel_range" for p in r["probes"]]
    unbounded = [p for r in runs if r["variant"] == "authors" for p in r["probes"]]
    assert all(p["pixel_min"] >= -1e-6 and p["pixel_max"] <= 1 + 1e-6 for p in bounded)
    assert all(p["outside_unit_range"] == 0 for p in bounded)
    # Standardized images read as pixels with mean 0.3 and std 0.4: about a quarter outside.
    assert all(p["outside_unit_range"] > 0.1 for p in unbounded)

    variants = summarize(runs)
    assert list(variants) == ["authors", "pixel_range"]
    assert variants["authors"]["seeds"] == [0, 1]
    plot_curves(variants, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert variants["authors"]["per_seed"] == [
        r["accuracy"] for r in runs if r["variant"] == "authors"
    ]
    report = {
        "iterations": 2,
        "batch_size": 8,
        "seeds": [0, 1],
        "workers": 1,
        "validation_samples": 40,
        "teacher_accuracies": [0.1, 0.1],
        "variants": variants,
        "total_seconds": 1.0,
    }
    table = markdown(report, "python bench/dfad_diagnosis.py --out x")
    assert table.count("\n| authors | batchnorm | 0 |") == 1
    assert "| pixel_range | pixel_range | 0 |" in table
