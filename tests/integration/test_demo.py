"""`cdfkd demo` end to end on digits (the fast dataset): nodes, federation check, Ray, report;
and no process outlives it, also when it is interrupted."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import owned_process, session_members, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]


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


def _left_behind(process: subprocess.Popen[str], out: Path) -> list[str]:
    """What the demo started and is still running: its teacher nodes (each in a session of its
    own, their configs under ``out``) and anything in the demo's session (its Ray and Flower
    processes change only their process group). Other programs' Ray is none of its business."""
    return [*_processes_mentioning(str(out)), *map(str, session_members(process.pid))]


@contextlib.contextmanager
def _demo(out: Path) -> Iterator[subprocess.Popen[str]]:
    # A session of its own, so that the test can send Ctrl-C to the whole process group as a
    # terminal does, and kill whatever is left of it if the test fails.
    command = [sys.executable, "-m", "cdfkd.coordinator.cli", "demo", "--quick"]
    command += ["--dataset", "digits", "--out", str(out)]
    with owned_process(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "CI": "true"},
    ) as process:
        yield process


def test_demo_runs_the_whole_system_and_leaves_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    with _demo(out) as process:
        stdout, stderr = process.communicate(timeout=900)
        # Its children are stopped before it exits; allow them a moment to be reaped.
        wait_until(lambda: not _left_behind(process, out), timeout_s=60)
        left = _left_behind(process, out)
    assert process.returncode == 0, stderr[-4000:]
    assert not left, left
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

    # Idempotent: a second run reuses the teachers and the finished checkpoint.
    with _demo(out) as again:
        stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 0, stderr[-4000:]
    assert "reusing teacher package" in stderr
    assert json.loads(stdout)["iterations"] == summary["iterations"]


def test_ctrl_c_stops_everything_and_exits_130(tmp_path: Path) -> None:
    out = tmp_path / "demo"

    def trained_an_iteration() -> bool:
        checkpoints = out / "checkpoints"
        return checkpoints.exists() and any(
            p.name != "checkpoint-00000000.pt" for p in checkpoints.iterdir()
        )

    with _demo(out) as process:
        wait_until(lambda: trained_an_iteration() or process.poll() is not None, timeout_s=600)
        os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        stdout, stderr = process.communicate(timeout=300)
        # Stopped means gone: wait (bounded) until nothing it started runs any more.
        wait_until(lambda: not _left_behind(process, out), timeout_s=60)
        left = _left_behind(process, out)
    assert process.returncode == 130, stderr[-4000:]
    assert not left, (left, stderr[-2000:])
