"""The generator batch sent once, on a real node over mTLS: a Query keeps it, InputGrad names it.

Attacks on the handle are written as tests: another identity's handle, a logits-only caller
with a stolen handle, a flood of keeps, and the budget and audit of a handle's InputGrad
against one with the images.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from bench.tcp_proxy import RecordingProxy
from cdfkd.protos import teacher_pb2, teacher_pb2_grpc
from cdfkd.protos.codec import decode, encode
from cdfkd.student_node.config import GeneratorConfig, StudentConfig, TrainConfig
from cdfkd.student_node.teachers.local import InProcessTeacher
from cdfkd.student_node.teachers.remote import RemoteTeacher, open_channel
from cdfkd.student_node.trainer import generator_step, init_state
from cdfkd.teacher_node.kept_batches import ENTRY_OVERHEAD_BYTES
from cdfkd.teacher_node.server import Node, build_node
from tests.conftest import client_config, node_config
from tests.teacher_node.test_policy import FakeClock

SHAPE = (1, 16, 16)
BATCH = 8
POLICY = {
    "callers": {
        "student": {"budget_images": 10_000},
        "caller-0": {"budget_images": 10_000},
        "caller-1": {"mode": "logits_only"},
    },
}


@pytest.fixture
def node(digits_teachers, dev_pki, tmp_path: Path) -> Iterator[Any]:
    """Build and start a node (``node(**sections)``), its servicer reachable for inspection."""
    nodes: list[Node] = []

    def start(monotonic: FakeClock | None = None, **sections: Any) -> Node:
        policy = {**POLICY, "budget_file": str(tmp_path / "budget.json")}
        config = node_config(
            digits_teachers.packages[0],
            dev_pki,
            tmp_path,
            policy=sections.pop("policy", policy),
            audit={"path": str(tmp_path / "audit.jsonl")},
            **sections,
        )
        built = build_node(config, monotonic=monotonic) if monotonic else build_node(config)
        built.start()
        nodes.append(built)
        return built

    yield start
    for built in nodes:
        built.stop(grace=None)


def _stub(address: str, pki, name: str = ""):
    channel = open_channel(client_config(address, pki, name=name))
    return channel, teacher_pb2_grpc.TeacherServiceStub(channel)


def _images(seed: int = 0) -> torch.Tensor:
    return torch.rand(BATCH, *SHAPE, generator=torch.Generator().manual_seed(seed))


def _grad_request(handle: bytes = b"", images: torch.Tensor | None = None):
    cotangent = torch.randn(BATCH, 10, generator=torch.Generator().manual_seed(7))
    return teacher_pb2.InputGradRequest(
        images=None if images is None else encode(images),
        batch_handle=handle,
        grad_logits=encode(cotangent),
        bn_weight=0.05,
    )


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code()


def _records(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]


def _remaining(stub) -> int:
    return stub.GetMetadata(teacher_pb2.GetMetadataRequest(), timeout=10).remaining_budget


def test_an_input_grad_by_handle_is_the_same_answer_charge_and_audit(
    node, dev_pki, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{node().port}"
    channel, stub = _stub(address, dev_pki)
    images = _images()
    kept = stub.Query(
        teacher_pb2.QueryRequest(images=encode(images), want_bn_loss=True, keep_for_grad=True),
        timeout=10,
    )
    assert len(kept.batch_handle) == 16
    plain = stub.Query(teacher_pb2.QueryRequest(images=encode(images)), timeout=10)
    assert plain.batch_handle == b""  # kept only when asked
    assert decode(kept.logits, name="l").equal(decode(plain.logits, name="l"))
    before = _remaining(stub)
    by_images = stub.InputGrad(_grad_request(images=images), timeout=10)
    assert _remaining(stub) == before - BATCH
    by_handle_request = _grad_request(kept.batch_handle)
    by_handle = stub.InputGrad(by_handle_request, timeout=10)
    assert _remaining(stub) == before - 2 * BATCH  # charged exactly as with the images
    assert by_handle == by_images  # the same answer, bit for bit
    # The request no longer carries the images: 2 KiB of float32 pixels less than the other.
    image_bytes = BATCH * 16 * 16 * 4
    assert by_handle_request.ByteSize() < _grad_request(images=images).ByteSize() - image_bytes
    assert by_handle_request.ByteSize() < 600
    # Used once: the node forgot the batch when it answered.
    assert _code(lambda: stub.InputGrad(_grad_request(kept.batch_handle), timeout=10)) == (
        grpc.StatusCode.NOT_FOUND
    )
    assert _remaining(stub) == before - 2 * BATCH  # the refusal charged nothing
    # Both the images and a handle, or a handle of the wrong length: INVALID_ARGUMENT.
    again = stub.Query(
        teacher_pb2.QueryRequest(images=encode(images), keep_for_grad=True), timeout=10
    )
    both = _grad_request(again.batch_handle, images)
    assert _code(lambda: stub.InputGrad(both, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
    short = _grad_request(again.batch_handle[:8])
    assert _code(lambda: stub.InputGrad(short, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
    channel.close()

    grads = [r for r in _records(tmp_path) if r["rpc"] == "InputGrad"]
    assert [r["decision"] for r in grads] == ["allowed", "allowed", "denied", "denied", "denied"]
    allowed = grads[:2]
    keys = ("caller", "images", "mode", "decision", "reason", "bytes_returned")
    assert [allowed[0][k] for k in keys] == [allowed[1][k] for k in keys]  # audited alike
    assert allowed[0]["images"] == BATCH
    assert "BatchHandleUnknown" in grads[2]["reason"]


def test_a_handle_is_worth_nothing_to_another_identity(node, dev_pki, tmp_path: Path) -> None:
    """Two real mTLS identities: caller-0 replays the student's handle (say, from a log)."""
    address = f"127.0.0.1:{node().port}"
    student_channel, student = _stub(address, dev_pki)
    attacker_channel, attacker = _stub(address, dev_pki, "caller-0")
    kept = student.Query(
        teacher_pb2.QueryRequest(images=encode(_images()), keep_for_grad=True), timeout=10
    )
    attacker_budget = _remaining(attacker)
    stolen = _grad_request(kept.batch_handle)
    assert _code(lambda: attacker.InputGrad(stolen, timeout=10)) == grpc.StatusCode.NOT_FOUND
    assert _remaining(attacker) == attacker_budget  # nothing answered, nothing charged
    # The attempt took nothing from the student: its handle still works, for it alone.
    student.InputGrad(_grad_request(kept.batch_handle), timeout=10)
    student_channel.close()
    attacker_channel.close()
    refused = [
        r for r in _records(tmp_path) if r["caller"] == "caller-0" and r["rpc"] != "GetMetadata"
    ]
    assert [(r["rpc"], r["decision"]) for r in refused] == [("InputGrad", "denied")]
    assert "BatchHandleUnknown" in refused[0]["reason"]


def test_logits_only_keeps_nothing_and_a_stolen_handle_opens_no_input_grad(
    node, dev_pki, tmp_path: Path
) -> None:
    built = node()
    address = f"127.0.0.1:{built.port}"
    student_channel, student = _stub(address, dev_pki)
    black_box_channel, black_box = _stub(address, dev_pki, "caller-1")
    query = teacher_pb2.QueryRequest(images=encode(_images()), keep_for_grad=True)
    assert black_box.Query(query, timeout=10).batch_handle == b""
    assert len(built.servicer._kept) == 0  # noqa: SLF001 - nothing kept for it
    kept = student.Query(query, timeout=10)
    for handle in (kept.batch_handle, b"\0" * 16):
        request = _grad_request(handle)
        request.bn_weight = 0.0
        code = _code(lambda r=request: black_box.InputGrad(r, timeout=10))
        assert code == grpc.StatusCode.PERMISSION_DENIED  # the policy first, as with images
    # The student side never asks to keep for a logits-only caller (it estimates gradients).
    with RemoteTeacher(client_config(address, dev_pki, name="caller-1")) as remote:
        remote.query(_images(), features=False, bn_loss=False, keep_for_grad=True)
        remote.input_grad(_images(), torch.randn(BATCH, 10), 0.0)
        assert (remote.handle_hits, remote.handle_misses) == (0, 0)
    student_channel.close()
    black_box_channel.close()
    queries = [r for r in _records(tmp_path) if r["caller"] == "caller-1" and r["rpc"] == "Query"]
    assert all(r["decision"] == "allowed" for r in queries)


def test_a_flood_of_keeps_stays_within_the_nodes_bounds(node, dev_pki) -> None:
    batch_bytes = BATCH * 16 * 16 * 4 + ENTRY_OVERHEAD_BYTES
    built = node(
        limits={
            "kept_batches_per_caller": 4,
            "kept_batch_bytes_per_caller": 3 * batch_bytes,
            "kept_batch_memory_bytes": 5 * batch_bytes,
        }
    )
    kept = built.servicer._kept  # noqa: SLF001
    address = f"127.0.0.1:{built.port}"
    channels, handles = [], {}
    most = 0
    for name in ("", "caller-0"):
        channel, stub = _stub(address, dev_pki, name)
        channels.append(channel)
        for seed in range(12):
            query = teacher_pb2.QueryRequest(images=encode(_images(seed)), keep_for_grad=True)
            handles[name, seed] = (stub, stub.Query(query, timeout=10).batch_handle)
            most = max(most, kept.stored_bytes)
    assert most <= 5 * batch_bytes
    assert kept.stored_bytes == 5 * batch_bytes
    assert len(kept) == 5
    # The student's oldest are gone (per-caller bound, then the global one), its newest work.
    stub, oldest = handles["", 0]
    assert _code(lambda: stub.InputGrad(_grad_request(oldest), timeout=10)) == (
        grpc.StatusCode.NOT_FOUND
    )
    stub, newest = handles["caller-0", 11]
    stub.InputGrad(_grad_request(newest), timeout=10)
    for channel in channels:
        channel.close()


def test_the_client_falls_back_to_the_images_when_the_batch_is_gone(
    node, dev_pki, digits_teachers, tmp_path: Path
) -> None:
    clock = FakeClock()
    address = f"127.0.0.1:{node(monotonic=clock).port}"
    local = InProcessTeacher.from_package(digits_teachers.packages[0])
    images, cotangent = _images(), torch.randn(BATCH, 10)
    expected = local.input_grad(images, cotangent, 0.05)
    with RemoteTeacher(client_config(address, dev_pki)) as remote:
        remote.query(images, features=False, keep_for_grad=True)
        assert torch.equal(remote.input_grad(images, cotangent, 0.05), expected)
        assert (remote.handle_hits, remote.handle_misses) == (1, 0)
        remote.query(images, features=False, keep_for_grad=True)
        clock.now += 121.0  # past kept_batch_ttl_s: the node forgot the batch
        assert torch.equal(remote.input_grad(images, cotangent, 0.05), expected)
        assert (remote.handle_hits, remote.handle_misses) == (1, 1)
        # Other images than the kept ones are sent, not named.
        remote.query(images, features=False, keep_for_grad=True)
        assert torch.equal(
            remote.input_grad(images + 0.5, cotangent, 0.05),
            local.input_grad(images + 0.5, cotangent, 0.05),
        )
        assert (remote.handle_hits, remote.handle_misses) == (1, 1)
    grads = [r for r in _records(tmp_path) if r["rpc"] == "InputGrad"]
    assert [r["decision"] for r in grads] == ["allowed", "denied", "allowed", "allowed"]
    assert "BatchHandleUnknown" in grads[1]["reason"]
    assert sum(r["images"] for r in grads if r["decision"] == "allowed") == 3 * BATCH


def test_a_node_that_keeps_missing_batches_is_no_longer_asked_to_keep(node, dev_pki) -> None:
    clock = FakeClock()
    built = node(monotonic=clock)
    images, cotangent = _images(), torch.randn(BATCH, 10)
    with RemoteTeacher(client_config(f"127.0.0.1:{built.port}", dev_pki)) as remote:
        for _ in range(3):
            remote.query(images, features=False, keep_for_grad=True)
            assert len(built.servicer._kept) == 1  # noqa: SLF001
            clock.now += 121.0
            remote.input_grad(images, cotangent, 0.05)
        assert (remote.handle_hits, remote.handle_misses) == (0, 3)
        remote.query(images, features=False, keep_for_grad=True)
        assert len(built.servicer._kept) == 0  # noqa: SLF001 - not asked any more
        remote.input_grad(images, cotangent, 0.05)
        assert (remote.handle_hits, remote.handle_misses) == (0, 3)


def test_a_node_that_keeps_nothing_gets_the_images(node, dev_pki, digits_teachers) -> None:
    address = f"127.0.0.1:{node(limits={'kept_batches_per_caller': 0}).port}"
    local = InProcessTeacher.from_package(digits_teachers.packages[0])
    images, cotangent = _images(), torch.randn(BATCH, 10)
    with RemoteTeacher(client_config(address, dev_pki)) as remote:
        remote.query(images, features=False, keep_for_grad=True)
        gradient = remote.input_grad(images, cotangent, 0.05)
        assert (remote.handle_hits, remote.handle_misses) == (0, 0)
    assert torch.equal(gradient, local.input_grad(images, cotangent, 0.05))


@pytest.mark.parametrize("wire_dtype", ["float32", "float16"])
def test_the_generator_step_sends_its_batch_once_on_the_wire(
    node, dev_pki, wire_dtype: str
) -> None:
    """The real generator step through a byte-counting proxy, with and without the handle:
    the same update, and the student-to-node bytes differ by the batch's pixels."""
    built = node()
    config = TrainConfig.model_validate(
        {
            "batch_size": 32,
            "student": StudentConfig(widths=(8, 16, 16)),
            "generator": GeneratorConfig(latent_dim=32, width=8),
        }
    )
    sent, generators = {}, {}
    for once in (False, True):
        with RecordingProxy(("127.0.0.1", built.port), keep=False) as proxy:
            settings = client_config(
                proxy.address, dev_pki, send_batch_once=once, wire_dtype=wire_dtype
            )
            with RemoteTeacher(settings) as remote:
                state = init_state(config, [remote.info()], torch.device("cpu"))
                counted, upstream = remote.bytes_sent, proxy.to_server
                generator_step(state, [remote], config, config.loss_weights())
                sent[once] = (remote.bytes_sent - counted, proxy.to_server - upstream)
                assert remote.handle_hits == int(once)
            generators[once] = [p.detach().clone() for p in state.generator.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(generators[False], generators[True], strict=True))
    pixels = 32 * 16 * 16 * (4 if wire_dtype == "float32" else 2)
    counted_saving = sent[False][0] - sent[True][0]
    wire_saving = sent[False][1] - sent[True][1]
    assert pixels < counted_saving < pixels + 64  # the accounting's counters
    assert 0.95 * pixels < wire_saving < 1.1 * pixels  # the TLS bytes on the wire
