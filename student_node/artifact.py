"""The distilled student as a deliverable: safetensors weights plus ``student.json``.

``student.json`` holds what is needed to rebuild the modules (the training config and the
teachers' public shapes) and the run image space the student reads (``image_space``: its
``(C, H, W)`` and the normalization of [0, 1] pixels), never anything of the teachers'
parameters.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cdfkd.student_node.config import TrainConfig
from cdfkd.student_node.errors import CheckpointError
from cdfkd.student_node.models.aggregator import AttentionAggregator
from cdfkd.student_node.teachers.protocol import ALL_OUTPUTS, PrivacyInfo, TeacherInfo
from cdfkd.student_node.teachers.run_space import RunImageSpace, resolve_image_space
from cdfkd.student_node.trainer import build_student
from cdfkd.teacher_node.datasets import Normalization

STUDENT_FILE = "student.safetensors"
AGGREGATOR_FILE = "aggregator.safetensors"
METADATA_FILE = "student.json"


def _save_module(module: nn.Module, path: Path) -> None:
    state = {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}
    temporary = path.with_suffix(".tmp")
    save_file(state, str(temporary))
    os.replace(temporary, path)


def save_student(
    directory: Path,
    student: nn.Module,
    aggregator: AttentionAggregator | None,
    config: TrainConfig,
    infos: list[TeacherInfo],
    image_space: RunImageSpace | None = None,
) -> None:
    """Write the student (and the attention aggregator, if trained) into ``directory``.

    ``image_space`` is the run's (default: resolved from ``config`` and ``infos``).
    """
    if image_space is None:
        image_space = resolve_image_space(infos, config.image_shape, config.normalization)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _save_module(student, directory / STUDENT_FILE)
    if aggregator is not None:
        _save_module(aggregator, directory / AGGREGATOR_FILE)
    metadata = {
        "image_space": image_space.to_json(),
        "train": config.model_dump(mode="json"),
        "teachers": [
            {**dataclasses.asdict(info), "allowed_outputs": sorted(info.allowed_outputs)}
            for info in infos
        ],
    }
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")


def load_student(
    directory: Path,
) -> tuple[nn.Module, AttentionAggregator | None, TrainConfig, list[TeacherInfo]]:
    """Rebuild the student (eval mode) and its aggregator from ``directory``.

    Raises:
        CheckpointError: missing or unreadable files.
    """
    directory = Path(directory)
    try:
        metadata = json.loads((directory / METADATA_FILE).read_text())
        config = TrainConfig.model_validate(metadata["train"])
        infos = [
            TeacherInfo(
                name=t["name"],
                input_shape=tuple(t["input_shape"]),  # type: ignore[arg-type]
                num_classes=t["num_classes"],
                feature_dim=t["feature_dim"],
                normalization_mean=tuple(t["normalization_mean"]),
                normalization_std=tuple(t["normalization_std"]),
                allowed_outputs=frozenset(t.get("allowed_outputs", ALL_OUTPUTS)),
                privacy=PrivacyInfo(**t["privacy"]) if t.get("privacy") else None,
            )
            for t in metadata["teachers"]
        ]
        student = build_student(config, infos)
        student.load_state_dict(load_file(str(directory / STUDENT_FILE)))
        aggregator = None
        if (directory / AGGREGATOR_FILE).exists():
            aggregator = AttentionAggregator(infos[0].num_classes)
            aggregator.load_state_dict(load_file(str(directory / AGGREGATOR_FILE)))
    except (OSError, KeyError, ValueError, TypeError, SafetensorError, RuntimeError) as error:
        raise CheckpointError(f"{directory} does not hold a readable student: {error}") from error
    return student.eval(), aggregator, config, infos


def student_image_space(directory: Path) -> RunImageSpace:
    """The images the student in ``directory`` reads: shape and normalization of [0, 1] pixels.

    A student written before the run image space was recorded reads its first teacher's
    input shape and normalization (all teachers shared them then).

    Raises:
        CheckpointError: missing or unreadable ``student.json``.
    """
    path = Path(directory) / METADATA_FILE
    try:
        metadata = json.loads(path.read_text())
        if "image_space" in metadata:
            return RunImageSpace.from_json(metadata["image_space"])
        first = metadata["teachers"][0]
        shape = tuple(int(v) for v in first["input_shape"])
        return RunImageSpace(
            (shape[0], shape[1], shape[2]),
            Normalization(mean=first["normalization_mean"], std=first["normalization_std"]),
        )
    except (OSError, KeyError, IndexError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path} does not describe the student's images: {error}") from error
