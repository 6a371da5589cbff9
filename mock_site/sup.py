"""The software update point: WSUS's client web services, SOAP 1.1 over HTTP.

- ``/SimpleAuthWebService/SimpleAuth.asmx``  GetAuthorizationCookie
- ``/ClientWebService/client.asmx``          GetConfig, GetCookie, SyncUpdates, GetExtendedUpdateInfo
- ``/ReportingWebService/ReportingWebService.asmx``  ReportEventBatch

The cookie round trip is real: the authorization cookie and the server cookie are
HMAC-signed by a key kept in ``data_dir``, and every call after GetCookie checks its
cookie (a bad or expired one gets the ``InvalidCookie`` fault). The catalog is small and
fixed: one detectoid (non-leaf) and three leaf updates that need it; SyncUpdates
answers in rounds like WSUS: first what needs nothing, then what the client's
``InstalledNonLeafUpdateIDs`` make applicable, never what it already has cached.
Unknown actions and malformed XML get a SOAP Fault (HTTP 500, ``soap:Client``).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable
from xml.sax.saxutils import escape

from aiohttp import web

from cmg.messaging import XMLFormatError, parse_xml
from mock_site.context import SiteContext, client_identity

SOAP_NS = "http://schemas.xmlsoap.org/soap/envelope/"
CLIENT_NS = "http://www.microsoft.com/SoftwareDistribution/Server/ClientWebService"
SIMPLEAUTH_NS = "http://www.microsoft.com/SoftwareDistribution/Server/SimpleAuthWebService"
REPORTING_NS = "http://www.microsoft.com/SoftwareDistribution"
PLUGIN_ID = "SimpleTargeting"
COOKIE_LIFETIME = 5 * 24 * 3600  # WSUS server cookies last days; the emulator uses five
CATALOG_CONTENT_ID = "WSUSContent"


@dataclass(frozen=True)
class Update:
    revision_id: int
    update_id: str
    revision_number: int
    title: str
    kb: str
    is_leaf: bool
    prerequisites: tuple[int, ...]
    size: int

    @property
    def file(self) -> str:
        return f"payload-{self.size}.bin"


CATALOG: tuple[Update, ...] = (
    Update(300000, "6407468E-EDC7-4ECD-8C32-521F64CEE65E", 100, "Windows 11 (detectoid)", "", False, (), 0),
    Update(300001, "A3A7C4F2-2E5B-4B1F-9B8C-5E0C4D6F7A11", 200, "2024-05 Cumulative Update for Windows 11",
           "5037771", True, (300000,), 4 * 1024 * 1024),
    Update(300002, "E0789628-CE08-4437-BE74-2495B842F43B", 201,
           "Security Intelligence Update for Microsoft Defender Antivirus", "2267602", True, (300000,),
           1024 * 1024),
    Update(300003, "1C3F5A7E-9B2D-4E6F-8A1C-3B5D7F9E2A4C", 202,
           "2024-05 Cumulative Update for .NET Framework 3.5 and 4.8.1", "5037591", True, (300000,),
           2 * 1024 * 1024),
)
_BY_REVISION = {u.revision_id: u for u in CATALOG}


class SoapFault(Exception):
    def __init__(self, error_code: str, message: str, actor: str = "") -> None:
        super().__init__(message)
        self.error_code, self.message, self.actor = error_code, message, actor


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def _envelope(inner: str) -> str:
    return (f'<?xml version="1.0" encoding="utf-8"?><soap:Envelope xmlns:soap="{SOAP_NS}" '
            'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:xsd="http://www.w3.org/2001/XMLSchema">'
            f"<soap:Body>{inner}</soap:Body></soap:Envelope>")


def fault_envelope(fault: SoapFault, method: str) -> str:
    return _envelope(
        "<soap:Fault><faultcode>soap:Client</faultcode>"
        f"<faultstring>{escape(fault.message)}</faultstring><faultactor>{escape(fault.actor)}</faultactor>"
        f"<detail><ErrorCode>{escape(fault.error_code)}</ErrorCode><Message>{escape(fault.message)}</Message>"
        f"<ID>{uuid.uuid4()}</ID><Method>{escape(method)}</Method></detail></soap:Fault>"
    )


class CookieSigner:
    """Signs and checks the SimpleAuth and server cookies with a key kept on disk."""

    def __init__(self, key_file: Path) -> None:
        if key_file.exists():
            self._key = key_file.read_bytes()
        else:
            key_file.parent.mkdir(parents=True, exist_ok=True)
            self._key = secrets.token_bytes(32)
            tmp = key_file.with_suffix(".tmp")
            tmp.write_bytes(self._key)
            os.chmod(tmp, 0o600)
            os.replace(tmp, key_file)

    def seal(self, kind: str, claims: dict[str, object]) -> str:
        payload = json.dumps({"k": kind, **claims}, separators=(",", ":")).encode()
        mac = hmac.new(self._key, payload, hashlib.sha256).digest()
        return base64.b64encode(payload + mac).decode("ascii")

    def open(self, kind: str, token: str) -> dict[str, object] | None:
        try:
            raw = base64.b64decode(token.strip(), validate=True)
        except ValueError:
            return None
        if len(raw) < 33:
            return None
        payload, mac = raw[:-32], raw[-32:]
        if not hmac.compare_digest(mac, hmac.new(self._key, payload, hashlib.sha256).digest()):
            return None
        try:
            claims = json.loads(payload)
        except ValueError:
            return None
        if not isinstance(claims, dict) or claims.get("k") != kind:
            return None
        return claims


def _child(el: ET.Element, ns: str, name: str) -> ET.Element | None:
    return el.find(f"{{{ns}}}{name}")


def _ints(el: ET.Element | None, ns: str) -> set[int]:
    if el is None:
        return set()
    out = set()
    for i in el.findall(f"{{{ns}}}int"):
        try:
            out.add(int((i.text or "").strip()))
        except ValueError:
            raise SoapFault("InvalidParameters", f"not an integer revision id: {i.text!r}") from None
    return out


class UpdateService:
    def __init__(self, ctx: SiteContext, signer: CookieSigner) -> None:
        self.ctx = ctx
        self.signer = signer
        self.events_reported = 0
        self._actions: dict[tuple[str, str], Callable[[ET.Element, web.Request], Awaitable[str]]] = {
            ("/simpleauthwebservice/simpleauth.asmx", "GetAuthorizationCookie"): self.get_authorization_cookie,
            ("/clientwebservice/client.asmx", "GetConfig"): self.get_config,
            ("/clientwebservice/client.asmx", "GetCookie"): self.get_cookie,
            ("/clientwebservice/client.asmx", "SyncUpdates"): self.sync_updates,
            ("/clientwebservice/client.asmx", "GetExtendedUpdateInfo"): self.get_extended_update_info,
            ("/reportingwebservice/reportingwebservice.asmx", "ReportEventBatch"): self.report_event_batch,
        }
        self._namespaces = {
            "/simpleauthwebservice/simpleauth.asmx": SIMPLEAUTH_NS,
            "/clientwebservice/client.asmx": CLIENT_NS,
            "/reportingwebservice/reportingwebservice.asmx": REPORTING_NS,
        }

    async def handle(self, request: web.Request) -> web.Response:
        path = request.path.lower()
        soap_action = request.headers.get("SOAPAction", "").strip().strip('"')
        method = soap_action or "(none)"
        ns = self._namespaces[path]
        try:
            root = parse_xml(await request.read())
            if root.tag != f"{{{SOAP_NS}}}Envelope":
                raise SoapFault("InvalidParameters", f"not a SOAP 1.1 envelope: <{root.tag}>")
            body = _child(root, SOAP_NS, "Body")
            if body is None or len(body) != 1:
                raise SoapFault("InvalidParameters", "the SOAP Body must hold exactly one element")
            call = body[0]
            call_ns, _, name = call.tag[1:].partition("}") if call.tag.startswith("{") else ("", "", call.tag)
            if soap_action and soap_action.rsplit("/", 1)[-1] != name:
                raise SoapFault("InvalidParameters", f"SOAPAction {soap_action} does not match the body <{name}>")
            action = self._actions.get((path, name))
            if action is None or call_ns != ns:
                raise SoapFault("InvalidParameters", f"unknown action {call_ns}/{name} at {request.path}")
            method = f"{ns}/{name}"
            reply = await action(call, request)
        except XMLFormatError as exc:
            return self._fault(SoapFault("InvalidParameters", f"malformed request: {exc}"), method, request)
        except SoapFault as exc:
            return self._fault(exc, method, request)
        self.ctx.logs.wsus.info(f"{name} from {request.remote}: OK")
        return web.Response(text=_envelope(reply), content_type="text/xml", charset="utf-8")

    def _fault(self, fault: SoapFault, method: str, request: web.Request) -> web.Response:
        fault.actor = fault.actor or request.path
        self.ctx.logs.wsus.warning(f"SOAP fault {fault.error_code} for {method}: {fault.message}")
        return web.Response(status=500, text=fault_envelope(fault, method), content_type="text/xml",
                            charset="utf-8")

    def _check_cookie(self, call: ET.Element, ns: str = CLIENT_NS) -> dict[str, object]:
        cookie = _child(call, ns, "cookie")
        data = cookie.findtext(f"{{{ns}}}EncryptedData") if cookie is not None else None
        claims = self.signer.open("server", data or "")
        if claims is None:
            raise SoapFault("InvalidCookie", "the cookie is missing or was not issued by this server")
        if float(claims.get("exp", 0)) < time.time():  # type: ignore[arg-type]
            raise SoapFault("CookieExpired", "the cookie has expired")
        return claims

    def _new_cookie(self, client_id: str) -> str:
        exp = time.time() + COOKIE_LIFETIME
        data = self.signer.seal("server", {"c": client_id, "exp": exp})
        return f"<Expiration>{_iso(exp)}</Expiration><EncryptedData>{data}</EncryptedData>"

    # --- SimpleAuth ---

    async def get_authorization_cookie(self, call: ET.Element, request: web.Request) -> str:
        client_id = (call.findtext(f"{{{SIMPLEAUTH_NS}}}clientId") or "").strip()
        if not client_id:
            raise SoapFault("InvalidParameters", "GetAuthorizationCookie needs a clientId")
        dns = (call.findtext(f"{{{SIMPLEAUTH_NS}}}dnsName") or "").strip()
        data = self.signer.seal("auth", {"c": client_id, "d": dns, "t": time.time(),
                                         "id": client_identity(request.headers)})
        return (f'<GetAuthorizationCookieResponse xmlns="{SIMPLEAUTH_NS}"><GetAuthorizationCookieResult>'
                f"<PlugInId>{PLUGIN_ID}</PlugInId><CookieData>{data}</CookieData>"
                "</GetAuthorizationCookieResult></GetAuthorizationCookieResponse>")

    # --- client web service ---

    async def get_config(self, call: ET.Element, request: web.Request) -> str:
        last_change = _iso(self.ctx.started)
        return (f'<GetConfigResponse xmlns="{CLIENT_NS}"><GetConfigResult>'
                f"<LastChange>{last_change}</LastChange><IsRegistrationRequired>false</IsRegistrationRequired>"
                f"<AuthInfo><AuthPlugInInfo><PlugInID>{PLUGIN_ID}</PlugInID>"
                "<ServiceUrl>SimpleAuthWebService/SimpleAuth.asmx</ServiceUrl><Parameter /></AuthPlugInInfo></AuthInfo>"
                "<AllowedEventIds><int>1</int><int>2</int><int>183</int><int>186</int></AllowedEventIds>"
                "<Properties><ConfigurationProperty><Name>MaxExtendedUpdatesPerRequest</Name><Value>50</Value>"
                "</ConfigurationProperty><ConfigurationProperty><Name>PackageServerShadow</Name><Value /></ConfigurationProperty>"
                "</Properties></GetConfigResult></GetConfigResponse>")

    async def get_cookie(self, call: ET.Element, request: web.Request) -> str:
        auth = _child(call, CLIENT_NS, "authCookies")
        client_id = ""
        if auth is not None:
            for cookie in auth.findall(f"{{{CLIENT_NS}}}AuthorizationCookie"):
                if (cookie.findtext(f"{{{CLIENT_NS}}}PlugInId") or "").strip() != PLUGIN_ID:
                    continue
                claims = self.signer.open("auth", cookie.findtext(f"{{{CLIENT_NS}}}CookieData") or "")
                if claims is not None:
                    client_id = str(claims.get("c", ""))
        if not client_id:
            raise SoapFault("InvalidAuthorizationCookie", "no valid SimpleTargeting authorization cookie")
        return (f'<GetCookieResponse xmlns="{CLIENT_NS}"><GetCookieResult>{self._new_cookie(client_id)}'
                "</GetCookieResult></GetCookieResponse>")

    async def sync_updates(self, call: ET.Element, request: web.Request) -> str:
        claims = self._check_cookie(call)
        params = _child(call, CLIENT_NS, "parameters")
        if params is None:
            raise SoapFault("InvalidParameters", "SyncUpdates needs <parameters>")
        installed = _ints(_child(params, CLIENT_NS, "InstalledNonLeafUpdateIDs"), CLIENT_NS)
        cached = _ints(_child(params, CLIENT_NS, "OtherCachedUpdateIDs"), CLIENT_NS)
        new = [u for u in CATALOG
               if u.revision_id not in installed | cached and all(p in installed for p in u.prerequisites)]
        infos = "".join(
            f"<UpdateInfo><ID>{u.revision_id}</ID><Deployment><ID>{20000 + u.revision_id % 1000}</ID>"
            f"<Action>{'Install' if u.is_leaf else 'Evaluate'}</Action><IsAssigned>true</IsAssigned>"
            f"<LastChangeTime>{_iso(self.ctx.started)[:10]}</LastChangeTime><AutoSelect>0</AutoSelect>"
            "<AutoDownload>0</AutoDownload><SupersedenceBehavior>0</SupersedenceBehavior></Deployment>"
            f"<IsLeaf>{'true' if u.is_leaf else 'false'}</IsLeaf>"
            f"<Xml>{escape(self._core_xml(u))}</Xml></UpdateInfo>"
            for u in new
        )
        self.ctx.logs.wsus.info(f"SyncUpdates for {claims.get('c')}: {len(new)} new update(s)")
        return (f'<SyncUpdatesResponse xmlns="{CLIENT_NS}"><SyncUpdatesResult>'
                f"<NewUpdates>{infos}</NewUpdates><OutOfScopeRevisionIDs /><Truncated>false</Truncated>"
                f"<NewCookie>{self._new_cookie(str(claims.get('c', '')))}</NewCookie>"
                "<DriverSyncNotNeeded>true</DriverSyncNotNeeded></SyncUpdatesResult></SyncUpdatesResponse>")

    @staticmethod
    def _core_xml(u: Update) -> str:
        prereqs = "".join(f'<UpdateIdentity UpdateID="{_BY_REVISION[p].update_id}" />' for p in u.prerequisites)
        return (f'<UpdateIdentity UpdateID="{u.update_id}" RevisionNumber="{u.revision_number}" />'
                f'<Properties UpdateType="{"Software" if u.is_leaf else "Detectoid"}" />'
                + (f"<Relationships><Prerequisites>{prereqs}</Prerequisites></Relationships>" if prereqs else ""))

    async def get_extended_update_info(self, call: ET.Element, request: web.Request) -> str:
        self._check_cookie(call)
        ids = _ints(_child(call, CLIENT_NS, "revisionIDs"), CLIENT_NS)
        unknown = sorted(i for i in ids if i not in _BY_REVISION)
        if unknown:
            raise SoapFault("InvalidParameters", f"unknown revision id(s): {', '.join(map(str, unknown))}")
        dps = self.ctx.roles_of("DP")
        updates, files = [], []
        for rid in sorted(ids):
            u = _BY_REVISION[rid]
            updates.append(f"<Update><ID>{rid}</ID><Xml>{escape(self._extended_xml(u))}</Xml></Update>")
            if u.is_leaf and dps:
                url = f"{self.ctx.cmg_url(dps[0].role_id)}/SMS_DP_SMSPKG$/{CATALOG_CONTENT_ID}/{u.file}"
                digest = base64.b64encode(hashlib.sha1(u.update_id.encode()).digest()).decode()
                files.append(f"<FileLocation><FileDigest>{digest}</FileDigest><Url>{escape(url)}</Url></FileLocation>")
        return (f'<GetExtendedUpdateInfoResponse xmlns="{CLIENT_NS}"><GetExtendedUpdateInfoResult>'
                f"<Updates>{''.join(updates)}</Updates><FileUrls>{''.join(files)}</FileUrls>"
                "</GetExtendedUpdateInfoResult></GetExtendedUpdateInfoResponse>")

    @staticmethod
    def _extended_xml(u: Update) -> str:
        kb = f"<KBArticleID>{u.kb}</KBArticleID>" if u.kb else ""
        return (f'<ExtendedProperties DefaultPropertiesLanguage="en" Handler="http://schemas.microsoft.com/msus/2002/12/UpdateHandlers/CBS" '
                f'IsBeta="false">{kb}</ExtendedProperties><Files><File FileName="{u.file}" Size="{u.size}" /></Files>'
                f"<Title>{escape(u.title)}</Title>")

    # --- reporting ---

    async def report_event_batch(self, call: ET.Element, request: web.Request) -> str:
        self._check_cookie(call, REPORTING_NS)
        batch = _child(call, REPORTING_NS, "eventBatch")
        n = len(batch.findall(f"{{{REPORTING_NS}}}ReportingEvent")) if batch is not None else 0
        self.events_reported += n
        self.ctx.logs.wsus.info(f"ReportEventBatch: {n} event(s)")
        return (f'<ReportEventBatchResponse xmlns="{REPORTING_NS}"><ReportEventBatchResult>true'
                "</ReportEventBatchResult></ReportEventBatchResponse>")
