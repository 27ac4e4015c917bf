"""Pipelining over gRPC: real teacher nodes (mutual TLS on loopback), the coordinator's run.

``[train] prefetch`` asks each node ahead of the student; the run computes what the serial run
does, each node is asked the same images, and a budget that runs out mid-iteration ends the run
as in the serial loop (``tests/integration/test_budget_end.py``), with the same ledger.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cdfkd.coordinator.config import parse_run_config
from cdfkd.coordinator.training_run import run_training
from cdfkd.student_node.artifact import STUDENT_FILE
from tests.helpers import small_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: SMALL_TRAIN: batch 32, K = 2, then the generator step's Query and InputGrad.
IMAGES_PER_ITERATION = (2 + 2) * 32


def _entries(addresses: list[str], pki) -> list[dict]:
    return [
        {"address": a, "ca": pki.ca.cert, "cert": pki.client.cert, "key": pki.client.key}
        for a in addresses
    ]


def _student(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "student" / STUDENT_FILE))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prefetch_over_grpc_trains_the_serial_student(
    inprocess_node, dev_pki, tmp_path: Path
) -> None:
    pki = dev_pki["trusted"]
    nodes = [inprocess_node(index) for index in range(3)]
    results = {}
    for depth in (0, 2):
        config = parse_run_config(
            small_run(_entries(nodes, pki), {"prefetch": depth, "epochs": 1}, threads=1)
        )
        assert config.train.prefetch == depth
        results[depth] = run_training(config, tmp_path / f"prefetch-{depth}", show_progress=False)
    serial, piped = results[0], results[2]
    assert serial.iterations == piped.iterations == 3
    assert _same(_student(serial.out), _student(piped.out))
    # Every node answered the same number of training images and calls.
    for near, far in zip(serial.teacher_traffic, piped.teacher_traffic, strict=True):
        assert near["training_images"] == far["training_images"] == 3 * IMAGES_PER_ITERATION
        assert near["training_wire_bytes"] == far["training_wire_bytes"]
        assert near["rpc_calls"] == far["rpc_calls"]


def test_a_spent_budget_ends_a_prefetching_run_as_a_serial_one(
    inprocess_node, dev_pki, tmp_path: Path
) -> None:
    """The same end, ledger, calls to the spent node and kept student as the serial run.

    Node 0's budget runs out at the second student batch of iteration 4; with depth 2 the
    generator step's query is already queued for it behind that batch, and must not be sent.
    """
    pki = dev_pki["trusted"]
    budget = 3 * IMAGES_PER_ITERATION + 48
    results = {}
    for depth in (0, 2):
        ledger = tmp_path / f"budget-{depth}.json"
        policy = {"callers": {"student": {"budget_images": budget}}, "budget_file": str(ledger)}
        budgeted = [inprocess_node(0, policy=policy), inprocess_node(1)]
        train = {"prefetch": depth}
        config = parse_run_config(small_run(_entries(budgeted, pki), train, threads=1))
        result = run_training(config, tmp_path / f"out-{depth}", show_progress=False)
        assert result.iterations == 3
        ended = result.ended_by
        assert ended is not None
        assert ended["reason"] == "teacher_budget"
        assert (ended["teacher"], ended["budget"], ended["iteration"]) == (0, "budget_images", 3)
        assert (ended["limit"], ended["used"], ended["requested"]) == (budget, 416, 32)
        assert json.loads(ledger.read_text())["student"]["total"] == 416
        results[depth] = result
    serial, piped = results[0], results[2]
    # The spent node got exactly the serial run's calls: none after its refusal.
    assert serial.teacher_traffic[0] == {
        **piped.teacher_traffic[0],
        "address": serial.teacher_traffic[0]["address"],
    }
    assert _same(_student(serial.out), _student(piped.out))

    reference_nodes = [inprocess_node(0), inprocess_node(1)]
    reference = parse_run_config(
        small_run(_entries(reference_nodes, pki), {"epochs": 1}, threads=1)
    )
    expected = run_training(reference, tmp_path / "reference", show_progress=False)
    assert expected.iterations == 3
    assert _same(_student(piped.out), _student(expected.out))
