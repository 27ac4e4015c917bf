"""`cdfkd federation check` against real teacher node processes."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from cdfkd.coordinator.cli import main
from cdfkd.coordinator.errors import ExitCode
from cdfkd.coordinator.nodes import TeacherNodeProcess
from tests.helpers import untrained_lenet_package


def _entry(address: str, pki, identity) -> str:
    return (
        f'[[teachers]]\naddress = "{address}"\nca = "{pki.ca.cert}"\n'
        f'cert = "{identity.client.cert}"\nkey = "{identity.client.key}"\n'
    )


@pytest.mark.integration
@pytest.mark.slow
def test_a_good_federation_passes(node_processes, dev_pki, tmp_path: Path, capsys) -> None:
    trusted = dev_pki["trusted"]
    nodes = [node_processes(i) for i in range(3)]
    config = tmp_path / "run.toml"
    config.write_text("".join(_entry(n.address, trusted, trusted) for n in nodes))
    assert main(["federation", "check", "--config", str(config)]) == ExitCode.OK
    table = capsys.readouterr().out
    for index, node in enumerate(nodes):
        assert node.address in table
        assert f"owner-{index + 1}" in table
    assert table.count(" ok") == 3
    assert "SERVING" in table


@pytest.mark.integration
@pytest.mark.slow
def test_each_failing_node_is_named_with_its_reason(
    node_processes, dev_pki, digits_teachers, tmp_path: Path, capsys, caplog
) -> None:
    trusted, foreign = dev_pki["trusted"], dev_pki["foreign"]
    good = node_processes(0)
    tls_refused = node_processes(1)
    other = untrained_lenet_package(tmp_path / "five-classes", name="five", num_classes=5)
    incompatible = TeacherNodeProcess(other, tmp_path / "n5", trusted)
    incompatible.start()
    # A port this test holds (bound on port 0, never listening): connections to it are refused,
    # and no other program can take it while the check runs.
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    unreachable = f"127.0.0.1:{held.getsockname()[1]}"
    try:
        config = tmp_path / "run.toml"
        config.write_text(
            _entry(good.address, trusted, trusted)
            + _entry(tls_refused.address, trusted, foreign)
            + _entry(incompatible.address, trusted, trusted)
            + _entry(unreachable, trusted, trusted)
        )
        assert main(["federation", "check", "--config", str(config), "--timeout", "3"]) == (
            ExitCode.FEDERATION
        )
    finally:
        incompatible.stop()
        held.close()
    table = capsys.readouterr().out
    lines = {line.split()[0]: line for line in table.splitlines()[1:]}
    assert lines[good.address].endswith("ok")
    assert "TLS" in lines[tls_refused.address]
    assert "incompatible label space" in lines[incompatible.address]
    # Another normalization is no longer a problem: the run image space bridges it.
    assert "normalization" not in lines[incompatible.address]
    assert "unreachable" in lines[unreachable]
    for address in (tls_refused.address, incompatible.address, unreachable):
        assert f"teacher {address}" in caplog.text
