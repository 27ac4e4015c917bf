"""A run submitted as a Ray job to a token-authenticated `ray start --head` cluster on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import packages, small_run, write_toml

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _http_status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _stop_processes_under(temp: Path, grace_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL, the Ray processes this test started (their command lines name
    its own temp dir); never other Ray clusters on the machine (no `ray stop`)."""

    def mine() -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(temp).encode() in command:
                pids.append(int(entry.name))
        return pids

    for pid in mine():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while mine() and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in mine():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(900)  # the session's teacher fixtures and a Ray cluster on 2 shared cores
def test_ray_job_submit_runs_the_distillation(digits_teachers, dev_pki, tmp_path: Path) -> None:
    if shutil.which("ray") is None:
        pytest.skip("the ray CLI comes with ray[default] (installed by install.sh)")
    port, dashboard = _free_port(), _free_port()
    # Unix socket paths are limited to ~107 bytes: keep Ray's temp dir short.
    temp = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
    # Token authentication as in deploy/ray/README.md; the token file is this test's own, so
    # nothing of the machine's ~/.ray is read or written.
    token = secrets.token_hex(32)
    token_file = temp / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "CI": "true",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
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
        # The job's working dir sits beside a private key: it must not reach the cluster.
        (job_dir / "pki").mkdir()
        shutil.copy(dev_pki["trusted"].client.key, job_dir / "pki" / "client.key")
        jobs_api = f"http://127.0.0.1:{dashboard}/api/jobs/"
        assert _http_status(jobs_api) == 401  # no token: the job API runs nothing
        assert _http_status(jobs_api, token="0" * 64) == 403  # a wrong token neither
        assert _http_status(jobs_api, token=token) == 200
        out = tmp_path / "out"
        no_token = {**env, "RAY_AUTH_TOKEN_PATH": str(temp / "missing"), "HOME": str(temp)}
        refused = subprocess.run(
            [
                "bash",
                str(ROOT / "deploy" / "ray" / "submit.sh"),
                f"http://127.0.0.1:{dashboard}",
                str(config),
                str(out),
            ],
            env=no_token,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert refused.returncode != 0
        assert not (out / "result.json").exists()
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
        # What the cluster received as the job's working dir: the config, not the key.
        unpacked = [p for p in temp.rglob("runtime_resources/working_dir_files/*/*") if p.is_file()]
        assert any(p.name == "run.toml" for p in unpacked)
        assert not any(b"PRIVATE KEY" in p.read_bytes() for p in unpacked)
    finally:
        _stop_processes_under(temp)
        shutil.rmtree(temp, ignore_errors=True)
