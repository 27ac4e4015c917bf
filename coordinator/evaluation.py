"""``cdfkd evaluate``: re-evaluate a finished run's student on labelled test images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cdfkd.coordinator.errors import ConfigError
from cdfkd.coordinator.training_run import STUDENT_DIR
from cdfkd.student_node.artifact import load_student, student_image_space
from cdfkd.student_node.evaluate import evaluate_student
from cdfkd.teacher_node.data_sources import DataSource, describe_source, load_labelled_images
from cdfkd.teacher_node.datasets import DatasetName, Split


def _source(
    run: Path,
    saved: dict[str, Any] | None,
    files: Path | None,
    dataset: DatasetName | None,
    data_path: Path | None,
) -> tuple[DataSource, Path | None]:
    """The test data: ``files`` or ``dataset`` if given, else the run's own ``[data]``."""
    if files is not None and (dataset is not None or data_path is not None):
        raise ConfigError("give --data (image folder or .npz) or --dataset/--data-path, not both")
    if files is not None:
        return files, None
    if dataset is not None:
        return dataset, data_path
    if saved is None:
        raise ConfigError(
            f"{run} was trained without real data (no [data] table): evaluate it on labelled "
            "test images with --data PATH (an image folder or .npz) or --dataset NAME, or on "
            "each organization's own data with 'cdfkd flower run'"
        )
    if saved.get("files"):
        return Path(saved["files"]), None
    path = data_path or (Path(saved["path"]) if saved.get("path") else None)
    return DatasetName(saved.get("dataset") or DatasetName.FASHION_MNIST), path


def evaluate_run(
    run: Path,
    data_path: Path | None = None,
    *,
    files: Path | None = None,
    dataset: DatasetName | None = None,
) -> dict[str, Any]:
    """Accuracy per header, of the mean and of the attention aggregate of ``run``'s student.

    Args:
        run: Output folder of ``cdfkd train`` (or ``cdfkd demo``).
        data_path: Folder of the Fashion-MNIST IDX files.
        files: Labelled test images: an image folder or ``.npz`` (its ``test`` split if it
            has splits); they are brought to the student's image size and normalization.
        dataset: A named dataset instead of the run's own ``[data]``.

    Raises:
        ConfigError: ``run`` is not a finished run folder, or it is data-free and no data
            are given.
        DatasetError: the test data are missing or malformed.
        CheckpointError: the student files are unreadable.
    """
    run = Path(run)
    config_file = run / "config.json"
    if not (run / STUDENT_DIR).is_dir() or not config_file.is_file():
        raise ConfigError(f"{run} is not a finished run folder (no {STUDENT_DIR}/ or config.json)")
    saved = json.loads(config_file.read_text()).get("data")
    source, root = _source(run, saved, files, dataset, data_path)
    student, aggregator, config, infos = load_student(run / STUDENT_DIR)
    space = student_image_space(run / STUDENT_DIR)
    test = load_labelled_images(source, Split.TEST, root=root, num_classes=infos[0].num_classes)
    images = space.prepare(test.images, describe_source(source))
    result = evaluate_student(student, images, test.labels, aggregator)
    return {
        "run": str(run),
        "method": config.method.value,
        "data": describe_source(source),
        "test_samples": len(test),
        "student_header_accuracies": result.headers,
        "student_accuracy_mean": result.mean,
        "student_accuracy_attention": result.attention,
    }
