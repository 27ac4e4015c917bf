"""The distilled student as a deliverable: safetensors weights plus ``student.json``.

``student.json`` holds what is needed to rebuild the modules (the training config and the
teachers' public shapes), never anything of the teachers' parameters.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from cdfkd.student_node.config import TrainConfig
from cdfkd.student_node.errors import CheckpointError
from cdfkd.student_node.models.aggregator import AttentionAggregator
from cdfkd.student_node.teachers.protocol import ALL_OUTPUTS, TeacherInfo
from cdfkd.student_node.trainer import build_student
from cdfkd.teacher_node.datasets import Normalization
from cdfkd.teacher_node.errors import DatasetError
from cdfkd.teacher_node.image_space import to_model_input

STUDENT_FILE = "student.safetensors"
AGGREGATOR_FILE = "aggregator.safetensors"
METADATA_FILE = "student.json"


@dataclasses.dataclass(frozen=True)
class StudentInputSpace:
    """The images the student takes: ``shape`` ``(C, H, W)`` and per-channel ``normalization``."""

    shape: tuple[int, int, int]
    normalization: Normalization

    def prepare(self, pixels: Tensor, source: str) -> Tensor:
        """Real images of any size as the student sees them (resized, then normalized).

        Args:
            pixels: float32 ``(N, C, H, W)`` in [0, 1], e.g. ``ImageDataset.images``.
            source: Where they come from, for the error message.

        Raises:
            DatasetError: their channel count is not the student's.
        """
        channels = int(pixels.shape[1])
        if channels != self.shape[0]:
            raise DatasetError(
                f"{source}: {channels}-channel images, but the student takes {self.shape[0]} "
                "channels (grayscale and colour data cannot be mixed)"
            )
        return to_model_input(pixels, self.shape, self.normalization)


def student_input_space(infos: Sequence[TeacherInfo]) -> StudentInputSpace:
    """The student's image shape and normalization: the one place that decides them.

    Today the student works in its teachers' input space, which the run requires them to share
    (``check_teachers``), so the first teacher's shape and normalization are the student's.
    """
    first = infos[0]
    return StudentInputSpace(
        shape=first.input_shape,
        normalization=Normalization(mean=first.normalization_mean, std=first.normalization_std),
    )


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
) -> None:
    """Write the student (and the attention aggregator, if trained) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _save_module(student, directory / STUDENT_FILE)
    if aggregator is not None:
        _save_module(aggregator, directory / AGGREGATOR_FILE)
    metadata = {
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
