"""The cdfkd command, called in-process through main(argv) and as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cdfkd.coordinator.cli import main
from cdfkd.coordinator.errors import ExitCode
from cdfkd.teacher_node.package import read_metadata
from tests.helpers import owned_process, small_run, wait_until, write_toml
from tests.helpers import packages as package_entries


def test_help_lists_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in ("teacher", "train", "evaluate", "demo"):
        assert command in text
    assert main(["teacher", "--help"]) == 0
    assert "train" in capsys.readouterr().out


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert main(["train"]) == ExitCode.USAGE
    assert main(["nonsense"]) == ExitCode.USAGE
    assert main(["train", "--config", str(tmp_path / "missing.toml")]) == ExitCode.USAGE
    bad = tmp_path / "bad.toml"
    bad.write_text('[[teachers]]\npackage = "x"\n[train]\nepochz = 3\n')
    assert main(["train", "--config", str(bad)]) == ExitCode.USAGE


def test_missing_dataset_exits_2_naming_the_package(tmp_path: Path, caplog) -> None:
    code = main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--data-path", str(tmp_path)])
    assert code == ExitCode.USAGE
    assert "dataset-fashion-mnist" in caplog.text


def test_teacher_train_writes_a_package(tmp_path: Path, capsys) -> None:
    out = tmp_path / "owner"
    code = main(
        [
            "teacher",
            "train",
            "--dataset",
            "digits",
            "--out",
            str(out),
            "--shard",
            "1",
            "--num-shards",
            "3",
            "--epochs",
            "2",
            "--batch-size",
            "32",
        ]
    )
    assert code == 0
    metadata = read_metadata(out)
    assert metadata.name == "owner"
    assert metadata.train_samples == 449
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == metadata.test_accuracy
    assert main(["teacher", "train", "--out", str(out), "--shard", "3", "--num-shards", "3"]) == 2


def write_run_config(path: Path, packages: list[Path], **train: object) -> Path:
    """A small digits run over local ``packages``, with ``train`` settings on top."""
    return write_toml(
        path,
        small_run(package_entries(packages), train, checkpoint_every=2, eval_every=2, log_every=1),
    )


@pytest.mark.integration
@pytest.mark.slow
def test_train_writes_every_output_then_resume_and_evaluate(
    digits_teachers, tmp_path: Path, capsys
) -> None:
    config = write_run_config(tmp_path / "run.toml", digits_teachers.packages)
    out = tmp_path / "out"
    assert main(["train", "--in-process", "--config", str(config), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["iterations"] == 6
    for name in (
        "metrics.jsonl",
        "config.json",
        "report.md",
        "accuracy.png",
        "losses.png",
        "samples.png",
        "result.json",
        "student/student.safetensors",
        "student/aggregator.safetensors",
        "student/student.json",
    ):
        assert (out / name).is_file(), name
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["type"] == "iteration"] == [1, 2, 3, 4, 5, 6]
    assert [r["iteration"] for r in records if r["type"] == "eval"] == [2, 4, 6]
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "checkpoint-00000006.pt"
    report = (out / "report.md").read_text()
    assert "mean of headers" in report
    assert "attention" in report

    # Same folder without --resume: refused, nothing overwritten.
    assert (
        main(["train", "--in-process", "--config", str(config), "--out", str(out)])
        == ExitCode.USAGE
    )
    # Longer run resumes from iteration 6.
    longer = write_run_config(tmp_path / "longer.toml", digits_teachers.packages, epochs=3)
    capsys.readouterr()
    assert (
        main(["train", "--in-process", "--config", str(longer), "--out", str(out), "--resume"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["iterations"] == 9
    # Math change on resume: refused.
    other = write_run_config(tmp_path / "other.toml", digits_teachers.packages, batch_size=16)
    assert (
        main(["train", "--in-process", "--config", str(other), "--out", str(out), "--resume"])
        == ExitCode.USAGE
    )

    assert main(["evaluate", "--run", str(out)]) == 0
    evaluation = json.loads(capsys.readouterr().out)
    assert evaluation["student_accuracy_mean"] == pytest.approx(
        json.loads((out / "result.json").read_text())["student_accuracy_mean"]
    )
    assert main(["evaluate", "--run", str(tmp_path)]) == ExitCode.USAGE


@pytest.mark.integration
@pytest.mark.slow
def test_diverging_run_stops_with_a_clear_error_and_a_good_checkpoint(
    digits_teachers, tmp_path: Path, caplog
) -> None:
    config = write_run_config(
        tmp_path / "run.toml",
        digits_teachers.packages,
        epochs=20,
        optimizer={"student_lr": 10.0},
        weights={"header": 1e20},
    )
    out = tmp_path / "out"
    assert (
        main(["train", "--in-process", "--config", str(config), "--out", str(out)])
        == ExitCode.FAILURE
    )
    assert "not finite" in caplog.text
    assert "last good checkpoint" in caplog.text
    import torch

    from cdfkd.student_node.checkpoint import latest_checkpoint

    payload = torch.load(latest_checkpoint(out / "checkpoints"), weights_only=True)
    assert all(
        torch.isfinite(v).all() for v in payload["student"].values() if v.is_floating_point()
    )
    # The checkpoint is the state after the last iteration that completed.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    completed = [r["iteration"] for r in records if r["type"] == "iteration"]
    assert payload["iteration"] == (completed[-1] if completed else 0)
    assert f"checkpoint-{payload['iteration']:08d}.pt" in caplog.text


@pytest.mark.integration
@pytest.mark.slow
def test_ctrl_c_checkpoints_and_exits_130(digits_teachers, tmp_path: Path) -> None:
    config = write_run_config(tmp_path / "run.toml", digits_teachers.packages, epochs=10000)
    out = tmp_path / "out"
    env = {**os.environ, "CI": "true"}
    command = [sys.executable, "-m", "cdfkd.coordinator.cli", "train"]
    command += ["--config", str(config), "--out", str(out)]

    def trained_an_iteration() -> bool:
        checkpoints = out / "checkpoints"
        found = list(checkpoints.glob("checkpoint-*.pt")) if checkpoints.exists() else []
        return any(p.name != "checkpoint-00000000.pt" for p in found)

    # Its own session: whatever it started (Ray included) is killed if the test fails.
    with owned_process(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as process:
        assert wait_until(trained_an_iteration, timeout_s=300, poll_s=0.2)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == ExitCode.INTERRUPTED, stderr
    assert "resume with --resume" in stderr
    summary = json.loads(stdout)
    latest = sorted((out / "checkpoints").glob("checkpoint-*.pt"))[-1]
    assert latest.name == f"checkpoint-{summary['iterations']:08d}.pt"
