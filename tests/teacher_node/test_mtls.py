"""Mutual TLS: only clients whose certificate chains to the owner's CA get an answer."""

from __future__ import annotations

import grpc
import pytest
import torch

from cdfkd.protos import teacher_pb2, teacher_pb2_grpc
from cdfkd.student_node.errors import TeacherUnavailable
from cdfkd.student_node.teachers.remote import RemoteTeacher, RemoteTeacherConfig
from tests.conftest import client_config
from tests.helpers import expired_client_credentials


def _query_ok(address: str, pki) -> None:
    with RemoteTeacher(client_config(address, pki)) as remote:
        assert remote.query(torch.randn(4, 1, 16, 16)).logits.shape == (4, 10)


def _metadata_call(channel: grpc.Channel) -> grpc.StatusCode:
    stub = teacher_pb2_grpc.TeacherServiceStub(channel)
    try:
        stub.GetMetadata(teacher_pb2.GetMetadataRequest(), timeout=5)
    except grpc.RpcError as error:
        return error.code()
    finally:
        channel.close()
    return grpc.StatusCode.OK


def test_untrusted_clients_are_refused_and_the_node_keeps_serving(
    inprocess_node, dev_pki, tmp_path
) -> None:
    address = inprocess_node()
    trusted = dev_pki["trusted"]
    foreign = dev_pki["foreign"]
    _query_ok(address, dev_pki)

    # A client certificate from another CA: the handshake fails.
    intruder = grpc.ssl_channel_credentials(
        root_certificates=trusted.ca.cert.read_bytes(),
        private_key=foreign.client.key.read_bytes(),
        certificate_chain=foreign.client.cert.read_bytes(),
    )
    assert _metadata_call(grpc.secure_channel(address, intruder)) == grpc.StatusCode.UNAVAILABLE
    _query_ok(address, dev_pki)

    # No client certificate at all.
    anonymous = grpc.ssl_channel_credentials(root_certificates=trusted.ca.cert.read_bytes())
    assert _metadata_call(grpc.secure_channel(address, anonymous)) == grpc.StatusCode.UNAVAILABLE
    _query_ok(address, dev_pki)

    # Plaintext.
    assert _metadata_call(grpc.insecure_channel(address)) == grpc.StatusCode.UNAVAILABLE
    _query_ok(address, dev_pki)

    # The student side reports it with a message that says what to check.
    config = RemoteTeacherConfig(
        address=address,
        ca=trusted.ca.cert,
        cert=foreign.client.cert,
        key=foreign.client.key,
        retries=0,
        deadline_s=5,
    )
    with pytest.raises(TeacherUnavailable, match="certificate is trusted"):
        RemoteTeacher(config)
    _query_ok(address, dev_pki)


def test_a_server_from_an_unknown_ca_is_not_trusted_by_the_student(inprocess_node, dev_pki) -> None:
    address = inprocess_node()
    foreign = dev_pki["foreign"]
    config = RemoteTeacherConfig(
        address=address,
        ca=foreign.ca.cert,
        cert=foreign.client.cert,
        key=foreign.client.key,
        retries=0,
        deadline_s=5,
    )
    with pytest.raises(TeacherUnavailable):
        RemoteTeacher(config)


def test_an_expired_client_certificate_is_refused(inprocess_node, dev_pki, tmp_path) -> None:
    address = inprocess_node()
    credentials = expired_client_credentials(dev_pki["trusted"], "expired")
    assert _metadata_call(grpc.secure_channel(address, credentials)) == grpc.StatusCode.UNAVAILABLE
    _query_ok(address, dev_pki)


def test_plaintext_needs_an_explicit_choice(digits_teachers, tmp_path, caplog) -> None:
    from cdfkd.teacher_node.config import parse_teacher_config
    from cdfkd.teacher_node.errors import TeacherConfigError
    from cdfkd.teacher_node.server import build_server

    with pytest.raises(TeacherConfigError, match="mutual TLS needs cert, key and client_ca"):
        parse_teacher_config({"node": {"package": str(digits_teachers.packages[0])}})
    config = parse_teacher_config(
        {
            "node": {"package": str(digits_teachers.packages[0])},
            "tls": {"insecure": True},
            "policy": {"allow_any_trusted_caller": True},
        }
    )
    server, port, _ = build_server(config)
    assert port > 0
    assert "WITHOUT TLS" in caplog.text
    server.stop(None)
