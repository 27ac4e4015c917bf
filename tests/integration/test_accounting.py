"""What a run cost its teachers: images and wire bytes, against the loop's arithmetic and the
nodes' own audit logs (real nodes over mutual TLS on loopback; in-process teachers too)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from cdfkd.coordinator.config import parse_run_config
from cdfkd.coordinator.training_run import run_training
from tests.helpers import packages, small_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: SMALL_TRAIN: 6 iterations of batch 32, K = 2 student steps.
ITERATIONS, BATCH, K = 6, 32, 2
#: Per iteration, a teacher with input gradients answers K student queries, the generator
#: step's query and its InputGrad.
FULL = ITERATIONS * (K + 2) * BATCH
#: The digits test split: the final evaluation asks every teacher about each image once.
TEST_IMAGES = 449
GRPC_PREFIX = 5


def _audit(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_in_process_teachers_count_images_and_send_no_bytes(digits_teachers, tmp_path) -> None:
    config = parse_run_config(small_run(packages(digits_teachers.packages[:2]), threads=1))
    summary = run_training(config, tmp_path / "out", show_progress=False).summary()
    assert summary["teacher_images_per_teacher"] == [FULL, FULL]
    assert summary["teacher_images"] == 2 * FULL
    assert summary["training_wire_bytes_per_teacher"] == [0, 0]
    assert summary["evaluation_teacher_images"] == 2 * TEST_IMAGES
    assert summary["wire_bytes"] == 0
    assert [t["transport"] for t in summary["teacher_traffic"]] == ["in_process"] * 2
    assert [t["teacher"] for t in summary["teacher_traffic"]] == ["owner-1", "owner-2"]
    assert summary["accuracy_per_million_teacher_images"] == pytest.approx(
        summary["student_accuracy_mean"] * 1e6 / (2 * FULL)
    )
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"| **all** | | **{2 * FULL:,}** | **0.00** | {2 * TEST_IMAGES:,} |" in report
    assert "Accuracy per million teacher images" in report


def test_usage_is_carried_across_a_resume(digits_teachers, tmp_path) -> None:
    config = parse_run_config(small_run(packages(digits_teachers.packages[:1]), threads=1))
    stop = threading.Event()

    def stop_after_three(state, metrics) -> None:
        if metrics.iteration == 3:
            stop.set()

    first = run_training(
        config, tmp_path / "out", stop_event=stop, callbacks=[stop_after_three], show_progress=False
    ).summary()
    assert (first["iterations"], first["ended_by"]) == (3, {"reason": "interrupted"})
    assert first["teacher_images"] == FULL // 2
    second = run_training(config, tmp_path / "out", resume=True, show_progress=False).summary()
    assert second["iterations"] == ITERATIONS
    assert second["teacher_images"] == FULL  # the whole trajectory, not this invocation's half
    assert second["evaluation_teacher_images"] == TEST_IMAGES  # evaluation: this invocation


def test_remote_counts_match_the_nodes_audit_and_the_loop(
    inprocess_node, dev_pki, tmp_path: Path
) -> None:
    pki = dev_pki["trusted"]
    audits = [tmp_path / "audit-full.jsonl", tmp_path / "audit-black-box.jsonl"]
    full = inprocess_node(0, audit={"path": str(audits[0])})
    black_box = inprocess_node(
        1,
        policy={"callers": {"student": {"mode": "logits_only"}}},
        audit={"path": str(audits[1])},
    )
    directions = 2
    entries = [
        {
            "address": address,
            "ca": pki.ca.cert,
            "cert": pki.client.cert,
            "key": pki.client.key,
            "zeroth_order_directions": directions,
        }
        for address in (full, black_box)
    ]
    config = parse_run_config(small_run(entries, threads=1))
    summary = run_training(config, tmp_path / "out", show_progress=False).summary()

    # The loop's arithmetic: a logits-only teacher answers K student queries, the generator
    # query, and (directions + 1) probes per image for the zeroth-order estimate.
    black_box_images = ITERATIONS * (K + 1 + directions + 1) * BATCH
    assert summary["teacher_images_per_teacher"] == [FULL, black_box_images]
    assert summary["evaluation_teacher_images"] == 2 * TEST_IMAGES
    for entry, audit in zip(summary["teacher_traffic"], audits, strict=True):
        records = [r for r in _audit(audit) if r["decision"] == "allowed"]
        answered = sum(r["images"] for r in records if r["rpc"] in ("Query", "InputGrad"))
        # The node's audit: every image it answered is one the student counted.
        assert answered == entry["training_images"] + entry["evaluation_images"]
        # Every reply the node sent, byte for byte (its size plus gRPC's 5-byte prefix).
        assert entry["bytes_received"] == sum(r["bytes_returned"] + GRPC_PREFIX for r in records)
        assert entry["rpc_calls"] == len(records)
        # Query requests carry the float32 images (1x16x16): at least 1 KiB each, little more.
        # InputGrad requests name the generator batch their Query kept: no pixels again.
        queried = sum(r["images"] for r in records if r["rpc"] == "Query")
        pixels = 4 * 16 * 16 * queried
        assert pixels < entry["bytes_sent"] < 1.05 * pixels
        assert entry["training_wire_bytes"] > 0
    assert summary["training_wire_bytes"] == sum(summary["training_wire_bytes_per_teacher"])
    assert summary["wire_bytes"] == sum(
        t["bytes_sent"] + t["bytes_received"] for t in summary["teacher_traffic"]
    )
    assert summary["wire_bytes"] > summary["training_wire_bytes"]  # + metadata and evaluation


def test_ideal_generator_asks_a_logits_only_node_only_for_the_student_steps(
    inprocess_node, dev_pki, tmp_path: Path
) -> None:
    """``generator_objective = "ideal"``: the node's own audit has no InputGrad and no probe,
    only the K student queries of each iteration (and the final evaluation)."""
    pki = dev_pki["trusted"]
    audit = tmp_path / "audit.jsonl"
    address = inprocess_node(
        1, policy={"callers": {"student": {"mode": "logits_only"}}}, audit={"path": str(audit)}
    )
    entry = {"address": address, "ca": pki.ca.cert, "cert": pki.client.cert, "key": pki.client.key}
    config = parse_run_config(small_run([entry], {"generator_objective": "ideal"}, threads=1))
    summary = run_training(config, tmp_path / "out", show_progress=False).summary()
    assert summary["ended_by"] == {"reason": "completed"}
    assert summary["teacher_images_per_teacher"] == [ITERATIONS * K * BATCH]
    records = [r for r in _audit(audit) if r["decision"] == "allowed"]
    assert {r["rpc"] for r in records} <= {"Query", "GetMetadata"}
    queries = [r["images"] for r in records if r["rpc"] == "Query"]
    assert sum(queries) == ITERATIONS * K * BATCH + TEST_IMAGES
