"""A run submitted as a Ray job to a `ray start --head` cluster on loopback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.helpers import packages, small_run, write_toml

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ray_job_submit_runs_the_distillation(digits_teachers, tmp_path: Path) -> None:
    if shutil.which("ray") is None:
        pytest.skip("the ray CLI comes with ray[default] (installed by install.sh)")
    port, dashboard = _free_port(), _free_port()
    # Unix socket paths are limited to ~107 bytes: keep Ray's temp dir short.
    temp = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "CI": "true"}
    env.pop("RAY_ADDRESS", None)
    start = [
        "ray",
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(port),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--include-dashboard",
        "true",
        "--num-cpus",
        "2",
        "--temp-dir",
        str(temp),
        "--disable-usage-stats",
    ]
    subprocess.run(start, check=True, env=env, capture_output=True, timeout=180)
    try:
        job_dir = tmp_path / "job"
        job_dir.mkdir()
        config = write_toml(
            job_dir / "run.toml", small_run(packages(digits_teachers.packages), cpus=1)
        )
        out = tmp_path / "out"
        result = subprocess.run(
            [
                "bash",
                str(ROOT / "deploy" / "ray" / "submit.sh"),
                f"http://127.0.0.1:{dashboard}",
                str(config),
                str(out),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "succeeded" in (result.stdout + result.stderr).lower()
        summary = json.loads((out / "result.json").read_text())
        assert summary["iterations"] == 6
        assert (out / "student" / "student.safetensors").is_file()
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
