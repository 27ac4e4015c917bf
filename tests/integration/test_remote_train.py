"""`cdfkd train` with teachers given by address: real node processes over mutual TLS, on Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cdfkd.coordinator.cli import main
from tests.helpers import small_run, write_toml


@pytest.mark.integration
@pytest.mark.slow
def test_train_against_teacher_nodes(
    node_processes, dev_pki, digits_teachers, tmp_path: Path, capsys
) -> None:
    nodes = [node_processes(index) for index in range(3)]
    pki = dev_pki["trusted"]
    remote = [
        {
            "address": n.address,
            "ca": pki.ca.cert,
            "cert": pki.client.cert,
            "key": pki.client.key,
            "deadline_s": 30,
        }
        for n in nodes
    ]
    config = write_toml(tmp_path / "run.toml", small_run(remote))
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["iterations"] == 6
    assert summary["teacher_parameters"] == [None, None, None]
    assert len(summary["teacher_accuracies"]) == 3
    assert min(summary["teacher_accuracies"]) > 0.85
    assert "not disclosed" in (out / "report.md").read_text()


@pytest.mark.integration
@pytest.mark.slow
def test_an_untrusted_identity_fails_naming_the_node(
    node_processes, dev_pki, digits_teachers, tmp_path: Path, caplog
) -> None:
    node = node_processes(0)
    foreign = dev_pki["foreign"]
    trusted = dev_pki["trusted"]
    entry = {
        "address": node.address,
        "ca": trusted.ca.cert,
        "cert": foreign.client.cert,
        "key": foreign.client.key,
        "retries": 1,
        "deadline_s": 5,
        "backoff_s": 0.05,
    }
    config = write_toml(tmp_path / "run.toml", small_run([entry]))
    # A TLS refusal looks like an unreachable node to gRPC: exit 1 with a message naming it.
    assert (
        main(["train", "--in-process", "--config", str(config), "--out", str(tmp_path / "out")])
        == 1
    )
    assert f"teacher node {node.address}" in caplog.text
    assert "certificate is trusted" in caplog.text
