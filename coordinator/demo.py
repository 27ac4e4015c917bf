"""``cdfkd demo``: the main job end to end on one machine.

Three owners each train a LeNet-5-BN teacher on a disjoint third of Fashion-MNIST (cached
under ``DIR/teachers``), CDFKD-MFS distills them into one multi-header student, attention is
trained on k = 60 real samples, and ``DIR/summary.json`` plus the report are written. Until
the gRPC and Ray issues land, the teachers run in-process.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from cdfkd.coordinator.config import PackageTeacher, RunConfig, RunSettings
from cdfkd.coordinator.training_run import CHECKPOINT_DIR, run_training
from cdfkd.student_node.checkpoint import latest_checkpoint
from cdfkd.student_node.config import (
    GeneratorConfig,
    Method,
    OptimizerConfig,
    TrainConfig,
)
from cdfkd.student_node.models.aggregator import AttentionConfig
from cdfkd.teacher_node.datasets import FASHION_MNIST_DIR, DatasetName, Split, load_fashion_mnist
from cdfkd.teacher_node.errors import PackageError
from cdfkd.teacher_node.package import read_metadata
from cdfkd.teacher_node.training import TeacherJob, train_teacher_package

logger = logging.getLogger(__name__)

NUM_OWNERS = 3
ATTENTION_SAMPLES = 60


def demo_train_config(quick: bool) -> TrainConfig:
    """The tuned CDFKD-MFS settings of the demo (bench/RESULTS.md records why)."""
    epochs = 6 if quick else 24
    return TrainConfig(
        method=Method.CDFKD_MFS,
        batch_size=128,
        epochs=epochs,
        iterations_per_epoch=25,
        optimizer=OptimizerConfig(milestones=(epochs * 2 // 3,)),
        generator=GeneratorConfig(latent_dim=256, width=8),
        attention=AttentionConfig(samples=ATTENTION_SAMPLES),
    )


def _teacher_jobs(quick: bool, data_path: Path | None) -> list[TeacherJob]:
    return [
        TeacherJob(
            name=f"owner-{index + 1}",
            dataset=DatasetName.FASHION_MNIST,
            data_path=data_path,
            shard=index,
            num_shards=NUM_OWNERS,
            epochs=5 if quick else 8,
            seed=index,
        )
        for index in range(NUM_OWNERS)
    ]


def _ensure_teacher(job: TeacherJob, directory: Path) -> None:
    """Reuse a cached package made for the same owner; otherwise (re)train it."""
    try:
        metadata = read_metadata(directory)
        if metadata.name == job.name and metadata.spec.architecture == job.architecture:
            logger.info("reusing teacher package %s", directory)
            return
    except PackageError:
        pass
    train_teacher_package(job, directory)


def run_demo(
    out: Path,
    quick: bool = False,
    stop_event: threading.Event | None = None,
    data_path: Path | None = None,
) -> dict[str, Any]:
    """Run the demo into ``out``; returns the summary (also written to ``out/summary.json``).

    Running it again reuses the teachers and, when the run finished, its checkpoint.
    """
    out = Path(out)
    started = time.monotonic()
    load_fashion_mnist(Split.TEST, data_path or FASHION_MNIST_DIR)  # fail early, exit code 2
    packages = []
    for job in _teacher_jobs(quick, data_path):
        directory = out / "teachers" / job.name
        _ensure_teacher(job, directory)
        packages.append(PackageTeacher(package=directory.resolve()))
    teacher_seconds = time.monotonic() - started
    config = RunConfig(
        data={"dataset": DatasetName.FASHION_MNIST, "path": data_path},
        teachers=tuple(packages),
        train=demo_train_config(quick),
        run=RunSettings(checkpoint_every=25, eval_every=25, log_every=10),
    )
    resume = latest_checkpoint(out / CHECKPOINT_DIR) is not None
    result = run_training(config, out, resume=resume, stop_event=stop_event)
    summary = {
        **result.summary(),
        "quick": quick,
        "teacher_seconds": round(teacher_seconds, 2),
        "total_seconds": round(time.monotonic() - started, 2),
        "report": str(out / "report.md"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info(
        "demo done: student %.2f %% (mean), %s (attention); teachers %s; report %s",
        100 * result.student.mean,
        "n/a" if result.student.attention is None else f"{100 * result.student.attention:.2f} %",
        [round(100 * a, 2) for a in result.teachers.teachers],
        out / "report.md",
    )
    return summary
