"""Shared pieces of the benches that run variants over seeds on the homogeneous federation.

``bench/dfad_diagnosis.py`` and ``bench/replay_sources.py``: the federation's data and
teachers, the teachers in process in the run image space with the validation images, the runs
in spawned workers, the per-variant accuracy over seeds, its table text and the probe curves.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import statistics
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from bench.quality import DataPaths, ensure_teachers, homogeneous_jobs, prepare_data
from cdfkd.student_node.teachers.local import InProcessTeacher
from cdfkd.student_node.teachers.protocol import TeacherInfo
from cdfkd.student_node.teachers.run_space import (
    RunImageSpace,
    RunSpaceTeacher,
    resolve_image_space,
)
from cdfkd.teacher_node.image_files import read_npz


def homogeneous_federation(
    out: Path, validation_samples: int, teacher_epochs: int, quick: bool, workers: int
) -> tuple[DataPaths, list[Path]]:
    """The quality protocol's split under ``out/data`` and its three teachers (cached, keyed)."""
    data = prepare_data(out / "data", validation_samples, 1000 if quick else None)
    jobs = homogeneous_jobs(1 if quick else teacher_epochs, data.owners)
    return data, ensure_teachers(out / "teachers", jobs, keyed=True, workers=workers)


@dataclasses.dataclass(frozen=True)
class InProcessFederation:
    """The teachers of ``packages`` in process, in the run image space, and validation data."""

    inner: list[InProcessTeacher]
    infos: list[TeacherInfo]
    space: RunImageSpace
    teachers: list[RunSpaceTeacher]
    validation: tuple[torch.Tensor, torch.Tensor]  # standardized images, labels

    @classmethod
    def load(cls, packages: list[str], validation: str) -> InProcessFederation:
        """The packages' teachers and the ``.npz`` validation file's images and labels."""
        inner = [InProcessTeacher.from_package(Path(p)) for p in packages]
        infos = [t.info() for t in inner]
        space = resolve_image_space(infos)
        data = read_npz(Path(validation))
        return cls(
            inner,
            infos,
            space,
            [RunSpaceTeacher(t, space) for t in inner],
            (space.prepare(data.images, "validation"), data.labels),
        )


def run_all(
    function: Callable[[dict[str, Any]], dict[str, Any]], specs: list[dict[str, Any]], workers: int
) -> list[dict[str, Any]]:
    """``function`` on every spec in ``workers`` spawned processes, results in spec order."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return list(pool.map(function, specs))


def variant_runs(runs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The runs of variant ``name``, by seed."""
    return sorted((r for r in runs if r["variant"] == name), key=lambda r: r["seed"])


def accuracy_over_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Final accuracy of ``runs``: mean, sample std (None for one run), per seed, seeds."""
    accuracies = [r["accuracy"] for r in runs]
    return {
        "accuracy_mean": statistics.fmean(accuracies),
        "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
        "per_seed": accuracies,
        "seeds": [r["seed"] for r in runs],
    }


def accuracy_cells(variant: dict[str, Any]) -> str:
    """The table cells ``mean ± std | per seed`` of :func:`accuracy_over_seeds`, in %."""
    spread = f"{100 * variant['accuracy_mean']:.2f}"
    if variant["accuracy_std"] is not None:
        spread += f" ± {100 * variant['accuracy_std']:.2f}"
    return f"{spread} | {' / '.join(f'{100 * a:.2f}' for a in variant['per_seed'])}"


def plot_probe_curves(
    variants: dict[str, Any], path: Path, x_key: str, x_label: str, x_scale: float = 1.0
) -> None:
    """Validation accuracy (%) of every run's probes against ``probe[x_key] * x_scale``.

    ``variants`` maps a name to a dict whose ``runs`` each hold ``probes`` with ``x_key`` and
    ``validation_accuracy``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for colour, (name, variant) in enumerate(variants.items()):
        for index, run in enumerate(variant["runs"]):
            axis.plot(
                [p[x_key] * x_scale for p in run["probes"]],
                [100 * p["validation_accuracy"] for p in run["probes"]],
                color=f"C{colour}",
                lw=1,
                label=name if index == 0 else None,
            )
    axis.set_xlabel(x_label)
    axis.set_ylabel("validation accuracy (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
