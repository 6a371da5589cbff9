"""A mock Microsoft Entra ID tenant: OIDC metadata, JWKS with key rollover, a token endpoint.

Served by the mock site on its own port (``SiteConfig.entra_port``; ``SiteRunner.ports
["entra"]``), with Microsoft's paths. The tenant is the deployment's
(``client_auth.entra``: tenant id and name, the server app with its App ID URI, the
client app). ``{tenant}`` in a path is the tenant id or its name (case-insensitive).

- ``GET /{tenant}/v2.0/.well-known/openid-configuration``: issuer
  ``https://login.microsoftonline.com/{tenant id}/v2.0``; ``jwks_uri`` and
  ``token_endpoint`` on the URL the request came to. Unknown tenant: ``400`` with an
  ``AADSTS90002`` error document.
- ``GET /{tenant}/discovery/v2.0/keys``: the JWKS. RSA 2048 keys, made on first start
  and kept in ``data_dir/entra/keys.json`` (0600), so restarts keep the kids.
- ``POST /{tenant}/oauth2/v2.0/token`` (form): ``grant_type=client_credentials``,
  ``client_id`` = the client app id (else ``400 invalid_client``, AADSTS700016),
  ``scope`` = ``<server App ID URI>/.default`` (else ``400 invalid_scope``, AADSTS70011);
  emulator parameters ``device_id`` (a device token for that device; default a new GUID)
  or ``username`` (a user token with that ``upn``). No client secret is asked for (a
  real device proves itself with its device certificate). Answers
  ``{"token_type": "Bearer", "expires_in": 3600, "ext_expires_in": 3600, "access_token": ...}``.

Test-only, under ``/_mock/`` (never published through the CMG):

- ``POST /_mock/entra/rollover``: a new key becomes current (signs new tokens) and is
  published at once; the previous one stays published (the 2 newest are). Answers the
  state below.
- ``GET /_mock/entra``: ``{"tenant_id", "current_kid", "published_kids", "unpublished_kid"}``.
- ``POST /_mock/entra/token`` JSON ``{"kind": "device"|"user", "audience", "tenant_id",
  "issuer", "lifetime_s", "not_before_s", "issued_s", "sign_with":
  "current"|"unpublished"|"tampered", "device_id", "username"}`` (all but ``kind``
  optional; offsets in seconds from now) -> ``{"access_token", "kid"}``: expired,
  not-yet-valid, wrong-audience, wrong-tenant, unknown-kid (a key never published) and
  tampered (signature bytes altered) tokens for tests.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import logging
import os
import re
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from cmg.config import EntraConfig
from cmg.tokens import ValidToken, entra_issuer, issue_entra_token, jwk_of, validate_entra_token

TOKEN_LIFETIME = dt.timedelta(hours=1)
PUBLISHED_KEYS = 2
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def key_id(public_key: RSAPublicKey) -> str:
    """A kid in Microsoft's style (base64url SHA-1, 27 characters), stable for a key."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.urlsafe_b64encode(hashlib.sha1(der).digest()).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class TenantKey:
    kid: str
    key: RSAPrivateKey
    created: float


def _new_key() -> TenantKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return TenantKey(key_id(key.public_key()), key, time.time())


@dataclass(frozen=True)
class Issued:
    token: str
    kid: str
    subject: str  # oid
    device_id: str | None
    upn: str | None
    audience: str


class TenantKeys:
    """The tenant's signing keys, newest last; the newest is current. Persisted."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "keys.json"
        self._keys: list[TenantKey] = []
        self._unpublished: TenantKey | None = None

    def load_or_create(self) -> None:
        if self.path.exists():
            data = json.loads(self.path.read_text(encoding="utf-8"))
            keys = []
            for entry in data["keys"]:
                key = serialization.load_pem_private_key(entry["pem"].encode("ascii"), password=None)
                if not isinstance(key, RSAPrivateKey):
                    raise ValueError(f"{self.path}: key {entry.get('kid')} is not RSA")
                keys.append(TenantKey(key_id(key.public_key()), key, float(entry["created"])))
            if not keys:
                raise ValueError(f"{self.path} holds no keys")
            self._keys = keys
        else:
            self._keys = [_new_key()]
            self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        doc = {"keys": [{
            "kid": k.kid, "created": k.created,
            "pem": k.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()).decode("ascii"),
        } for k in self._keys]}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f)
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @property
    def current(self) -> TenantKey:
        return self._keys[-1]

    @property
    def published(self) -> dict[str, RSAPublicKey]:
        return {k.kid: k.key.public_key() for k in self._keys}

    def rollover(self) -> TenantKey:
        """A new current key; the 2 newest stay published. (CPU-bound: run in an executor.)"""
        new = _new_key()
        self._keys = (self._keys + [new])[-PUBLISHED_KEYS:]
        self._save()
        return new

    def unpublished(self) -> TenantKey:
        """A key that is never in the JWKS (for unknown-kid tests); made on first use."""
        if self._unpublished is None:
            self._unpublished = _new_key()
        return self._unpublished


class EntraError(Exception):
    """An Entra ID error answer (``error``, AADSTS code, description)."""

    def __init__(self, status: int, error: str, code: int, description: str) -> None:
        super().__init__(description)
        self.status, self.error, self.code, self.description = status, error, code, description

    def response(self) -> web.Response:
        now = dt.datetime.now(dt.timezone.utc)
        trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
        stamp = now.strftime("%Y-%m-%d %H:%M:%SZ")
        return web.json_response({
            "error": self.error,
            "error_description": (f"AADSTS{self.code}: {self.description} Trace ID: {trace} "
                                  f"Correlation ID: {correlation} Timestamp: {stamp}"),
            "error_codes": [self.code],
            "timestamp": stamp,
            "trace_id": trace,
            "correlation_id": correlation,
            "error_uri": f"https://login.microsoftonline.com/error?code={self.code}",
        }, status=self.status)


class EntraTenant:
    """The tenant's state and HTTP handlers."""

    def __init__(self, config: EntraConfig, data_dir: Path, log: logging.Logger) -> None:
        self.config = config
        self.keys = TenantKeys(data_dir / "entra")
        self.log = log
        self._rollover_lock = asyncio.Lock()

    # --- state ---

    def knows(self, tenant: str) -> bool:
        t = tenant.lower()
        return t in (self.config.tenant_id.lower(), self.config.tenant_name.lower())

    @property
    def issuer(self) -> str:
        return entra_issuer(self.config.tenant_id)

    @property
    def audiences(self) -> tuple[str, ...]:
        """What a token for ConfigMgr may name as ``aud``: the server app's App ID URI or id."""
        return (self.config.server_app_id_uri, self.config.server_app_id)

    def validate(self, token: str, skew: dt.timedelta) -> ValidToken:
        """Validate an Entra token against this tenant's published keys (in-process, as the
        MP does); raises :class:`cmg.tokens.TokenError`."""
        return validate_entra_token(token, self.keys.published, tenant_id=self.config.tenant_id,
                                    audiences=self.audiences, skew=skew)

    def state(self) -> dict[str, Any]:
        return {
            "tenant_id": self.config.tenant_id,
            "tenant_name": self.config.tenant_name,
            "current_kid": self.keys.current.kid,
            "published_kids": list(self.keys.published),
            "unpublished_kid": self.keys.unpublished().kid,
        }

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid, public in self.keys.published.items():
            jwk = jwk_of(public, kid)
            jwk["issuer"] = self.issuer
            keys.append(jwk)
        return {"keys": keys}

    def issue(self, kind: str, *, device_id: str | None = None, username: str | None = None,
              audience: str | None = None, tenant_id: str | None = None, issuer: str | None = None,
              lifetime: dt.timedelta = TOKEN_LIFETIME, now: dt.datetime | None = None,
              not_before: dt.datetime | None = None, sign_with: str = "current") -> Issued:
        """A token as the token endpoint issues it (or a deliberately bad one)."""
        tenant = tenant_id or self.config.tenant_id
        if kind == "user":
            upn = username or f"user@{self.config.tenant_name}"
            subject = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{tenant}/{upn.lower()}"))
        else:
            upn = None
            device_id = device_id or str(uuid.uuid4())
            subject = device_id
        signing = self.keys.unpublished() if sign_with == "unpublished" else self.keys.current
        token = issue_entra_token(
            signing.key, signing.kid, tenant_id=tenant, audience=audience or self.config.server_app_id_uri,
            client_app_id=self.config.client_app_id, subject=subject, kind=kind, device_id=device_id,
            upn=upn, lifetime=lifetime, now=now, not_before=not_before, issuer=issuer,
        )
        if sign_with == "tampered":
            token = _tamper(token)
        return Issued(token, signing.kid, subject, device_id, upn, audience or self.config.server_app_id_uri)

    # --- endpoints ---

    def _tenant(self, request: web.Request) -> str:
        tenant = request.match_info["tenant"]
        if not self.knows(tenant):
            self.log.warning(f"{request.method} {request.path}: unknown tenant {tenant!r}")
            raise EntraError(400, "invalid_tenant", 90002,
                             f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID "
                             "and are signing into the correct cloud.")
        return tenant

    async def metadata(self, request: web.Request) -> web.Response:
        try:
            tenant = self._tenant(request)
        except EntraError as exc:
            return exc.response()
        authority = f"{request.scheme}://{request.host}"
        base = f"{authority}/{tenant}"
        self.log.info(f"OpenID configuration for tenant {tenant} served to {request.remote}")
        return web.json_response({
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "jwks_uri": f"{base}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": self.issuer,
            "request_uri_parameter_supported": False,
            "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
            "claims_supported": ["sub", "iss", "cloud_instance_name", "cloud_instance_host_name", "cloud_graph_host_name",
                                 "msgraph_host", "aud", "exp", "iat", "auth_time", "acr", "nonce",
                                 "preferred_username", "name", "tid", "ver", "at_hash", "c_hash", "email"],
            "kerberos_endpoint": f"{base}/kerberos",
            "tenant_region_scope": "NA",
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com",
            "rbac_url": "https://pas.windows.net",
        })

    async def jwks_handler(self, request: web.Request) -> web.Response:
        try:
            self._tenant(request)
        except EntraError as exc:
            return exc.response()
        return web.json_response(self.jwks())

    async def token(self, request: web.Request) -> web.Response:
        try:
            tenant = self._tenant(request)
            form = await request.post()
            params = {k: str(v) for k, v in form.items() if isinstance(v, str)}
            for name in ("grant_type", "client_id", "scope"):
                if not params.get(name):
                    raise EntraError(400, "invalid_request", 900144,
                                     f"The request body must contain the following parameter: '{name}'.")
            if params["grant_type"] != "client_credentials":
                raise EntraError(400, "unsupported_grant_type", 70003,
                                 f"The app requested an unsupported grant type '{params['grant_type']}'.")
            if params["client_id"].lower() != self.config.client_app_id.lower():
                raise EntraError(400, "invalid_client", 700016,
                                 f"Application with identifier '{params['client_id']}' was not found in the "
                                 f"directory '{self.config.tenant_name}'. This can happen if the application has "
                                 "not been installed by the administrator of the tenant or consented to by any "
                                 "user in the tenant.")
            wanted = f"{self.config.server_app_id_uri}/.default"
            if params["scope"].lower() != wanted.lower():
                raise EntraError(400, "invalid_scope", 70011,
                                 f"The provided value for the input parameter 'scope' is not valid. The scope "
                                 f"{params['scope']} is not valid (expected {wanted}).")
            username = params.get("username", "").strip()
            device_id = params.get("device_id", "").strip()
            if device_id and not _GUID.match(device_id):
                raise EntraError(400, "invalid_request", 90014,
                                 f"The device_id '{device_id}' is not a GUID.")
            if username and "@" not in username:
                raise EntraError(400, "invalid_request", 90014,
                                 f"The username '{username}' is not a user principal name (name@domain).")
        except EntraError as exc:
            self.log.warning(f"Token request from {request.remote} refused: {exc.error} AADSTS{exc.code}: "
                             f"{exc.description}")
            return exc.response()
        kind = "user" if username else "device"
        issued = self.issue(kind, device_id=device_id or None, username=username or None)
        who = f"user {issued.upn}" if issued.upn else f"device {issued.device_id}"
        self.log.info(f"Issued {kind} token for {who} (oid {issued.subject}) in tenant {tenant} to app "
                      f"{self.config.client_app_id}, audience {issued.audience}, kid {issued.kid}, valid 3600 s")
        return web.json_response({
            "token_type": "Bearer",
            "expires_in": int(TOKEN_LIFETIME.total_seconds()),
            "ext_expires_in": int(TOKEN_LIFETIME.total_seconds()),
            "access_token": issued.token,
        })

    # --- test-only admin ---

    async def admin_state(self, request: web.Request) -> web.Response:
        return web.json_response(self.state())

    async def admin_rollover(self, request: web.Request) -> web.Response:
        async with self._rollover_lock:
            old = self.keys.current.kid
            new = await asyncio.get_running_loop().run_in_executor(None, self.keys.rollover)
        self.log.info(f"Key rollover: {new.kid} is current (was {old}); published {', '.join(self.keys.published)}")
        return web.json_response(self.state())

    async def admin_mint(self, request: web.Request) -> web.Response:
        try:
            data = json.loads(await request.read())
        except ValueError:
            raise web.HTTPBadRequest(reason="body must be JSON") from None
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(reason="body must be a JSON object")
        known = {"kind", "audience", "tenant_id", "issuer", "lifetime_s", "not_before_s", "issued_s", "sign_with",
                 "device_id", "username"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise web.HTTPBadRequest(reason=f"unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        kind = data.get("kind")
        if kind not in ("device", "user"):
            raise web.HTTPBadRequest(reason='kind must be "device" or "user"')
        sign_with = data.get("sign_with", "current")
        if sign_with not in ("current", "unpublished", "tampered"):
            raise web.HTTPBadRequest(reason='sign_with must be "current", "unpublished" or "tampered"')
        _strings(data, ("audience", "tenant_id", "issuer", "device_id", "username"))
        _ints(data, ("lifetime_s", "not_before_s", "issued_s"))
        real_now = dt.datetime.now(dt.timezone.utc)
        now = real_now + dt.timedelta(seconds=data.get("issued_s", 0))
        not_before = real_now + dt.timedelta(seconds=data["not_before_s"]) if "not_before_s" in data else None
        lifetime = dt.timedelta(seconds=data.get("lifetime_s", int(TOKEN_LIFETIME.total_seconds())))
        issued = self.issue(kind, device_id=data.get("device_id"), username=data.get("username"),
                                audience=data.get("audience"), tenant_id=data.get("tenant_id"),
                                issuer=data.get("issuer"), lifetime=lifetime, now=now, not_before=not_before,
                                sign_with=sign_with)
        self.log.info(f"Test token minted: {kind}, sign_with {sign_with}, kid {issued.kid}, "
                      f"fields {', '.join(sorted(k for k in data if k != 'kind')) or '-'}")
        return web.json_response({"access_token": issued.token, "kid": issued.kid})

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/_mock/entra", self.admin_state)
        app.router.add_post("/_mock/entra/rollover", self.admin_rollover)
        app.router.add_post("/_mock/entra/token", self.admin_mint)
        app.router.add_get("/{tenant}/v2.0/.well-known/openid-configuration", self.metadata)
        app.router.add_get("/{tenant}/discovery/v2.0/keys", self.jwks_handler)
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self.token)


def _strings(data: dict[str, Any], names: Iterable[str]) -> None:
    for n in names:
        if n in data and not (isinstance(data[n], str) and data[n]):
            raise web.HTTPBadRequest(reason=f"{n} must be a non-empty string")


def _ints(data: dict[str, Any], names: Iterable[str]) -> None:
    for n in names:
        if n in data and (isinstance(data[n], bool) or not isinstance(data[n], int)
                          or abs(data[n]) > 10 * 365 * 86400):
            raise web.HTTPBadRequest(reason=f"{n} must be an integer number of seconds (at most 10 years)")


def _tamper(token: str) -> str:
    """The same token with its signature's bytes altered (still well-formed base64url)."""
    head, payload, sig = token.split(".")
    raw = bytearray(jwt.utils.base64url_decode(sig.encode("ascii")))
    raw[len(raw) // 2] ^= 0xFF
    return f"{head}.{payload}.{jwt.utils.base64url_encode(bytes(raw)).decode('ascii')}"
