"""What the operator sees: Prometheus metrics, the health endpoint, audit failures, log format,
message size limits; on real nodes over mTLS, scraped over real HTTP on loopback."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from cdfkd.coordinator.cli import main
from cdfkd.protos import teacher_pb2, teacher_pb2_grpc
from cdfkd.protos.codec import encode
from cdfkd.student_node.errors import TeacherRefused
from cdfkd.student_node.teachers.remote import RemoteTeacher, open_channel
from cdfkd.teacher_node.config import parse_teacher_config
from cdfkd.teacher_node.errors import TeacherConfigError
from cdfkd.teacher_node.server import MESSAGE_OVERHEAD_BYTES, Node, build_node
from tests.conftest import client_config, node_config

SHAPE = (1, 16, 16)


@pytest.fixture
def node(digits_teachers, dev_pki, tmp_path: Path) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def start(**sections: Any) -> Node:
        config = node_config(digits_teachers.packages[0], dev_pki, tmp_path, **sections)
        built = build_node(config)
        built.start()
        nodes.append(built)
        return built

    yield start
    for built in nodes:
        built.stop(grace=None)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_requests_latency_images_budgets_and_calls_in_flight(
    node, dev_pki, tmp_path: Path
) -> None:
    running = node(
        policy={
            "callers": {"student": {"budget_images": 100}, "caller-0": {}},
            "budget_file": str(tmp_path / "budget.json"),
        },
        audit={"path": str(tmp_path / "audit.jsonl"), "refusals_per_minute": 5},
        metrics={"address": "127.0.0.1:0", "health_address": "127.0.0.1:0"},
    )
    address = f"127.0.0.1:{running.port}"
    with RemoteTeacher(client_config(address, dev_pki)) as remote:
        remote.query(torch.randn(4, *SHAPE))
        remote.input_grad(torch.randn(6, *SHAPE), torch.randn(6, 10), 0.0)
    for _ in range(20):  # a caller not on the allow-list, refused every time
        with pytest.raises(TeacherRefused):
            RemoteTeacher(client_config(address, dev_pki, name="other-student"))
    status, text = _get(f"http://127.0.0.1:{running.endpoints['metrics'].port}/metrics")
    assert status == 200
    samples = _samples(text)
    requests = "cdfkd_requests_total"
    assert samples[(requests, (("caller", "student"), ("decision", "allowed"), ("rpc", "Query")))]
    assert (
        samples[(requests, (("caller", "student"), ("decision", "allowed"), ("rpc", "InputGrad")))]
        == 1
    )
    assert (
        samples[
            (
                requests,
                (("caller", "other-student"), ("decision", "denied"), ("rpc", "GetMetadata")),
            )
        ]
        == 20
    )
    latency = "cdfkd_request_latency_seconds_count"
    assert samples[(latency, (("decision", "allowed"), ("rpc", "Query")))] == 1
    assert (
        samples[("cdfkd_request_latency_seconds_sum", (("decision", "allowed"), ("rpc", "Query")))]
        > 0
    )
    images = "cdfkd_images_answered_total"
    assert samples[(images, (("caller", "student"), ("rpc", "Query")))] == 4
    assert samples[(images, (("caller", "student"), ("rpc", "InputGrad")))] == 6
    assert samples[("cdfkd_budget_remaining_images", (("caller", "student"),))] == 90
    assert ("cdfkd_budget_remaining_images", (("caller", "caller-0"),)) not in samples  # no budget
    assert samples[("cdfkd_calls_in_flight", ())] == 0
    # 20 refusals from one peer, 5 lines a minute: the rest counted, not written.
    assert samples[("cdfkd_audit_refusals_suppressed_total", ())] >= 14
    health_url = f"http://127.0.0.1:{running.endpoints['health'].port}/healthz"
    assert _get(health_url) == (200, "SERVING\n")
    assert _get(health_url.replace("/healthz", "/other"))[0] == 404
    running.stop(grace=None)
    with pytest.raises(urllib.error.URLError):
        _get(health_url)


def test_a_failed_audit_write_refuses_with_unavailable_and_no_file_path(
    node, dev_pki, tmp_path: Path, caplog
) -> None:
    audit = tmp_path / "logs" / "audit.jsonl"
    running = node(
        policy={"callers": {"student": {}}},
        audit={"path": str(audit)},
        metrics={"health_address": "127.0.0.1:0"},
    )
    health_url = f"http://127.0.0.1:{running.endpoints['health'].port}/healthz"
    channel = open_channel(client_config(f"127.0.0.1:{running.port}", dev_pki))
    stub = teacher_pb2_grpc.TeacherServiceStub(channel)
    request = teacher_pb2.QueryRequest(images=encode(torch.randn(4, *SHAPE)))
    stub.Query(request, timeout=30)
    audit.unlink()
    audit.mkdir()  # the fault: the log cannot be appended to
    with caplog.at_level(logging.ERROR, logger="cdfkd"):
        for call in (
            lambda: stub.Query(request, timeout=30),
            lambda: stub.Query(
                teacher_pb2.QueryRequest(images=encode(torch.randn(1, *SHAPE))), timeout=30
            ),
        ):  # an answer and a refusal (batch of 1) alike
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "audit log" in refused.value.details()
            assert str(tmp_path) not in refused.value.details()
    assert any("cannot write the audit log" in r.getMessage() for r in caplog.records)
    assert any(str(audit) in r.getMessage() for r in caplog.records)  # the operator sees where
    assert _get(health_url) == (503, "NOT_SERVING\n")
    assert running.metrics.audit_failures._value.get() == 2  # noqa: SLF001
    audit.rmdir()
    assert stub.Query(request, timeout=30).logits.shape[0] > 0  # the node kept serving
    assert _get(health_url) == (200, "SERVING\n")
    channel.close()


def test_the_message_limit_follows_max_batch_and_the_input_shape(node, dev_pki) -> None:
    running = node(policy={"callers": {"student": {}}}, limits={"max_batch": 64})
    address = f"127.0.0.1:{running.port}"
    with RemoteTeacher(client_config(address, dev_pki)) as remote:
        info = remote.info()
        limit = remote.metadata.max_message_bytes
        side = remote.metadata.max_image_side  # the largest query image the node accepts
        assert side == 2 * max(SHAPE[1:])  # the default: twice the teacher's own side
        images = 64 * (SHAPE[0] * side * side + 10)  # an InputGrad request of max_batch
        outputs = 64 * (10 + info.feature_dim)  # a Query reply: logits + features
        assert limit == max(images, outputs) * 4 + MESSAGE_OVERHEAD_BYTES
        assert limit < 1024 * 1024  # not the old fixed 64 MiB
        gradient = remote.input_grad(torch.randn(64, *SHAPE), torch.randn(64, 10), 0.1)
        assert gradient.shape == (64, *SHAPE)  # the largest batch fits
    channel = open_channel(client_config(address, dev_pki))
    oversized = teacher_pb2.QueryRequest(images=encode(torch.randn(400, SHAPE[0], side, side)))
    assert oversized.ByteSize() > limit
    with pytest.raises(grpc.RpcError) as refused:
        teacher_pb2_grpc.TeacherServiceStub(channel).Query(oversized, timeout=30)
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    channel.close()


def test_metrics_settings_are_validated(digits_teachers, dev_pki, tmp_path: Path) -> None:
    with pytest.raises(TeacherConfigError, match="health_address.*loopback"):
        node_config(
            digits_teachers.packages[0],
            dev_pki,
            tmp_path,
            metrics={"health_address": "0.0.0.0:8081"},
            policy={"callers": {"student": {}}},
        )
    with pytest.raises(TeacherConfigError, match="max_in_flight_per_caller"):
        node_config(
            digits_teachers.packages[0],
            dev_pki,
            tmp_path,
            node={"workers": 2},
            limits={"max_in_flight_per_caller": 3},
            policy={"callers": {"student": {}}},
        )
    assert (
        parse_teacher_config(
            {
                "node": {"package": "p"},
                "tls": {"insecure": True},
                "policy": {"allow_any_trusted_caller": True},
                "metrics": {"address": "[::]:9100"},
            }
        ).metrics.address
        == "[::]:9100"
    )


def test_serve_logs_json_lines_when_asked(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "teacher.toml"
    assert main(["teacher", "serve", "--config", str(missing), "--log-format", "json"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines
    record = json.loads(lines[-1])
    assert record["level"] == "ERROR"
    assert record["logger"].startswith("cdfkd")
    assert str(missing) in record["message"]
    assert main(["teacher", "serve", "--config", str(missing), "--log-format", "xml"]) == 2
