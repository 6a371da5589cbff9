"""The management point's HTTP endpoints (paths as IIS serves them, case-insensitive).

- ``GET /SMS_MP/.sms_aut?MPLIST|MPLIST2|MPCERT|SITESIGNCERT|MPKEYINFORMATION``
- ``CCM_POST /ccm_system/request`` (messaging; the client certificate is the CMG's business)
- ``CCM_POST /ccm_system_tokenauth/request``: the same messages with ``Authorization:
  Bearer <token>``, validated here: a client token or a CCM token for every endpoint; a
  bulk registration token for ``MP_ClientRegistration`` only (the reply then carries the
  client's own token, see :mod:`mock_site.mp_messages`). ``401`` with the reason otherwise.
- ``POST /CCM_STS`` (also ``CCM_POST``): ``Authorization: Bearer <Entra token>``, validated
  here against the tenant's keys (issuer, audience = the server app, tenant, client app,
  lifetime); answers JSON ``{"token_type": "Bearer", "type": "CCMToken", "access_token":
  <CCM token>, "expires_in": 28800, "expires_on": <unix time>, "subject": <Entra oid>}``.
  ``401`` with the reason otherwise; ``CCM_STS.log``.
- ``GET /SMS_MP/.sms_pol?{GUID}.SHA256:<hash>`` (policy bodies)
- ``BITS_POST /CCM_Incoming/<name>`` (uploads, :mod:`mock_site.bits`)
- ``GET /BGB/handler.ashx?RequestType=LogIn|Poll`` (notifications, :mod:`mock_site.bgb`)
- ``GET|HEAD /CCM_Client/ccmsetup.cab``
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from urllib.parse import unquote

from aiohttp import web

from cmg.messaging import Message, MessageFormatError, decode_message, encode_message, reply_header
from cmg.site_tokens import SigningKeyMissing
from cmg.tokens import (CCM_TOKEN_LIFETIME, TYPE_BULK_REGISTRATION, TYPE_CCM, TYPE_CLIENT, TokenError,
                        ValidToken)
from mock_site.cab import build_cab
from mock_site.context import SITE_BUILD, SITE_VERSION, SiteContext, client_identity
from mock_site.mp_messages import ENDPOINTS, EndpointError
from mock_site.policy import parse_policy_query


def _reason(text: str) -> str:
    """A status line's reason phrase: one line, ASCII, bounded."""
    return " ".join(text.split()).encode("ascii", "replace").decode("ascii")[:300]


def _error(status: int, reason: str) -> web.Response:
    return web.Response(status=status, reason=_reason(reason), text=reason + "\n")


def _unauthorized(reason: str) -> web.Response:
    return web.Response(status=401, reason=_reason(reason), text=reason + "\n",
                        headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


def bearer_token(request: web.Request) -> str | None:
    """The token of ``Authorization: Bearer <token>``, or None."""
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


TOKENAUTH_TYPES = (TYPE_BULK_REGISTRATION, TYPE_CLIENT, TYPE_CCM)


class ManagementPoint:
    def __init__(self, ctx: SiteContext) -> None:
        self.ctx = ctx
        mp = ctx.mp_role
        self.name = mp.name if mp else "MP01"
        self.cab = build_cab([("ccmsetup.xml", self._ccmsetup_xml().encode("utf-8"))])

    def _ccmsetup_xml(self) -> str:
        root = ET.Element("ccmsetup", SiteCode=self.ctx.site_code, Version=SITE_VERSION)
        mp = self.ctx.mp_role
        if mp is not None:
            ET.SubElement(root, "CCMHOSTNAME").text = self.ctx.cmg_host(mp.role_id)
        ET.SubElement(root, "ClientAlwaysOnInternet").text = "1"
        return ET.tostring(root, encoding="unicode")

    # --- .sms_aut ---

    def _mplist(self, detailed: bool) -> str:
        root = ET.Element("MPList")
        for role in self.ctx.roles_of("MP"):
            host = self.ctx.cmg_host(role.role_id)
            mp = ET.SubElement(root, "MP", Name=host, FQDN=host, URL=self.ctx.cmg_url(role.role_id),
                               Type="Internet", SiteCode=self.ctx.site_code)
            ET.SubElement(mp, "Version").text = SITE_BUILD
            caps = ET.SubElement(mp, "Capabilities", SchemaVersion="1.0")
            # SSLState 63: HTTPS, client certificates and CMG traffic (the emulator's value)
            ET.SubElement(caps, "Property", Name="SSLState", Value="63")
            ET.SubElement(caps, "Property", Name="CMG", Value="1")
            if detailed:
                ET.SubElement(mp, "Site", Code=self.ctx.site_code, Version=SITE_VERSION)
                ET.SubElement(mp, "RoleID").text = str(role.role_id)
        return ET.tostring(root, encoding="unicode")

    async def sms_aut(self, request: web.Request) -> web.Response:
        what = unquote(request.query_string).strip().upper()
        certs = self.ctx.certs
        log = self.ctx.logs.getauth
        if what in ("MPLIST", "MPLIST2"):
            body, ctype = self._mplist(what == "MPLIST2"), "text/xml"
        elif what == "MPCERT":
            body, ctype = certs.mp_signing_hex, "text/plain"
        elif what == "SITESIGNCERT":
            body, ctype = certs.site_signing_hex, "text/plain"
        elif what == "MPKEYINFORMATION":
            root = ET.Element("MPKEYINFORMATION")
            ET.SubElement(root, "SITECODE").text = self.ctx.site_code
            ET.SubElement(root, "SIGNINGCERTIFICATE").text = certs.mp_signing_hex
            ET.SubElement(root, "SITESIGNINGCERTIFICATE").text = certs.site_signing_hex
            body, ctype = ET.tostring(root, encoding="unicode"), "text/xml"
        else:
            log.warning(f".sms_aut?{request.query_string} from {request.remote}: unknown request")
            return _error(400, f"unknown .sms_aut request {request.query_string!r} "
                               "(MPLIST, MPLIST2, MPCERT, SITESIGNCERT, MPKEYINFORMATION)")
        log.info(f".sms_aut?{what} from {request.remote}: {len(body)} chars")
        return web.Response(text=body, content_type=ctype)

    # --- messaging ---

    async def ccm_request(self, request: web.Request, token: ValidToken | None = None) -> web.Response:
        isapi = self.ctx.logs.isapi
        data = await request.read()
        try:
            msg = decode_message(request.headers.get("Content-Type", ""), data)
        except MessageFormatError as exc:
            isapi.warning(f"CCM_POST {request.path} from {request.remote}: malformed message: {exc}")
            return _error(400, f"malformed message: {exc}")
        endpoint = ENDPOINTS.get(msg.header.target_endpoint)
        if endpoint is None:
            isapi.warning(f"Message {msg.header.id} for unknown endpoint {msg.header.target_endpoint}")
            return _error(404, f"unknown target endpoint {msg.header.target_endpoint}")
        if token is not None:
            refused = self._token_refusal(token, msg)
            if refused:
                isapi.warning(f"Message {msg.header.id} to {msg.header.target_endpoint} on {request.path} "
                              f"refused: {refused}")
                return _unauthorized(refused)
        try:
            body = await endpoint(self.ctx, msg, client_identity(request.headers), token)
        except EndpointError as exc:
            isapi.warning(f"Message {msg.header.id} to {msg.header.target_endpoint} refused: {exc.reason}")
            return _error(exc.status, exc.reason)
        reply = Message(reply_header(msg.header, source_host=self.name), body)
        ctype, payload = encode_message(reply)
        isapi.info(f"Message {msg.header.id} from {msg.header.source_host} to {msg.header.target_endpoint}: "
                   f"replied {len(payload)} bytes")
        return web.Response(body=payload, headers={"Content-Type": ctype})

    def _token_refusal(self, token: ValidToken, msg: Message) -> str | None:
        endpoint = msg.header.target_endpoint
        if token.kind == TYPE_BULK_REGISTRATION and endpoint != "MP_ClientRegistration":
            return f"a {TYPE_BULK_REGISTRATION} token is accepted for MP_ClientRegistration only, not {endpoint}"
        if token.kind == TYPE_CLIENT:
            if self.ctx.clients.get(token.subject) is None:
                return f"the client token names {token.subject}, which is not a registered client"
            source = msg.header.source_id.strip()
            if source and source.upper() != token.subject.upper():
                return f"the client token of {token.subject} was presented by {source}"
        return None

    async def ccm_tokenauth_request(self, request: web.Request) -> web.Response:
        """``ccm_system_tokenauth/request``: a valid site token first, then the message."""
        isapi = self.ctx.logs.isapi
        via = request.headers.get("X-CMG-Client-Auth", "")
        token = bearer_token(request)
        if token is None:
            isapi.warning(f"CCM_POST {request.path} from {request.remote}: no bearer token")
            return _unauthorized("ccm_system_tokenauth needs Authorization: Bearer <client, CCM or bulk "
                                 "registration token>")
        try:
            valid = self.ctx.token_signer().validate(token, TOKENAUTH_TYPES)
        except SigningKeyMissing as exc:
            isapi.error(f"CCM_POST {request.path}: cannot validate tokens: {exc}")
            return _error(503, f"cannot validate tokens: {exc}")
        except TokenError as exc:
            isapi.warning(f"CCM_POST {request.path} from {request.remote} (CMG auth {via or '-'}): "
                          f"token refused: {exc.reason}")
            return _unauthorized(f"token refused: {exc.reason}")
        isapi.info(f"CCM_POST {request.path}: {valid.kind} token for {valid.subject} accepted "
                   f"(CMG auth {via or '-'})")
        return await self.ccm_request(request, valid)

    # --- CCM_STS ---

    async def ccm_sts(self, request: web.Request) -> web.Response:
        """Exchange a valid Entra ID token for a CCM token (8 hours)."""
        log = self.ctx.logs.sts
        tenant = self.ctx.entra
        who = f"{request.remote} (CMG auth {request.headers.get('X-CMG-Client-Auth') or '-'})"
        if tenant is None:
            log.warning(f"Token request from {who} refused: Microsoft Entra ID is not enabled for this site")
            return _unauthorized("Microsoft Entra ID is not enabled for this site")
        token = bearer_token(request)
        if token is None:
            log.warning(f"Token request from {who} refused: no bearer token")
            return _unauthorized("CCM_STS needs Authorization: Bearer <Microsoft Entra ID token>")
        try:
            entra = tenant.validate(token, self.ctx.clock_skew)
        except TokenError as exc:
            log.warning(f"Token request from {who} refused: Entra token invalid: {exc.reason}")
            return _unauthorized(f"Entra token refused: {exc.reason}")
        claims = entra.claims
        app = str(claims.get("appid") or claims.get("azp") or "")
        if app.lower() != tenant.config.client_app_id.lower():
            reason = (f"the Entra token was issued to app {app or '(none)'}, not to the ConfigMgr client app "
                      f"{tenant.config.client_app_id}")
            log.warning(f"Token request from {who} refused: {reason}")
            return _unauthorized(f"Entra token refused: {reason}")
        try:
            signer = self.ctx.token_signer()
        except SigningKeyMissing as exc:
            log.error(f"Token request from {who}: cannot issue a CCM token: {exc}")
            return _error(503, f"cannot issue a CCM token: {exc}")
        extra = {k: claims[k] for k in ("tid", "deviceid", "upn", "idtyp") if k in claims}
        issued = time.time()
        ccm = signer.ccm_token(entra.subject, extra=extra)
        kind = str(claims.get("idtyp", "device"))
        name = claims.get("upn") or claims.get("deviceid") or entra.subject
        log.info(f"Issued a CCM token to {kind} {name} (oid {entra.subject}, tenant {claims.get('tid')}) for {who}, "
                 f"valid {int(CCM_TOKEN_LIFETIME.total_seconds())} s, kid {signer.kid}")
        return web.json_response({
            "token_type": "Bearer",
            "type": TYPE_CCM,
            "access_token": ccm,
            "expires_in": int(CCM_TOKEN_LIFETIME.total_seconds()),
            "expires_on": int(issued + CCM_TOKEN_LIFETIME.total_seconds()),
            "subject": entra.subject,
        })

    # --- policy bodies ---

    async def sms_pol(self, request: web.Request) -> web.Response:
        log = self.ctx.logs.getpolicy
        parsed = parse_policy_query(unquote(request.query_string))
        if parsed is None:
            log.warning(f".sms_pol?{request.query_string}: not {{GUID}}.SHA256:<hash>")
            return _error(400, "policy request must be .sms_pol?{GUID}.SHA256:<64 hex digits>")
        pid, sha = parsed
        policy, why = self.ctx.policies.lookup(pid, sha)
        if policy is None:
            log.warning(f"Policy request {pid} SHA256:{sha} from {request.remote}: {why}")
            return _error(404, why)
        log.info(f"Policy {pid} ({policy.category}) sent to {request.remote}, {len(policy.body)} bytes")
        return web.Response(body=policy.body, headers={"Content-Type": "text/xml; charset=UTF-16"})

    async def ccmsetup_cab(self, request: web.Request) -> web.Response:
        self.ctx.logs.isapi.info(f"{request.method} ccmsetup.cab from {request.remote}")
        return web.Response(body=self.cab, headers={"Content-Type": "application/vnd.ms-cab-compressed"})
