"""A development PKI made with ``cryptography``: a CA, server and client certificates.

``cdfkd pki dev --out DIR`` writes::

    ca.pem, ca.key                      the development CA (keep ca.key private)
    server.pem, server.key              SANs: localhost, 127.0.0.1, ::1 and any names given
    client.pem, client.key              a client identity (CN "student"), for student nodes

``cdfkd pki dev`` refuses to overwrite an existing CA (``--force`` replaces it: every
certificate it issued stops being trusted). ``cdfkd pki issue`` issues one more server or
client certificate from an existing CA (:func:`issue_from_files`).

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

from cdfkd.teacher_node.errors import PkiError

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
    *,
    force: bool = False,
) -> DevPki:
    """Write a development CA, one server identity and client identities into ``out``.

    Args:
        out: Folder to write (created).
        server_names: Extra DNS names or IP addresses for the server certificate.
        client_names: Common names of client certificates; the first is written as
            ``client.pem``/``client.key``, the others as ``client-<name>.pem``/``.key``.
        force: Replace an existing CA in ``out``.

    Raises:
        PkiError: ``out`` already holds a CA and ``force`` is False.
    """
    out = Path(out)
    existing = [p.name for p in (out / "ca.pem", out / "ca.key") if p.exists()]
    if existing and not force:
        raise PkiError(
            f"{out} already holds a CA ({', '.join(existing)}): replacing it would invalidate "
            "every certificate it issued. Issue more certificates from it with 'cdfkd pki "
            "issue', choose another --out, or pass --force to replace it"
        )
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


def _file_stem(kind: str, name: str) -> str:
    """``kind-name`` with anything but letters, digits, '.', '-', '_' replaced (no paths)."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip(".") or "_"
    return f"{kind}-{safe}"


def load_ca(ca_cert: Path, ca_key: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Read a CA certificate and its private key (PEM, unencrypted) and check they belong.

    Raises:
        PkiError: a file is missing or unreadable, the certificate is not a CA, or the key
            is not the certificate's.
    """
    try:
        cert = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
    except FileNotFoundError as error:
        raise PkiError(f"--ca-cert {ca_cert} not found") from error
    except (OSError, ValueError) as error:
        raise PkiError(f"--ca-cert {ca_cert} is not a PEM certificate: {error}") from error
    try:
        key = serialization.load_pem_private_key(Path(ca_key).read_bytes(), password=None)
    except FileNotFoundError as error:
        raise PkiError(f"--ca-key {ca_key} not found") from error
    except (OSError, ValueError, TypeError) as error:
        raise PkiError(
            f"--ca-key {ca_key} is not an unencrypted PEM private key: {error}"
        ) from error
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"--ca-key {ca_key} is not an EC key (cdfkd issues with EC P-256)")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise PkiError(f"--ca-cert {ca_cert} is not a CA certificate (basicConstraints CA:FALSE)")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise PkiError(f"--ca-key {ca_key} is not the key of --ca-cert {ca_cert}")
    return key, cert


def issue_from_files(
    ca_cert: Path,
    ca_key: Path,
    out: Path,
    *,
    client: str | None = None,
    server_names: tuple[str, ...] = (),
    force: bool = False,
) -> Identity:
    """Issue one client (CN ``client``) or server (SANs ``server_names``) identity from a CA.

    Writes ``client-<name>.pem/.key`` or ``server-<first name>.pem/.key`` into ``out``, and a
    copy of the CA certificate as ``ca.pem`` if ``out`` has none.

    Raises:
        PkiError: the CA cannot be used, both or neither of client and server names are
            given, or the files exist and ``force`` is False.
    """
    if (client is None) == (not server_names):
        raise PkiError("give exactly one of --client NAME or --server-name NAME")
    key, cert = load_ca(ca_cert, ca_key)
    out = Path(out)
    if client is not None:
        stem = _file_stem("client", client)
        leaf = issue(key, cert, client, client=True)
    else:
        stem = _file_stem("server", server_names[0])
        leaf = issue(key, cert, server_names[0], server_names=tuple(dict.fromkeys(server_names)))
    existing = [p.name for p in (out / f"{stem}.pem", out / f"{stem}.key") if p.exists()]
    if existing and not force:
        raise PkiError(f"{out} already holds {', '.join(existing)}: pass --force to replace")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "ca.pem").exists():
        (out / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return _write(out, stem, *leaf)
