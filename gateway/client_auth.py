"""PKI client authentication: is this client certificate one the CMG trusts?

The TLS layer accepts any certificate (see gateway.tls); this module judges the chain
the client presented against the trusted roots uploaded to the CMG, with
``cryptography.x509.verification`` (chain, validity period, client-auth EKU).
The verdict is computed once per TLS connection and kept with it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from dataclasses import dataclass
from enum import Enum

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from .revocation import CRLStore

MIN_RSA_BITS = 2048
MAX_REMEMBERED_INTERMEDIATES = 64


class Verdict(Enum):
    NO_CERTIFICATE = "no certificate"
    TRUSTED = "trusted"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """The validated client, as passed on to the site roles."""

    subject: str
    thumbprint: str  # SHA-1, upper-case hex, as Windows shows it
    issuer: str
    not_after: dt.datetime


@dataclass(frozen=True, slots=True)
class ClientCertificateCheck:
    verdict: Verdict
    identity: ClientIdentity | None = None
    reason: str = ""  # for the gateway's log only, never for the client


def thumbprint(cert: x509.Certificate) -> str:
    return hashlib.sha1(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()


class ClientCertificateVerifier:
    """Checks presented chains against the CMG's trusted client roots."""

    def __init__(self, trusted_roots: tuple[x509.Certificate, ...], crls: CRLStore | None = None,
                 refuse_unknown: bool = True, log: logging.Logger | None = None) -> None:
        if not trusted_roots:
            raise ValueError("at least one trusted client root is needed")
        self._store = Store(list(trusted_roots))
        self._crls = crls  # None: revocation is not checked
        # Intermediates of chains verified before. A resumed TLS session carries the
        # client's certificate but not the chain it sent in the full handshake; its
        # issuers are found here (they only help a chain that reaches a trusted root).
        self._intermediates: dict[bytes, x509.Certificate] = {}
        self._refuse_unknown = refuse_unknown
        self._log = log or logging.getLogger("gateway.client_auth")

    def check(self, chain: tuple[x509.Certificate, ...],
              now: dt.datetime | None = None) -> ClientCertificateCheck:
        if not chain:
            return ClientCertificateCheck(Verdict.NO_CERTIFICATE, reason="no client certificate presented")
        leaf = chain[0]
        subject = leaf.subject.rfc4514_string()
        key = leaf.public_key()
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
            return ClientCertificateCheck(
                Verdict.REJECTED,
                reason=f"client certificate '{subject}' has a {key.key_size}-bit key; at least {MIN_RSA_BITS} is required",
            )
        try:
            eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = None
        # cryptography's verifier accepts a leaf with no EKU at all; the CMG requires client auth.
        if eku is None or ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
            return ClientCertificateCheck(
                Verdict.REJECTED, reason=f"client certificate '{subject}' lacks the Client Authentication EKU"
            )
        when = now or dt.datetime.now(dt.timezone.utc)
        verifier = PolicyBuilder().store(self._store).time(when).build_client_verifier()
        try:
            verified = verifier.verify(leaf, [*chain[1:], *self._intermediates.values()])
        except VerificationError as exc:
            return ClientCertificateCheck(
                Verdict.REJECTED, reason=f"client certificate '{subject}' is not trusted: {exc}"
            )
        except ValueError as exc:  # unsupported or malformed certificate contents
            return ClientCertificateCheck(
                Verdict.REJECTED, reason=f"client certificate '{subject}' cannot be verified: {exc}"
            )
        for cert in verified.chain[1:-1]:
            key = cert.subject.public_bytes()
            if key not in self._intermediates and len(self._intermediates) < MAX_REMEMBERED_INTERMEDIATES:
                self._intermediates[key] = cert
        if self._crls is not None:
            path = verified.chain  # leaf first, the trusted root last
            for cert, issuer in zip(path, path[1:]):
                status = self._crls.status(cert, issuer, when)
                if status.revoked:
                    return ClientCertificateCheck(Verdict.REJECTED, reason=f"client certificate {status.reason}")
                if status.unknown:
                    if self._refuse_unknown:
                        return ClientCertificateCheck(
                            Verdict.REJECTED,
                            reason=f"revocation status of '{cert.subject.rfc4514_string()}' is unknown: "
                                   f"{status.reason} (client_auth.crl_unavailable = refuse)")
                    self._log.warning("Revocation status of '%s' is unknown: %s; allowed "
                                      "(client_auth.crl_unavailable = allow)",
                                      cert.subject.rfc4514_string(), status.reason)
        identity = ClientIdentity(
            subject=subject,
            thumbprint=thumbprint(leaf),
            issuer=leaf.issuer.rfc4514_string(),
            not_after=leaf.not_valid_after_utc,
        )
        return ClientCertificateCheck(Verdict.TRUSTED, identity=identity)
