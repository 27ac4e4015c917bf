"""Who gets in: identities bound to their issuing CA and subject, deny by default.

Unit tests resolve certificates made with ``cryptography``; the service tests show the same
certificates to a real node over mutual TLS, and the CLI tests start ``cdfkd teacher serve``.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from cdfkd.coordinator.cli import main
from cdfkd.protos import teacher_pb2, teacher_pb2_grpc
from cdfkd.teacher_node.config import parse_teacher_config
from cdfkd.teacher_node.errors import PermissionDenied, TeacherConfigError, Unauthenticated
from cdfkd.teacher_node.identity import (
    CallerIdentities,
    certificate_sha256,
    read_peer,
    spki_sha256,
)
from cdfkd.teacher_node.pki import create_ca, issue
from cdfkd.teacher_node.policy import CallerRule
from tests.conftest import IdentityPki
from tests.helpers import client_certificate, pem

OK = grpc.StatusCode.OK


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained LeNet-5-BN teacher package: identity does not need a good teacher."""
    from tests.helpers import untrained_lenet_package

    directory = tmp_path_factory.mktemp("identity_package")
    return untrained_lenet_package(directory, name="random", mean=0.5, std=0.25)


def _identities(rules: dict[str, CallerRule], *cas: x509.Certificate, any_caller: bool = False):
    bundle = b"".join(pem(*_dummy_key_for(ca))[1] for ca in cas)
    return CallerIdentities(rules, bundle, any_caller)


def _dummy_key_for(ca: x509.Certificate):  # noqa: ANN202 - (key, cert) for pem()
    return ec.generate_private_key(ec.SECP256R1()), ca


def _peer(cert: x509.Certificate, *cas: x509.Certificate, chain: tuple = ()):  # noqa: ANN202
    leaf = pem(ec.generate_private_key(ec.SECP256R1()), cert)[1]
    sent = b"".join(pem(ec.generate_private_key(ec.SECP256R1()), c)[1] for c in chain)
    return read_peer(leaf, sent, list(cas))


@pytest.fixture(scope="module")
def cas():  # noqa: ANN201 - three CAs: a, a rogue with a's name, b
    a = create_ca("org A CA")
    rogue = create_ca("org A CA")
    b = create_ca("org B CA")
    return {"a": a, "rogue": rogue, "b": b}


def test_a_second_ca_in_the_bundle_cannot_mint_student(cas, tmp_path: Path) -> None:
    (a_key, a_cert), (rogue_key, rogue_cert), (b_key, b_cert) = cas.values()
    issuer_file = tmp_path / "org-a.pem"
    issuer_file.write_bytes(pem(a_key, a_cert)[1])
    bundle = (a_cert, rogue_cert, b_cert)
    by_path = _identities({"student": CallerRule(issuer=str(issuer_file))}, *bundle)
    by_hash = _identities(
        {"student": CallerRule(issuer="sha256:" + certificate_sha256(a_cert).upper())}, *bundle
    )
    for identities in (by_path, by_hash):
        _, genuine = client_certificate(a_key, a_cert, common_names=("student",))
        assert identities.resolve(_peer(genuine, *bundle)) == "student"
        for key, ca in ((rogue_key, rogue_cert), (b_key, b_cert)):  # same CN, other issuer
            _, forged = client_certificate(key, ca, common_names=("student",))
            with pytest.raises(PermissionDenied, match="'student' is not on this node's allow"):
                identities.resolve(_peer(forged, *bundle))


def test_with_several_cas_a_rule_must_name_its_issuer(cas) -> None:
    bundle = [cert for _, cert in cas.values()]
    with pytest.raises(TeacherConfigError, match=r"policy.callers.student: .* 3 CAs"):
        _identities({"student": CallerRule()}, *bundle)
    with pytest.raises(TeacherConfigError, match="policy.callers.student.issuer: cannot read"):
        _identities({"student": CallerRule(issuer="/nonexistent/ca.pem")}, *bundle)
    a_key, a_cert = cas["a"]
    single = _identities({"student": CallerRule()}, a_cert)  # one CA: it is the issuer
    _, cert = client_certificate(a_key, a_cert, common_names=("student",))
    assert single.resolve(_peer(cert, a_cert)) == "student"


def test_san_only_certificates_are_told_apart(cas) -> None:
    a_key, a_cert = cas["a"]
    rules = {
        "trainer": CallerRule(san_uri="spiffe://org/student"),
        "probe": CallerRule(san_dns="probe.org-a.example"),
    }
    identities = _identities(rules, a_cert)
    _, spiffe = client_certificate(a_key, a_cert, san_uris=("spiffe://org/student",))
    _, other = client_certificate(a_key, a_cert, san_uris=("spiffe://org/other",))
    _, probe = client_certificate(a_key, a_cert, san_dns=("PROBE.org-a.example",))
    assert identities.resolve(_peer(spiffe, a_cert)) == "trainer"
    assert identities.resolve(_peer(probe, a_cert)) == "probe"
    with pytest.raises(PermissionDenied, match="'spiffe://org/other' is not on"):
        identities.resolve(_peer(other, a_cert))
    # A rule named "" cannot exist, so SAN-only certificates never share the empty name.
    with pytest.raises(TeacherConfigError, match="must be non-empty"):
        parse_teacher_config(
            {"node": {"package": "p"}, "tls": {"insecure": True}, "policy": {"callers": {"": {}}}}
        )


def test_ambiguous_or_empty_identities_are_refused(cas) -> None:
    a_key, a_cert = cas["a"]
    rules = {"student": CallerRule(), "by-dns": CallerRule(san_dns="student")}
    identities = _identities(rules, a_cert, any_caller=True)
    _, two_cns = client_certificate(a_key, a_cert, common_names=("student", "admin"))
    with pytest.raises(Unauthenticated, match="2 common names"):
        identities.resolve(_peer(two_cns, a_cert))
    _, both = issue(a_key, a_cert, "student", client=True)  # CN=student and DNS SAN student
    with pytest.raises(Unauthenticated, match=r"matches the rules \['student', 'by-dns'\]"):
        identities.resolve(_peer(both, a_cert))
    _, nameless = client_certificate(a_key, a_cert)
    with pytest.raises(Unauthenticated, match="names no identity"):
        identities.resolve(_peer(nameless, a_cert))
    # allow_any_trusted_caller answers an unlisted caller under a name no rule can have.
    _, unlisted = client_certificate(a_key, a_cert, common_names=("visitor",))
    assert (
        identities.resolve(_peer(unlisted, a_cert))
        == "<visitor from CN=org A CA,O=cdfkd development>"
    )


def test_a_pinned_key_is_an_identity_whatever_the_name_or_ca(cas) -> None:
    (a_key, a_cert), (_, rogue_cert), (b_key, b_cert) = cas.values()
    key = ec.generate_private_key(ec.SECP256R1())
    _, pinned_cert = client_certificate(b_key, b_cert, common_names=("anything",), key=key)
    rules = {"workload": CallerRule(spki_sha256=spki_sha256(pinned_cert))}
    identities = _identities(rules, a_cert, rogue_cert, b_cert)  # no issuer needed with a pin
    assert identities.resolve(_peer(pinned_cert, a_cert, rogue_cert, b_cert)) == "workload"
    _, renewed = client_certificate(a_key, a_cert, common_names=("renewed",), key=key)
    assert identities.resolve(_peer(renewed, a_cert, rogue_cert, b_cert)) == "workload"
    _, same_name = client_certificate(b_key, b_cert, common_names=("anything",))
    with pytest.raises(PermissionDenied):
        identities.resolve(_peer(same_name, a_cert, rogue_cert, b_cert))


def test_the_issuer_is_found_by_signature_through_an_intermediate(cas) -> None:
    (a_key, a_cert), (_, rogue_cert) = cas["a"], cas["rogue"]
    intermediate_key = ec.generate_private_key(ec.SECP256R1())
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    intermediate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "team CA")]))
        .issuer_name(a_cert.subject)
        .public_key(intermediate_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(a_key, hashes.SHA256())
    )
    _, leaf = client_certificate(intermediate_key, intermediate, common_names=("student",))
    peer = _peer(leaf, rogue_cert, a_cert, chain=(leaf, intermediate))
    assert peer.issuers == (certificate_sha256(intermediate), certificate_sha256(a_cert))
    rules = {"student": CallerRule(issuer=certificate_sha256(a_cert))}
    assert _identities(rules, a_cert, rogue_cert).resolve(peer) == "student"
    with pytest.raises(Unauthenticated, match="does not chain"):
        _peer(leaf, rogue_cert)  # the intermediate not sent: no path by signature


# --- the same certificates against a real node over mutual TLS -------------------------------


def _node_policy(pki: IdentityPki, tmp_path: Path) -> dict:
    trusted = str(pki.trusted_ca)
    return {
        "callers": {
            "student": {"issuer": trusted},
            "trainer": {
                "issuer": trusted,
                "san_uri": "spiffe://org/student",
                "mode": "no_features",
            },
            "workload": {"spki_sha256": pki.pinned_spki, "mode": "logits_only"},
        },
        "budget_file": str(tmp_path / "budget.json"),
    }


def _call(address: str, dev_pki, client: tuple[bytes, bytes]) -> tuple[grpc.StatusCode, str]:
    key, cert = client
    credentials = grpc.ssl_channel_credentials(dev_pki["trusted"].ca.cert.read_bytes(), key, cert)
    with grpc.secure_channel(address, credentials) as channel:
        stub = teacher_pb2_grpc.TeacherServiceStub(channel)
        try:
            reply = stub.GetMetadata(teacher_pb2.GetMetadataRequest(), timeout=10)
        except grpc.RpcError as error:
            return error.code(), error.details() or ""
    return OK, reply.mode


def test_a_node_binds_identities_to_their_issuer(
    package: Path, dev_pki, identity_pki: IdentityPki, tmp_path: Path
) -> None:
    from cdfkd.teacher_node.server import build_server

    trusted = dev_pki["trusted"]
    config = parse_teacher_config(
        {
            "node": {"package": str(package), "address": "127.0.0.1:0"},
            "tls": {
                "cert": str(trusted.server.cert),
                "key": str(trusted.server.key),
                "client_ca": str(identity_pki.bundle),
            },
            "policy": _node_policy(identity_pki, tmp_path),
        }
    )
    server, port, _ = build_server(config)
    server.start()
    address = f"127.0.0.1:{port}"
    genuine = (trusted.client.key.read_bytes(), trusted.client.cert.read_bytes())
    try:
        clients = identity_pki.clients
        assert _call(address, dev_pki, genuine) == (OK, "full")
        assert _call(address, dev_pki, clients["spiffe-student"]) == (OK, "no_features")
        assert _call(address, dev_pki, clients["pinned"]) == (OK, "logits_only")
        # BoringSSL looks the issuer up by name and finds the genuine CA first: the rogue CA's
        # certificate fails the handshake (UNAVAILABLE). The name never decides the identity
        # either way (see the unit test above, which resolves it by signature).
        got, details = _call(address, dev_pki, clients["rogue-student"])
        assert got in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED), details
        refused = {
            "orgb-student": grpc.StatusCode.PERMISSION_DENIED,
            "spiffe-other": grpc.StatusCode.PERMISSION_DENIED,
            "two-cns": grpc.StatusCode.UNAUTHENTICATED,
            "no-name": grpc.StatusCode.UNAUTHENTICATED,
        }
        for name, code in refused.items():
            got, details = _call(address, dev_pki, clients[name])
            assert got == code, (name, details)
        assert _call(address, dev_pki, genuine) == (OK, "full")  # still serving
    finally:
        server.stop(grace=None).wait()


# --- cdfkd teacher serve refuses to start -----------------------------------------------------


def _write_config(path: Path, package: Path, dev_pki, client_ca: Path, policy: str) -> Path:
    trusted = dev_pki["trusted"]
    path.write_text(
        f'[node]\npackage = "{package}"\naddress = "127.0.0.1:0"\n'
        f'[tls]\ncert = "{trusted.server.cert}"\nkey = "{trusted.server.key}"\n'
        f'client_ca = "{client_ca}"\n' + policy
    )
    return path


def test_serve_refuses_to_start_without_caller_rules(
    package: Path, dev_pki, identity_pki: IdentityPki, tmp_path: Path, capsys
) -> None:
    ca = dev_pki["trusted"].ca.cert
    cases = {
        "no policy": ("", "no [policy.callers.NAME] table"),
        "no callers": (
            f'[policy]\nbudget_file = "{tmp_path / "b.json"}"\n',
            "allow_any_trusted_caller",
        ),
        "budget in memory": (
            "[policy.callers.student]\nbudget_images = 10\n",
            "no budget_file",
        ),
    }
    for name, (policy, message) in cases.items():
        config = _write_config(tmp_path / f"{len(name)}.toml", package, dev_pki, ca, policy)
        assert main(["teacher", "serve", "--config", str(config)]) == 2, name
        assert message in capsys.readouterr().err, name
    several = _write_config(
        tmp_path / "several.toml",
        package,
        dev_pki,
        identity_pki.bundle,
        "[policy.callers.student]\n",
    )
    assert main(["teacher", "serve", "--config", str(several)]) == 2
    assert "policy.callers.student: tls.client_ca holds 3 CAs" in capsys.readouterr().err
