"""The quality protocol without training: grid, cells, budgets, sizes, shards, schema."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bench.quality import federation_jobs, prepare_data
from bench.quality_protocol import (
    CELL_KEYS,
    Budget,
    Grid,
    Setting,
    build_cells,
    cell_record,
    check_report,
    markdown_federation,
    matched_widths,
    mean_std,
    methods_summary,
    settings_for,
    student_parameters,
    train_settings,
)
from cdfkd.student_node.config import Method, StudentKind, TrainConfig
from cdfkd.teacher_node.datasets import ImageDataset
from cdfkd.teacher_node.training import Partition, owner_shard

LENET = [84, 84, 84]  # LeNet-5-BN's feature width, one per teacher


def test_every_generator_method_gets_the_same_grid_and_dfad_its_authors_recipes() -> None:
    grid = Grid()
    mfs = settings_for(Method.CDFKD_MFS, grid)
    assert settings_for(Method.CDFKD, grid) == mfs
    assert len(mfs) == 16
    assert {(s.student_lr, s.generator_lr, s.bn, s.generator_output) for s in mfs} == {
        (a, b, c, d)
        for a in (0.1, 0.05)
        for b in (1e-3, 2e-3)
        for c in (0.0, 0.1)
        for d in ("batchnorm", "pixel_range")
    }
    dfad = settings_for(Method.DFAD, grid)
    # The authors' recipe (0.1, 1e-3, no BN prior, wd 5e-4, their generator) is a grid
    # point, now named; their lr 0.01 / wd 1e-4 recipe comes on top.
    assert len(dfad) == 17
    assert {s.recipe for s in dfad} >= {"dfad_authors", "dfad_authors_lr0.01_wd1e-4"}
    authors = next(s for s in dfad if s.recipe == "dfad_authors")
    assert (authors.student_lr, authors.bn, authors.generator_output) == (0.1, 0.0, "batchnorm")

    def point(s: Setting) -> tuple:
        return (s.student_lr, s.generator_lr, s.bn, s.student_weight_decay, s.generator_output)

    assert {point(s) for s in dfad} == {point(s) for s in mfs} | {
        (0.01, 1e-3, 0.0, 1e-4, "batchnorm")
    }
    kd = settings_for(Method.KD_REAL, grid)
    assert [(s.student_lr, s.generator_lr, s.bn, s.generator_output) for s in kd] == [
        (0.1, None, None, None),
        (0.05, None, None, None),
    ]
    assert len({s.key for s in dfad}) == len(dfad)
    # The authors' generator keeps the folder names runs were cached under before.
    assert (
        Setting(0.1, 1e-3, 0.1, generator_output="batchnorm").key
        == "slr0.1_wd0.0005_glr0.001_bn0.1"
    )


def test_a_setting_gives_the_run_its_generator_output() -> None:
    cell = build_cells((39, 78, 156))[0]
    for output in ("batchnorm", "pixel_range"):
        settings = train_settings(
            cell, Setting(0.1, 1e-3, 0.1, generator_output=output), Budget(50), 0
        )
        config = TrainConfig.model_validate(settings)
        assert config.generator.output == output
        assert config.generator.latent_dim == 256  # the base settings are kept beside it
    kd = train_settings(build_cells((39, 78, 156))[-1], Setting(0.1, None, None), Budget(50), 0)
    assert "output" not in kd.get("generator", {})


def test_cells_separate_objective_and_student() -> None:
    cells = build_cells((39, 78, 156))
    names = [c.name for c in cells]
    assert len(set(names)) == len(names) == 8
    for objective in (Method.CDFKD_MFS, Method.CDFKD):
        for student in (StudentKind.MFS, StudentKind.SIMPLE_MULTI_HEADER):
            assert f"{objective.value}/{student.value}" in names
    assert {"dfad/single_head", "dfad/single_head_matched", "kd_real/mfs"} <= set(names)
    assert "kd_real/simple_multi_header" in names
    paper = {c.name for c in cells if c.is_paper_cell}
    assert paper == {
        "cdfkd_mfs/mfs",
        "cdfkd/simple_multi_header",
        "dfad/single_head",
        "kd_real/mfs",
    }


def test_the_matched_single_head_has_the_mfs_students_inference_size() -> None:
    mfs = student_parameters(StudentKind.MFS, None, LENET)
    single = student_parameters(StudentKind.SINGLE_HEAD, None, LENET)
    widths = matched_widths(mfs, LENET)
    matched = student_parameters(StudentKind.SINGLE_HEAD, widths, LENET)
    assert single < mfs / 4
    assert abs(matched - mfs) / mfs < 0.03
    assert widths == (widths[0], 2 * widths[0], 4 * widths[0])
    # Training-only projections (64 -> 84 per header) are not counted.
    assert student_parameters(StudentKind.MFS, None, [64, 64, 64]) == mfs


def test_budgets_are_iterations_and_decay_at_fixed_fractions() -> None:
    full = Budget(1000)
    assert (full.epochs, full.total_iterations, full.milestones) == (40, 1000, (27,))
    assert Budget(200).milestones == (5,)
    assert Budget(3, 1).milestones == (2,)
    assert Budget(1, 1).milestones == ()


def test_train_settings_change_only_the_grid_knobs_of_each_method() -> None:
    cell = build_cells((39, 78, 156))[3]  # cdfkd on the simple multi-header student
    setting = Setting(0.05, 2e-3, 0.0)
    config = TrainConfig.model_validate(train_settings(cell, setting, Budget(200), seed=2))
    assert config.method is Method.CDFKD
    assert config.student_kind() is StudentKind.SIMPLE_MULTI_HEADER
    weights = config.loss_weights()
    assert (weights.bn, weights.ensemble, weights.feature) == (0.0, 1.0, 0.0)  # CDFKD's own
    assert (config.optimizer.student_lr, config.optimizer.generator_lr) == (0.05, 2e-3)
    assert config.optimizer.milestones == (5,)
    assert (config.total_iterations, config.seed) == (200, 2)
    matched = build_cells((39, 78, 156))[5]
    dfad = TrainConfig.model_validate(
        train_settings(matched, Setting(0.1, 1e-3, 0.1), Budget(50), 0)
    )
    assert dfad.student.widths == (39, 78, 156)
    assert dfad.loss_weights().bn == 0.1


def test_label_skewed_owners_get_disjoint_dirichlet_shards() -> None:
    jobs = federation_jobs("label_skewed", 1, Path("owners"))
    assert all(j.partition is Partition.DIRICHLET and j.alpha == 0.3 for j in jobs)
    labels = torch.arange(10).repeat_interleave(300)
    data = ImageDataset(torch.zeros(len(labels), 1, 4, 4), labels, 10)
    shards = [owner_shard(job, data) for job in jobs]
    assert sum(len(s) for s in shards) == len(labels)
    shares = torch.stack([torch.bincount(s.labels, minlength=10) for s in shards]).float() / 300
    assert float(shares.max()) > 0.6  # some owner holds most of some class
    iid = [owner_shard(job, data) for job in federation_jobs("homogeneous", 1, Path("o"))]
    iid_shares = torch.stack([torch.bincount(s.labels, minlength=10) for s in iid]).float() / 300
    assert float(iid_shares.max()) < 0.45


def _run(seed: int, accuracy: float, attention: float | None = None) -> dict:
    return {
        "seed": seed,
        "accuracy": accuracy,
        "attention": attention,
        "iterations": 1000,
        "train_seconds": 800.0,
        "parameters_inference": 139_406,
    }


def test_quality_json_schema_and_table() -> None:
    cells = build_cells((39, 78, 156))
    setting = Setting(0.1, 1e-3, 0.1)
    records = [
        cell_record("homogeneous", cell, setting, [_run(0, 0.80 + i / 100, 0.79), _run(1, 0.82)])
        for i, cell in enumerate(cells)
    ]
    assert records[0]["accuracy_mean"] == pytest.approx(0.81)
    assert records[0]["accuracy_std"] == pytest.approx(float(np.std([0.80, 0.82], ddof=1)))
    assert "attention_mean" not in records[0]  # one seed has no attention figure
    methods = methods_summary(records)
    assert set(methods) == {"kd_real", "dfad", "cdfkd", "cdfkd_mfs_mean"}
    assert methods["dfad"] == records[4]["accuracy_mean"]
    report: dict[str, Any] = {
        "methods": methods,
        "protocol": {"validation_samples": 5000, "seeds": [0, 1], "grid": {}, "chosen": {}},
        "cells": records,
    }
    check_report(report)
    assert all(set(CELL_KEYS) <= set(r) for r in records)
    for broken in ("per_seed", "parameters_inference"):
        bad = copy.deepcopy(report)
        del bad["cells"][2][broken]
        with pytest.raises(ValueError, match=broken):
            check_report(bad)
    bad = copy.deepcopy(report)
    bad["protocol"]["seeds"] = [0, 1, 2]
    with pytest.raises(ValueError, match="seeds"):
        check_report(bad)
    table = markdown_federation(
        "t",
        {"teacher_names": ["a"], "teachers": [0.9], "teacher_ensemble": 0.91},
        records,
    )
    assert "| cdfkd_mfs/mfs | cdfkd_mfs | mfs | 139,406 | 81.00 ± 1.41 | 80.00 / 82.00 |" in table
    assert mean_std([0.5]) == (0.5, 0.0)


def test_validation_is_held_out_before_the_owners_data(tmp_path: Path) -> None:
    paths = prepare_data(tmp_path, validation_samples=300, test_samples=100)
    with np.load(paths.owners / "train.npz") as owners, np.load(paths.validation / "test.npz") as v:
        owner_images, held = owners["images"], v["images"]
        assert len(owner_images) + len(held) == 60_000
        assert len(held) == 300
        owned = {row.tobytes() for row in owner_images.reshape(len(owner_images), -1)}
    # Fashion-MNIST repeats a few images; held-out ones must not be owners' images by index,
    # so at most those duplicates can coincide.
    shared = sum(row.tobytes() in owned for row in held.reshape(len(held), -1))
    assert shared <= 3
    with np.load(paths.final / "test.npz") as test:
        assert len(test["labels"]) == 100
    assert (paths.validation / "train.npz").resolve() == (paths.owners / "train.npz").resolve()
