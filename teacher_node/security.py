"""mTLS credentials of the teacher node; the caller identity from its client certificate."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from cdfkd.teacher_node.config import TlsSettings
from cdfkd.teacher_node.errors import TeacherConfigError, Unauthenticated
from cdfkd.teacher_node.identity import PLAINTEXT_CALLER, CallerIdentities, read_peer

logger = logging.getLogger(__name__)


def _read(path: Path | None, what: str) -> bytes:
    if path is None:
        raise TeacherConfigError(f"no {what} file configured")
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise TeacherConfigError(f"cannot read the {what} file {path}: {error}") from error


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials | None:
    """Server credentials that require a client certificate chaining to ``tls.client_ca``.

    Returns None for plaintext (``insecure = true``), after logging a warning.
    """
    if tls.insecure:
        logger.warning(
            "serving WITHOUT TLS (insecure = true): anyone who can reach the port can query "
            "the teacher; use this only on an isolated test network"
        )
        return None
    return grpc.ssl_server_credentials(
        [(_read(tls.key, "TLS key"), _read(tls.cert, "TLS certificate"))],
        root_certificates=_read(tls.client_ca, "client CA"),
        require_client_auth=True,
    )


def client_ca_bundle(tls: TlsSettings) -> bytes | None:
    """The ``tls.client_ca`` bundle, or None for a plaintext node."""
    return None if tls.insecure else _read(tls.client_ca, "client CA")


def peer_description(context: grpc.ServicerContext) -> str:
    """What the peer's certificate claims (its CN or first SAN), for logs; never raises."""
    auth = context.auth_context()
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        values = auth.get(key)
        if values:
            return values[0].decode(errors="replace")
    return PLAINTEXT_CALLER if not auth.get("x509_pem_cert") else "<no name>"


def caller_identity(context: grpc.ServicerContext, identities: CallerIdentities) -> str:
    """The caller rule the verified client certificate matches (PLAINTEXT_CALLER in plaintext).

    Raises:
        Unauthenticated: no, an unparsable or an ambiguous certificate.
        PermissionDenied: a certificate that no rule names.
    """
    auth = context.auth_context()
    leaf = auth.get("x509_pem_cert")
    if not identities.anchors:
        return identities.resolve(None)
    if not leaf:
        raise Unauthenticated("no client certificate")
    chain = b"".join(auth.get("x509_pem_cert_chain", []))
    return identities.resolve(read_peer(leaf[0], chain, identities.anchors))
