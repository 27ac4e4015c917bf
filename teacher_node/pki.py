"""A development PKI made with ``cryptography``: a CA, server and client certificates.

``cdfkd pki dev --out DIR`` writes::

    ca.pem, ca.key                      the development CA (keep ca.key private)
    server.pem, server.key              SANs: localhost, 127.0.0.1, ::1 and any names given
    client.pem, client.key              a client identity (CN "student"), for student nodes

For production, each owner uses certificates from its own CA; a node trusts the CAs it lists.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Identity:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class DevPki:
    """The files written by :func:`create_dev_pki`."""

    ca: Identity
    server: Identity
    client: Identity


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cdfkd development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _write(
    directory: Path, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> Identity:
    key_path, cert_path = directory / f"{stem}.key", directory / f"{stem}.pem"
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Identity(cert_path, key_path)


def issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    *,
    server_names: tuple[str, ...] = (),
    client: bool = False,
    valid_from: datetime.datetime | None = None,
    valid_days: int = 365,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Issue a leaf certificate signed by the CA (server if ``server_names``, else client)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = valid_from or datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    names = server_names or (common_name,)
    builder = builder.add_extension(_san(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def create_ca(
    common_name: str = "cdfkd dev CA",
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA valid for ten years."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def create_dev_pki(
    out: Path,
    server_names: tuple[str, ...] = (),
    client_names: tuple[str, ...] = ("student",),
) -> DevPki:
    """Write a development CA, one server identity and client identities into ``out``.

    Args:
        out: Folder to write (created).
        server_names: Extra DNS names or IP addresses for the server certificate.
        client_names: Common names of client certificates; the first is written as
            ``client.pem``/``client.key``, the others as ``client-<name>.pem``/``.key``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = create_ca()
    ca = _write(out, "ca", ca_key, ca_cert)
    names = tuple(dict.fromkeys(DEFAULT_SERVER_NAMES + tuple(server_names)))
    server = _write(out, "server", *issue(ca_key, ca_cert, "teacher-node", server_names=names))
    clients = [
        _write(
            out,
            "client" if i == 0 else f"client-{name}",
            *issue(ca_key, ca_cert, name, client=True),
        )
        for i, name in enumerate(client_names)
    ]
    return DevPki(ca=ca, server=server, client=clients[0])
