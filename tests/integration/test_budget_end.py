"""An owner's budget running out mid-run: the run ends cleanly on its last completed iteration.

Real teacher nodes (gRPC, mutual TLS, on loopback) with a tiny image budget in their policy; the
budget refusal travels as RESOURCE_EXHAUSTED with the node's account of the budget.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cdfkd.coordinator.cli import main
from cdfkd.coordinator.config import parse_run_config
from cdfkd.coordinator.training_run import run_training
from cdfkd.student_node.artifact import STUDENT_FILE
from cdfkd.student_node.checkpoint import latest_checkpoint, list_checkpoints
from tests.helpers import small_run, write_toml

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: SMALL_TRAIN: batch 32, K = 2 student steps, then the generator step's Query and InputGrad.
IMAGES_PER_ITERATION = (2 + 2) * 32
#: Three iterations, then two more student queries fit (416); the generator query (32) does not.
BUDGET = 3 * IMAGES_PER_ITERATION + 48


def _entries(addresses: list[str], pki) -> list[dict]:
    return [
        {"address": a, "ca": pki.ca.cert, "cert": pki.client.cert, "key": pki.client.key}
        for a in addresses
    ]


def _student(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "student" / STUDENT_FILE))


def test_a_spent_budget_ends_the_run_on_its_last_completed_iteration(
    inprocess_node, dev_pki, tmp_path: Path, capsys
) -> None:
    pki = dev_pki["trusted"]
    ledger = tmp_path / "budget.json"
    policy = {"callers": {"student": {"budget_images": BUDGET}}, "budget_file": str(ledger)}
    budgeted = [inprocess_node(0, policy=policy), inprocess_node(1)]
    config = write_toml(tmp_path / "run.toml", small_run(_entries(budgeted, pki), threads=1))
    out = tmp_path / "out"

    assert main(["train", "--in-process", "--config", str(config), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["iterations"] == 3
    assert summary["stopped_early"]
    ended = summary["ended_by"]
    assert ended["reason"] == "teacher_budget"
    assert (ended["teacher"], ended["name"], ended["address"]) == (0, "owner-1", budgeted[0])
    assert ended["budget"] == "budget_images"
    assert (ended["limit"], ended["used"], ended["requested"]) == (BUDGET, 416, 32)
    assert ended["iteration"] == 3
    # The node's own ledger: everything answered, the refused request not charged.
    assert json.loads(ledger.read_text())["student"]["total"] == 416
    # ... and the run's accounting: all of it training (the cut iteration included), none
    # evaluation (refused).
    spent = summary["teacher_traffic"][0]
    assert (spent["training_images"], spent["evaluation_images"]) == (416, 0)
    assert summary["teacher_images_per_teacher"][0] == 416
    # The exhausted teacher could not be evaluated; the others were; the student was.
    assert summary["teacher_accuracies"][0] is None
    assert summary["teacher_accuracies"][1] > 0.85
    assert summary["teacher_ensemble_accuracy"] is None
    assert summary["student_accuracy_mean"] is not None
    assert json.loads((out / "result.json").read_text())["ended_by"] == ended
    report = (out / "report.md").read_text()
    assert "Ended by a teacher's budget" in report
    assert f"`owner-1` ({budgeted[0]})" in report
    assert f"`budget_images` of {BUDGET:,} images" in report
    assert latest_checkpoint(out / "checkpoints").name == "checkpoint-00000003.pt"
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert (final["type"], final["iteration"], final["ended_by"]) == ("final", 3, "teacher_budget")

    # The student kept is exactly that of an unbudgeted run of three iterations (the
    # fingerprint leaves out epochs, so the same config with one epoch of three iterations).
    reference_nodes = [inprocess_node(0), inprocess_node(1)]
    reference = parse_run_config(
        small_run(_entries(reference_nodes, pki), {"epochs": 1}, threads=1)
    )
    result = run_training(reference, tmp_path / "reference", show_progress=False)
    assert result.iterations == 3
    assert result.ended_by == {"reason": "completed"}
    kept, expected = _student(out), _student(tmp_path / "reference")
    assert kept.keys() == expected.keys()
    assert all(torch.equal(kept[k], expected[k]) for k in kept)

    # Resuming with the budget still spent makes no progress: exit 4, nothing overwritten.
    before = list_checkpoints(out / "checkpoints")
    code = main(["train", "--in-process", "--config", str(config), "--out", str(out), "--resume"])
    assert code == 4
    assert list_checkpoints(out / "checkpoints") == before
    assert json.loads(ledger.read_text())["student"]["total"] == 416


def test_a_budget_too_small_for_one_iteration_is_a_refusal(
    inprocess_node, dev_pki, tmp_path: Path, caplog
) -> None:
    pki = dev_pki["trusted"]
    policy = {
        "callers": {"student": {"budget_images": IMAGES_PER_ITERATION - 1}},
        "budget_file": str(tmp_path / "budget.json"),
    }
    address = inprocess_node(0, policy=policy)
    config = write_toml(tmp_path / "run.toml", small_run(_entries([address], pki), threads=1))
    out = tmp_path / "out"
    assert main(["train", "--in-process", "--config", str(config), "--out", str(out)]) == 4
    assert "before its first iteration completed" in caplog.text
    assert "budget exhausted" in caplog.text
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-00000000.pt"]
    assert not (out / "result.json").exists()
