"""Shared fixtures: real teachers trained for seconds on scikit-learn's digits (shipped data)."""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from cdfkd.student_node.teachers.local import InProcessTeacher
from cdfkd.teacher_node.datasets import DatasetName
from cdfkd.teacher_node.training import TeacherJob, train_teacher_package

torch.set_num_threads(2)
# Ray must never report usage statistics over the network from tests.
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"


@pytest.fixture(autouse=True)
def _two_torch_threads() -> None:
    """Every test starts with 2 intra-op threads: an in-process run (``run.threads``) sets the
    process-wide count and would otherwise leave it to the next test, whose in-process answers
    then differ in the last bits from a node's that runs with 2 (a GroupNorm backward, say)."""
    torch.set_num_threads(2)


#: Programs whose start makes a test slow (a node, a training run, Ray, Flower).
_HEAVY_PROGRAMS = ("cdfkd", "ray", "flwr", "flower-superlink", "flower-supernode")


def _heavy_command(args: object) -> bool:
    """Whether a command line starts a node, the CLI, Ray or Flower (``python -m cdfkd...``)."""
    words = [str(a) for a in args] if isinstance(args, list | tuple) else str(args).split()
    if not words:
        return False
    if os.path.basename(words[0]) in _HEAVY_PROGRAMS:
        return True
    modules = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "-m"]
    return any(m.split(".")[0] in ("cdfkd", "ray", "flwr") for m in modules)


@contextlib.contextmanager
def _refuse_heavy_work(item: pytest.Item) -> Iterator[None]:
    """Fail ``item`` if it (or a fixture it sets up) starts Ray, a process or a training run.

    ``python -m pytest -m "not slow"`` is the edit loop (README); it stays fast only if every
    heavy test says ``@pytest.mark.slow``. Flower's simulation starts Ray, so ``ray.init``
    covers it; node processes and ``cdfkd`` subprocesses go through ``subprocess.Popen``.
    """

    def refuse(what: str) -> None:
        pytest.fail(f"{item.nodeid} starts {what} but is not marked slow (@pytest.mark.slow)")

    original_popen_init = subprocess.Popen.__init__

    def popen_init(self: subprocess.Popen, args: object, *rest: object, **kwargs: object) -> None:
        if _heavy_command(args):
            refuse(f"the process {args!r}")
        original_popen_init(self, args, *rest, **kwargs)  # type: ignore[arg-type,call-overload]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "__init__", popen_init)
        for module_name, attribute in (
            ("ray", "init"),
            ("cdfkd.coordinator.training_run", "_distill"),
        ):
            module = importlib.import_module(module_name)
            what = f"{module_name}.{attribute}"
            patch.setattr(module, attribute, lambda *a, _what=what, **k: refuse(_what))
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """Guard the set-up of a test not marked slow (module and session fixtures included)."""
    if item.get_closest_marker("slow") is not None:
        return (yield)
    with _refuse_heavy_work(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Guard the body of a test not marked slow."""
    if item.get_closest_marker("slow") is not None:
        return (yield)
    with _refuse_heavy_work(item):
        return (yield)


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
    callers = ("student", "other-student", *(f"caller-{i}" for i in range(8)))
    trusted = create_dev_pki(root / "trusted", client_names=callers)
    foreign = create_dev_pki(root / "foreign", client_names=("intruder",))
    return {"trusted": trusted, "foreign": foreign, "root": root}


def node_config(
    package: Path,
    pki,
    tmp: Path,
    *,
    insecure: bool = False,
    client_ca: Path | None = None,
    **sections,
):
    """A TeacherNodeConfig for ``package`` on 127.0.0.1:0 with the dev PKI's server identity.

    ``client_ca`` replaces the dev CA as the bundle of client CAs.
    """
    from cdfkd.teacher_node.config import parse_teacher_config

    tls = (
        {"insecure": True}
        if insecure
        else {
            "cert": str(pki["trusted"].server.cert),
            "key": str(pki["trusted"].server.key),
            "client_ca": str(client_ca or pki["trusted"].ca.cert),
        }
    )
    # Deny by default: the node answers the dev PKI's student unless a test sets a policy.
    policy: dict[str, Any] = (
        {"allow_any_trusted_caller": True} if insecure else {"callers": {"student": {}}}
    )
    data = {
        "node": {"package": str(package), "address": "127.0.0.1:0", **sections.pop("node", {})},
        "tls": tls,
        "policy": sections.pop("policy", policy),
        **sections,
    }
    return parse_teacher_config(data, base=tmp)


def client_config(
    address: str, pki, *, identity: str = "trusted", insecure: bool = False, name: str = "", **extra
):
    """A RemoteTeacherConfig with the trusted CA and a client identity of ``identity``'s PKI.

    ``name`` picks another client certificate of that PKI (``client-<name>.pem``).
    """
    from cdfkd.student_node.teachers.remote import RemoteTeacherConfig

    if insecure:
        return RemoteTeacherConfig(address=address, insecure=True, **extra)
    cert, key = pki[identity].client.cert, pki[identity].client.key
    if name:
        cert = cert.with_name(f"client-{name}.pem")
        key = key.with_name(f"client-{name}.key")
    return RemoteTeacherConfig(
        address=address, ca=pki["trusted"].ca.cert, cert=cert, key=key, **extra
    )


@pytest.fixture
def inprocess_node(digits_teachers, dev_pki, tmp_path: Path):
    """A real gRPC teacher node with mTLS on 127.0.0.1:0, served from this process."""
    from cdfkd.teacher_node.server import build_server

    servers = []

    def start(
        index: int = 0,
        insecure: bool = False,
        clock=None,
        monotonic=None,
        client_ca: Path | None = None,
        **sections,
    ) -> str:
        config = node_config(
            digits_teachers.packages[index],
            dev_pki,
            tmp_path,
            insecure=insecure,
            client_ca=client_ca,
            **sections,
        )
        clocks = {"clock": clock, "monotonic": monotonic}
        server, port, _ = build_server(config, **{k: v for k, v in clocks.items() if v})
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(grace=None).wait()


@pytest.fixture
def node_processes(digits_teachers, dev_pki, tmp_path: Path):
    """Start teacher node processes through the CLI; all are stopped (SIGTERM, then kill) after."""
    from cdfkd.coordinator.nodes import TeacherNodeProcess

    started: list[TeacherNodeProcess] = []

    def start(index: int = 0, insecure: bool = False, threads: int = 2) -> TeacherNodeProcess:
        node = TeacherNodeProcess(
            digits_teachers.packages[index],
            tmp_path / f"node-{len(started)}",
            None if insecure else dev_pki["trusted"],
            threads=threads,
        )
        started.append(node)
        node.start()
        return node

    yield start
    for node in started:
        node.stop()


@dataclass(frozen=True)
class IdentityPki:
    """A client CA bundle of three CAs and client certificates that probe identity binding.

    ``bundle`` holds the dev PKI's CA (which issues ``student`` and the callers), a *rogue* CA
    with the very same subject name, and a second organization's CA. ``clients`` maps a name
    to (key PEM, certificate PEM): ``rogue-student`` and ``orgb-student`` (CN=student from the
    other CAs), ``spiffe-student`` and ``spiffe-other`` (SAN URI only, from the dev CA),
    ``two-cns`` (CN=student and CN=admin), ``no-name`` (no CN, no SAN), ``pinned`` (org B,
    CN=pinned-workload, its key's SPKI hash in ``pinned_spki``).
    """

    bundle: Path
    trusted_ca: Path
    clients: dict[str, tuple[bytes, bytes]]
    pinned_spki: str


@pytest.fixture(scope="session")
def identity_pki(dev_pki, tmp_path_factory: pytest.TempPathFactory) -> IdentityPki:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from cdfkd.teacher_node.identity import spki_sha256
    from cdfkd.teacher_node.pki import create_ca
    from tests.helpers import client_certificate, pem

    root = tmp_path_factory.mktemp("identity_pki")
    trusted = dev_pki["trusted"]
    ca_key = serialization.load_pem_private_key(trusted.ca.key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(trusted.ca.cert.read_bytes())
    rogue_key, rogue_cert = create_ca()  # the dev CA's default name
    orgb_key, orgb_cert = create_ca("org B CA")
    assert rogue_cert.subject == ca_cert.subject  # same name, another key
    clients = {
        "rogue-student": client_certificate(rogue_key, rogue_cert, common_names=("student",)),
        "orgb-student": client_certificate(orgb_key, orgb_cert, common_names=("student",)),
        "spiffe-student": client_certificate(ca_key, ca_cert, san_uris=("spiffe://org/student",)),
        "spiffe-other": client_certificate(ca_key, ca_cert, san_uris=("spiffe://org/other",)),
        "two-cns": client_certificate(ca_key, ca_cert, common_names=("student", "admin")),
        "no-name": client_certificate(ca_key, ca_cert),
        "pinned": client_certificate(orgb_key, orgb_cert, common_names=("pinned-workload",)),
    }
    bundle = root / "client-ca-bundle.pem"
    bundle.write_bytes(
        trusted.ca.cert.read_bytes()
        + rogue_cert.public_bytes(serialization.Encoding.PEM)
        + orgb_cert.public_bytes(serialization.Encoding.PEM)
    )
    return IdentityPki(
        bundle=bundle,
        trusted_ca=trusted.ca.cert,
        clients={name: pem(*pair) for name, pair in clients.items()},
        pinned_spki=spki_sha256(clients["pinned"][1]),
    )


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End the process with pytest's own status, skipping the interpreter's teardown.

    On an Intel Xeon machine (2026-12-03) the whole suite passed twice (506 tests) and the
    interpreter then crashed at exit (SIGSEGV, status 139), after every result was reported,
    with or without the one test that starts Ray in-process. A guess, not checked: the
    teardown of threads that Ray, gRPC and Flower leave in this process. Not yet diagnosed.
    ``CDFKD_TEST_TEARDOWN=1`` keeps the teardown, to look for the crash (with
    ``PYTHONFAULTHANDLER=1``, which prints every thread's stack at the fault). So run on an
    AMD EPYC machine (2026-12-07), the whole suite (506 tests) passed and exited 0: the crash
    did not come back there, so it is still not diagnosed, and the hook stays.
    """
    if _EXIT_STATUS and not os.environ.get("CDFKD_TEST_TEARDOWN"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
