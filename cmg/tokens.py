"""The tokens of CMG client authentication: issue and validate (PyJWT, no I/O).

Three families, as in ConfigMgr:

- **Microsoft Entra ID** device or user tokens: RS256, signed by the tenant's keys
  (JWKS, rolled over), ``iss https://login.microsoftonline.com/<tenant>/v2.0``, ``aud``
  the server app's App ID URI (``https://ConfigMgrService``) or its application id,
  ``tid`` the tenant, ``appid`` the client app.
- **CCM tokens**: what ``CCM_STS`` on the MP gives for a valid Entra token, valid 8
  hours, signed by the site's token-signing key.
- **Site-issued tokens**: the bulk registration token (``cmg token new``; default 4,320
  minutes, at most 10,080) used once at install, and the client's own token (90 days)
  it registers for. RS256, ``iss urn:sccm:oauth2:<site issuer guid>``,
  ``aud urn:sccm:service``, a ``type`` claim.

Validation raises :class:`TokenError` whose ``reason`` is for the log only; the client
sees ``401 CMGService_Invalid_Token``.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

SITE_AUDIENCE = "urn:sccm:service"
SERVER_APP_ID_URI = "https://ConfigMgrService"

TYPE_BULK_REGISTRATION = "BulkRegistration"
TYPE_CLIENT = "ClientToken"
TYPE_CCM = "CCMToken"

BULK_DEFAULT_MINUTES = 4320
BULK_MAX_MINUTES = 10080
CLIENT_TOKEN_LIFETIME = dt.timedelta(days=90)
CCM_TOKEN_LIFETIME = dt.timedelta(hours=8)
DEFAULT_CLOCK_SKEW = dt.timedelta(minutes=5)
ALGORITHMS = ["RS256"]


class TokenError(Exception):
    """A token is not acceptable; ``reason`` says why (for logs, never for clients)."""

    def __init__(self, reason: str, *, unknown_key: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unknown_key = unknown_key


def entra_issuer(tenant_id: str) -> str:
    return f"https://login.microsoftonline.com/{tenant_id}/v2.0"


def site_issuer(issuer_id: str) -> str:
    return f"urn:sccm:oauth2:{issuer_id}"


def _now(now: dt.datetime | None) -> dt.datetime:
    return now or dt.datetime.now(dt.timezone.utc)


def _ts(t: dt.datetime) -> int:
    return int(t.timestamp())


# --- issuing --------------------------------------------------------------------


def issue_entra_token(key: RSAPrivateKey, kid: str, *, tenant_id: str, audience: str,
                      client_app_id: str, subject: str, kind: str = "device",
                      device_id: str | None = None, upn: str | None = None,
                      lifetime: dt.timedelta = dt.timedelta(hours=1),
                      now: dt.datetime | None = None, not_before: dt.datetime | None = None,
                      issuer: str | None = None, extra: Mapping[str, Any] | None = None) -> str:
    """An Entra ID access token as the tenant's token endpoint issues it."""
    t = _now(now)
    claims: dict[str, Any] = {
        "iss": issuer or entra_issuer(tenant_id),
        "aud": audience,
        "tid": tenant_id,
        "sub": subject,
        "oid": subject,
        "appid": client_app_id,
        "azp": client_app_id,
        "idtyp": "device" if kind == "device" else "user",
        "iat": _ts(t),
        "nbf": _ts(not_before or t),
        "exp": _ts(t + lifetime),
        "ver": "2.0",
        "uti": uuid.uuid4().hex,
    }
    if device_id:
        claims["deviceid"] = device_id
    if upn:
        claims["upn"] = upn
    claims.update(extra or {})
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid, "typ": "JWT"})


def issue_site_token(key: RSAPrivateKey, kid: str, *, issuer_id: str, token_type: str,
                     subject: str, lifetime: dt.timedelta, now: dt.datetime | None = None,
                     not_before: dt.datetime | None = None,
                     extra: Mapping[str, Any] | None = None) -> str:
    """A site-issued token: bulk registration, client token or CCM token."""
    t = _now(now)
    claims: dict[str, Any] = {
        "iss": site_issuer(issuer_id),
        "aud": SITE_AUDIENCE,
        "type": token_type,
        "sub": subject,
        "iat": _ts(t),
        "nbf": _ts(not_before or t),
        "exp": _ts(t + lifetime),
        "jti": str(uuid.uuid4()),
    }
    claims.update(extra or {})
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid, "typ": "JWT"})


def bulk_lifetime(minutes: int | None) -> dt.timedelta:
    """The bulk registration token's lifetime; refused above 10,080 minutes."""
    m = BULK_DEFAULT_MINUTES if minutes is None else minutes
    if not 1 <= m <= BULK_MAX_MINUTES:
        raise ValueError(f"a bulk registration token lives 1 to {BULK_MAX_MINUTES} minutes, not {m}")
    return dt.timedelta(minutes=m)


# --- validating -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ValidToken:
    kind: str  # "entra", or the site token's type
    subject: str
    claims: Mapping[str, Any]


def unverified_header(token: str) -> dict[str, Any]:
    try:
        return dict(jwt.get_unverified_header(token))
    except jwt.PyJWTError as exc:
        raise TokenError(f"not a JWT: {exc}") from None


def unverified_issuer(token: str) -> str:
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise TokenError(f"not a JWT: {exc}") from None
    iss = claims.get("iss")
    if not isinstance(iss, str):
        raise TokenError("the token names no issuer")
    return iss


def _decode(token: str, key: RSAPublicKey | Any, *, issuer: str, audiences: Iterable[str],
            skew: dt.timedelta) -> dict[str, Any]:
    try:
        return dict(jwt.decode(
            token, key, algorithms=ALGORITHMS, audience=list(audiences), issuer=issuer,
            leeway=skew, options={"require": ["exp", "nbf", "iat", "iss", "aud"]},
        ))
    except jwt.ExpiredSignatureError:
        raise TokenError("the token has expired") from None
    except jwt.ImmatureSignatureError:
        raise TokenError("the token is not valid yet (nbf/iat in the future)") from None
    except jwt.InvalidAudienceError:
        raise TokenError("the token's audience is not this CMG's") from None
    except jwt.InvalidIssuerError:
        raise TokenError("the token's issuer is not trusted") from None
    except jwt.InvalidSignatureError:
        raise TokenError("the token's signature does not verify") from None
    except jwt.MissingRequiredClaimError as exc:
        raise TokenError(f"the token lacks the {exc.claim} claim") from None
    except jwt.PyJWTError as exc:
        raise TokenError(f"the token is invalid: {exc}") from None


def validate_entra_token(token: str, keys: Mapping[str, Any], *, tenant_id: str,
                         audiences: Iterable[str], skew: dt.timedelta = DEFAULT_CLOCK_SKEW) -> ValidToken:
    """Check an Entra token against the tenant's keys (kid -> public key)."""
    header = unverified_header(token)
    if header.get("alg") not in ALGORITHMS:
        raise TokenError(f"algorithm {header.get('alg')!r} is not accepted")
    kid = header.get("kid")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise TokenError(f"signing key {kid!r} is not in the tenant's JWKS", unknown_key=True)
    claims = _decode(token, key, issuer=entra_issuer(tenant_id), audiences=audiences, skew=skew)
    if claims.get("tid") != tenant_id:
        raise TokenError(f"the token is for tenant {claims.get('tid')!r}, not {tenant_id}")
    return ValidToken("entra", str(claims.get("oid") or claims.get("sub") or ""), claims)


def validate_site_token(token: str, key: RSAPublicKey, *, issuer_id: str, types: Iterable[str],
                        skew: dt.timedelta = DEFAULT_CLOCK_SKEW) -> ValidToken:
    """Check a site-issued token (bulk registration, client, CCM) of an accepted type."""
    header = unverified_header(token)
    if header.get("alg") not in ALGORITHMS:
        raise TokenError(f"algorithm {header.get('alg')!r} is not accepted")
    claims = _decode(token, key, issuer=site_issuer(issuer_id), audiences=[SITE_AUDIENCE], skew=skew)
    kind = claims.get("type")
    wanted = tuple(types)
    if kind not in wanted:
        raise TokenError(f"a {kind!r} token is not accepted here (expected {', '.join(wanted)})")
    return ValidToken(str(kind), str(claims.get("sub") or ""), claims)


def jwk_of(public_key: RSAPublicKey, kid: str) -> dict[str, Any]:
    """A public key as a JWK (for the tenant's JWKS)."""
    import json

    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public_key))
    jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
    return dict(jwk)


def keys_from_jwks(jwks: Mapping[str, Any]) -> dict[str, Any]:
    """kid -> public key, from a JWKS document; malformed entries are skipped."""
    out: dict[str, Any] = {}
    for entry in jwks.get("keys", []) if isinstance(jwks, Mapping) else []:
        try:
            jwk = jwt.PyJWK(entry)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
            continue
        kid = entry.get("kid") if isinstance(entry, Mapping) else None
        if isinstance(kid, str):
            out[kid] = jwk.key
    return out
