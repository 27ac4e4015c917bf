"""The bad-input corpus: transport, identity, policy and tensor cases, each with its status code.

After every case the node still answers a trusted caller correctly, and no refusal carries a
traceback.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import torch

from cdfkd.protos import teacher_pb2, teacher_pb2_grpc
from cdfkd.protos.codec import encode
from cdfkd.student_node.teachers.local import InProcessTeacher
from cdfkd.student_node.teachers.remote import open_channel
from tests.conftest import client_config
from tests.helpers import expired_client_credentials
from tests.teacher_node.test_service import BAD_REQUESTS

SHAPE = (1, 16, 16)
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
DENIED = grpc.StatusCode.PERMISSION_DENIED
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE  # a refused TLS handshake, as the client sees it

POLICY = {
    "callers": {
        "student": {"mode": "full"},
        "caller-0": {"mode": "logits_only"},
        "caller-1": {"mode": "no_features"},
        "caller-2": {"budget_images": 0},
        "caller-3": {"rate_images_per_s": 1, "burst_images": 4},
    }
}


@dataclass(frozen=True)
class Case:
    name: str
    caller: str  # "student", a client name, or "foreign", "anonymous", "plaintext", "expired"
    method: str
    request: object
    code: grpc.StatusCode


def _images(batch: int = 4) -> teacher_pb2.Tensor:
    return encode(torch.randn(batch, *SHAPE))


def _grad(batch: int = 4, classes: int = 10) -> teacher_pb2.Tensor:
    return encode(torch.randn(batch, classes))


def _tensor(dtype: str, shape: list[int], data: bytes) -> teacher_pb2.Tensor:
    return teacher_pb2.Tensor(dtype=dtype, shape=shape, data=data)


TRANSPORT = [
    Case(f"{who} client", who, "GetMetadata", teacher_pb2.GetMetadataRequest(), UNAVAILABLE)
    for who in ("foreign", "anonymous", "plaintext", "expired")
] + [
    Case(
        f"{who} client queries",
        who,
        "Query",
        teacher_pb2.QueryRequest(images=_images()),
        UNAVAILABLE,
    )
    for who in ("foreign", "anonymous", "plaintext", "expired")
]
IDENTITY = [
    Case(
        "unknown caller metadata",
        "other-student",
        "GetMetadata",
        teacher_pb2.GetMetadataRequest(),
        DENIED,
    ),
    Case(
        "unknown caller query",
        "other-student",
        "Query",
        teacher_pb2.QueryRequest(images=_images()),
        DENIED,
    ),
    Case(
        "unknown caller gradient",
        "other-student",
        "InputGrad",
        teacher_pb2.InputGradRequest(images=_images(), grad_logits=_grad()),
        DENIED,
    ),
]
POLICY_CASES = [
    Case(
        "logits_only asks features",
        "caller-0",
        "Query",
        teacher_pb2.QueryRequest(images=_images(), want_features=True),
        DENIED,
    ),
    Case(
        "logits_only asks BN term",
        "caller-0",
        "Query",
        teacher_pb2.QueryRequest(images=_images(), want_bn_loss=True),
        DENIED,
    ),
    Case(
        "logits_only asks gradients",
        "caller-0",
        "InputGrad",
        teacher_pb2.InputGradRequest(images=_images(), grad_logits=_grad()),
        DENIED,
    ),
    Case(
        "logits_only asks gradients with BN",
        "caller-0",
        "InputGrad",
        teacher_pb2.InputGradRequest(images=_images(), grad_logits=_grad(), bn_weight=0.1),
        DENIED,
    ),
    Case(
        "no_features asks features",
        "caller-1",
        "Query",
        teacher_pb2.QueryRequest(images=_images(), want_features=True),
        DENIED,
    ),
    Case(
        "exhausted budget",
        "caller-2",
        "Query",
        teacher_pb2.QueryRequest(images=_images()),
        EXHAUSTED,
    ),
    Case(
        "exhausted budget, gradient",
        "caller-2",
        "InputGrad",
        teacher_pb2.InputGradRequest(images=_images(), grad_logits=_grad()),
        EXHAUSTED,
    ),
    Case(
        "over the burst",
        "caller-3",
        "Query",
        teacher_pb2.QueryRequest(images=_images(8)),
        EXHAUSTED,
    ),
    Case("within the rate", "caller-3", "Query", teacher_pb2.QueryRequest(images=_images(4)), OK),
    Case(
        "over the rate", "caller-3", "Query", teacher_pb2.QueryRequest(images=_images(4)), EXHAUSTED
    ),
]
MORE_TENSORS = [
    Case(
        "absurd spatial size",
        "student",
        "Query",
        teacher_pb2.QueryRequest(images=_tensor("float32", [3, 1, 2**31, 2**31], b"")),
        INVALID,
    ),
    Case(
        "zero height",
        "student",
        "Query",
        teacher_pb2.QueryRequest(images=_tensor("float32", [4, 1, 0, 16], b"")),
        INVALID,
    ),
    Case(
        "bfloat16 images of the wrong length",
        "student",
        "Query",
        teacher_pb2.QueryRequest(images=_tensor("bfloat16", [4, 1, 16, 16], b"\0" * 4096)),
        INVALID,
    ),
    Case(
        "response dtype int8",
        "student",
        "Query",
        teacher_pb2.QueryRequest(images=_images(), response_dtype="int8"),
        INVALID,
    ),
    Case(
        "float64 cotangent",
        "student",
        "InputGrad",
        teacher_pb2.InputGradRequest(
            images=_images(), grad_logits=_tensor("float64", [4, 10], b"\0" * 320)
        ),
        INVALID,
    ),
    Case(
        "cotangent of rank 3",
        "student",
        "InputGrad",
        teacher_pb2.InputGradRequest(
            images=_images(), grad_logits=_tensor("float32", [4, 10, 1], b"\0" * 160)
        ),
        INVALID,
    ),
    Case(
        "gradient without images",
        "student",
        "InputGrad",
        teacher_pb2.InputGradRequest(grad_logits=_grad()),
        INVALID,
    ),
]
TENSORS = [
    Case(f"tensor case {i}: {match or code.name}", "student", method, request, code)
    for i, (method, request, code, match) in enumerate(BAD_REQUESTS)
]
CORPUS = TRANSPORT + IDENTITY + POLICY_CASES + MORE_TENSORS + TENSORS


def _expired_credentials(pki) -> grpc.ChannelCredentials:
    return expired_client_credentials(pki["trusted"], "student")


def _channel(address: str, pki, caller: str) -> grpc.Channel:
    trusted, foreign = pki["trusted"], pki["foreign"]
    match caller:
        case "foreign":
            return grpc.secure_channel(
                address,
                grpc.ssl_channel_credentials(
                    trusted.ca.cert.read_bytes(),
                    foreign.client.key.read_bytes(),
                    foreign.client.cert.read_bytes(),
                ),
            )
        case "anonymous":
            return grpc.secure_channel(
                address, grpc.ssl_channel_credentials(trusted.ca.cert.read_bytes())
            )
        case "plaintext":
            return grpc.insecure_channel(address)
        case "expired":
            return grpc.secure_channel(address, _expired_credentials(pki))
        case "student":
            return open_channel(client_config(address, pki))
        case name:
            return open_channel(client_config(address, pki, name=name))


def test_the_corpus_has_at_least_50_cases() -> None:
    assert len(CORPUS) >= 50
    assert len({case.name for case in CORPUS}) == len(CORPUS)


def test_every_case_gets_its_status_and_the_node_keeps_serving(
    inprocess_node, dev_pki, digits_teachers, tmp_path
) -> None:
    policy = {**POLICY, "budget_file": str(tmp_path / "budget.json")}
    address = inprocess_node(policy=policy, limits={"max_batch": 64, "max_message_bytes": 200_000})
    trusted_channel = open_channel(client_config(address, dev_pki))
    trusted = teacher_pb2_grpc.TeacherServiceStub(trusted_channel)
    local = InProcessTeacher.from_package(digits_teachers.packages[0])
    check = torch.randn(8, *SHAPE)
    expected = local.query(check).logits
    outcomes = {}
    for case in CORPUS:
        channel = _channel(address, dev_pki, case.caller)
        stub = teacher_pb2_grpc.TeacherServiceStub(channel)
        try:
            getattr(stub, case.method)(case.request, timeout=10)
            code, details = OK, ""
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""
        finally:
            channel.close()
        outcomes[case.name] = code
        assert code == case.code, (case.name, details)
        assert "Traceback" not in details
        assert 'File "' not in details
        reply = trusted.Query(teacher_pb2.QueryRequest(images=encode(check)), timeout=10)
        answer = torch.frombuffer(bytearray(reply.logits.data), dtype=torch.float32).view(8, 10)
        assert torch.equal(answer, expected), case.name
    trusted_channel.close()
    assert sum(code != OK for code in outcomes.values()) >= 50
