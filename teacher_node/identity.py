"""Caller identities bound to their issuer: which ``[policy.callers.NAME]`` a certificate is.

The TLS handshake has already checked that the client's certificate chains to a CA of
``tls.client_ca``; this module decides *which* caller it is, from the certificate itself
(never from the bare common name gRPC reports, which any CA of the bundle could mint):

- the issuing CA is found by verifying signatures along the chain, from the leaf up to a CA
  of the bundle (a CA's name alone proves nothing);
- a rule matches when the issuer it names is on that path and every subject field it names
  holds (``subject_cn``, ``san_uri``, ``san_dns``), or when the pinned key hash
  (``spki_sha256``, SHA-256 of the DER SubjectPublicKeyInfo) equals the leaf's;
- a certificate with more than one common name, or that names nothing (no CN, no SAN) and is
  pinned by no rule, or that matches two rules, is refused.

Pure: ``cryptography`` only, no grpc.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from cdfkd.teacher_node.errors import PermissionDenied, TeacherConfigError, Unauthenticated
from cdfkd.teacher_node.policy import CallerRule, is_sha256, normalize_sha256

logger = logging.getLogger(__name__)

#: The identity of every caller of a plaintext node (``tls.insecure = true``).
PLAINTEXT_CALLER = "anonymous"
#: The longest chain walked from the leaf to a CA of the bundle.
MAX_CHAIN_DEPTH = 8


def certificate_sha256(certificate: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER encoding, lowercase hex (how ``issuer`` may name a CA)."""
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def spki_sha256(certificate: x509.Certificate) -> str:
    """SHA-256 of the DER SubjectPublicKeyInfo, lowercase hex (what ``spki_sha256`` pins)."""
    der = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def load_certificates(pem: bytes, what: str) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle.

    Raises:
        TeacherConfigError: the bundle holds none or cannot be parsed.
    """
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError as error:
        raise TeacherConfigError(f"{what} is not a PEM certificate bundle: {error}") from error
    if not certificates:
        raise TeacherConfigError(f"{what} holds no certificate")
    return certificates


@dataclass(frozen=True)
class PeerCertificate:
    """What a client certificate says about its holder, read with ``cryptography``.

    Attributes:
        common_names: Every CN of the subject (more than one is ambiguous).
        san_uris: URI SANs (e.g. SPIFFE IDs).
        san_dns: DNS SANs.
        spki_sha256: SHA-256 of the SubjectPublicKeyInfo.
        issuers: SHA-256 fingerprints of the CAs on the verified path, the signer first.
        issuer_subject: The signer's subject, for messages.
    """

    common_names: tuple[str, ...]
    san_uris: tuple[str, ...]
    san_dns: tuple[str, ...]
    spki_sha256: str
    issuers: tuple[str, ...]
    issuer_subject: str

    def describe(self) -> str:
        """A short name for logs and the audit: the CN, else the first URI or DNS SAN."""
        for names in (self.common_names, self.san_uris, self.san_dns):
            if names:
                return names[0] if len(names) == 1 else "|".join(names)
        return f"spki:{self.spki_sha256[:16]}"


def _issuer_path(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
) -> list[x509.Certificate]:
    """The CAs from the leaf's signer up to a CA of ``anchors``, each verified by signature."""
    path: list[x509.Certificate] = []
    current = leaf
    for _ in range(MAX_CHAIN_DEPTH):
        signer = _signer(current, anchors)
        if signer is not None:
            return [*path, signer]
        signer = _signer(current, intermediates)
        if signer is None or signer in path or signer == current:
            break
        path.append(signer)
        current = signer
    raise Unauthenticated(
        "the client certificate does not chain to a CA of this node's client_ca by signature"
    )


def _signer(
    certificate: x509.Certificate, candidates: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    for candidate in candidates:
        try:
            certificate.verify_directly_issued_by(candidate)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return candidate
    return None


def read_peer(
    leaf_pem: bytes, chain_pem: bytes, anchors: Sequence[x509.Certificate]
) -> PeerCertificate:
    """Parse the peer's certificate and find its issuers among ``anchors`` by signature.

    Args:
        leaf_pem: The peer's certificate (gRPC's ``x509_pem_cert``).
        chain_pem: The certificates the peer sent (``x509_pem_cert_chain``), may be empty.
        anchors: The CAs of ``tls.client_ca``.

    Raises:
        Unauthenticated: unparsable, or not signed along a path to an anchor.
    """
    try:
        leaf = x509.load_pem_x509_certificate(leaf_pem)
        chain = x509.load_pem_x509_certificates(chain_pem) if chain_pem.strip() else []
    except ValueError as error:
        raise Unauthenticated(f"the client certificate cannot be parsed: {error}") from error
    intermediates = [c for c in chain if c != leaf]
    path = _issuer_path(leaf, intermediates, anchors)
    names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_names = tuple(str(attribute.value) for attribute in names)
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        dns = tuple(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        uris, dns = (), ()
    return PeerCertificate(
        common_names=common_names,
        san_uris=uris,
        san_dns=dns,
        spki_sha256=spki_sha256(leaf),
        issuers=tuple(certificate_sha256(ca) for ca in path),
        issuer_subject=path[0].subject.rfc4514_string(),
    )


@dataclass(frozen=True)
class _Matcher:
    """One rule, with its issuer and subject resolved."""

    name: str
    issuer: str | None
    subject_cn: str | None
    san_uri: str | None
    san_dns: str | None
    spki_sha256: str | None

    def matches(self, peer: PeerCertificate) -> bool:
        if self.spki_sha256 is not None and peer.spki_sha256 != self.spki_sha256:
            return False
        if self.issuer is not None and self.issuer not in peer.issuers:
            return False
        if self.subject_cn is not None and peer.common_names != (self.subject_cn,):
            return False
        if self.san_uri is not None and self.san_uri not in peer.san_uris:
            return False
        dns = {name.lower() for name in peer.san_dns}
        return self.san_dns is None or self.san_dns.lower() in dns


class CallerIdentities:
    """Resolves a verified client certificate to the one caller rule it matches.

    Args:
        callers: ``[policy.callers]``: rule name -> rule.
        client_ca_pem: The ``tls.client_ca`` bundle; None for a plaintext node.
        allow_any_trusted_caller: Whether a certificate that matches no rule is still answered
            (under a name in angle brackets, which no rule can have).

    Raises:
        TeacherConfigError: an ``issuer`` that cannot be read or is no CA of the bundle's
            hierarchy, or a rule without ``issuer`` while the bundle holds several CAs.
    """

    def __init__(
        self,
        callers: Mapping[str, CallerRule],
        client_ca_pem: bytes | None,
        allow_any_trusted_caller: bool,
    ) -> None:
        self._allow_any = allow_any_trusted_caller
        self._callers = dict(callers)
        self.anchors: list[x509.Certificate] = (
            [] if client_ca_pem is None else load_certificates(client_ca_pem, "tls.client_ca")
        )
        self._matchers = (
            []
            if client_ca_pem is None
            else [self._matcher(name, rule) for name, rule in callers.items()]
        )

    def _matcher(self, name: str, rule: CallerRule) -> _Matcher:
        pinned = None if rule.spki_sha256 is None else normalize_sha256(rule.spki_sha256)
        subject_given = any(v is not None for v in (rule.subject_cn, rule.san_uri, rule.san_dns))
        subject_cn = rule.subject_cn
        if not subject_given and pinned is None:
            subject_cn = name  # the documented default: [policy.callers.student] is CN=student
        issuer = self._issuer(name, rule.issuer) if rule.issuer is not None else None
        if issuer is None and pinned is None:
            if len(self.anchors) != 1:
                raise TeacherConfigError(
                    f"policy.callers.{name}: tls.client_ca holds {len(self.anchors)} CAs, so "
                    "the rule must name its issuer (issuer = path of that CA's certificate, or "
                    "its SHA-256): otherwise any CA of the bundle could issue this identity"
                )
            issuer = certificate_sha256(self.anchors[0])
        return _Matcher(name, issuer, subject_cn, rule.san_uri, rule.san_dns, pinned)

    def _issuer(self, name: str, issuer: str) -> str:
        if is_sha256(issuer):
            return normalize_sha256(issuer)
        path = Path(issuer)
        try:
            certificates = load_certificates(path.read_bytes(), f"policy.callers.{name}.issuer")
        except OSError as error:
            raise TeacherConfigError(
                f"policy.callers.{name}.issuer: cannot read {path}: {error}"
            ) from error
        if len(certificates) != 1:
            raise TeacherConfigError(
                f"policy.callers.{name}.issuer: {path} must hold exactly one CA certificate, "
                f"not {len(certificates)}"
            )
        return certificate_sha256(certificates[0])

    def resolve(self, peer: PeerCertificate | None) -> str:
        """The name of the one rule ``peer`` matches.

        Args:
            peer: The verified client certificate; None on a plaintext node.

        Returns:
            A rule name; or, with ``allow_any_trusted_caller`` and no rule matching, a name in
            angle brackets that describes the certificate (no rule can have it).

        Raises:
            Unauthenticated: an empty or ambiguous identity (two CNs, two matching rules).
            PermissionDenied: a valid certificate that no rule names.
        """
        if peer is None:
            if PLAINTEXT_CALLER in self._callers or self._allow_any:
                return PLAINTEXT_CALLER
            raise PermissionDenied(
                f"plaintext callers are {PLAINTEXT_CALLER!r} and that is not on this node's "
                "allow-list"
            )
        if len(peer.common_names) > 1:
            raise Unauthenticated(
                f"the client certificate has {len(peer.common_names)} common names "
                f"{list(peer.common_names)}: an ambiguous identity is refused"
            )
        matched = [m.name for m in self._matchers if m.matches(peer)]
        if len(matched) > 1:
            raise Unauthenticated(
                f"the client certificate {peer.describe()!r} matches the rules {matched}: an "
                "ambiguous identity is refused (make the rules' subjects or issuers distinct)"
            )
        if matched:
            return matched[0]
        if not any((*peer.common_names, *peer.san_uris, *peer.san_dns)):  # none, or only ""
            raise Unauthenticated(
                "the client certificate names no identity (no common name, no SAN) and no rule "
                "pins its key"
            )
        if self._allow_any:
            return f"<{peer.describe()} from {peer.issuer_subject}>"
        raise PermissionDenied(
            f"caller {peer.describe()!r} is not on this node's allow-list: ask the owner to add "
            f"it (certificate issued by {peer.issuer_subject})"
        )
