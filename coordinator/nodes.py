"""Teacher node processes (``cdfkd teacher serve``) started and stopped by the coordinator.

Used by ``cdfkd demo``, the benchmarks and the tests. Every process is stopped on exit (SIGTERM,
then SIGKILL after a grace period), so no node outlives the run that started it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.x509.oid import NameOID

from cdfkd.teacher_node.pki import DevPki

logger = logging.getLogger(__name__)


def teacher_toml(
    package: Path,
    address_file: Path,
    pki: DevPki | None,
    *,
    address: str = "127.0.0.1:0",
    threads: int | None = None,
    extra: str = "",
    policy: str | None = None,
) -> str:
    """The ``teacher.toml`` text of a node: mutual TLS with ``pki``, or plaintext when None.

    ``policy`` is the TOML of its ``[policy]`` tables; by default the node answers the PKI's
    client identity (``pki.client``, CN ``student`` from ``cdfkd pki dev``) in full mode, and a
    plaintext node answers every caller (``allow_any_trusted_caller``; tests, benchmarks).
    """
    lines = [
        "[node]",
        f'package = "{package}"',
        f'address = "{address}"',
        f'address_file = "{address_file}"',
        "drain_seconds = 5",
    ]
    if threads is not None:
        lines.append(f"threads = {threads}")
    lines.append("[tls]")
    if pki is None:
        lines.append("insecure = true")
    else:
        lines += [
            f'cert = "{pki.server.cert}"',
            f'key = "{pki.server.key}"',
            f'client_ca = "{pki.ca.cert}"',
        ]
    if policy is None:
        policy = default_policy(pki)
    return "\n".join(lines) + "\n" + policy + extra


def default_policy(pki: DevPki | None) -> str:
    """``[policy]`` TOML answering ``pki``'s client identity (full mode), or, in plaintext, all."""
    if pki is None:
        return "[policy]\nallow_any_trusted_caller = true\n"
    certificate = x509.load_pem_x509_certificate(pki.client.cert.read_bytes())
    (name,) = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return f'[policy.callers.{json.dumps(str(name.value))}]\nmode = "full"\n'


class TeacherNodeProcess:
    """One ``cdfkd teacher serve`` process; a context manager that stops it on exit.

    Args:
        package: The teacher package to serve.
        directory: Where its ``teacher.toml``, address file and log go.
        pki: Mutual TLS identities; None serves plaintext (tests, benchmarks).
        address: Listen address; port 0 picks a free port.
        threads: torch threads of the node.
        extra: More TOML appended to the config (limits, choices, audit).
        policy: The ``[policy]`` TOML; by default :func:`default_policy`.
        command_prefix: Run the node under this command, e.g. ``["ip", "netns", "exec", NS]``
            to serve from another network namespace; it must exec the node, not fork it, so
            that stopping this process stops the node.
    """

    def __init__(
        self,
        package: Path,
        directory: Path,
        pki: DevPki | None,
        *,
        address: str = "127.0.0.1:0",
        threads: int | None = None,
        extra: str = "",
        command_prefix: Sequence[str] = (),
        policy: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.address_file = self.directory / "address"
        self.config_path = self.directory / "teacher.toml"
        self.log_path = self.directory / "node.log"
        self.config_path.write_text(
            teacher_toml(
                Path(package),
                self.address_file,
                pki,
                address=address,
                threads=threads,
                extra=extra,
                policy=policy,
            )
        )
        self.command_prefix = list(command_prefix)
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""

    def start(self, timeout_s: float = 60.0) -> str:
        """Start the process and wait until it listens; returns its address."""
        self.address_file.unlink(missing_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                *self.command_prefix,
                sys.executable,
                "-m",
                "cdfkd.coordinator.cli",
                "teacher",
                "serve",
                "--config",
                str(self.config_path),
            ],
            stdout=log,
            stderr=log,
            env={**os.environ, "CI": "true"},
            # Its own session: a terminal's Ctrl-C reaches the coordinator, which finishes the
            # iteration (still needing its teachers) and then stops the nodes itself.
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while not self.address_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"teacher node {self.directory.name} exited with {self.process.returncode}; "
                    f"see {self.log_path}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"teacher node {self.directory.name} did not start in time")
            time.sleep(0.05)
        self.address = self.address_file.read_text().strip()
        return self.address

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM (the node drains), then SIGKILL after ``grace_s``; returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.terminate()
        try:
            return self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            logger.warning("teacher node %s did not drain in time: killing it", self.directory.name)
            return self.kill()

    def kill(self) -> int | None:
        """SIGKILL, then reap."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.kill()
        return self.process.wait(timeout=30)

    def __enter__(self) -> TeacherNodeProcess:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
