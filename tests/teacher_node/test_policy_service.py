"""The owner's policy on a real node over mTLS: allow-list, modes, budgets, rates, noise, audit."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import grpc
import pytest
import torch

from cdfkd.protos import teacher_pb2, teacher_pb2_grpc
from cdfkd.protos.codec import encode
from cdfkd.protos.contract import RETRY_AFTER_KEY
from cdfkd.student_node.errors import TeacherBudgetExhausted, TeacherRefused
from cdfkd.student_node.teachers.local import InProcessTeacher
from cdfkd.student_node.teachers.remote import RemoteTeacher, open_channel
from tests.conftest import client_config
from tests.teacher_node.test_policy import FakeClock

SHAPE = (1, 16, 16)
POLICY = {
    "callers": {
        "student": {"mode": "full"},
        "caller-0": {"mode": "logits_only"},
        "caller-1": {"mode": "no_features"},
        "caller-2": {"budget_images": 100},
        "caller-3": {"rate_images_per_s": 10, "burst_images": 64},
        "caller-4": {"perturbation": {"logits_sigma": 1.0}},
    },
    "noise_seed": 0,
}


def _policy(tmp_path: Path) -> dict:
    """POLICY with a budget file (budgets in memory refill on restart: refused)."""
    return {**POLICY, "budget_file": str(tmp_path / "budget.json")}


def _stub(address: str, pki, name: str = ""):
    channel = open_channel(client_config(address, pki, name=name))
    return channel, teacher_pb2_grpc.TeacherServiceStub(channel)


def _query(batch: int, **flags: bool) -> teacher_pb2.QueryRequest:
    return teacher_pb2.QueryRequest(images=encode(torch.randn(batch, *SHAPE)), **flags)


def test_modes_are_stated_up_front_and_enforced(inprocess_node, dev_pki, tmp_path: Path) -> None:
    address = inprocess_node(
        policy=_policy(tmp_path), audit={"path": str(tmp_path / "audit.jsonl")}
    )
    with RemoteTeacher(client_config(address, dev_pki, name="caller-0")) as black_box:
        assert black_box.metadata.mode == "logits_only"
        assert list(black_box.metadata.allowed_outputs) == ["logits"]
        assert black_box.info().allowed_outputs == {"logits"}
        assert (
            black_box.query(torch.randn(4, *SHAPE), features=False, bn_loss=False).features is None
        )
        with pytest.raises(TeacherRefused, match="logits_only"):
            black_box.query(torch.randn(4, *SHAPE))
    with RemoteTeacher(client_config(address, dev_pki, name="caller-1")) as no_features:
        assert no_features.metadata.mode == "no_features"
        assert set(no_features.metadata.allowed_outputs) == {"logits", "bn_loss", "input_grad"}
        out = no_features.query(torch.randn(4, *SHAPE), features=False)
        assert out.bn_loss is not None
        no_features.input_grad(torch.randn(4, *SHAPE), torch.randn(4, 10), 0.1)
        with pytest.raises(TeacherRefused, match="features"):
            no_features.query(torch.randn(4, *SHAPE))
    with pytest.raises(TeacherRefused, match="'other-student' is not on this node's allow-list"):
        RemoteTeacher(client_config(address, dev_pki, name="other-student"))
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert {r["decision"] for r in records} == {"allowed", "denied"}
    denied = [r for r in records if r["decision"] == "denied"]
    assert any(r["caller"] == "other-student" and "allow-list" in r["reason"] for r in denied)
    assert all(
        set(r)
        == {
            *("time", "caller", "rpc", "images", "mode", "decision", "reason", "bytes_returned"),
            *("request_id", "peer", "latency_ms", "suppressed"),
        }
        for r in records
    )
    allowed_queries = [r for r in records if r["decision"] == "allowed" and r["rpc"] == "Query"]
    assert all(r["bytes_returned"] > 0 for r in allowed_queries)


def test_budget_is_exact_and_says_what_was_used(inprocess_node, dev_pki, tmp_path: Path) -> None:
    budget = tmp_path / "budget.json"
    address = inprocess_node(policy={**POLICY, "budget_file": str(budget)})
    with RemoteTeacher(client_config(address, dev_pki, name="caller-2")) as remote:
        assert remote.metadata.remaining_budget == 100
        for _ in range(3):
            remote.query(torch.randn(32, *SHAPE), bn_loss=False)
        with pytest.raises(
            TeacherBudgetExhausted, match="96 of 100 images used, this request needs 32"
        ) as refused:
            remote.query(torch.randn(32, *SHAPE))
        # The node says which budget, as data: the student names it when a run ends by it.
        assert (refused.value.budget, refused.value.limit) == ("budget_images", 100)
        assert (refused.value.used, refused.value.requested) == (96, 32)
        assert isinstance(refused.value, TeacherRefused)  # exit code 4 where nothing was kept
        assert refused.value.code == "RESOURCE_EXHAUSTED"
        copy = pickle.loads(pickle.dumps(refused.value))  # a Ray worker's error crosses over
        assert (copy.budget, copy.limit, copy.used, copy.requested) == (
            "budget_images",
            100,
            96,
            32,
        )
        assert (copy.address, str(copy)) == (address, str(refused.value))
        remote.query(torch.randn(4, *SHAPE))
    assert json.loads(budget.read_text())["caller-2"]["total"] == 100
    with RemoteTeacher(client_config(address, dev_pki, name="caller-2")) as again:
        assert again.metadata.remaining_budget == 0


def test_rate_limit_gives_a_retry_hint_and_the_student_backs_off(
    inprocess_node, dev_pki, tmp_path: Path
) -> None:
    clock = FakeClock()
    address = inprocess_node(policy=_policy(tmp_path), monotonic=clock)
    channel, stub = _stub(address, dev_pki, "caller-3")
    stub.Query(_query(64), timeout=10)
    with pytest.raises(grpc.RpcError) as raised:
        stub.Query(_query(32), timeout=10)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry after 3.20 s" in raised.value.details()
    assert dict(raised.value.trailing_metadata())[RETRY_AFTER_KEY] == "3200"
    channel.close()

    waits: list[float] = []

    def sleep(seconds: float) -> None:  # the student's sleep moves the node's clock
        waits.append(seconds)
        clock.now += seconds

    with RemoteTeacher(client_config(address, dev_pki, name="caller-3"), sleep=sleep) as remote:
        for _ in range(4):
            remote.query(torch.randn(32, *SHAPE), bn_loss=False)
    assert waits
    assert all(w == pytest.approx(3.2, abs=0.01) for w in waits)


def test_output_noise(inprocess_node, dev_pki, digits_teachers, tmp_path: Path) -> None:
    address = inprocess_node(policy=_policy(tmp_path))
    local = InProcessTeacher.from_package(digits_teachers.packages[0])
    images = torch.randn(256, *SHAPE)
    clean = local.query(images).logits
    with RemoteTeacher(client_config(address, dev_pki, name="caller-4")) as noisy:
        assert noisy.info().allowed_outputs == {"logits"}  # the rest would undo the noise
        answered = noisy.query(images, features=False, bn_loss=False).logits
    with RemoteTeacher(client_config(address, dev_pki)) as exact:
        assert torch.equal(exact.query(images).logits, clean)
    assert (answered - clean).std().item() == pytest.approx(1.0, rel=0.1)
