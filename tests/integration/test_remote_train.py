"""`cdfkd train` with teachers given by address: real node processes over mutual TLS, on Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cdfkd.coordinator.cli import main
from cdfkd.coordinator.errors import ExitCode
from cdfkd.coordinator.nodes import TeacherNodeProcess
from cdfkd.student_node.checkpoint import list_checkpoints
from cdfkd.student_node.teachers.remote import RemoteTeacher
from tests.conftest import client_config
from tests.helpers import owned_process, small_run, write_toml


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


@pytest.mark.integration
@pytest.mark.slow
def test_a_full_run_against_no_features_and_logits_only_nodes(
    inprocess_node, dev_pki, tmp_path: Path, capsys
) -> None:
    """Owners who share less: one node in full mode, one ``no_features``, one ``logits_only``.

    Real gRPC servers with mutual TLS on 127.0.0.1:0 (in this process) and their audit logs;
    the run must ask each node only for what its mode allows (a refusal would end it with
    exit 4) and get the black-box node's input gradient by zeroth-order queries.
    """
    modes = ["full", "no_features", "logits_only"]
    audits = [tmp_path / f"audit-{mode}.jsonl" for mode in modes]
    addresses = [
        inprocess_node(
            index,
            policy={"callers": {"student": {"mode": mode}}},
            audit={"path": str(audit)},
        )
        for index, (mode, audit) in enumerate(zip(modes, audits, strict=True))
    ]
    pki = dev_pki["trusted"]
    remote = [
        {"address": a, "ca": pki.ca.cert, "cert": pki.client.cert, "key": pki.client.key}
        for a in addresses
    ]
    config = write_toml(tmp_path / "run.toml", small_run(remote))
    out = tmp_path / "out"
    assert main(["train", "--in-process", "--config", str(config), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "result.json").read_text())
    assert printed == summary
    assert summary["method"] == "cdfkd_mfs"
    assert summary["iterations"] == 6
    assert summary["stopped_early"] is False
    assert min(summary["teacher_accuracies"]) > 0.85  # logits come from every mode
    assert len(summary["student_header_accuracies"]) == 3
    assert summary["student_accuracy_attention"] is not None
    assert summary["attention_samples"] == 30
    assert [t["address"] for t in summary["teacher_traffic"]] == addresses
    assert summary["rpc_retries"] == 0
    assert summary["rpc_calls"] == sum(t["rpc_calls"] for t in summary["teacher_traffic"])
    # Per iteration the black-box node gets 2 + 1 batches and (8 directions + 1) x 32 probes,
    # the others 2 + 1 batches and one VJP request: 384 against about 128 images (measured
    # 2.25x the bytes, evaluation and metadata included).
    sent = [t["bytes_sent"] for t in summary["teacher_traffic"]]
    assert sent[2] > 2 * max(sent[0], sent[1]), sent

    records = [[json.loads(line) for line in audit.read_text().splitlines()] for audit in audits]
    for mode, node_records in zip(modes, records, strict=True):
        assert {r["decision"] for r in node_records} == {"allowed"}, mode
        assert {r["mode"] for r in node_records} == {mode}
    input_grads = [[r for r in node if r["rpc"] == "InputGrad"] for node in records]
    # One input VJP per generator step from the nodes that give gradients, none from the other.
    assert [len(calls) for calls in input_grads] == [6, 6, 0]
    probes = [r for r in records[2] if r["rpc"] == "Query" and r["images"] == (8 + 1) * 32]
    assert len(probes) == 6  # one batch of probes per generator step (8 directions, batch 32)


@pytest.mark.integration
@pytest.mark.slow
def test_a_caller_off_the_allow_list_exits_4_naming_the_node(
    inprocess_node, dev_pki, tmp_path: Path, caplog
) -> None:
    address = inprocess_node(policy={"callers": {"other-student": {}}})
    pki = dev_pki["trusted"]
    entry = {"address": address, "ca": pki.ca.cert, "cert": pki.client.cert, "key": pki.client.key}
    config = write_toml(tmp_path / "run.toml", small_run([entry]))
    out = tmp_path / "out"
    code = main(["train", "--in-process", "--config", str(config), "--out", str(out)])
    assert code == ExitCode.REFUSED == 4
    assert f"teacher node {address} (GetMetadata) refused this caller" in caplog.text
    assert "'student' is not on this node's allow-list" in caplog.text
    assert not (out / "result.json").exists()


@pytest.mark.integration
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_spent_budget_ends_the_run_cleanly_and_a_resume_exits_4(
    digits_teachers, dev_pki, tmp_path: Path
) -> None:
    """``cdfkd train`` as a user runs it (a process, on Ray) against a node process whose owner
    gives this caller 300 images: 128 an iteration (2 student batches, 1 generator batch and its
    VJP, of 32), so iteration 3 is refused. The run ends cleanly on iteration 2 (exit 0, the
    student of iteration 2 evaluated, ``ended_by`` naming the node and its budget); resuming
    while the budget is still spent trains nothing and exits 4 with a message naming the node,
    the checkpoint untouched and the node still serving."""
    pki = dev_pki["trusted"]
    budget = tmp_path / "budget.json"
    policy = (
        f'[policy]\nbudget_file = "{budget}"\n'
        '[policy.callers."student"]\nmode = "full"\nbudget_images = 300\n'
    )
    node = TeacherNodeProcess(
        digits_teachers.packages[0], tmp_path / "node", pki, threads=1, policy=policy
    )
    with node:
        entry = {
            "address": node.address,
            "ca": pki.ca.cert,
            "cert": pki.client.cert,
            "key": pki.client.key,
        }
        run = small_run([entry], checkpoint_every=1, cpus=1)
        config = write_toml(tmp_path / "run.toml", run)
        out = tmp_path / "out"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        command = [sys.executable, "-m", "cdfkd.coordinator.cli", "train"]
        command += ["--config", str(config), "--out", str(out)]

        def train(*extra: str) -> tuple[int, str, str]:
            with owned_process(
                [*command, *extra],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**env, "CI": "true"},
            ) as process:
                stdout, stderr = process.communicate(timeout=540)
            return process.returncode, stdout, stderr

        code, stdout, stderr = train()
        assert code == 0, stderr[-3000:]
        assert "budget exhausted: 288 of 300 images used, this request needs 32" in stderr
        assert "Traceback" not in stderr  # the message, not the Ray worker's stack
        result = json.loads((out / "result.json").read_text())
        assert result["iterations"] == 2
        assert result["stopped_early"] is True
        ended_by = result["ended_by"]
        assert ended_by["reason"] == "teacher_budget"
        assert (ended_by["address"], ended_by["limit"], ended_by["used"]) == (
            node.address,
            300,
            288,
        )
        assert result["student_accuracy_mean"] is not None  # the kept student was evaluated
        assert list_checkpoints(out / "checkpoints")[-1].name == "checkpoint-00000002.pt"
        assert json.loads(budget.read_text())["student"]["total"] == 288

        last = list_checkpoints(out / "checkpoints")[-1]
        before = last.read_bytes()
        code, stdout, stderr = train("--resume")
        assert code == ExitCode.REFUSED == 4, stderr[-3000:]
        assert f"teacher node {node.address}" in stderr
        assert "budget exhausted: 288 of 300 images used, this request needs 32" in stderr
        assert "Traceback" not in stderr
        assert stdout == ""
        assert list_checkpoints(out / "checkpoints")[-1] == last
        assert last.read_bytes() == before
        assert json.loads(budget.read_text())["student"]["total"] == 288
        # The node refused the request and kept serving.
        assert node.process is not None
        assert node.process.poll() is None
        with RemoteTeacher(client_config(node.address, dev_pki)) as teacher:
            assert teacher.metadata.remaining_budget == 12
