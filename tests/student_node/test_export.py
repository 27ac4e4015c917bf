"""Edge export: ONNX (run by onnxruntime) and TorchScript files against the PyTorch student."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from cdfkd.coordinator.cli import main
from cdfkd.coordinator.errors import ExitCode
from cdfkd.student_node.artifact import load_student, save_student
from cdfkd.student_node.config import Method, StudentConfig, TrainConfig
from cdfkd.student_node.evaluate import header_logits
from cdfkd.student_node.export import (
    TORCHSCRIPT_DESCRIPTION_FILE,
    Aggregation,
    ExportFormat,
    export_student,
    load_edge_model,
)
from cdfkd.student_node.models.aggregator import AttentionAggregator
from cdfkd.student_node.teachers.protocol import TeacherInfo
from cdfkd.student_node.trainer import build_student
from cdfkd.teacher_node.datasets import Normalization, Split, load_digits_dataset

TOLERANCE = 1e-4
#: Digits as the demo's teachers see them: 1x16x16, normalized.
NORMALIZATION = Normalization(mean=(0.3,), std=(0.4,))
INFOS = [
    TeacherInfo(
        name=f"owner-{index + 1}",
        input_shape=(1, 16, 16),
        num_classes=10,
        feature_dim=84,
        normalization_mean=NORMALIZATION.mean,
        normalization_std=NORMALIZATION.std,
    )
    for index in range(3)
]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _save_random_student(directory: Path, method: Method, attention: bool) -> Path:
    """A student with random weights and BatchNorm statistics, saved by the real save path."""
    config = TrainConfig(method=method, student=StudentConfig(widths=(8, 16, 16)))
    torch.manual_seed(0)
    student = build_student(config, INFOS)
    student.train()
    with torch.no_grad():  # non-trivial running statistics, so folding BatchNorm is exercised
        for _ in range(3):
            student(torch.randn(16, 1, 16, 16) * 1.5 + 0.2)
    aggregator = None
    if attention:
        aggregator = AttentionAggregator(INFOS[0].num_classes)
        with torch.no_grad():  # header weights that differ clearly from the mean's 1/N
            aggregator.score.weight.mul_(5.0)
    save_student(directory, student.eval(), aggregator, config, INFOS)
    return directory


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_random_student(
        tmp_path_factory.mktemp("student"), Method.CDFKD_MFS, attention=True
    )


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Five normalized digits: a batch size other than the export's."""
    test = load_digits_dataset(Split.TEST)
    return NORMALIZATION.apply(test.images[:5])


def _reference(student_dir: Path, aggregation: Aggregation, images: torch.Tensor) -> np.ndarray:
    """Logits as ``cdfkd evaluate`` combines them (student_node.evaluate)."""
    student, aggregator, _, _ = load_student(student_dir)
    logits = header_logits(student, images)
    if aggregation is Aggregation.MEAN:
        return logits.mean(dim=0).numpy()
    assert aggregator is not None
    with torch.no_grad():
        return aggregator.eval()(logits).numpy()


def _assert_close(exported: np.ndarray, reference: np.ndarray) -> None:
    assert exported.shape == reference.shape
    assert np.abs(exported - reference).max() <= TOLERANCE


def _run_onnx(path: Path, images: torch.Tensor) -> np.ndarray:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.numpy()})[0]


def _run_torchscript(path: Path, images: torch.Tensor) -> np.ndarray:
    module = torch.jit.load(str(path))
    with torch.no_grad():
        return module(images).numpy()


def test_the_two_aggregations_differ(student_dir: Path, images: torch.Tensor) -> None:
    mean = _reference(student_dir, Aggregation.MEAN, images)
    attention = _reference(student_dir, Aggregation.ATTENTION, images)
    assert np.abs(mean - attention).max() > 10 * TOLERANCE


@pytest.mark.slow
def test_onnx_mean_matches_the_student(
    student_dir: Path, images: torch.Tensor, tmp_path: Path
) -> None:
    result = export_student(student_dir, ExportFormat.ONNX, Aggregation.MEAN, tmp_path / "s.onnx")
    assert result.size_bytes == (tmp_path / "s.onnx").stat().st_size
    assert not list(tmp_path.glob("*.tmp"))
    for batch in (images, images[:1]):  # the export's example batch has 2 images
        _assert_close(
            _run_onnx(result.path, batch), _reference(student_dir, Aggregation.MEAN, batch)
        )


@pytest.mark.slow
def test_cli_exports_onnx_with_attention(
    student_dir: Path, images: torch.Tensor, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "edge" / "student.onnx"
    code = main(
        [
            "export",
            "--student",
            str(student_dir),
            "--format",
            "onnx",
            "--aggregate",
            "attention",
            "--out",
            str(out),
        ]
    )
    assert code == ExitCode.OK
    printed = json.loads(capsys.readouterr().out)
    assert printed["path"] == str(out)
    assert printed["size_bytes"] == out.stat().st_size
    assert (
        printed["parameters"]
        == load_edge_model(student_dir, Aggregation.ATTENTION).parameter_count()
    )
    _assert_close(_run_onnx(out, images), _reference(student_dir, Aggregation.ATTENTION, images))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    description = json.loads(session.get_modelmeta().custom_metadata_map["cdfkd"])
    assert description["aggregation"] == "attention"
    assert description["input_shape"] == ["batch", 1, 16, 16]
    assert description["normalization_std"] == [0.4]
    data = out.read_bytes()
    assert b"stack_trace" not in data
    assert b"site-packages" not in data


@pytest.mark.parametrize("aggregation", list(Aggregation))
def test_torchscript_matches_the_student(
    student_dir: Path, images: torch.Tensor, tmp_path: Path, aggregation: Aggregation
) -> None:
    path = tmp_path / "student.pt"
    export_student(student_dir, ExportFormat.TORCHSCRIPT, aggregation, path)
    for batch in (images, images[:1]):
        _assert_close(_run_torchscript(path, batch), _reference(student_dir, aggregation, batch))
    extra = {TORCHSCRIPT_DESCRIPTION_FILE: ""}
    torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra[TORCHSCRIPT_DESCRIPTION_FILE])["aggregation"] == aggregation.value


@pytest.mark.parametrize("method", [Method.CDFKD, Method.DFAD])
def test_torchscript_exports_the_other_student_kinds(
    method: Method, images: torch.Tensor, tmp_path: Path
) -> None:
    directory = _save_random_student(tmp_path / "student", method, attention=False)
    path = tmp_path / "student.pt"
    export_student(directory, ExportFormat.TORCHSCRIPT, Aggregation.MEAN, path)
    _assert_close(_run_torchscript(path, images), _reference(directory, Aggregation.MEAN, images))


def test_parameter_count_leaves_out_the_training_only_projections(student_dir: Path) -> None:
    student, aggregator, _, _ = load_student(student_dir)
    assert aggregator is not None
    used = sum(
        p.numel() for name, p in student.named_parameters() if not name.startswith("projections")
    )
    assert load_edge_model(student_dir, Aggregation.MEAN).parameter_count() == used
    assert load_edge_model(student_dir, Aggregation.ATTENTION).parameter_count() == used + sum(
        p.numel() for p in aggregator.parameters()
    )


def test_attention_without_an_aggregator_exits_2(tmp_path: Path, caplog) -> None:
    directory = _save_random_student(tmp_path / "student", Method.CDFKD_MFS, attention=False)
    out = tmp_path / "student.onnx"
    arguments = ["export", "--student", str(directory), "--format", "onnx", "--out", str(out)]
    assert main([*arguments, "--aggregate", "attention"]) == ExitCode.USAGE
    assert "no trained attention aggregator" in caplog.text
    assert "--aggregate mean" in caplog.text
    assert not out.exists()


def test_missing_student_exits_2(tmp_path: Path, caplog) -> None:
    out = tmp_path / "student.pt"
    missing = tmp_path / "nowhere"
    code = main(["export", "--student", str(missing), "--format", "torchscript", "--out", str(out)])
    assert code == ExitCode.USAGE
    assert f"no student at {missing}" in caplog.text
    assert not out.exists()


def test_bad_format_or_aggregation_is_a_usage_error(student_dir: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "student.bin")
    base = ["export", "--student", str(student_dir), "--out", out]
    assert main([*base, "--format", "tflite"]) == ExitCode.USAGE
    assert main([*base, "--format", "onnx", "--aggregate", "median"]) == ExitCode.USAGE
    assert main(["export", "--student", str(student_dir), "--format", "onnx"]) == ExitCode.USAGE
