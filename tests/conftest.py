"""Shared fixtures: real teachers trained for seconds on scikit-learn's digits (shipped data)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cdfkd.student_node.teachers.local import InProcessTeacher
from cdfkd.teacher_node.datasets import DatasetName
from cdfkd.teacher_node.training import TeacherJob, train_teacher_package

torch.set_num_threads(2)


@dataclass(frozen=True)
class TeacherSet:
    """Teacher packages on disk and their in-process teachers."""

    packages: list[Path]

    def load(self) -> list[InProcessTeacher]:
        return [InProcessTeacher.from_package(path) for path in self.packages]


def _train(root: Path, jobs: list[TeacherJob]) -> TeacherSet:
    packages = []
    for job in jobs:
        directory = root / job.name
        train_teacher_package(job, directory)
        packages.append(directory)
    return TeacherSet(packages)


@pytest.fixture(scope="session")
def digits_teachers(tmp_path_factory: pytest.TempPathFactory) -> TeacherSet:
    """Three LeNet-5-BN teachers on disjoint thirds of the digits training split."""
    root = tmp_path_factory.mktemp("digits_teachers")
    jobs = [
        TeacherJob(
            name=f"owner-{i + 1}",
            dataset=DatasetName.DIGITS,
            shard=i,
            num_shards=3,
            epochs=15,
            batch_size=32,
            seed=i,
        )
        for i in range(3)
    ]
    return _train(root, jobs)


@pytest.fixture(scope="session")
def mixed_teachers(tmp_path_factory: pytest.TempPathFactory) -> TeacherSet:
    """A heterogeneous federation on digits: LeNet-5-BN and two different ResNets."""
    root = tmp_path_factory.mktemp("mixed_teachers")
    jobs = [
        TeacherJob(
            name="lenet",
            dataset=DatasetName.DIGITS,
            shard=0,
            num_shards=3,
            epochs=15,
            batch_size=32,
        ),
        TeacherJob(
            name="resnet-a",
            dataset=DatasetName.DIGITS,
            architecture="resnet",
            depth=1,
            width=8,
            shard=1,
            num_shards=3,
            epochs=8,
            batch_size=32,
            seed=1,
        ),
        TeacherJob(
            name="resnet-b",
            dataset=DatasetName.DIGITS,
            architecture="resnet",
            depth=2,
            width=6,
            shard=2,
            num_shards=3,
            epochs=8,
            batch_size=32,
            seed=2,
        ),
    ]
    return _train(root, jobs)


@pytest.fixture(scope="session")
def dev_pki(tmp_path_factory: pytest.TempPathFactory):
    """A development CA with server and client certificates, plus a foreign CA's client."""
    from cdfkd.teacher_node.pki import create_dev_pki

    root = tmp_path_factory.mktemp("pki")
    trusted = create_dev_pki(root / "trusted", client_names=("student", "other-student"))
    foreign = create_dev_pki(root / "foreign", client_names=("intruder",))
    return {"trusted": trusted, "foreign": foreign, "root": root}


def node_config(package: Path, pki, tmp: Path, *, insecure: bool = False, **sections):
    """A TeacherNodeConfig for ``package`` on 127.0.0.1:0 with the dev PKI's server identity."""
    from cdfkd.teacher_node.config import parse_teacher_config

    tls = (
        {"insecure": True}
        if insecure
        else {
            "cert": str(pki["trusted"].server.cert),
            "key": str(pki["trusted"].server.key),
            "client_ca": str(pki["trusted"].ca.cert),
        }
    )
    data = {
        "node": {"package": str(package), "address": "127.0.0.1:0", **sections.pop("node", {})},
        "tls": tls,
        **sections,
    }
    return parse_teacher_config(data, base=tmp)


def client_config(address: str, pki, *, identity: str = "trusted", insecure: bool = False, **extra):
    """A RemoteTeacherConfig with the trusted CA and a client identity of ``identity``'s PKI."""
    from cdfkd.student_node.teachers.remote import RemoteTeacherConfig

    if insecure:
        return RemoteTeacherConfig(address=address, insecure=True, **extra)
    return RemoteTeacherConfig(
        address=address,
        ca=pki["trusted"].ca.cert,
        cert=pki[identity].client.cert,
        key=pki[identity].client.key,
        **extra,
    )


@pytest.fixture
def inprocess_node(digits_teachers, dev_pki, tmp_path: Path):
    """A real gRPC teacher node with mTLS on 127.0.0.1:0, served from this process."""
    from cdfkd.teacher_node.server import build_server

    servers = []

    def start(index: int = 0, insecure: bool = False, **sections) -> str:
        config = node_config(
            digits_teachers.packages[index], dev_pki, tmp_path, insecure=insecure, **sections
        )
        server, port, _ = build_server(config)
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(grace=None).wait()


@dataclass
class NodeProcess:
    """A teacher node started through the CLI as a separate process."""

    process: object
    address: str
    config_path: Path


def start_node_process(config_toml: str, directory: Path, timeout: float = 60.0) -> NodeProcess:
    """Run ``cdfkd teacher serve`` on ``config_toml`` and wait for its address file."""
    import os
    import subprocess
    import sys
    import time

    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "teacher.toml"
    address_file = directory / "address"
    address_file.unlink(missing_ok=True)
    config_path.write_text(config_toml)
    env = {**os.environ, "CI": "true"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cdfkd.coordinator.cli",
            "teacher",
            "serve",
            "--config",
            str(config_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if address_file.exists():
            return NodeProcess(process, address_file.read_text().strip(), config_path)
        if process.poll() is not None:
            raise RuntimeError(f"teacher node exited: {process.stderr.read()}")
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("teacher node did not start in time")


def node_toml(
    package: Path, pki, directory: Path, *, insecure: bool = False, threads: int = 2
) -> str:
    """The teacher.toml text for a node process."""
    lines = [
        "[node]",
        f'package = "{package}"',
        'address = "127.0.0.1:0"',
        f'address_file = "{directory / "address"}"',
        f"threads = {threads}",
        "drain_seconds = 5",
        "[tls]",
    ]
    if insecure:
        lines.append("insecure = true")
    else:
        lines += [
            f'cert = "{pki["trusted"].server.cert}"',
            f'key = "{pki["trusted"].server.key}"',
            f'client_ca = "{pki["trusted"].ca.cert}"',
        ]
    return "\n".join(lines) + "\n"


@pytest.fixture
def node_processes(digits_teachers, dev_pki, tmp_path: Path):
    """Start teacher node processes through the CLI; all are stopped (SIGTERM, then kill) after."""
    started: list[NodeProcess] = []

    def start(index: int = 0, insecure: bool = False) -> NodeProcess:
        directory = tmp_path / f"node-{len(started)}"
        text = node_toml(digits_teachers.packages[index], dev_pki, directory, insecure=insecure)
        node = start_node_process(text, directory)
        started.append(node)
        return node

    yield start
    for node in started:
        process = node.process
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except Exception:  # noqa: BLE001
                process.kill()
                process.wait(timeout=15)
