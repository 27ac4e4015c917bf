"""A run submitted as a Ray job to a token-authenticated `ray start --head` cluster on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import packages, small_run, write_toml

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.slow]


def _recently_free_port() -> int:
    """A port free when this returns (bind to port 0, release); see its one use below."""
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
    # Port 0 for every port Ray would otherwise fix (GCS 6379, dashboard 8265, its agent
    # 52365, workers 10002-19999): each component binds a port the system picks and holds it;
    # the dashboard's is read back from what `ray start` prints. One exception: Ray always
    # starts its client server (grpc is installed) and refuses port 0 for it
    # ("ray_client_server_port must be an integer between 1024 and 65535"), so it gets a port
    # that was free a moment ago. Nothing here connects to it (jobs go through the dashboard)
    # and `ray start` does not wait for it: if another program took that port meanwhile, only
    # this unused server fails to start.
    # Ray's CLI of this interpreter (as the `ray` script of its environment would): the head's
    # workers then run this Python, whose cdfkd is the one under test.
    start = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head"]
    start += ["--node-ip-address", "127.0.0.1", "--port", "0"]
    start += ["--dashboard-host", "127.0.0.1", "--dashboard-port", "0"]
    start += ["--dashboard-agent-listen-port", "0"]
    start += ["--ray-client-server-port", str(_recently_free_port())]
    start += ["--min-worker-port", "0", "--max-worker-port", "0", "--include-dashboard", "true"]
    start += ["--num-cpus", "2", "--temp-dir", str(temp), "--disable-usage-stats"]
    try:
        started = subprocess.run(
            start, check=True, env=env, capture_output=True, text=True, timeout=180
        )
        found = re.search(r"http://127\.0\.0\.1:(\d+)", started.stdout + started.stderr)
        assert found, started.stdout[-3000:] + started.stderr[-3000:]
        dashboard = int(found.group(1))
        assert dashboard not in (0, 8265)
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
