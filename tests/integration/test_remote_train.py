"""`cdfkd train` with teachers given by address: real node processes over mutual TLS, on Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cdfkd.coordinator.cli import main
from tests.coordinator.test_cli import write_run_config


@pytest.mark.integration
def test_train_against_teacher_nodes(
    node_processes, dev_pki, digits_teachers, tmp_path: Path, capsys
) -> None:
    nodes = [node_processes(index) for index in range(3)]
    pki = dev_pki["trusted"]
    config = write_run_config(tmp_path / "run.toml", digits_teachers.packages)
    text = config.read_text()
    local = "".join(f'[[teachers]]\npackage = "{p}"\n' for p in digits_teachers.packages)
    remote = "".join(
        f'[[teachers]]\naddress = "{n.address}"\nca = "{pki.ca.cert}"\n'
        f'cert = "{pki.client.cert}"\nkey = "{pki.client.key}"\ndeadline_s = 30\n'
        for n in nodes
    )
    config.write_text(text.replace(local, remote))
    assert "address" in config.read_text()
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["iterations"] == 6
    assert summary["teacher_parameters"] == [None, None, None]
    assert len(summary["teacher_accuracies"]) == 3
    assert min(summary["teacher_accuracies"]) > 0.85
    assert "not disclosed" in (out / "report.md").read_text()


@pytest.mark.integration
def test_an_untrusted_identity_fails_naming_the_node(
    node_processes, dev_pki, digits_teachers, tmp_path: Path, caplog
) -> None:
    node = node_processes(0)
    foreign = dev_pki["foreign"]
    trusted = dev_pki["trusted"]
    config = write_run_config(tmp_path / "run.toml", digits_teachers.packages[:1])
    text = config.read_text().replace(
        f'[[teachers]]\npackage = "{digits_teachers.packages[0]}"\n',
        f'[[teachers]]\naddress = "{node.address}"\nca = "{trusted.ca.cert}"\n'
        f'cert = "{foreign.client.cert}"\nkey = "{foreign.client.key}"\nretries = 1\n'
        "deadline_s = 5\nbackoff_s = 0.05\n",
    )
    config.write_text(text)
    # A TLS refusal looks like an unreachable node to gRPC: exit 1 with a message naming it.
    assert (
        main(["train", "--in-process", "--config", str(config), "--out", str(tmp_path / "out")])
        == 1
    )
    assert f"teacher node {node.address}" in caplog.text
    assert "certificate is trusted" in caplog.text
