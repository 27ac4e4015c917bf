"""A real gRPC teacher node with mutual TLS on loopback: answers, refusals, status codes."""

from __future__ import annotations

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cdfkd.protos import teacher_pb2, teacher_pb2_grpc
from cdfkd.protos.codec import encode
from cdfkd.student_node.errors import TeacherRefused, TeacherUnavailable
from cdfkd.student_node.teachers.local import InProcessTeacher
from cdfkd.student_node.teachers.remote import RemoteTeacher, open_channel
from tests.conftest import client_config

SHAPE = (1, 16, 16)


def _stub(address: str, pki) -> tuple[grpc.Channel, teacher_pb2_grpc.TeacherServiceStub]:
    channel = open_channel(client_config(address, pki))
    return channel, teacher_pb2_grpc.TeacherServiceStub(channel)


def test_remote_answers_equal_the_in_process_engine(
    inprocess_node, dev_pki, digits_teachers
) -> None:
    address = inprocess_node()
    local = InProcessTeacher.from_package(digits_teachers.packages[0])
    with RemoteTeacher(client_config(address, dev_pki)) as remote:
        assert remote.info() == local.info()
        images = torch.randn(16, *SHAPE)
        a, b = remote.query(images), local.query(images)
        assert torch.equal(a.logits, b.logits)
        assert torch.equal(a.features, b.features)
        assert torch.equal(a.bn_loss, b.bn_loss)
        cotangent = torch.randn(16, 10)
        assert torch.equal(
            remote.input_grad(images, cotangent, 0.05), local.input_grad(images, cotangent, 0.05)
        )


def test_metadata_states_the_owner_choices(inprocess_node, dev_pki) -> None:
    address = inprocess_node(
        choices={"allowed_outputs": ["logits", "features"], "wire_dtypes": ["float32"]},
        limits={"max_batch": 64},
    )
    with RemoteTeacher(client_config(address, dev_pki)) as remote:
        assert set(remote.metadata.allowed_outputs) == {"logits", "features"}
        assert remote.metadata.mode == "full"
        assert remote.metadata.remaining_budget == -1
        assert remote.metadata.max_batch == 64
        assert list(remote.metadata.wire_dtypes) == ["float32"]
        assert remote.metadata.input_shape == list(SHAPE)
        # Nothing about parameters or statistics is in the metadata.
        assert set(teacher_pb2.GetMetadataResponse.DESCRIPTOR.fields_by_name) == {
            "name",
            "num_classes",
            "input_shape",
            "feature_dim",
            "normalization_mean",
            "normalization_std",
            "allowed_outputs",
            "max_batch",
            "max_message_bytes",
            "wire_dtypes",
            "mode",
            "remaining_budget",
            "has_bn_prior",  # a yes/no, not the layers or their statistics
            "max_image_side",
            "privacy",  # the DP guarantee's parameters, not data
        }
        assert set(teacher_pb2.Privacy.DESCRIPTOR.fields_by_name) == {
            "mechanism",
            "epsilon",
            "delta",
            "accountant",
            "max_grad_norm",
            "noise_multiplier",
            "statistics_noise_multiplier",
        }
        assert not remote.metadata.HasField("privacy")  # a teacher trained without DP
        assert remote.info().privacy is None
        assert remote.metadata.has_bn_prior
        assert remote.metadata.max_image_side == 2 * max(SHAPE[1:])  # the default
        with pytest.raises(TeacherRefused, match=r"does not allow \['bn_loss'\]"):
            remote.query(torch.randn(4, *SHAPE))
        # Without input gradients the student side estimates them from logits instead...
        calls = remote.calls
        estimate = remote.input_grad(torch.randn(4, *SHAPE), torch.randn(4, 10), 0.0)
        assert estimate.shape == (4, *SHAPE)
        assert remote.calls > calls
        # ...and asking the node for them directly is refused.
        channel, stub = _stub(address, dev_pki)
        request = teacher_pb2.InputGradRequest(
            images=encode(torch.randn(4, *SHAPE)), grad_logits=encode(torch.randn(4, 10))
        )
        with pytest.raises(grpc.RpcError) as raised:
            stub.InputGrad(request, timeout=10)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "['input_grad']" in raised.value.details()
        channel.close()


def test_health_service_reports_serving(inprocess_node, dev_pki) -> None:
    address = inprocess_node()
    channel = open_channel(client_config(address, dev_pki))
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "cdfkd.teacher.v1.TeacherService"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()


def _images(batch: int = 4, dtype: str = "float32") -> teacher_pb2.Tensor:
    return encode(torch.randn(batch, *SHAPE), dtype)


def _tensor(dtype: str, shape: list[int], data: bytes) -> teacher_pb2.Tensor:
    return teacher_pb2.Tensor(dtype=dtype, shape=shape, data=data)


INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
NAN = encode(torch.full((4, *SHAPE), float("nan")))
INF = encode(torch.full((4, *SHAPE), float("inf")))
BAD_REQUESTS = [
    ("Query", teacher_pb2.QueryRequest(), INVALID, "dtype"),
    (
        "Query",
        teacher_pb2.QueryRequest(images=_tensor("float64", [4, 1, 16, 16], b"\0" * 8192)),
        INVALID,
        "dtype",
    ),
    (
        "Query",
        teacher_pb2.QueryRequest(images=_tensor("int32", [4, 1, 16, 16], b"\0" * 4096)),
        INVALID,
        "dtype",
    ),
    (
        "Query",
        teacher_pb2.QueryRequest(images=_tensor("float32", [4, 3, 16, 16], b"\0" * 12288)),
        INVALID,
        "shape",
    ),
    (
        "Query",
        teacher_pb2.QueryRequest(images=_tensor("float32", [4, 1, 16], b"\0" * 256)),
        INVALID,
        "shape",
    ),
    (
        "Query",
        teacher_pb2.QueryRequest(images=_tensor("float32", [4, 1, 16, 16, 1], b"\0" * 4096)),
        INVALID,
        "rank",
    ),
    (
        "Query",
        teacher_pb2.QueryRequest(images=_tensor("float32", [4, 1, 16, 16], b"\0" * 4095)),
        INVALID,
        "bytes",
    ),
    (
        "Query",
        teacher_pb2.QueryRequest(images=_tensor("float32", [4, 1, 16, 16], b"\0" * 4100)),
        INVALID,
        "bytes",
    ),
    (
        "Query",
        teacher_pb2.QueryRequest(images=_tensor("float32", [4, 1, 16, 16], b"")),
        INVALID,
        "bytes",
    ),
    (
        "Query",
        teacher_pb2.QueryRequest(images=_tensor("float32", [0, 1, 16, 16], b"")),
        INVALID,
        "empty",
    ),
    (
        "Query",
        teacher_pb2.QueryRequest(images=_tensor("float32", [-4, 1, 16, 16], b"")),
        INVALID,
        "negative",
    ),
    (
        "Query",
        teacher_pb2.QueryRequest(images=_tensor("float32", [4, -1, 16, 16], b"")),
        INVALID,
        "negative",
    ),
    ("Query", teacher_pb2.QueryRequest(images=NAN), INVALID, "NaN"),
    ("Query", teacher_pb2.QueryRequest(images=INF), INVALID, "NaN"),
    ("Query", teacher_pb2.QueryRequest(images=_images(1)), INVALID, "at least 2"),
    (
        "Query",
        teacher_pb2.QueryRequest(images=_images(), response_dtype="float64"),
        INVALID,
        "response_dtype",
    ),
    (
        "Query",
        teacher_pb2.QueryRequest(images=_tensor("float32", [65, 1, 16, 16], b"\0" * 66560)),
        EXHAUSTED,
        "max_batch",
    ),
    (
        "Query",
        teacher_pb2.QueryRequest(images=_tensor("float32", [2**40, 1, 16, 16], b"")),
        EXHAUSTED,
        "max_batch",
    ),
    (
        "Query",
        teacher_pb2.QueryRequest(images=_tensor("float32", [4, 1, 16, 16], b"\0" * 300_000)),
        EXHAUSTED,
        "",
    ),
    ("InputGrad", teacher_pb2.InputGradRequest(images=_images()), INVALID, "grad_logits"),
    (
        "InputGrad",
        teacher_pb2.InputGradRequest(images=_images(), grad_logits=encode(torch.ones(4, 9))),
        INVALID,
        "grad_logits",
    ),
    (
        "InputGrad",
        teacher_pb2.InputGradRequest(images=_images(), grad_logits=encode(torch.ones(3, 10))),
        INVALID,
        "grad_logits",
    ),
    (
        "InputGrad",
        teacher_pb2.InputGradRequest(
            images=_images(), grad_logits=encode(torch.full((4, 10), float("nan")))
        ),
        INVALID,
        "NaN",
    ),
    (
        "InputGrad",
        teacher_pb2.InputGradRequest(
            images=_images(), grad_logits=encode(torch.ones(4, 10)), bn_weight=float("nan")
        ),
        INVALID,
        "bn_weight",
    ),
    (
        "InputGrad",
        teacher_pb2.InputGradRequest(
            images=_images(), grad_logits=encode(torch.ones(4, 10)), bn_weight=float("inf")
        ),
        INVALID,
        "bn_weight",
    ),
    (
        "InputGrad",
        teacher_pb2.InputGradRequest(images=NAN, grad_logits=encode(torch.ones(4, 10))),
        INVALID,
        "NaN",
    ),
]


def test_bad_requests_get_their_status_and_the_node_keeps_serving(
    inprocess_node, dev_pki, digits_teachers
) -> None:
    address = inprocess_node(limits={"max_batch": 64, "max_message_bytes": 200_000})
    channel, stub = _stub(address, dev_pki)
    local = InProcessTeacher.from_package(digits_teachers.packages[0])
    images = torch.randn(8, *SHAPE)
    expected = local.query(images).logits
    assert len(BAD_REQUESTS) >= 20
    for method, request, code, match in BAD_REQUESTS:
        with pytest.raises(grpc.RpcError) as raised:
            getattr(stub, method)(request, timeout=10)
        assert raised.value.code() == code, (method, request, raised.value.details())
        assert match in (raised.value.details() or ""), raised.value.details()
        assert "Traceback" not in (raised.value.details() or "")
        reply = stub.Query(teacher_pb2.QueryRequest(images=encode(images)), timeout=10)
        assert torch.equal(
            torch.frombuffer(bytearray(reply.logits.data), dtype=torch.float32).view(8, 10),
            expected,
        )
    channel.close()


def test_unexpected_errors_are_internal_with_a_generic_message(
    inprocess_node, dev_pki, monkeypatch, caplog
) -> None:
    address = inprocess_node()
    from cdfkd.teacher_node.engine import TeacherEngine

    original = TeacherEngine.query
    calls = {"n": 0}

    def flaky(self, images, with_bn_loss=True):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("secret internal detail")
        return original(self, images, with_bn_loss)

    monkeypatch.setattr(TeacherEngine, "query", flaky)
    channel, stub = _stub(address, dev_pki)
    with pytest.raises(grpc.RpcError) as raised:
        stub.Query(teacher_pb2.QueryRequest(images=_images()), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in raised.value.details()
    assert "incident" in raised.value.details()
    assert "secret internal detail" in caplog.text
    stub.Query(teacher_pb2.QueryRequest(images=_images()), timeout=10)
    channel.close()


def test_reduced_precision_transport(inprocess_node, dev_pki, digits_teachers) -> None:
    address = inprocess_node()
    local = InProcessTeacher.from_package(digits_teachers.packages[0])
    images = torch.randn(8, *SHAPE)
    exact = local.query(images).logits
    for dtype in ("float16", "bfloat16"):
        with RemoteTeacher(client_config(address, dev_pki, wire_dtype=dtype)) as remote:
            logits = remote.query(images).logits
            assert logits.dtype == torch.float32
            assert not torch.equal(logits, exact)
            assert torch.allclose(logits, exact, atol=0.1, rtol=0.05)


def test_unreachable_node_retries_then_says_what_to_do() -> None:
    from cdfkd.student_node.teachers.remote import RemoteTeacherConfig

    sleeps: list[float] = []
    config = RemoteTeacherConfig(
        address="127.0.0.1:1", insecure=True, deadline_s=2, retries=3, backoff_s=0.1
    )
    with pytest.raises(TeacherUnavailable, match="Check that the node runs") as raised:
        RemoteTeacher(config, sleep=sleeps.append)
    assert sleeps == [0.1, 0.2, 0.4]
    assert raised.value.code == "UNAVAILABLE"


def test_the_example_teacher_config_is_valid() -> None:
    from pathlib import Path

    from cdfkd.teacher_node.config import load_teacher_config

    example = Path(__file__).resolve().parents[2] / "deploy" / "teacher.example.toml"
    config = load_teacher_config(example)
    assert config.node.address == "0.0.0.0:50051"
    assert not config.tls.insecure
    assert config.tls.client_ca == example.parent / "pki" / "ca.pem"


def test_outage_timeout_bounds_the_retries() -> None:
    from cdfkd.student_node.teachers.remote import RemoteTeacherConfig
    from tests.teacher_node.test_policy import FakeClock

    config = RemoteTeacherConfig(
        address="127.0.0.1:1",
        insecure=True,
        deadline_s=1,
        outage_timeout_s=1.0,
        backoff_s=0.05,
        max_backoff_s=0.2,
    )
    clock = FakeClock(0.0)
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:  # the backoff moves the injected clock, not the test
        sleeps.append(seconds)
        clock.now += seconds

    with pytest.raises(TeacherUnavailable, match="127.0.0.1:1"):
        RemoteTeacher(config, sleep=sleep, clock=clock)
    # Doubling from 0.05 s, capped at 0.2 s; stops before the next wait passes 1 s of outage.
    assert sleeps == [0.05, 0.1, 0.2, 0.2, 0.2, 0.2]
    assert sum(sleeps) <= config.outage_timeout_s
