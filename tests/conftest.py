"""Shared fixtures: real teachers trained for seconds on scikit-learn's digits (shipped data)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cdfkd.student_node.teachers.local import InProcessTeacher
from cdfkd.teacher_node.datasets import DatasetName
from cdfkd.teacher_node.training import TeacherJob, train_teacher_package

torch.set_num_threads(2)


@dataclass(frozen=True)
class TeacherSet:
    """Teacher packages on disk and their in-process teachers."""

    packages: list[Path]

    def load(self) -> list[InProcessTeacher]:
        return [InProcessTeacher.from_package(path) for path in self.packages]


def _train(root: Path, jobs: list[TeacherJob]) -> TeacherSet:
    packages = []
    for job in jobs:
        directory = root / job.name
        train_teacher_package(job, directory)
        packages.append(directory)
    return TeacherSet(packages)


@pytest.fixture(scope="session")
def digits_teachers(tmp_path_factory: pytest.TempPathFactory) -> TeacherSet:
    """Three LeNet-5-BN teachers on disjoint thirds of the digits training split."""
    root = tmp_path_factory.mktemp("digits_teachers")
    jobs = [
        TeacherJob(
            name=f"owner-{i + 1}",
            dataset=DatasetName.DIGITS,
            shard=i,
            num_shards=3,
            epochs=15,
            batch_size=32,
            seed=i,
        )
        for i in range(3)
    ]
    return _train(root, jobs)


@pytest.fixture(scope="session")
def mixed_teachers(tmp_path_factory: pytest.TempPathFactory) -> TeacherSet:
    """A heterogeneous federation on digits: LeNet-5-BN and two different ResNets."""
    root = tmp_path_factory.mktemp("mixed_teachers")
    jobs = [
        TeacherJob(
            name="lenet",
            dataset=DatasetName.DIGITS,
            shard=0,
            num_shards=3,
            epochs=15,
            batch_size=32,
        ),
        TeacherJob(
            name="resnet-a",
            dataset=DatasetName.DIGITS,
            architecture="resnet",
            depth=1,
            width=8,
            shard=1,
            num_shards=3,
            epochs=8,
            batch_size=32,
            seed=1,
        ),
        TeacherJob(
            name="resnet-b",
            dataset=DatasetName.DIGITS,
            architecture="resnet",
            depth=2,
            width=6,
            shard=2,
            num_shards=3,
            epochs=8,
            batch_size=32,
            seed=2,
        ),
    ]
    return _train(root, jobs)
