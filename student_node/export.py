"""Edge export of a distilled student: one ONNX or TorchScript file, images in, logits out.

The exported model is :class:`EdgeClassifier`: the student's header logits combined as
``student_node.evaluate`` combines them, by their mean (1/N) sum_i s_i(x) or by the trained
attention aggregate sum_i alpha_i(x) s_i(x) (METHOD.md 3). The batch dimension is dynamic.
Each file carries a small JSON description (input shape, normalization, aggregation) under the
key ``cdfkd``: ONNX metadata, or an extra file ``cdfkd.json`` in the TorchScript archive.
"""

from __future__ import annotations

import enum
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, assert_never

import torch
from torch import Tensor, nn

from cdfkd.student_node.artifact import (
    AGGREGATOR_FILE,
    METADATA_FILE,
    load_student,
    student_image_space,
)
from cdfkd.student_node.errors import CheckpointError
from cdfkd.student_node.models.aggregator import AttentionAggregator
from cdfkd.student_node.models.multi_header import StudentOutputs

#: torch.export specializes a dimension of size 0 or 1 to a constant; 2 keeps the batch symbolic.
EXAMPLE_BATCH_SIZE = 2
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
#: ONNX metadata key; the TorchScript archive holds the same JSON as ``cdfkd.json``.
DESCRIPTION_KEY = "cdfkd"
TORCHSCRIPT_DESCRIPTION_FILE = "cdfkd.json"


class ExportFormat(enum.StrEnum):
    """File format of an exported student."""

    ONNX = "onnx"
    TORCHSCRIPT = "torchscript"


class Aggregation(enum.StrEnum):
    """How the header logits become one prediction."""

    MEAN = "mean"
    ATTENTION = "attention"


class EdgeClassifier(nn.Module):
    """The student and, for attention, its aggregator: images ``(B, C, H, W)`` -> logits ``(B, K)``.

    Args:
        student: A student returning :class:`StudentOutputs`, in eval mode.
        aggregator: The trained attention aggregator; None averages the headers.
    """

    def __init__(self, student: nn.Module, aggregator: AttentionAggregator | None = None) -> None:
        super().__init__()
        self.student = student
        self.aggregator = aggregator

    def forward(self, images: Tensor) -> Tensor:
        """Logits float32 ``(B, K)`` for normalized ``images`` float32 ``(B, C, H, W)``."""
        outputs: StudentOutputs = self.student(images)
        if self.aggregator is None:
            return outputs.mean_logits()
        return self.aggregator(torch.stack(outputs.logits))


@dataclass(frozen=True)
class EdgeModel:
    """An :class:`EdgeClassifier` (eval mode) and what a deployment needs to feed it.

    Attributes:
        classifier: The module that is exported.
        aggregation: How it combines the headers.
        method: The distillation method the student was trained with.
        input_shape: ``(C, H, W)`` of one normalized image (the run image shape: real images
            of another size are resized to it, bilinear, before normalizing).
        num_classes: K, the width of the logits.
        normalization_mean: Per-channel mean subtracted from [0, 1] images before the model.
        normalization_std: Per-channel std the difference is divided by.
    """

    classifier: EdgeClassifier
    aggregation: Aggregation
    method: str
    input_shape: tuple[int, int, int]
    num_classes: int
    normalization_mean: tuple[float, ...]
    normalization_std: tuple[float, ...]

    def example_input(self, batch_size: int = EXAMPLE_BATCH_SIZE, seed: int = 0) -> Tensor:
        """Seeded standard-normal images float32 ``(batch_size, C, H, W)``."""
        generator = torch.Generator().manual_seed(seed)
        return torch.randn((batch_size, *self.input_shape), generator=generator)

    def parameter_count(self) -> int:
        """Parameters the logits depend on (the student's feature projections serve training).

        The exporters leave the others out of the file, so this is what the file holds before
        BatchNorm is folded into the convolutions.
        """
        parameters = list(self.classifier.parameters())
        with torch.enable_grad():
            logits = self.classifier(self.example_input())
            gradients = torch.autograd.grad(logits.sum(), parameters, allow_unused=True)
        return sum(p.numel() for p, g in zip(parameters, gradients, strict=True) if g is not None)

    def description(self) -> str:
        """The JSON description stored in the exported file."""
        return json.dumps(
            {
                "input_name": INPUT_NAME,
                "output_name": OUTPUT_NAME,
                "input_shape": ["batch", *self.input_shape],
                "num_classes": self.num_classes,
                "normalization_mean": list(self.normalization_mean),
                "normalization_std": list(self.normalization_std),
                "aggregation": self.aggregation.value,
                "method": self.method,
            }
        )


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote."""

    path: Path
    format: ExportFormat
    aggregation: Aggregation
    size_bytes: int
    parameters: int

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready mapping of the fields."""
        return {
            "path": str(self.path),
            "format": self.format.value,
            "aggregation": self.aggregation.value,
            "size_bytes": self.size_bytes,
            "parameters": self.parameters,
        }


def load_edge_model(directory: Path, aggregation: Aggregation) -> EdgeModel:
    """The student saved in ``directory`` (by ``cdfkd train``) as an :class:`EdgeModel`.

    Args:
        directory: A student folder: ``student.json`` and safetensors weights.
        aggregation: Mean of headers, or the trained attention aggregator.

    Raises:
        CheckpointError: ``directory`` holds no readable student, or no attention aggregator
            although ``aggregation`` is attention.
    """
    directory = Path(directory)
    if not (directory / METADATA_FILE).is_file():
        raise CheckpointError(
            f"no student at {directory} (no {METADATA_FILE}): pass the 'student' folder inside "
            "the output folder of 'cdfkd train' or 'cdfkd demo'"
        )
    student, aggregator, config, infos = load_student(directory)
    if aggregation is Aggregation.ATTENTION and aggregator is None:
        raise CheckpointError(
            f"the student at {directory} has no trained attention aggregator ({AGGREGATOR_FILE}):"
            " export it with --aggregate mean"
        )
    if aggregator is not None:
        aggregator.eval()
    first = infos[0]
    space = student_image_space(directory)
    return EdgeModel(
        classifier=EdgeClassifier(
            student, aggregator if aggregation is Aggregation.ATTENTION else None
        ).eval(),
        aggregation=aggregation,
        method=config.method.value,
        input_shape=space.image_shape,
        num_classes=first.num_classes,
        normalization_mean=space.normalization.mean,
        normalization_std=space.normalization.std,
    )


def _temporary(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _result(model: EdgeModel, path: Path, export_format: ExportFormat) -> ExportResult:
    return ExportResult(
        path=path,
        format=export_format,
        aggregation=model.aggregation,
        size_bytes=path.stat().st_size,
        parameters=model.parameter_count(),
    )


def export_onnx(model: EdgeModel, path: Path) -> ExportResult:
    """Write ``model`` to ``path`` as one self-contained ONNX file (dynamic batch).

    Uses the torch.export-based exporter (``dynamo=True``, the maintained one; the TorchScript
    one is deprecated in torch 2.13), which folds BatchNorm into the convolutions. The per-node
    debugging metadata it adds (Python stack traces with local paths) is removed.
    """
    path = Path(path)
    with warnings.catch_warnings():
        # torch 2.13's exporter calls its own deprecated pytree API; nothing for a caller to do.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        program = torch.onnx.export(
            model.classifier,
            (model.example_input(),),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
            dynamo=True,
            verbose=False,
        )
    if program is None:  # only the deprecated exporter returns nothing
        raise RuntimeError("torch.onnx.export returned no ONNX program")
    for node in program.model.graph.all_nodes():
        node.metadata_props.clear()
    program.model.metadata_props[DESCRIPTION_KEY] = model.description()
    temporary = _temporary(path)
    program.save(temporary, external_data=False)
    os.replace(temporary, path)
    return _result(model, path, ExportFormat.ONNX)


def export_torchscript(model: EdgeModel, path: Path) -> ExportResult:
    """Write ``model`` to ``path`` as a frozen TorchScript archive (dynamic batch).

    Traced (the students have no data-dependent control flow), checked on a second batch
    size, then frozen: parameters become constants and BatchNorm is folded into the
    convolutions.
    """
    path = Path(path)
    example = model.example_input()
    other_batch = model.example_input(EXAMPLE_BATCH_SIZE + 1, seed=1)
    with torch.no_grad():
        traced = torch.jit.trace(model.classifier, (example,), check_inputs=[(other_batch,)])
        frozen = torch.jit.freeze(traced)
    temporary = _temporary(path)
    torch.jit.save(
        frozen, str(temporary), _extra_files={TORCHSCRIPT_DESCRIPTION_FILE: model.description()}
    )
    os.replace(temporary, path)
    return _result(model, path, ExportFormat.TORCHSCRIPT)


def export_student(
    directory: Path, export_format: ExportFormat, aggregation: Aggregation, path: Path
) -> ExportResult:
    """Export the student saved in ``directory`` to one ``export_format`` file at ``path``.

    Raises:
        CheckpointError: See :func:`load_edge_model`.
    """
    model = load_edge_model(directory, aggregation)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    match export_format:
        case ExportFormat.ONNX:
            return export_onnx(model, path)
        case ExportFormat.TORCHSCRIPT:
            return export_torchscript(model, path)
        case unknown:
            assert_never(unknown)
