"""The site's own tokens: the bulk registration token, the client token, the CCM token.

All three are issued with :func:`cmg.tokens.issue_site_token` and checked with
:func:`cmg.tokens.validate_site_token`, signed by the site's token-signing key
(``SiteConfig.token_signing_certificate`` / ``token_signing_key``, made by ``cmg certs
init``), ``kid`` = the certificate's SHA-1 thumbprint in upper-case hex. No JWT code here.

- :func:`new_bulk_token`: what ``cmg token new [--lifetime MINUTES]`` prints (the
  ``BulkRegistrationTokenTool.exe /new`` of a real site): type ``BulkRegistration``,
  default 4,320 minutes, refused above 10,080. Claims, as the real one: ``iss
  urn:sccm:oauth2:<site issuer guid>``, ``aud urn:sccm:service``, ``type``, a unique
  ``jti`` (the token's id the site records), ``nbf``, ``exp`` (plus ``iat`` and ``sub``).
- :meth:`TokenSigner.client_token`: the client's own token (``ClientToken``, 90 days,
  ``sub`` = its SMSID), returned by the MP when a client registers with a bulk token.
- :meth:`TokenSigner.ccm_token`: what ``CCM_STS`` exchanges a valid Entra token for
  (``CCMToken``, 8 hours, ``sub`` = the Entra device (or user) object id).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from cmg.config import SiteConfig
from cmg.tokens import (CCM_TOKEN_LIFETIME, CLIENT_TOKEN_LIFETIME, TYPE_BULK_REGISTRATION, TYPE_CCM, TYPE_CLIENT,
                        ValidToken, bulk_lifetime, issue_site_token, validate_site_token)

BULK_SUBJECT = "BulkRegistration"

try:  # the PKI module names the kid; until it does, the same formula here
    from cmg.pki import token_signing_kid  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the pki change landing
    def token_signing_kid(cert: x509.Certificate) -> str:
        """The token-signing certificate's SHA-1 thumbprint, upper-case hex (the JWT ``kid``)."""
        return hashlib.sha1(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()


class SigningKeyMissing(OSError):
    """The site has no (readable) token-signing certificate and key."""


@dataclass(frozen=True)
class TokenSigner:
    """The site's token-signing key: issues and validates site tokens."""

    key: RSAPrivateKey
    certificate: x509.Certificate
    kid: str
    issuer_id: str
    skew: dt.timedelta

    @property
    def public_key(self) -> RSAPublicKey:
        return self.key.public_key()

    def issue(self, token_type: str, subject: str, lifetime: dt.timedelta, *,
              now: dt.datetime | None = None, extra: Mapping[str, Any] | None = None) -> str:
        return issue_site_token(self.key, self.kid, issuer_id=self.issuer_id, token_type=token_type,
                                subject=subject, lifetime=lifetime, now=now, extra=extra)

    def bulk_token(self, minutes: int | None = None, *, now: dt.datetime | None = None) -> str:
        return self.issue(TYPE_BULK_REGISTRATION, BULK_SUBJECT, bulk_lifetime(minutes), now=now)

    def client_token(self, smsid: str, *, now: dt.datetime | None = None) -> str:
        return self.issue(TYPE_CLIENT, smsid, CLIENT_TOKEN_LIFETIME, now=now)

    def ccm_token(self, subject: str, *, extra: Mapping[str, Any] | None = None,
                  now: dt.datetime | None = None) -> str:
        return self.issue(TYPE_CCM, subject, CCM_TOKEN_LIFETIME, now=now, extra=extra)

    def validate(self, token: str, types: Iterable[str]) -> ValidToken:
        """Raises :class:`cmg.tokens.TokenError` (its ``reason`` is for the log)."""
        return validate_site_token(token, self.public_key, issuer_id=self.issuer_id, types=types, skew=self.skew)


def load_signer(site: SiteConfig) -> TokenSigner:
    """The site's signer from its token-signing certificate and key files."""
    cert_path, key_path = Path(site.token_signing_certificate), Path(site.token_signing_key)
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise SigningKeyMissing(f"the site's token-signing certificate or key is missing ({exc.filename}); "
                                "run 'cmg certs init'") from None
    except (OSError, ValueError) as exc:
        raise SigningKeyMissing(f"cannot read the site's token-signing certificate {cert_path} / key {key_path}: "
                                f"{exc}") from None
    if not isinstance(key, RSAPrivateKey):
        raise SigningKeyMissing(f"the token-signing key {key_path} is not an RSA key (RS256 needs one)")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise SigningKeyMissing(f"the token-signing key {key_path} does not belong to {cert_path}")
    return TokenSigner(key, cert, token_signing_kid(cert), site.client_auth.token_issuer_id,
                       dt.timedelta(seconds=site.client_auth.clock_skew))


def new_bulk_token(site: SiteConfig, minutes: int | None = None) -> str:
    """A bulk registration token for this site (``cmg token new``).

    ``minutes`` defaults to 4,320; ``ValueError`` outside 1..10,080;
    :class:`SigningKeyMissing` when the site has no token-signing certificate.
    """
    bulk_lifetime(minutes)  # refuse a bad lifetime before touching any file
    return load_signer(site).bulk_token(minutes)
