"""Token authentication on the ``CCM_Proxy_ServerAuth`` channel.

Accepted bearer tokens:

- a Microsoft Entra ID token of the onboarded tenant, for the server app (audience its
  App ID URI or application id), signed by a key in the tenant's JWKS. The JWKS is
  fetched from the tenant's OpenID metadata, cached, and fetched again when a token
  names an unknown key id (key rollover), at most once every few seconds;
- a CCM token (from the MP's ``CCM_STS``) or a client's own site-issued token, signed
  by the site's token-signing certificate;
- a bulk registration token, only on ``ccm_system_tokenauth`` (registration).

Every failure is ``401 CMGService_Invalid_Token`` for the client; the reason goes to
CMGService.log.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from cryptography import x509

from cmg import tokens
from cmg.config import ClientAuthConfig
from cmg.tokens import TokenError, ValidToken

# ``X-CMG-Client-Auth`` values the site sees.
AUTH_NAMES = {
    "entra": "EntraID",
    tokens.TYPE_CCM: "CCMToken",
    tokens.TYPE_CLIENT: "ClientToken",
    tokens.TYPE_BULK_REGISTRATION: "BulkRegistration",
}
REGISTRATION_ENDPOINT = "ccm_system_tokenauth"
JWKS_MIN_REFRESH = 2.0  # seconds between two fetches of the tenant's keys
UNKNOWN_KID_MEMORY = 60.0  # a kid still unknown after a fresh fetch is refused at once this long
MAX_UNKNOWN_KIDS = 1024


@dataclass(frozen=True, slots=True)
class TokenIdentity:
    auth: str  # EntraID | CCMToken | ClientToken | BulkRegistration
    subject: str
    tenant: str | None


class TokenAuthenticator:
    def __init__(self, config: ClientAuthConfig, log: logging.Logger) -> None:
        self._config = config
        self._log = log
        self._skew = dt.timedelta(seconds=config.clock_skew)
        self._entra = config.entra
        self._site_key: Any = None
        self._keys: dict[str, Any] = {}
        self._fetched_at = -JWKS_MIN_REFRESH
        self._unknown_kids: dict[str, float] = {}
        self._fetch_lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        try:
            cert = x509.load_pem_x509_certificate(self._config.token_signing_certificate.read_bytes())
            self._site_key = cert.public_key()
        except (OSError, ValueError) as exc:
            self._log.warning("Site token-signing certificate %s unavailable (%s): site-issued and CCM "
                              "tokens will be refused", self._config.token_signing_certificate, exc)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        if self._entra.enabled:
            await self._refresh_keys("start-up")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def authenticate(self, authorization: str, resource: str) -> TokenIdentity:
        """Validate ``Authorization: Bearer <token>``; raises TokenError."""
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise TokenError("the Authorization header is not a bearer token")
        issuer = tokens.unverified_issuer(token)
        if issuer.startswith("urn:sccm:oauth2:"):
            return self._site_token(token, resource)
        if not self._entra.enabled:
            raise TokenError("Entra ID authentication is not enabled on this CMG")
        try:
            valid = self._validate_entra(token)
        except TokenError as exc:
            if not exc.unknown_key:
                raise
            kid = str(tokens.unverified_header(token).get("kid"))
            if time.monotonic() - self._unknown_kids.get(kid, -UNKNOWN_KID_MEMORY) < UNKNOWN_KID_MEMORY:
                raise
            await self._refresh_keys("unknown key id", kid)
            try:
                valid = self._validate_entra(token)
            except TokenError as again:
                if again.unknown_key:
                    if len(self._unknown_kids) >= MAX_UNKNOWN_KIDS:
                        self._unknown_kids.clear()
                    self._unknown_kids[kid] = time.monotonic()
                raise
        return TokenIdentity("EntraID", valid.subject, str(valid.claims.get("tid")))

    def _validate_entra(self, token: str) -> ValidToken:
        return tokens.validate_entra_token(
            token, self._keys, tenant_id=self._entra.tenant_id,
            audiences=(self._entra.server_app_id_uri, self._entra.server_app_id,
                       f"api://{self._entra.server_app_id}"),
            skew=self._skew,
        )

    def _site_token(self, token: str, resource: str) -> TokenIdentity:
        if self._site_key is None:
            raise TokenError("no site token-signing certificate to check site-issued tokens with")
        types = [tokens.TYPE_CCM, tokens.TYPE_CLIENT]
        if resource.lower() == REGISTRATION_ENDPOINT:
            types.append(tokens.TYPE_BULK_REGISTRATION)
        valid = tokens.validate_site_token(token, self._site_key, issuer_id=self._config.token_issuer_id,
                                           types=types, skew=self._skew)
        return TokenIdentity(AUTH_NAMES[valid.kind], valid.subject, None)

    async def _refresh_keys(self, why: str, kid: str | None = None) -> None:
        """Fetch the tenant's keys; at most one fetch every JWKS_MIN_REFRESH seconds
        (a token naming a new kid waits for the next allowed fetch, it does not fail)."""
        async with self._fetch_lock:
            if kid is not None and kid in self._keys:
                return  # another request fetched it meanwhile
            wait = self._fetched_at + JWKS_MIN_REFRESH - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._fetched_at = time.monotonic()
            assert self._session is not None
            url = self._entra.metadata_url
            try:
                async with self._session.get(url) as r:
                    r.raise_for_status()
                    meta = await r.json(content_type=None)
                jwks_uri = meta["jwks_uri"]
                async with self._session.get(jwks_uri) as r:
                    r.raise_for_status()
                    jwks = await r.json(content_type=None)
            except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, TypeError, ValueError) as exc:
                self._log.warning("Cannot read the Entra tenant's keys from %s (%s): %s", url, why,
                                  exc.__class__.__name__)
                return
            keys = tokens.keys_from_jwks(jwks)
            self._log.info("Entra tenant %s signing keys loaded (%s): %s", self._entra.tenant_id, why,
                           ", ".join(sorted(keys)) or "none")
            self._keys = keys

    def aad_auth_info(self, tenant_id: str) -> dict[str, str] | None:
        """What ``AADAuthInfo?TenantID=`` answers for an onboarded tenant; None otherwise."""
        e = self._entra
        if not e.enabled or tenant_id.lower() not in e.onboarded_tenants:
            return None
        return {
            "TenantId": e.tenant_id,
            "TenantName": e.tenant_name,
            "ServerAppIdUri": e.server_app_id_uri,
            "ServerAppId": e.server_app_id,
            "ClientAppId": e.client_app_id,
            "Authority": f"https://login.microsoftonline.com/{e.tenant_id}",
        }
