"""``cdfkd pki dev`` keeps an existing CA, ``cdfkd pki issue`` issues from one, ``--version``."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cdfkd.coordinator.cli import main


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _no_traceback(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_pki_dev_refuses_to_replace_a_ca_unless_forced(tmp_path: Path, capsys) -> None:
    out = tmp_path / "pki"
    assert main(["pki", "dev", "--out", str(out)]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["pki", "dev", "--out", str(out)]) == 2
    err = _no_traceback(capsys)
    assert "already holds a CA (ca.pem, ca.key)" in err
    assert "--force" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["pki", "dev", "--out", str(out), "--force"]) == 0
    assert (out / "ca.pem").read_bytes() != before["ca.pem"]
    server = _cert(out / "server.pem")
    server.verify_directly_issued_by(_cert(out / "ca.pem"))


def test_pki_issue_makes_client_and_server_certificates_from_an_existing_ca(
    tmp_path: Path, capsys
) -> None:
    ca_dir = tmp_path / "ca"
    assert main(["pki", "dev", "--out", str(ca_dir)]) == 0
    capsys.readouterr()
    issued = tmp_path / "issued"
    ca_args = ["--ca-cert", str(ca_dir / "ca.pem"), "--ca-key", str(ca_dir / "ca.key")]
    assert main(["pki", "issue", *ca_args, "--client", "hospital-b", "--out", str(issued)]) == 0
    files = json.loads(capsys.readouterr().out)
    client = _cert(Path(files["cert"]))
    ca = _cert(ca_dir / "ca.pem")
    client.verify_directly_issued_by(ca)
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "hospital-b"
    usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert (Path(files["key"]).stat().st_mode & 0o777) == 0o600
    assert (issued / "ca.pem").read_bytes() == (ca_dir / "ca.pem").read_bytes()

    command = ["pki", "issue", *ca_args, "--server-name", "node.example.org"]
    assert main([*command, "--server-name", "10.0.0.7", "--out", str(issued)]) == 0
    server = _cert(Path(json.loads(capsys.readouterr().out)["cert"]))
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["node.example.org"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]

    # The same identity again is refused unless forced.
    again = ["pki", "issue", *ca_args, "--client", "hospital-b", "--out", str(issued)]
    assert main(again) == 2
    assert "client-hospital-b.pem" in _no_traceback(capsys)
    assert main([*again, "--force"]) == 0


def test_pki_issue_refuses_a_key_that_is_not_the_cas(tmp_path: Path, capsys) -> None:
    assert main(["pki", "dev", "--out", str(tmp_path / "a")]) == 0
    assert main(["pki", "dev", "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    code = main(
        [
            "pki",
            "issue",
            "--ca-cert",
            str(tmp_path / "a" / "ca.pem"),
            "--ca-key",
            str(tmp_path / "b" / "ca.key"),
            "--client",
            "x",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    assert "is not the key of --ca-cert" in _no_traceback(capsys)
    # A leaf certificate is no CA.
    code = main(
        [
            "pki",
            "issue",
            "--ca-cert",
            str(tmp_path / "a" / "server.pem"),
            "--ca-key",
            str(tmp_path / "a" / "server.key"),
            "--client",
            "x",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    assert "is not a CA certificate" in _no_traceback(capsys)
    assert not (tmp_path / "out").exists()


def test_pki_issue_needs_exactly_one_identity(tmp_path: Path, capsys) -> None:
    base = ["pki", "issue", "--ca-cert", "c", "--ca-key", "k", "--out", str(tmp_path)]
    assert main(base) == 2
    assert main([*base, "--client", "a", "--server-name", "b"]) == 2
    assert "not allowed with" in capsys.readouterr().err


def test_version(capsys) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"cdfkd {version('cdfkd')}"


@pytest.mark.parametrize("flag", ["--mean", "--input-shape"])
def test_package_flags_with_bad_numbers_exit_2(tmp_path: Path, flag: str, capsys) -> None:
    argv = {
        "--out": str(tmp_path / "p"),
        "--factory": "tests.owner_models:small_bn_net",
        "--weights": str(tmp_path / "w.safetensors"),
        "--input-shape": "3,20,20",
        "--num-classes": "4",
        "--mean": "0.5,0.5,0.5",
        "--std": "0.2,0.2,0.2",
    }
    argv[flag] = "a,b"
    assert main(["teacher", "package", *[x for pair in argv.items() for x in pair]]) == 2
    assert flag in _no_traceback(capsys)
