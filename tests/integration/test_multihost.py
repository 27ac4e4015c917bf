"""Three teacher hosts on a private network: mutual TLS by address, a link cut mid-run.

Each teacher node runs in its own Linux network namespace with its own address, joined to this
machine by a veth pair (bench/netns.py); the student trains on this machine and reaches the
nodes only over those links. Each node's certificate has its address as its only SAN. Cutting
a link (``ip link set LINK down``) must be handled by the fault-tolerance rules: a short outage
is waited for and the run continues; one past ``outage_timeout_s`` checkpoints, names the node
and exits 1, and ``--resume`` continues once the link is back. Every namespace, link, route and
process is removed again, also on failure; no packet leaves this machine.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench.netns import NamespaceError, VirtualHost, VirtualHosts, unavailable_reason
from bench.tcp_proxy import Link, RecordingProxy
from cdfkd.coordinator.cli import main
from cdfkd.coordinator.config import parse_run_config
from cdfkd.coordinator.errors import ExitCode
from cdfkd.coordinator.nodes import TeacherNodeProcess
from cdfkd.coordinator.training_run import run_training
from cdfkd.student_node.checkpoint import list_checkpoints
from cdfkd.student_node.errors import TeacherUnavailable
from cdfkd.student_node.teachers.remote import RemoteTeacher, RemoteTeacherConfig
from cdfkd.teacher_node.pki import DevPki, Identity, create_ca, issue
from tests.coordinator.test_ray_driver import same, student_weights
from tests.helpers import packages, run_when, small_run, wait_until, write_toml

# Generous: the first test's set-up also trains the session's digits teachers when this module
# runs alone; each test itself takes under a minute on two cores.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

EPOCHS = 2  # 6 iterations of the small digits run
ITERATIONS = 3 * EPOCHS
#: gRPC honours proxy variables for non-loopback addresses; traffic must stay on the links.
PROXY_VARIABLES = ("grpc_proxy", "https_proxy", "http_proxy", "HTTPS_PROXY", "HTTP_PROXY")


@dataclass(frozen=True)
class Federation:
    """Three teacher nodes, each on its own virtual host."""

    network: VirtualHosts
    hosts: list[VirtualHost]
    nodes: list[TeacherNodeProcess]
    pki: list[DevPki]
    root: Path


def _write(directory: Path, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate):
    key_path, cert_path = directory / f"{stem}.key", directory / f"{stem}.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Identity(cert_path, key_path)


def _federation_pki(directory: Path, addresses: list[str]) -> list[DevPki]:
    """One CA; per node a server certificate whose only SAN is its address; one student."""
    directory.mkdir(parents=True)
    ca_key, ca_cert = create_ca()
    ca = _write(directory, "ca", ca_key, ca_cert)
    student = _write(directory, "student", *issue(ca_key, ca_cert, "student", client=True))
    return [
        DevPki(
            ca=ca,
            server=_write(
                directory,
                f"node-{index}",
                *issue(ca_key, ca_cert, f"teacher-node-{index}", server_names=(address,)),
            ),
            client=student,
        )
        for index, address in enumerate(addresses)
    ]


@pytest.fixture(scope="module")
def federation(digits_teachers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"multi-host test needs network namespaces: {reason}")
    network = VirtualHosts(3)
    try:
        hosts = network.create()
    except NamespaceError as error:
        pytest.skip(f"multi-host test needs network namespaces: {error}")
    nodes: list[TeacherNodeProcess] = []
    try:
        root = tmp_path_factory.mktemp("multihost")
        pki = _federation_pki(root / "pki", [host.address for host in hosts])
        for index, host in enumerate(hosts):
            directory = root / f"node-{index}"
            nodes.append(
                TeacherNodeProcess(
                    digits_teachers.packages[index],
                    directory,
                    pki[index],
                    address=f"{host.address}:0",
                    threads=1,
                    extra=f'[audit]\npath = "{directory / "audit.jsonl"}"\n',
                    command_prefix=host.exec_prefix(),
                )
            )
        with ThreadPoolExecutor(len(nodes)) as pool:
            list(pool.map(lambda node: node.start(), nodes))
        yield Federation(network, hosts, nodes, pki, root)
    finally:
        for node in nodes:
            node.stop(grace_s=5)
        network.close()


@pytest.fixture(autouse=True)
def _links_up_and_no_proxy(request, monkeypatch) -> Iterator[None]:
    for variable in PROXY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    yield
    if "federation" in request.fixturenames:
        federation: Federation = request.getfixturevalue("federation")
        for host in federation.hosts:
            federation.network.link_up(host)


@pytest.fixture(scope="module")
def reference(digits_teachers, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same run with in-process teachers: what every remote run must equal exactly."""
    out = tmp_path_factory.mktemp("reference") / "run"
    config = parse_run_config(small_run(packages(digits_teachers.packages), {"epochs": EPOCHS}))
    summary = run_training(config, out).summary()
    return {"summary": summary, "weights": student_weights(out)}


def _entries(federation: Federation, **remote: object) -> list[dict[str, Any]]:
    return [
        {
            "address": node.address,
            "ca": pki.ca.cert,
            "cert": pki.client.cert,
            "key": pki.client.key,
            "backoff_s": 0.1,
            "max_backoff_s": 0.5,
            **remote,
        }
        for node, pki in zip(federation.nodes, federation.pki, strict=True)
    ]


class _RetryWatch(logging.Handler):
    """Counts the retried calls to ``address`` the student logs, with how long each had been
    failing by the student's own clock; ``seen`` is set at the first."""

    def __init__(self, address: str) -> None:
        super().__init__()
        self.address = address
        self.seen = threading.Event()
        self.failing_for: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if f"teacher node {self.address}:" in message and "retrying" in message:
            found = re.search(r"failing for (\d+) s", message)
            self.failing_for.append(float(found.group(1)) if found else float("nan"))
            self.seen.set()

    @property
    def retries(self) -> int:
        return len(self.failing_for)


def _train(config: Path, out: Path, *flags: str) -> int:
    return main(["train", "--in-process", "--config", str(config), "--out", str(out), *flags])


def _after_iterations(out: Path, count: int, action: Callable[[], None]) -> threading.Thread:
    """Run ``action`` in a thread once ``out/metrics.jsonl`` records ``count`` iterations."""
    metrics = out / "metrics.jsonl"

    def reached() -> bool:
        return metrics.exists() and metrics.read_text().count('"type": "iteration"') >= count

    return run_when(reached, action, timeout_s=120, poll_s=0.02)


def test_a_run_across_three_hosts_with_mutual_tls(
    federation: Federation, reference, tmp_path: Path, capsys
) -> None:
    for node, host, pki in zip(federation.nodes, federation.hosts, federation.pki, strict=True):
        assert node.address.rpartition(":")[0] == host.address
        cert = x509.load_pem_x509_certificate(pki.server.cert.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(host.address)]
        assert names.get_values_for_type(x509.DNSName) == []
    config = write_toml(tmp_path / "run.toml", small_run(_entries(federation), {"epochs": EPOCHS}))
    out = tmp_path / "out"
    assert _train(config, out) == ExitCode.OK
    summary = json.loads(capsys.readouterr().out)
    assert summary["iterations"] == ITERATIONS
    assert not summary["stopped_early"]
    assert min(summary["teacher_accuracies"]) > 0.85
    assert 0.0 <= summary["student_accuracy_mean"] <= 1.0
    # Remote over the links computes exactly what in-process teachers compute.
    assert summary["teacher_accuracies"] == reference["summary"]["teacher_accuracies"]
    assert summary["student_accuracy_mean"] == reference["summary"]["student_accuracy_mean"]
    assert same(student_weights(out), reference["weights"])
    # Each node saw the student's verified identity on its own link.
    for node in federation.nodes:
        records = [json.loads(line) for line in (node.directory / "audit.jsonl").open()]
        assert records
        assert {record["caller"] for record in records} == {"student"}


def test_a_node_certificate_for_another_address_is_refused(federation: Federation) -> None:
    pki = federation.pki[1]
    impostor = RemoteTeacherConfig(
        address=federation.nodes[1].address,
        ca=pki.ca.cert,
        cert=pki.client.cert,
        key=pki.client.key,
        server_name=federation.hosts[0].address,  # expect node 0's certificate there
        retries=0,
        deadline_s=5,
    )
    with pytest.raises(TeacherUnavailable, match=federation.nodes[1].address):
        RemoteTeacher(impostor)
    with RemoteTeacher(impostor.model_copy(update={"server_name": None})) as teacher:
        assert teacher.info().num_classes == 10  # the same node, checked against its own address


def test_a_link_cut_briefly_is_waited_for_and_the_run_continues(
    federation: Federation, reference, tmp_path: Path, caplog
) -> None:
    victim, node = federation.hosts[1], federation.nodes[1]
    entries = _entries(federation, deadline_s=2, outage_timeout_s=60)
    config = write_toml(tmp_path / "run.toml", small_run(entries, {"epochs": EPOCHS}))
    out = tmp_path / "out"
    retried = _RetryWatch(node.address)
    cut: list[bool] = []

    def cut_briefly() -> None:
        federation.network.link_down(victim)
        cut.append(True)
        # On busy cores the student may not call this node for seconds: keep the link down
        # until the student has retried twice (observed, bounded), well within its
        # outage_timeout_s, then bring it back.
        wait_until(lambda: retried.retries >= 2, timeout_s=60)
        federation.network.link_up(victim)

    watcher = _after_iterations(out, 2, cut_briefly)
    remote_logger = logging.getLogger(RemoteTeacher.__module__)
    remote_logger.addHandler(retried)
    try:
        assert _train(config, out) == ExitCode.OK
    finally:
        remote_logger.removeHandler(retried)
        watcher.join(timeout=60)
    assert cut, "the link was never cut"
    assert retried.retries >= 2
    result = json.loads((out / "result.json").read_text())
    assert result["iterations"] == ITERATIONS
    assert not result["stopped_early"]
    assert f"teacher node {node.address}" in caplog.text
    assert f"teacher node {node.address} answers again" in caplog.text
    # Retried calls are idempotent: the outage changes nothing in the result.
    assert same(student_weights(out), reference["weights"])


def test_a_link_cut_past_the_timeout_checkpoints_names_the_node_and_resumes(
    federation: Federation, reference, tmp_path: Path, caplog
) -> None:
    victim, node = federation.hosts[2], federation.nodes[2]
    entries = _entries(federation, deadline_s=2, outage_timeout_s=4)
    run = small_run(entries, {"epochs": EPOCHS}, checkpoint_every=1000)
    config = write_toml(tmp_path / "run.toml", run)
    out = tmp_path / "out"
    cut: list[bool] = []
    retried = _RetryWatch(node.address)

    def cut_for_good() -> None:
        federation.network.link_down(victim)
        cut.append(True)

    watcher = _after_iterations(out, 2, cut_for_good)
    remote_logger = logging.getLogger(RemoteTeacher.__module__)
    remote_logger.addHandler(retried)
    try:
        assert _train(config, out) == ExitCode.FAILURE
    finally:
        remote_logger.removeHandler(retried)
        watcher.join(timeout=10)
    assert cut, "the link was never cut"
    # The student saw the outage, retried, and gave up once its own clock said the node had
    # been failing for outage_timeout_s (4 s), not after gRPC's minutes of reconnecting: every
    # retry it logged was within that time, and there were only a few (deadline 2 s each).
    assert retried.retries >= 1
    assert max(retried.failing_for) <= 4, retried.failing_for
    assert retried.retries <= 4 / 0.1, retried.failing_for
    assert f"teacher node {node.address} (" in caplog.text
    assert "did not answer" in caplog.text
    assert f"teacher node {node.address}" in caplog.text
    assert "the last good checkpoint is" in caplog.text
    saved = list_checkpoints(out / "checkpoints")[-1]
    assert int(saved.stem.split("-")[1]) >= 2  # the last completed iteration was saved
    assert not (out / "result.json").exists()

    federation.network.link_up(victim)
    assert _train(config, out, "--resume") == ExitCode.OK
    result = json.loads((out / "result.json").read_text())
    assert result["iterations"] == ITERATIONS
    assert same(student_weights(out), reference["weights"])
    assert torch.isfinite(torch.tensor(result["student_accuracy_mean"]))


def test_an_emulated_wan_link_in_front_of_a_host(federation: Federation) -> None:
    """bench/tcp_proxy.py's WAN link in the multi-host setup: the proxy on this machine forwards
    to a node's namespace address; TLS still checks that address (``server_name``)."""
    host, node, pki = federation.hosts[0], federation.nodes[0], federation.pki[0]
    link = Link.wan(round_trip_ms=50, mbit_per_s=100)
    upstream = (host.address, int(node.address.rpartition(":")[2]))
    files = {"ca": pki.ca.cert, "cert": pki.client.cert, "key": pki.client.key}
    images = torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with (
        RecordingProxy(upstream, keep=False, link=link) as proxy,
        RemoteTeacher(RemoteTeacherConfig(address=node.address, **files)) as direct,
        RemoteTeacher(
            RemoteTeacherConfig(address=proxy.address, server_name=host.address, **files)
        ) as far,
    ):
        expected = direct.query(images, bn_loss=False)
        seconds = []
        for _ in range(4):
            sent = far.bytes_sent
            started = time.monotonic()
            answer = far.query(images, bn_loss=False)
            seconds.append(time.monotonic() - started)
            request = far.bytes_sent - sent
        assert torch.equal(answer.logits, expected.logits)
        assert torch.equal(answer.features, expected.features)
        assert proxy.to_server > 4 * request  # it all went through the link
    # A query cannot be faster than the round trip plus its request at the link's rate.
    assert min(seconds) >= 2 * link.delay_s + request / link.rate_bytes_per_s  # type: ignore[operator]
