"""``cdfkd evaluate``: re-evaluate a finished run's student on the test split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cdfkd.coordinator.errors import ConfigError
from cdfkd.coordinator.training_run import STUDENT_DIR
from cdfkd.student_node.artifact import load_student, student_image_space
from cdfkd.student_node.evaluate import evaluate_student
from cdfkd.teacher_node.datasets import DatasetName, Split, load_dataset
from cdfkd.teacher_node.image_space import to_model_input


def evaluate_run(run: Path, data_path: Path | None = None) -> dict[str, Any]:
    """Accuracy per header, of the mean and of the attention aggregate of ``run``'s student.

    Raises:
        ConfigError: ``run`` is not a finished run folder.
        CheckpointError: the student files are unreadable.
    """
    run = Path(run)
    config_file = run / "config.json"
    if not (run / STUDENT_DIR).is_dir() or not config_file.is_file():
        raise ConfigError(f"{run} is not a finished run folder (no {STUDENT_DIR}/ or config.json)")
    data = json.loads(config_file.read_text()).get("data", {})
    dataset = DatasetName(data.get("dataset", DatasetName.FASHION_MNIST))
    path = data_path or (Path(data["path"]) if data.get("path") else None)
    student, aggregator, config, infos = load_student(run / STUDENT_DIR)
    space = student_image_space(run / STUDENT_DIR)
    test = load_dataset(dataset, Split.TEST, path)
    images = to_model_input(test.images, space.image_shape, space.normalization)
    result = evaluate_student(student, images, test.labels, aggregator)
    return {
        "run": str(run),
        "method": config.method.value,
        "test_samples": len(test),
        "student_header_accuracies": result.headers,
        "student_accuracy_mean": result.mean,
        "student_accuracy_attention": result.attention,
    }
