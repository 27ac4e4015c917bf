"""Flower's deployment runtime on this machine: a SuperLink and one SuperNode per organization.

Each is its own process, on loopback, with TLS (the SuperLink serves its Fleet, Control and
Runtime APIs over HTTPS with a certificate the SuperNodes and ``flwr`` verify against the CA).
``flwr run`` then submits the Flower App of ``deploy/flower/app`` with the run's settings; the
ServerApp writes ``flower.json`` and ``aggregator.safetensors`` into ``out-dir``. On separate
machines the same three commands are run by each party (``deploy/flower/README.md``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from cdfkd.coordinator.errors import ConfigError, FlowerRunFailed
from cdfkd.coordinator.flower.server_app import SUMMARY_FILE
from cdfkd.coordinator.flower.settings import FederatedAttentionSettings, owner_node_configs

logger = logging.getLogger(__name__)

#: The Flower App (a FAB with no code: the components live in the installed cdfkd package).
APP_DIR = Path(__file__).resolve().parents[2] / "deploy" / "flower" / "app"
CONNECTION = "cdfkd"


@dataclass(frozen=True)
class FlowerTls:
    """The SuperLink's certificate and key, and the CA that SuperNodes and ``flwr`` trust."""

    ca: Path
    cert: Path
    key: Path


def _executable(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(found).exists():
        raise ConfigError(f"{name} not found: install cdfkd with ./install.sh (flwr 1.42)")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_listening(
    port: int, process: subprocess.Popen[bytes], log: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FlowerRunFailed(f"the SuperLink exited with {process.returncode}; see {log}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise FlowerRunFailed(f"the SuperLink did not listen on 127.0.0.1:{port} in {timeout_s:.0f} s")


class _Process:
    """A child process in its own session, logged to a file, stopped on exit."""

    def __init__(self, command: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        with log.open("ab") as handle:
            self.process = subprocess.Popen(
                command, stdout=handle, stderr=handle, env=env, start_new_session=True
            )

    def __enter__(self) -> subprocess.Popen[bytes]:
        return self.process

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()


def node_config(
    owner: int, settings: FederatedAttentionSettings, own: dict[str, Any] | None = None
) -> str:
    """A SuperNode's ``--node-config``: its owner index and its own paths (``own`` on top)."""
    entries: dict[str, Any] = {
        "partition-id": owner,
        "num-partitions": settings.num_owners,
        "student-dir": str(settings.student_dir),
    }
    if settings.data_path is not None:
        entries["data-path"] = str(settings.data_path)
    entries.update(own or {})
    return " ".join(f"{k}={json.dumps(v)}" for k, v in entries.items())


def run_local_deployment(
    settings: FederatedAttentionSettings,
    tls: FlowerTls,
    work_dir: Path,
    timeout_s: float = 900.0,
    app_dir: Path = APP_DIR,
    owner_data: Sequence[Path] = (),
) -> dict[str, Any]:
    """Start a SuperLink and ``num_owners`` SuperNodes, ``flwr run`` the app, stop them all.

    With ``settings.owner_files``, ``owner_data`` gives each organization's own ``data-path``
    (its SuperNode's ``--node-config``), in owner order.

    Returns:
        The ServerApp's summary (``flower.json``).

    Raises:
        ConfigError: the Flower App folder or Flower's executables are missing.
        FlowerRunFailed: a process failed or the run did not finish in ``timeout_s``.
    """
    own = owner_node_configs(settings, owner_data)
    if not (app_dir / "pyproject.toml").is_file():
        raise ConfigError(f"no Flower App at {app_dir} (expected deploy/flower/app of cdfkd)")
    work_dir = Path(work_dir).resolve()
    home = work_dir / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    summary_path = Path(settings.out_dir) / SUMMARY_FILE
    summary_path.unlink(missing_ok=True)
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"}
    port = _free_port()
    with ExitStack() as processes:
        superlink_log = work_dir / "superlink.log"
        superlink = processes.enter_context(
            _Process(
                [
                    _executable("flower-superlink"),
                    "--ssl-ca-certfile", str(tls.ca),
                    "--ssl-certfile", str(tls.cert),
                    "--ssl-keyfile", str(tls.key),
                    "--host", "127.0.0.1",
                    "--port", str(port),
                    "--database", str(work_dir / "superlink.db"),
                    "--disable-runtime-dependency-installation",
                ],
                superlink_log,
                env,
            )
        )  # fmt: skip
        _wait_listening(port, superlink, superlink_log, timeout_s=60)
        for owner in range(settings.num_owners):
            processes.enter_context(
                _Process(
                    [
                        _executable("flower-supernode"),
                        "--root-certificates", str(tls.ca),
                        "--superlink", f"127.0.0.1:{port}",
                        "--host", "127.0.0.1",
                        "--port", str(_free_port()),
                        "--node-config", node_config(owner, settings, own.get(owner)),
                    ],
                    work_dir / f"supernode-{owner}.log",
                    env,
                )
            )  # fmt: skip
        (home / "config.toml").write_text(
            tomli_w.dumps(
                {
                    "superlink": {
                        "default": CONNECTION,
                        CONNECTION: {
                            "address": f"127.0.0.1:{port}",
                            "root-certificates": str(tls.ca),
                        },
                    }
                }
            )
        )
        run_config = work_dir / "run-config.toml"
        run_config.write_text(tomli_w.dumps(settings.to_flat()))
        logger.info("flwr run %s on the SuperLink at 127.0.0.1:%d", app_dir, port)
        run_log = work_dir / "flwr-run.log"
        with run_log.open("ab") as handle:
            try:
                finished = subprocess.run(
                    [
                        _executable("flwr"), "run", str(app_dir), CONNECTION,
                        "--run-config", str(run_config), "--stream",
                    ],
                    stdout=handle,
                    stderr=handle,
                    env=env,
                    timeout=timeout_s,
                    check=False,
                )  # fmt: skip
            except subprocess.TimeoutExpired as error:
                raise FlowerRunFailed(
                    f"the Flower run did not finish in {timeout_s:.0f} s; see {run_log}"
                ) from error
        if finished.returncode != 0 or not summary_path.is_file():
            raise FlowerRunFailed(
                f"the Flower run failed (flwr exit {finished.returncode}); see {run_log}, "
                f"{superlink_log} and {work_dir}/supernode-*.log"
            )
    return json.loads(summary_path.read_text())
