"""`cdfkd demo` end to end on digits (the fast dataset): nodes, federation check, Ray, report;
and no process outlives it, also when it is interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

RAY_PROCESS_NAMES = ("raylet", "gcs_server", "ray::")


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command:
            found.append(f"{entry.name}: {command[:200]}")
    return found


def _ray_processes() -> list[str]:
    return [p for name in RAY_PROCESS_NAMES for p in _processes_mentioning(name)]


def _demo(out: Path) -> subprocess.Popen[str]:
    # A session of its own, so that the test can send Ctrl-C to the whole process group as a
    # terminal does.
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cdfkd.coordinator.cli",
            "demo",
            "--quick",
            "--dataset",
            "digits",
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "CI": "true"},
        start_new_session=True,
    )


def test_demo_runs_the_whole_system_and_leaves_nothing_behind(tmp_path: Path) -> None:
    before = set(_ray_processes())
    out = tmp_path / "demo"
    process = _demo(out)
    stdout, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(stdout) == summary
    for key in (
        "teacher_accuracies",
        "teacher_ensemble_accuracy",
        "student_accuracy_mean",
        "student_accuracy_attention",
        "student_parameters",
        "train_seconds",
        "teacher_nodes",
        "rpc_calls",
        "wire_bytes",
    ):
        assert key in summary, key
    assert len(summary["teacher_nodes"]) == 3
    assert all(a.startswith("127.0.0.1:") for a in summary["teacher_nodes"])
    # Per teacher: GetMetadata + 25 iterations x 5 epochs x (5 student + 2 generator) calls,
    # then evaluation (the digits test split in batches of 500) -- at least the training calls.
    assert summary["rpc_calls"] >= 3 * 125 * 7
    assert summary["wire_bytes"] > summary["rpc_calls"] * 1000
    assert summary["student_accuracy_mean"] > 0.5
    assert (out / "report.md").is_file()
    assert "federation check" in stderr
    # Flower: the attention trained by FedAvg on the owners' samples, evaluated per owner.
    federated = summary["federated"]
    assert [o["owner"] for o in federated["owners"]] == [0, 1, 2]
    assert federated["accuracy_mean"] == pytest.approx(summary["student_accuracy_mean"], abs=1e-9)
    assert federated["accuracy_attention"] > 0.5
    assert (out / "student" / "aggregator.safetensors").read_bytes() == (
        out / "flower" / "aggregator.safetensors"
    ).read_bytes()
    assert not _processes_mentioning(str(out))
    assert set(_ray_processes()) <= before

    # Idempotent: a second run reuses the teachers and the finished checkpoint.
    again = _demo(out)
    stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 0, stderr[-4000:]
    assert "reusing teacher package" in stderr
    assert json.loads(stdout)["iterations"] == summary["iterations"]


def test_ctrl_c_stops_everything_and_exits_130(tmp_path: Path) -> None:
    before = set(_ray_processes())
    out = tmp_path / "demo"
    process = _demo(out)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        checkpoints = out / "checkpoints"
        if checkpoints.exists() and any(
            p.name != "checkpoint-00000000.pt" for p in checkpoints.iterdir()
        ):
            break
        if process.poll() is not None:
            break
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-4000:]
    time.sleep(2)
    assert not _processes_mentioning(str(out)), stderr[-2000:]
    assert set(_ray_processes()) <= before
