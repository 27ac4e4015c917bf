"""The bad-input corpus: transport, identity, policy and tensor cases, each with its status code,
and the attacks on what leaves the node (issue 17), each written as the attacker would run it.

After every case the node still answers a trusted caller correctly, and no refusal carries a
traceback. The node's client CA bundle holds three CAs (the dev CA, a rogue CA with the very
same name, and another organization's CA), so every rule names its issuer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import torch

from cdfkd.protos import teacher_pb2, teacher_pb2_grpc
from cdfkd.protos.codec import encode
from cdfkd.student_node.teachers.local import InProcessTeacher
from cdfkd.student_node.teachers.remote import RemoteTeacher, open_channel
from tests.conftest import client_config
from tests.helpers import expired_client_credentials
from tests.teacher_node.test_service import BAD_REQUESTS

SHAPE = (1, 16, 16)
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
DENIED = grpc.StatusCode.PERMISSION_DENIED
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE  # a refused TLS handshake, as the client sees it
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED

#: The rules; ``_policy`` adds the dev CA as every rule's issuer (the bundle holds three CAs).
POLICY: dict[str, dict[str, dict[str, Any]]] = {
    "callers": {
        "student": {"mode": "full"},
        "caller-0": {"mode": "logits_only"},
        "caller-1": {"mode": "no_features"},
        "caller-2": {"budget_images": 0},
        "caller-3": {"rate_images_per_s": 1, "burst_images": 4},
        # Noisy logits only: features, the BN term and gradients would undo the noise.
        "caller-4": {"perturbation": {"logits_sigma": 1.0}},
        # Everything noised: features, R(x), gradients (clipped, capped, proportional noise).
        "caller-5": {
            "perturbation": {
                "logits_sigma": 1.0,
                "features_sigma": 1.0,
                "bn_loss_sigma": 0.1,
                "gradient_sigma": 0.5,
                "grad_logits_max_norm": 1.0,
                "bn_weight_max": 0.05,
            }
        },
        # Temperature and top-k, no noise: gradients through the same transform.
        "caller-6": {"perturbation": {"temperature": 4.0, "top_k": 3}},
        # Noisy logits with a budget: what averaging costs.
        "caller-7": {"budget_images": 64 * 40, "perturbation": {"logits_sigma": 1.0}},
        "trainer": {"san_uri": "spiffe://org/student", "mode": "logits_only"},
    }
}


def _policy(identity_pki, tmp_path) -> dict:
    issuer = str(identity_pki.trusted_ca)
    callers = {name: {**rule, "issuer": issuer} for name, rule in POLICY["callers"].items()}
    return {"callers": callers, "budget_file": str(tmp_path / "budget.json")}


@dataclass(frozen=True)
class Case:
    name: str
    # "student", a client name, "foreign", "anonymous", "plaintext", "expired", or a
    # certificate of the identity_pki fixture ("rogue-student", "two-cns", ...)
    caller: str
    method: str
    request: object
    code: grpc.StatusCode


def _images(batch: int = 4) -> teacher_pb2.Tensor:
    return encode(torch.randn(batch, *SHAPE))


def _grad(batch: int = 4, classes: int = 10) -> teacher_pb2.Tensor:
    return encode(torch.randn(batch, classes))


def _tensor(dtype: str, shape: list[int], data: bytes) -> teacher_pb2.Tensor:
    return teacher_pb2.Tensor(dtype=dtype, shape=shape, data=data)


def _query(**flags: bool) -> teacher_pb2.QueryRequest:
    return teacher_pb2.QueryRequest(images=_images(), **flags)


def _metadata() -> teacher_pb2.GetMetadataRequest:
    return teacher_pb2.GetMetadataRequest()


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
IDENTITY += [
    Case("another CA's student", "orgb-student", "GetMetadata", _metadata(), DENIED),
    Case("another CA's student queries", "orgb-student", "Query", _query(), DENIED),
    Case("same-named rogue CA's student", "rogue-student", "Query", _query(), UNAVAILABLE),
    Case("unlisted SAN-only certificate", "spiffe-other", "Query", _query(), DENIED),
    Case("listed SAN-only certificate", "spiffe-student", "Query", _query(), OK),
    Case("two common names", "two-cns", "Query", _query(), UNAUTHENTICATED),
    Case("no name at all", "no-name", "Query", _query(), UNAUTHENTICATED),
    Case("pinned key of no rule", "pinned", "GetMetadata", _metadata(), DENIED),
]
POLICY_CASES = [
    Case("noisy caller asks features", "caller-4", "Query", _query(want_features=True), DENIED),
    Case("noisy caller asks the BN term", "caller-4", "Query", _query(want_bn_loss=True), DENIED),
    Case(
        "noisy caller asks gradients",
        "caller-4",
        "InputGrad",
        teacher_pb2.InputGradRequest(images=_images(), grad_logits=_grad()),
        DENIED,
    ),
    Case(
        "tempered caller asks the BN gradient",
        "caller-6",
        "InputGrad",
        teacher_pb2.InputGradRequest(images=_images(), grad_logits=_grad(), bn_weight=0.1),
        DENIED,
    ),
    Case(
        "tempered caller asks gradients",
        "caller-6",
        "InputGrad",
        teacher_pb2.InputGradRequest(images=_images(), grad_logits=_grad()),
        OK,
    ),
    Case(
        "noised caller rescales its cotangent by 1e6",
        "caller-5",
        "InputGrad",
        teacher_pb2.InputGradRequest(
            images=_images(), grad_logits=encode(1e6 * torch.randn(4, 10)), bn_weight=1e6
        ),
        OK,
    ),
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


def _channel(address: str, pki, caller: str, identity_pki=None) -> grpc.Channel:
    trusted, foreign = pki["trusted"], pki["foreign"]
    if identity_pki is not None and caller in identity_pki.clients:
        key, cert = identity_pki.clients[caller]
        credentials = grpc.ssl_channel_credentials(trusted.ca.cert.read_bytes(), key, cert)
        return grpc.secure_channel(address, credentials)
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
    inprocess_node, dev_pki, identity_pki, digits_teachers, tmp_path
) -> None:
    address = inprocess_node(
        policy=_policy(identity_pki, tmp_path),
        limits={"max_batch": 64, "max_message_bytes": 200_000},
        client_ca=identity_pki.bundle,
        # The rate cases (caller-3: 1 image/s, burst 4) on a clock that stands still: "over the
        # rate" is refused however long the cases before it take on busy cores.
        monotonic=lambda: 1000.0,
    )
    trusted_channel = open_channel(client_config(address, dev_pki))
    trusted = teacher_pb2_grpc.TeacherServiceStub(trusted_channel)
    local = InProcessTeacher.from_package(digits_teachers.packages[0])
    check = torch.randn(8, *SHAPE)
    expected = local.query(check).logits
    outcomes = {}
    for case in CORPUS:
        channel = _channel(address, dev_pki, case.caller, identity_pki)
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


# --- Attacks on what leaves the node ----------------------------------------------------------
# Each one is what an attacker would run with ordinary requests. On the code before issue 17
# every one of them stripped the noise (or read what the owner hid).


class _Attacker:
    """A caller's raw stub, and the same teacher computed locally for the ground truth."""

    def __init__(self, address: str, pki, name: str, local: InProcessTeacher) -> None:
        self.channel = open_channel(client_config(address, pki, name=name))
        self.stub = teacher_pb2_grpc.TeacherServiceStub(self.channel)
        self.local = local

    def query(self, images: torch.Tensor, **flags: bool) -> teacher_pb2.QueryResponse:
        return self.stub.Query(teacher_pb2.QueryRequest(images=encode(images), **flags), timeout=30)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return _decode(self.query(images).logits)

    def input_grad(self, images: torch.Tensor, cotangent: torch.Tensor, bn_weight: float):
        request = teacher_pb2.InputGradRequest(
            images=encode(images), grad_logits=encode(cotangent), bn_weight=bn_weight
        )
        return _decode(self.stub.InputGrad(request, timeout=30).grad_images)


def _decode(message: teacher_pb2.Tensor) -> torch.Tensor:
    data = torch.frombuffer(bytearray(message.data), dtype=torch.float32)
    return data.view(*message.shape)


def _refused(call) -> grpc.StatusCode:  # noqa: ANN001 - a zero-argument call
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return OK


@pytest.fixture
def attack_node(inprocess_node, dev_pki, identity_pki, digits_teachers, tmp_path):
    """(address, local teacher) of a node with the corpus policy."""
    address = inprocess_node(
        policy=_policy(identity_pki, tmp_path),
        limits={"max_batch": 512},
        client_ca=identity_pki.bundle,
    )
    return address, InProcessTeacher.from_package(digits_teachers.packages[0])


def _least_squares_logits(features: torch.Tensor, logits: torch.Tensor, fresh: torch.Tensor):
    """Fit logits = W f + b on one batch, then predict the logits of ``fresh`` features."""
    design = torch.cat([features, torch.ones(len(features), 1)], dim=1).double()
    solution = torch.linalg.lstsq(design, logits.double()).solution
    return torch.cat([fresh, torch.ones(len(fresh), 1)], dim=1).double() @ solution


def test_least_squares_on_features_cannot_strip_the_logit_noise(attack_node, dev_pki) -> None:
    address, local = attack_node
    torch.manual_seed(7)
    batch, fresh = torch.randn(512, *SHAPE), torch.randn(256, *SHAPE)
    truth = local.query(fresh).logits.double()
    # Noisy logits, no feature noise configured: features are refused, so no fit is possible.
    noisy_only = _Attacker(address, dev_pki, "caller-4", local)
    assert _refused(lambda: noisy_only.query(batch, want_features=True)) == DENIED
    # Features with their own noise: fit the last layer on one batch, predict fresh logits.
    attacker = _Attacker(address, dev_pki, "caller-5", local)
    reply = attacker.query(batch, want_features=True)
    fresh_reply = attacker.query(fresh, want_features=True)
    estimate = _least_squares_logits(
        _decode(reply.features), _decode(reply.logits), _decode(fresh_reply.features)
    )
    answered = _decode(fresh_reply.logits).double()
    best = min(
        (estimate - truth).std().item(),
        (answered - truth).std().item(),
        ((estimate + answered) / 2 - truth).std().item(),
    )
    print(f"\nleast squares: best estimate error {best:.3f} (logits_sigma 1.0)")
    # With exact features (before issue 17) the same fit gave the logits to 0.43 sigma from
    # this one batch (measured on the digits teacher), and less with every further batch; with
    # features_sigma = 1 it measured 0.64 sigma: noisy features are a second view of the
    # logits, which the threat model in deploy/teacher/README.md states.
    assert best > 0.5


def test_rescaling_the_cotangent_does_not_shrink_the_noise(attack_node, dev_pki) -> None:
    address, local = attack_node
    attacker = _Attacker(address, dev_pki, "caller-5", local)
    torch.manual_seed(8)
    images = torch.randn(64, *SHAPE)
    cotangent = torch.randn(64, 10)
    cotangent = 0.5 * cotangent / cotangent.norm(dim=1, keepdim=True)  # inside the clip of 1.0

    def noise_to_signal(scale: float, bn_weight: float) -> float:
        answer = attacker.input_grad(images, scale * cotangent, scale * bn_weight)
        # What the node computed before its noise: the clipped and capped request.
        rows = (scale * cotangent).norm(dim=1, keepdim=True)
        clipped = scale * cotangent * torch.clamp(1.0 / rows, max=1.0)
        capped = min(scale * bn_weight, 0.05)
        signal = local.input_grad(images, clipped, capped)
        return ((answer - signal).norm() / signal.norm()).item()

    for bn_weight in (0.0, 0.01):
        ratios = {scale: noise_to_signal(scale, bn_weight) for scale in (1e-3, 1.0, 1e6)}
        print(f"\nnoise/signal by scale (bn_weight {bn_weight}): {ratios}")
        assert ratios[1.0] > 0.1  # the noise is there
        for scale in (1e-3, 1e6):  # and no scale of the request shrinks it
            assert ratios[scale] > 0.8 * ratios[1.0], (scale, ratios)


def test_the_bn_term_is_never_exact_for_a_perturbing_rule(attack_node, dev_pki) -> None:
    address, local = attack_node
    torch.manual_seed(9)
    batches = [torch.randn(32, *SHAPE) for _ in range(24)]
    noisy_only = _Attacker(address, dev_pki, "caller-4", local)
    assert _refused(lambda: noisy_only.query(batches[0], want_bn_loss=True)) == DENIED
    attacker = _Attacker(address, dev_pki, "caller-5", local)
    errors = torch.tensor(
        [
            attacker.query(batch, want_bn_loss=True).bn_loss - float(local.query(batch).bn_loss)
            for batch in batches
        ]
    )
    print(f"\nbn_loss error std {errors.std().item():.4f} (bn_loss_sigma 0.1)")
    assert 0.05 < errors.std().item() < 0.2
    # The same batch reordered is the same question: no fresh noise to average.
    first, reordered = batches[0], batches[0].flip(0)
    assert attacker.query(first, want_bn_loss=True).bn_loss == pytest.approx(
        attacker.query(reordered, want_bn_loss=True).bn_loss, abs=1e-4
    )


def test_input_gradients_follow_the_temperature_and_top_k(attack_node, dev_pki) -> None:
    address, local = attack_node
    attacker = _Attacker(address, dev_pki, "caller-6", local)
    torch.manual_seed(10)
    images = torch.randn(16, *SHAPE)
    logits = local.query(images).logits
    ranked = logits.argsort(dim=1, descending=True)

    def one_hot(classes: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(classes, 10).float()

    # The attacker asks about the lowest class, which the top-3 truncation hides: the answer
    # is the gradient of what it was answered for that class (the 3rd largest logit, / T),
    # not the hidden logit's own gradient.
    answer = attacker.input_grad(images, one_hot(ranked[:, -1]), 0.0)
    hidden = local.input_grad(images, one_hot(ranked[:, -1]), 0.0)
    answered = local.input_grad(images, one_hot(ranked[:, 2]), 0.0) / 4.0
    torch.testing.assert_close(answer, answered, rtol=1e-4, atol=1e-6)
    assert (answer - hidden / 4.0).abs().max() > 1e-3
    # A visible class: the gradient of logits / temperature, not of the logits.
    top = logits.argmax(dim=1)
    cotangent = torch.nn.functional.one_hot(top, 10).float()
    answer = attacker.input_grad(images, cotangent, 0.0)
    raw = local.input_grad(images, cotangent, 0.0)
    torch.testing.assert_close(answer, raw / 4.0, rtol=1e-4, atol=1e-6)


def test_averaging_repeated_queries(attack_node, dev_pki) -> None:
    """Exact repeats get the same noise; near-copies do average, and the budget pays for them.

    This is the honest limit of output noise: n near-copies of an image cost n images of the
    budget and divide the noise by about sqrt(n). Only the budget bounds it.
    """
    address, local = attack_node
    attacker = _Attacker(address, dev_pki, "caller-7", local)
    torch.manual_seed(11)
    images = torch.randn(64, *SHAPE)
    truth = local.query(images).logits
    repeats = 16
    same = torch.stack([attacker.logits(images) for _ in range(repeats)])
    assert all(torch.equal(answer, same[0]) for answer in same)
    single_error = (same[0] - truth).std().item()
    assert (same.mean(0) - truth).std().item() == pytest.approx(single_error)
    near = torch.stack(
        [attacker.logits(images + 1e-5 * torch.randn_like(images)) for _ in range(repeats)]
    )
    averaged_error = (near.mean(0) - truth).std().item()
    print(f"\naveraging: single {single_error:.3f}, 16 near-copies {averaged_error:.3f}")
    assert averaged_error < 0.5 * single_error  # the limit, stated above
    with RemoteTeacher(client_config(address, dev_pki, name="caller-7")) as remote:
        assert remote.metadata.remaining_budget == 64 * 40 - 2 * repeats * 64
    for _ in range(40 - 2 * repeats):
        attacker.logits(images + 1e-5 * torch.randn_like(images))
    assert _refused(lambda: attacker.logits(images)) == EXHAUSTED
