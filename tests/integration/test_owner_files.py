"""Owners' own image files end to end, and a student side that reads no real data at all.

Two owners train ResNet teachers on shards of an RGB image folder of drawn shapes written here
with Pillow (``cdfkd teacher train --data``); ``cdfkd train`` distills them once with no
``[data]`` table (data-free: no accuracy, no attention) and once with the image folder; the
data-free student is evaluated against image folders and ``.npz`` files and then gets its
attention module from a Flower simulation in which each organization reads its own files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cdfkd.coordinator.cli import main
from cdfkd.coordinator.errors import ExitCode
from cdfkd.student_node.artifact import load_student, student_image_space
from cdfkd.student_node.evaluate import evaluate_student
from cdfkd.student_node.models.aggregator import AttentionAggregator
from cdfkd.teacher_node.data_sources import load_train_and_test
from cdfkd.teacher_node.package import read_metadata
from tests.helpers import SMALL_TRAIN, write_toml
from tests.image_data import shape_arrays, write_shape_folder, write_shape_splits

pytestmark = [pytest.mark.integration, pytest.mark.slow]

IMAGE_SIZE = 24
TRAIN = {**SMALL_TRAIN, "batch_size": 16, "attention": {"samples": 12, "epochs": 10}}


class Federation:
    """Files and teacher packages shared by the tests of this module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.shapes = write_shape_splits(root / "shapes", 40, 15, IMAGE_SIZE, seed=0)
        self.packages: list[Path] = []

    def run_config(self, name: str, data: dict[str, Any] | None, **train: Any) -> Path:
        config: dict[str, Any] = {
            "teachers": [{"package": str(p)} for p in self.packages],
            "train": {**TRAIN, **train},
            "run": {"device": "cpu", "threads": 2, "eval_every": 2, "checkpoint_every": 3},
        }
        if data is not None:
            config["data"] = data
        return write_toml(self.root / name, config)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    """Two owners' ResNet teachers, each trained on its shard of the shapes image folder."""
    federation = Federation(tmp_path_factory.mktemp("owner-files"))
    for shard in range(2):
        out = federation.root / f"teacher-{shard}"
        code = main(
            [
                "teacher", "train", "--data", str(federation.shapes), "--out", str(out),
                "--architecture", "resnet", "--width", "8", "--shard", str(shard),
                "--num-shards", "2", "--epochs", "12", "--batch-size", "16", "--seed", str(shard),
            ]
        )  # fmt: skip
        assert code == ExitCode.OK
        federation.packages.append(out)
    return federation


@pytest.fixture(scope="module")
def data_free_run(federation: Federation) -> Path:
    """A ``cdfkd train`` output folder of a run config without a ``[data]`` table."""
    config = federation.run_config("data-free.toml", None)
    out = federation.root / "data-free"
    assert main(["train", "--in-process", "--config", str(config), "--out", str(out)]) == 0
    return out


def test_teacher_train_reads_the_image_folder(federation: Federation) -> None:
    for package in federation.packages:
        metadata = read_metadata(package)
        assert metadata.spec.input_shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert metadata.spec.num_classes == 3
        assert metadata.train_samples == 60  # half of 3 classes x 40 images
        assert len(metadata.normalization.mean) == 3
        assert metadata.test_accuracy > 0.5  # three classes: chance is 1/3


def test_a_run_without_data_reads_none_and_reports_no_accuracy(data_free_run: Path) -> None:
    result = json.loads((data_free_run / "result.json").read_text())
    assert result["iterations"] == 6
    assert result["data"] is None
    for key in (
        "teacher_accuracies",
        "teacher_ensemble_accuracy",
        "student_header_accuracies",
        "student_accuracy_mean",
        "student_accuracy_attention",
    ):
        assert key in result, key
        assert result[key] is None, key
    assert result["attention_samples"] == 0
    assert not (data_free_run / "student" / "aggregator.safetensors").exists()
    assert (data_free_run / "student" / "student.safetensors").is_file()
    assert not (data_free_run / "accuracy.png").exists()
    report = (data_free_run / "report.md").read_text()
    assert "Data-free run" in report
    assert "cdfkd flower run" in report
    assert "accuracy.png" not in report
    assert "%" not in report
    records = [
        json.loads(line) for line in (data_free_run / "metrics.jsonl").read_text().splitlines()
    ]
    assert not [r for r in records if r["type"] == "eval"]
    final = [r for r in records if r["type"] == "final"]
    assert final[-1]["accuracy_mean"] is None
    assert "data" not in json.loads((data_free_run / "config.json").read_text())


def test_evaluate_a_data_free_run_on_folders_and_npz(
    data_free_run: Path, federation: Federation, capsys, caplog
) -> None:
    run = str(data_free_run)
    assert main(["evaluate", "--run", run]) == ExitCode.USAGE
    assert "trained without real data" in caplog.text
    assert "--data PATH" in caplog.text
    capsys.readouterr()

    def evaluate(*data: str) -> dict[str, Any]:
        assert main(["evaluate", "--run", run, *data]) == 0
        return json.loads(capsys.readouterr().out)

    by_splits = evaluate("--data", str(federation.shapes))  # its test split
    by_folder = evaluate("--data", str(federation.shapes / "test"))
    assert by_splits["test_samples"] == by_folder["test_samples"] == 45
    assert by_splits["student_accuracy_mean"] == by_folder["student_accuracy_mean"]
    assert by_splits["student_accuracy_attention"] is None  # no attention module yet
    # The same test images as an .npz, uint8 (N, H, W, C): the same accuracy.
    _, test = load_train_and_test(federation.shapes)
    pixels = (test.images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(federation.root / "test.npz", images=pixels, labels=test.labels.numpy())
    by_npz = evaluate("--data", str(federation.root / "test.npz"))
    assert by_npz["student_header_accuracies"] == by_splits["student_header_accuracies"]
    # Images of another size are brought to the student's 24x24 (bilinear), not refused.
    larger = write_shape_folder(federation.root / "larger", 5, size=48, seed=7)
    assert evaluate("--data", str(larger))["test_samples"] == 15
    # Grayscale images for an RGB student: refused, naming both channel counts.
    gray = federation.root / "gray"
    for name in ("circle", "cross", "square"):
        (gray / name).mkdir(parents=True)
        Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 80).save(gray / name / "a.png")
    caplog.clear()
    assert main(["evaluate", "--run", run, "--data", str(gray)]) == ExitCode.USAGE
    assert "1-channel images, but the student takes 3 channels" in caplog.text
    assert main(["evaluate", "--run", run, "--data", str(gray / "nope")]) == ExitCode.USAGE
    assert "nope: no such file or folder" in caplog.text
    assert "Traceback" not in caplog.text


def test_train_with_an_image_folder_as_data(federation: Federation, capsys) -> None:
    config = federation.run_config("with-files.toml", {"files": "shapes", "eval_samples": 30})
    out = federation.root / "with-files"
    assert main(["train", "--in-process", "--config", str(config), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["data"] == str(federation.shapes)  # relative to the config file
    assert 0.0 <= summary["student_accuracy_mean"] <= 1.0
    assert summary["student_accuracy_attention"] is not None
    assert summary["attention_samples"] == 12
    assert len(summary["teacher_accuracies"]) == 2
    assert (out / "student" / "aggregator.safetensors").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["type"] == "eval"] == [2, 4, 6]
    assert "Test data:" in (out / "report.md").read_text()
    # cdfkd evaluate reads the run's own files again, and agrees.
    assert main(["evaluate", "--run", str(out)]) == 0
    evaluation = json.loads(capsys.readouterr().out)
    assert evaluation["test_samples"] == 45
    assert evaluation["student_accuracy_mean"] == pytest.approx(summary["student_accuracy_mean"])
    assert evaluation["student_accuracy_attention"] == pytest.approx(
        summary["student_accuracy_attention"]
    )


def test_config_and_teacher_refusals(federation: Federation, tmp_path: Path, caplog) -> None:
    out = str(tmp_path / "out")
    kd_real = federation.run_config("kd-real.toml", None, method="kd_real")
    assert main(["train", "--in-process", "--config", str(kd_real), "--out", out]) == 2
    assert "'data': train.method = 'kd_real'" in caplog.text
    both = federation.run_config("both.toml", {"files": "shapes", "dataset": "digits"})
    assert main(["train", "--in-process", "--config", str(both), "--out", out]) == 2
    assert "'data': Value error, give data.files" in caplog.text
    missing = federation.run_config("missing.toml", {"files": "no-such-folder"})
    assert main(["train", "--in-process", "--config", str(missing), "--out", out]) == 2
    assert "no-such-folder: no such file or folder" in caplog.text
    teacher = ["teacher", "train", "--out", str(tmp_path / "t"), "--epochs", "1"]
    assert main([*teacher, "--data", str(federation.shapes), "--dataset", "digits"]) == 2
    assert "not both" in caplog.text
    npz = tmp_path / "one.npz"
    images, labels = shape_arrays(2, 16)
    np.savez(npz, images=images, labels=labels)
    assert main([*teacher, "--data", str(npz)]) == 2
    assert "one set of images" in caplog.text
    assert not (tmp_path / "t").exists()
    assert "Traceback" not in caplog.text


def _owner_folders(root: Path) -> tuple[Path, Path]:
    """Alice's image folder and Bob's train.npz/test.npz: other drawings than the teachers'."""
    alice = write_shape_splits(root / "alice", 8, 6, IMAGE_SIZE, seed=11)
    bob = root / "bob"
    bob.mkdir()
    for split, per_class, seed in (("train", 8, 21), ("test", 4, 22)):
        images, labels = shape_arrays(per_class, 40, seed)  # 40x40: resized for the student's 24x24
        np.savez(bob / f"{split}.npz", images=images, labels=labels)
    return alice, bob


def test_flower_run_refuses_bad_owner_data(data_free_run: Path, tmp_path: Path, caplog) -> None:
    alice, bob = _owner_folders(tmp_path)
    flower = ["flower", "run", "--student", str(data_free_run / "student")]
    flower += ["--out", str(tmp_path / "flower")]
    cases = [
        (["--owner-data", str(alice)], "expected NAME=PATH"),
        (["--owner-data", f"a={alice}", "--owner-data", f"a={bob}"], "'a' is given twice"),
        (["--owner-data", f"a={alice}", "--partition", "dirichlet"], "--partition"),
        (["--owner-data", f"a={alice}", "--owners", "3"], "--owners 3 but 1 --owner-data"),
        (["--owner-data", f"a={alice / 'train'}"], "holds one set of images"),
        (["--owner-data", f"a={tmp_path / 'none'}"], "none: no such file or folder"),
    ]
    for arguments, message in cases:
        caplog.clear()
        assert main([*flower, *arguments]) == ExitCode.USAGE, arguments
        assert message in caplog.text, (arguments, caplog.text)
    bad = tmp_path / "bad"
    bad.mkdir()
    np.savez(bad / "train.npz", images=np.zeros((3, 8, 8, 3), np.uint8), labels=np.array([0, 1, 7]))
    np.savez(bad / "test.npz", images=np.zeros((3, 8, 8, 3), np.uint8), labels=np.array([0, 1, 2]))
    assert main([*flower, "--owner-data", f"a={bad}"]) == ExitCode.USAGE
    assert "train.npz: label 7 is out of range for a model of 3 classes" in caplog.text
    assert not (tmp_path / "flower" / "flower.json").exists()
    assert "Traceback" not in caplog.text


@pytest.mark.flower
@pytest.mark.timeout(900)
def test_flower_owners_read_their_own_files(data_free_run: Path, tmp_path: Path, capsys) -> None:
    alice, bob = _owner_folders(tmp_path)
    out = tmp_path / "flower"
    student = data_free_run / "student"
    arguments = [
        "flower", "run", "--student", str(student), "--out", str(out),
        "--owner-data", f"alice={alice}", "--owner-data", f"bob={bob}",
        "--samples-per-owner", "9", "--rounds", "2", "--local-epochs", "5",
    ]  # fmt: skip
    assert main(arguments) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == json.loads((out / "flower.json").read_text())
    assert [(o["name"], o["test_samples"]) for o in summary["owners"]] == [
        ("alice", 18),
        ("bob", 12),
    ]
    assert summary["settings"]["owner_files"] is True
    assert summary["settings"]["data_path"] is None  # the owners' paths stay with them

    # Each organization evaluated on its own files: recompute centrally from the same files.
    model, _, _, infos = load_student(student)
    space = student_image_space(student)
    aggregator = AttentionAggregator(infos[0].num_classes)
    aggregator.load_state_dict(load_file(str(out / "aggregator.safetensors")))
    for owner, path in zip(summary["owners"], (alice, bob), strict=True):
        _, test = load_train_and_test(path)
        central = evaluate_student(
            model, space.prepare(test.images, str(path)), test.labels, aggregator
        )
        assert owner["accuracy_mean"] == pytest.approx(central.mean, abs=1e-9)
        assert owner["accuracy_attention"] == pytest.approx(central.attention, abs=1e-9)
