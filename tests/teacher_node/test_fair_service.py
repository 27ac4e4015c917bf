"""Fair under load on a real node over mTLS: bounded admission, round-robin, drops, retries.

The engine is the real one; ``GatedEngine`` only makes each call wait at a gate before it
computes (test instrumentation, so the engine can be held busy without sleeps) and records the
batch sizes it computed, in order.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from cdfkd.protos import teacher_pb2, teacher_pb2_grpc
from cdfkd.protos.codec import encode
from cdfkd.protos.contract import REQUEST_ID_KEY, RETRY_AFTER_KEY
from cdfkd.student_node.teachers.remote import RemoteTeacher, open_channel
from cdfkd.teacher_node.engine import EngineOutputs, TeacherEngine
from cdfkd.teacher_node.package import load_package
from cdfkd.teacher_node.server import Node, build_node
from tests.conftest import client_config, node_config

SHAPE = (1, 16, 16)
CALLERS = ("student", "caller-0", "caller-1", "caller-2")


class GatedEngine(TeacherEngine):
    """The real engine; each call waits at ``gate`` first and its batch size is recorded."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gate = threading.Event()
        self.batches: list[int] = []
        self._arrived = threading.Condition()

    def _arrive(self, images: torch.Tensor) -> None:
        with self._arrived:
            self.batches.append(int(images.shape[0]))
            self._arrived.notify_all()
        assert self.gate.wait(60), "the test never opened the gate"

    def wait_for_batches(self, count: int) -> None:
        with self._arrived:
            assert self._arrived.wait_for(lambda: len(self.batches) >= count, timeout=60)

    def query(self, images: torch.Tensor, with_bn_loss: bool = True) -> EngineOutputs:
        self._arrive(images)
        return super().query(images, with_bn_loss)

    def input_grad(
        self, images: torch.Tensor, grad_logits: torch.Tensor, bn_weight: float
    ) -> torch.Tensor:
        self._arrive(images)
        return super().input_grad(images, grad_logits, bn_weight)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """Wait for a server-side state the test cannot be notified of (bounded)."""
    done = threading.Event()
    for _ in range(int(timeout_s / 0.005)):
        if predicate():
            return
        done.wait(0.005)
    raise AssertionError("condition not reached")


@pytest.fixture
def gated_node(digits_teachers, dev_pki, tmp_path: Path) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def start(**sections: Any) -> Node:
        metadata, model = load_package(digits_teachers.packages[0])
        engine = GatedEngine(model, metadata.spec.input_shape)
        policy = {
            "callers": {name: {} for name in CALLERS},
            "budget_file": str(tmp_path / "budget.json"),
            **sections.pop("policy", {}),  # type: ignore[dict-item]
        }
        config = node_config(
            digits_teachers.packages[0],
            dev_pki,
            tmp_path,
            policy=policy,
            audit={"path": str(tmp_path / "audit.jsonl")},
            **sections,
        )
        node = build_node(config, engine=engine, metadata=metadata)
        node.start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        for engine in [node.servicer._engine]:  # noqa: SLF001 - release held calls
            engine.gate.set()  # type: ignore[attr-defined]
        node.stop(grace=None)


def _stub(node: Node, pki, name: str) -> teacher_pb2_grpc.TeacherServiceStub:
    channel = open_channel(client_config(f"127.0.0.1:{node.port}", pki, name=name))
    return teacher_pb2_grpc.TeacherServiceStub(channel)


def _query(batch: int, seed: int = 0) -> teacher_pb2.QueryRequest:
    generator = torch.Generator().manual_seed(seed)
    return teacher_pb2.QueryRequest(images=encode(torch.randn(batch, *SHAPE, generator=generator)))


def _in_flight(node: Node) -> int:
    return node.servicer._admission.in_flight  # noqa: SLF001


def _records(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]


def _budget_used(tmp_path: Path, caller: str) -> int:
    return int(json.loads((tmp_path / "budget.json").read_text())[caller]["total"])


def test_excess_calls_are_refused_with_a_retry_hint_and_callers_take_turns(
    gated_node, dev_pki
) -> None:
    node = gated_node(node={"workers": 4}, limits={"max_in_flight_per_caller": 3})
    engine: GatedEngine = node.servicer._engine  # type: ignore[assignment]  # noqa: SLF001
    flood, other, third = (_stub(node, dev_pki, n) for n in ("caller-0", "caller-1", ""))
    first = flood.Query.future(_query(2), timeout=60)
    engine.wait_for_batches(1)  # the flood holds the engine
    queued = [flood.Query.future(_query(3), timeout=60)]
    wait_until(lambda: _in_flight(node) == 2)
    queued.append(flood.Query.future(_query(4), timeout=60))
    wait_until(lambda: _in_flight(node) == 3)
    with pytest.raises(grpc.RpcError) as per_caller:
        flood.Query(_query(5), timeout=60)
    assert per_caller.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "caller-0" in per_caller.value.details()
    assert "already has 3 calls in flight" in per_caller.value.details()
    hint = dict(per_caller.value.trailing_metadata())[RETRY_AFTER_KEY]
    assert int(hint) >= 1
    late = other.Query.future(_query(6), timeout=60)  # another caller still gets in
    wait_until(lambda: _in_flight(node) == 4)
    with pytest.raises(grpc.RpcError) as total:
        third.Query(_query(7), timeout=60)
    assert total.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "busy" in total.value.details()
    assert RETRY_AFTER_KEY in dict(total.value.trailing_metadata())
    # The stock client honours the hint: it waits and retries until there is room.
    results: list[int] = []
    with RemoteTeacher(client_config(f"127.0.0.1:{node.port}", dev_pki)) as patient:
        waiting = threading.Thread(
            target=lambda: results.append(patient.query(torch.randn(8, *SHAPE)).logits.shape[0])
        )
        waiting.start()
        wait_until(lambda: patient.calls >= 3)  # metadata, then at least one refused attempt
        engine.gate.set()
        waiting.join(60)
    for future in [first, *queued, late]:
        assert future.result().logits.shape[0] > 0
    assert results == [8]
    # Fair turns: the late caller's batch of 6 ran right after the flood's running call,
    # before the flood's two queued ones, where first-come-first-served would have run it last.
    # (The patient student's 8, retried at its hint, may come anywhere after.)
    assert engine.batches[:2] == [2, 6]
    assert sorted(engine.batches[2:]) == [3, 4, 8]
    assert engine.batches.index(3) < engine.batches.index(4)  # one caller's calls stay in order
    records = _records(node.audit.path.parent)  # type: ignore[union-attr]
    refused = [r for r in records if r["decision"] == "denied"]
    assert {r["caller"] for r in refused} >= {"caller-0", "student"}
    assert all("Overloaded" in r["reason"] for r in refused)


def test_cancelled_and_expired_calls_are_neither_computed_nor_charged(
    gated_node, dev_pki, tmp_path: Path
) -> None:
    node = gated_node(policy={"callers": {"caller-0": {"budget_images": 1000}}})
    engine: GatedEngine = node.servicer._engine  # type: ignore[assignment]  # noqa: SLF001
    stub = _stub(node, dev_pki, "caller-0")
    running = stub.Query.future(_query(2), timeout=60)
    engine.wait_for_batches(1)
    expiring = stub.Query.future(_query(3), timeout=0.5)
    with pytest.raises(grpc.RpcError) as expired:
        expiring.result()
    assert expired.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: _in_flight(node) == 1)  # dropped from the queue at its deadline
    cancelled = stub.Query.future(_query(4), timeout=60)
    wait_until(lambda: _in_flight(node) == 2)
    assert cancelled.cancel()
    wait_until(lambda: _in_flight(node) == 1)  # the cancel reached the node: out of the queue
    engine.gate.set()
    assert running.result().logits.shape[0] == 2
    node.stop(grace=30)  # waits for every handler to finish
    assert engine.batches == [2]  # nothing computed for nobody
    assert _budget_used(tmp_path, "caller-0") == 2  # nor charged
    dropped = [r for r in _records(tmp_path) if r["decision"] == "dropped"]
    assert sorted(r["images"] for r in dropped) == [3, 4]
    assert all("not computed, not charged" in r["reason"] for r in dropped)
    exposition = node.metrics.exposition().decode()
    assert 'cdfkd_requests_total{caller="caller-0",decision="dropped",rpc="Query"} 2.0' in (
        exposition
    )


def test_a_retry_with_the_same_request_id_is_answered_once_and_charged_once(
    gated_node, dev_pki, tmp_path: Path
) -> None:
    node = gated_node(
        policy={
            "callers": {"caller-0": {"perturbation": {"logits_sigma": 1.0}}},
        }
    )
    engine: GatedEngine = node.servicer._engine  # type: ignore[assignment]  # noqa: SLF001
    engine.gate.set()
    stub = _stub(node, dev_pki, "caller-0")
    request = _query(4)
    once = ((REQUEST_ID_KEY, "r-1"),)
    first = stub.Query(request, timeout=60, metadata=once)
    again = stub.Query(request, timeout=60, metadata=once)
    # The stored reply, byte for byte: repeating a request cannot average the noise away.
    assert again.SerializeToString() == first.SerializeToString()
    assert _budget_used(tmp_path, "caller-0") == 4
    assert engine.batches == [4]
    with pytest.raises(grpc.RpcError) as reused:
        stub.Query(_query(4, seed=1), timeout=60, metadata=once)
    assert reused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "different request" in reused.value.details()
    fresh = stub.Query(request, timeout=60, metadata=((REQUEST_ID_KEY, "r-2"),))
    # A new request is computed and charged again; its noise is keyed by the images asked
    # about (teacher_node/answers.py), so asking the same again still averages nothing away.
    assert engine.batches == [4, 4]
    assert fresh.SerializeToString() == first.SerializeToString()
    stub.Query(request, timeout=60)  # no id: an ordinary, charged request
    assert _budget_used(tmp_path, "caller-0") == 12
    with pytest.raises(grpc.RpcError) as malformed:
        stub.Query(request, timeout=60, metadata=((REQUEST_ID_KEY, "x" * 65),))
    assert malformed.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    # A retry that arrives while its first attempt still computes waits for that answer.
    engine.gate.clear()
    retried = ((REQUEST_ID_KEY, "r-3"),)
    with pytest.raises(grpc.RpcError) as timed_out:
        stub.Query(_query(6), timeout=0.5, metadata=retried)  # computing when the client quits
    assert timed_out.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    retry = stub.Query.future(_query(6), timeout=60, metadata=retried)
    wait_until(lambda: _in_flight(node) == 2)
    engine.gate.set()
    assert retry.result().logits.shape[0] == 6
    assert engine.batches == [4, 4, 4, 6]
    assert _budget_used(tmp_path, "caller-0") == 18
    decisions = [(r["request_id"], r["decision"]) for r in _records(tmp_path)]
    assert decisions.count(("r-1", "replayed")) == 1
    assert decisions.count(("r-3", "replayed")) == 1


def test_the_client_sends_one_request_id_per_request(gated_node, dev_pki, tmp_path) -> None:
    node = gated_node()
    node.servicer._engine.gate.set()  # type: ignore[attr-defined]  # noqa: SLF001
    with RemoteTeacher(client_config(f"127.0.0.1:{node.port}", dev_pki)) as remote:
        remote.query(torch.randn(4, *SHAPE))
        remote.query(torch.randn(4, *SHAPE))
    ids = [r["request_id"] for r in _records(tmp_path) if r["rpc"] == "Query"]
    assert len(ids) == len(set(ids)) == 2
    assert all(len(i) == 32 for i in ids)
    assert all(r["peer"].startswith("ipv") for r in _records(tmp_path))
    assert all(r["latency_ms"] > 0 for r in _records(tmp_path))
