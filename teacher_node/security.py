"""mTLS credentials of the teacher node; the caller identity from its client certificate."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from cdfkd.teacher_node.config import TlsSettings
from cdfkd.teacher_node.errors import TeacherConfigError

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


def caller_identity(context: grpc.ServicerContext) -> str:
    """The verified client certificate's common name (or first SAN), or 'anonymous' in plaintext."""
    auth = context.auth_context()
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        values = auth.get(key)
        if values:
            return values[0].decode(errors="replace")
    return "anonymous"
