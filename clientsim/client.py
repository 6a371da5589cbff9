"""An internet ConfigMgr client (``ClientAlwaysOnInternet = 1``) that talks only to the CMG.

Every request goes to ``https://<service name>/<channel>/<role id>/<internal path>``:
the connection is made to ``address`` (the gateway's host and port) while the service
name is used for SNI, the Host header and certificate hostname verification, as a real
client resolving the CMG's DNS name would. The client certificate, when given, is
presented in the TLS handshake.

Client authentication (``auth``):

- ``"pki"``: channel ``CCM_Proxy_MutualAuth``, the client certificate; messages on
  ``ccm_system/request``.
- ``"entra"``: the client gets a device token from the Entra ID tenant's token endpoint
  (:class:`EntraSettings`; straight to the authority, which is in the cloud, not behind
  the CMG), exchanges it at the MP's ``CCM_STS`` through
  ``/CCM_Proxy_ServerAuth/<MP role id>/CCM_STS`` for a CCM token, and sends that
  (``Authorization: Bearer``) on every later request, on ``CCM_Proxy_ServerAuth``;
  messages on ``ccm_system_tokenauth/request``. No client certificate.
- ``"token"``: site-issued tokens. The client registers once with the bulk registration
  token (``MP_ClientRegistration`` on ``ccm_system_tokenauth/request``), takes its own
  client token from the reply's ``<ClientToken>`` and sends that afterwards. Given a
  ``client_token`` (from an earlier registration) it renews with it instead.

URLs the site hands out (MPLIST, location replies) name ``CCM_Proxy_MutualAuth``; a
token client uses them on ``CCM_Proxy_ServerAuth``, the same role id and path.

:meth:`InternetClient.run_cycle` does what a client does after install, timing each
step: MPLIST, location, registration, policy, a BITS upload, an update scan and a
ranged content download. The lower-level methods (:meth:`send_message`, :meth:`get`,
:meth:`bits_upload`, :meth:`download`) are for tests and load generators. Errors from
the CMG (``403 CMGConnector_Forbidden`` ...) are kept verbatim in :class:`CMGError`
and in each :class:`Step`'s detail.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import re
import socket
import ssl
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDictProxy
from yarl import URL

from clientsim import payloads
from cmg.messaging import (Message, MessageFormatError, MessageHeader, XMLFormatError, decode_message,
                           encode_message, new_message_id, parse_xml)

USER_AGENT = "ConfigMgr Messaging HTTP Sender"
AUTH_METHODS = ("pki", "entra", "token")
MUTUAL_AUTH = "CCM_Proxy_MutualAuth"
SERVER_AUTH = "CCM_Proxy_ServerAuth"
WUA_USER_AGENT = "Windows-Update-Agent/10.0.10011.16384 Client-Protocol/2.50"
BITS_PROTOCOL = "{7df0354d-249b-430f-820d-3d2a9bef4931}"
BITS_USER_AGENT = "Microsoft BITS/7.8"
_CHUNK = 256 * 1024


class CMGError(Exception):
    """A non-success HTTP answer on the CMG path; ``str()`` is the status, reason and body
    text as received (e.g. ``403 CMGConnector_Forbidden``)."""

    def __init__(self, status: int, reason: str, body: bytes = b"", headers: Mapping[str, str] | None = None) -> None:
        self.status, self.reason, self.body = status, reason, body
        self.headers = dict(headers or {})
        text = body.decode("utf-8", "replace").strip()
        detail = f"{status} {reason}".strip()
        if text and text != reason:
            detail += f": {text[:500]}"
        bits = self.headers.get("BITS-Error-Code")
        if bits:
            detail += f" (BITS-Error-Code {bits})"
        super().__init__(detail)


class StepFailure(Exception):
    """A step got an answer but the answer is wrong (hash mismatch, missing field)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


@dataclass(frozen=True)
class EntraSettings:
    """Where a client gets its Entra ID device token: the tenant's authority (base URL of
    ``/{tenant}/oauth2/v2.0/token``), the tenant, the client app and the server app's
    App ID URI (the scope is ``<server_app_id_uri>/.default``). ``device_id`` is the
    Entra device id (default: derived from the client name, stable across runs);
    ``ca_cert`` is trusted for an ``https`` authority besides the system roots."""

    authority: str
    tenant_id: str
    client_app_id: str
    server_app_id_uri: str
    device_id: str | None = None
    ca_cert: Path | None = None

    @property
    def token_endpoint(self) -> str:
        return f"{self.authority.rstrip('/')}/{self.tenant_id}/oauth2/v2.0/token"


@dataclass(frozen=True)
class Step:
    name: str
    ok: bool
    status: int
    elapsed_ms: float
    detail: str


@dataclass(frozen=True)
class CycleResult:
    steps: list[Step]
    active_mp: str | None
    smsid: str | None
    auth: str = "pki"
    client_token: str | None = None  # auth "token": the client's own token, for the next run

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps)

    @property
    def sms_active_mp_candidate(self) -> str | None:
        """The WMI ``SMS_ActiveMPCandidate`` instance the client would show."""
        return f'MP="{self.active_mp}" Type="Internet"' if self.active_mp else None


@dataclass(frozen=True)
class HttpResult:
    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    body: bytes


@dataclass(frozen=True)
class UploadResult:
    status: int
    session_id: str
    size: int
    sha256: str
    fragments: int


@dataclass
class _Locations:
    site_code: str = ""
    sup_urls: list[str] = field(default_factory=list)
    dp_urls: list[str] = field(default_factory=list)


class _CMGResolver(AbstractResolver):
    """Resolves the CMG's service name (any port) to the gateway address, nothing else."""

    def __init__(self, service_name: str, address: tuple[str, int]) -> None:
        self.service_name = service_name.lower()
        self.address = address

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        if host.lower().rstrip(".") != self.service_name:
            raise OSError(f"{host} is not the CMG service name {self.service_name}; "
                          "an internet client reaches nothing else")
        ip, p = self.address
        try:
            addr = ipaddress.ip_address(ip)
            infos = [(socket.AF_INET6 if addr.version == 6 else socket.AF_INET, ip)]
        except ValueError:
            found = await asyncio.get_running_loop().getaddrinfo(ip, p, type=socket.SOCK_STREAM)
            infos = [(fam, sa[0]) for fam, _, _, _, sa in found]
        return [ResolveResult(hostname=host, host=h, port=p, family=fam, proto=0, flags=socket.AI_NUMERICHOST)
                for fam, h in infos]

    async def close(self) -> None:
        return None


class _Reader:
    """Reads exact amounts from an async byte source."""

    def __init__(self, source: AsyncIterator[bytes]) -> None:
        self._source = source
        self._buf = b""

    async def read(self, n: int) -> bytes:
        while not self._buf:
            try:
                self._buf = bytes(await self._source.__anext__())
            except StopAsyncIteration:
                return b""
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


async def _aiter_bytes(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), _CHUNK):
        yield data[i:i + _CHUNK]


class InternetClient:
    """One internet client. Use as ``async with InternetClient(...) as c`` or call :meth:`close`."""

    def __init__(self, service_name: str, address: tuple[str, int], mp_role_id: int, ca_cert: Path,
                 client_cert: Path | None, client_key: Path | None, *, client_name: str = "CLIENT01",
                 timeout: float = 60, content_id: str = "PS100001.1",
                 content_file: str = "payload-1048576.bin", upload_size: int = 1024 * 1024,
                 fragment_size: int = 256 * 1024, auth: str = "pki", bulk_token: str | None = None,
                 entra: EntraSettings | None = None, client_token: str | None = None) -> None:
        if auth not in AUTH_METHODS:
            raise ValueError(f"auth must be one of {', '.join(AUTH_METHODS)}, not {auth!r}")
        if auth == "entra" and entra is None:
            raise ValueError('auth="entra" needs entra=EntraSettings(...)')
        if auth == "token" and not (bulk_token or client_token):
            raise ValueError('auth="token" needs bulk_token= (or the client_token= of an earlier registration)')
        self.auth = auth
        self.bulk_token = bulk_token
        self.entra = entra
        self.client_token = client_token
        self.access_token: str | None = None  # what goes in Authorization: Bearer
        self.channel = MUTUAL_AUTH if auth == "pki" else SERVER_AUTH
        self.messaging_path = "ccm_system/request" if auth == "pki" else "ccm_system_tokenauth/request"
        self.service_name = service_name
        self.address = address
        self.mp_role_id = mp_role_id
        self.client_name = client_name
        self.timeout = timeout
        self.content_id = content_id
        self.content_file = content_file
        self.upload_size = upload_size
        self.fragment_size = fragment_size
        self.ssl_context = ssl.create_default_context(cafile=str(ca_cert))
        self.client_cert = client_cert
        if client_cert is not None:
            self.ssl_context.load_cert_chain(str(client_cert), str(client_key) if client_key else None)
        self.mp_url: str = self.role_url(mp_role_id)
        self.smsid: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._cloud_session: aiohttp.ClientSession | None = None

    # --- plumbing ---

    async def __aenter__(self) -> "InternetClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._cloud_session is not None:
            await self._cloud_session.close()
            self._cloud_session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=_CMGResolver(self.service_name, self.address),
                                             ssl=self.ssl_context, use_dns_cache=False, limit=0)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, connect=self.timeout, sock_read=self.timeout),
                headers={"User-Agent": USER_AGENT},
                auto_decompress=False,
            )
        return self._session

    def _cloud(self) -> aiohttp.ClientSession:
        """A session for the Entra ID tenant (ordinary DNS, not the CMG)."""
        if self._cloud_session is None:
            ctx = ssl.create_default_context()
            if self.entra is not None and self.entra.ca_cert is not None:
                ctx.load_verify_locations(cafile=str(self.entra.ca_cert))
            self._cloud_session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ctx),
                timeout=aiohttp.ClientTimeout(total=None, connect=self.timeout, sock_read=self.timeout),
            )
        return self._cloud_session

    def role_url(self, role_id: int) -> str:
        """``https://<service name>/<channel>/<role id>`` (the CMG URL of a role)."""
        return f"https://{self.service_name}/{self.channel}/{role_id}"

    def on_channel(self, url: str) -> str:
        """A CMG URL as the site hands it out, on this client's channel."""
        return re.sub(r"/CCM_Proxy_(MutualAuth|ServerAuth)/", f"/{self.channel}/", url, count=1, flags=re.I)

    def _mp_headers(self) -> dict[str, str]:
        return {"CCMClientID": self.smsid} if self.smsid else {}

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"} if self.access_token else {}

    async def request(self, method: str, url: str, *, data: Any = None,
                      headers: Mapping[str, str] | None = None) -> HttpResult:
        """One request on the CMG path; the whole answer is read (use for small bodies).
        The client's bearer token goes along unless ``headers`` names an Authorization."""
        merged = {**self._auth_headers(), **dict(headers or {})}
        async with self._http().request(method, URL(url), data=data, headers=merged) as resp:
            body = await resp.read()
            return HttpResult(resp.status, resp.reason or "", resp.headers, body)

    async def get(self, path_under_role: str, role_id: int, headers: Mapping[str, str] | None = None) -> HttpResult:
        """``GET <role URL>/<path_under_role>``, e.g. ``get("SMS_MP/.sms_aut?MPLIST", mp_id)``."""
        return await self.request("GET", f"{self.role_url(role_id)}/{path_under_role.lstrip('/')}", headers=headers)

    async def send_message(self, endpoint: str, body_xml: str, *, token: str | None = None) -> Message:
        """``CCM_POST <MP>/ccm_system/request`` (``ccm_system_tokenauth/request`` for a token
        client) with a message for ``endpoint``; the reply. ``token`` replaces the client's
        bearer token for this message (registration with the bulk token).

        Raises :class:`CMGError` on a non-200 answer, ``MessageFormatError`` on a bad reply.
        """
        header = MessageHeader(id=new_message_id(), source_id=self.smsid or "", source_host=self.client_name,
                               target_endpoint=endpoint, target_host=self.mp_url.split("://", 1)[-1])
        ctype, data = encode_message(Message(header, body_xml))
        headers = {"Content-Type": ctype, **self._mp_headers()}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        res = await self.request("CCM_POST", f"{self.mp_url}/{self.messaging_path}", data=data, headers=headers)
        if res.status != 200:
            raise CMGError(res.status, res.reason, res.body, res.headers)
        return decode_message(res.headers.get("Content-Type", ""), res.body)

    async def bits_upload(self, name: str, data: int | bytes | AsyncIterable[bytes],
                          fragment_size: int = 256 * 1024, *, size: int | None = None) -> UploadResult:
        """Upload to ``<MP>/CCM_Incoming/<name>`` with BITS: Create-Session, fragments, Close-Session.

        ``data`` is a size (a generated state-message payload of that many bytes), bytes,
        or an async byte source (then ``size`` is required: BITS ranges name the total).
        Nothing is held whole in memory. Raises :class:`CMGError` on any refused packet.
        """
        if isinstance(data, int):
            size = data
            source: AsyncIterator[bytes] = payloads.state_message_payload(self.client_name, self.smsid or "", data)
        elif isinstance(data, (bytes, bytearray)):
            size = len(data)
            source = _aiter_bytes(bytes(data))
        else:
            if size is None:
                raise ValueError("an async byte source needs size=")
            source = aiter(data)
        if fragment_size <= 0:
            raise ValueError("fragment_size must be positive")
        url = f"{self.mp_url}/CCM_Incoming/{name}"
        base = {"User-Agent": BITS_USER_AGENT, **self._mp_headers()}

        async def packet(kind: str, extra: Mapping[str, str] | None = None, body: Any = None) -> HttpResult:
            headers = {**base, "BITS-Packet-Type": kind, **(extra or {})}
            if body is None:
                headers["Content-Length"] = "0"
            res = await self.request("BITS_POST", url, data=body, headers=headers)
            if res.status != 200:
                raise CMGError(res.status, res.reason, res.body, res.headers)
            return res

        created = await packet("Create-Session", {"BITS-Supported-Protocols": BITS_PROTOCOL})
        sid = created.headers.get("BITS-Session-Id", "")
        if not sid:
            raise StepFailure(created.status, "Create-Session answer carries no BITS-Session-Id")
        reader = _Reader(source)
        hasher = hashlib.sha256()
        sent = 0
        fragments = 0
        try:
            while sent < size:
                length = min(fragment_size, size - sent)

                async def body(n: int = length) -> AsyncIterator[bytes]:
                    left = n
                    while left:
                        chunk = await reader.read(min(_CHUNK, left))
                        if not chunk:
                            raise ValueError(f"upload source ended {left} bytes early")
                        hasher.update(chunk)
                        left -= len(chunk)
                        yield chunk

                res = await packet("Fragment", {"BITS-Session-Id": sid, "Content-Length": str(length),
                                                "Content-Range": f"bytes {sent}-{sent + length - 1}/{size}"},
                                   body())
                acked = int(res.headers.get("BITS-Received-Content-Range", "-1"))
                if acked != sent + length:
                    raise StepFailure(res.status, f"server acknowledged {acked} bytes, sent {sent + length}")
                sent += length
                fragments += 1
            closed = await packet("Close-Session", {"BITS-Session-Id": sid})
        except BaseException:
            try:
                await packet("Cancel-Session", {"BITS-Session-Id": sid})
            except (CMGError, aiohttp.ClientError, OSError, asyncio.TimeoutError):
                pass
            raise
        return UploadResult(closed.status, sid, size, hasher.hexdigest(), fragments)

    async def _download_url(self, url: str, range_: str | tuple[int, int] | None,
                            hasher: Any) -> tuple[int, int, str]:
        headers: dict[str, str] = self._auth_headers()
        if isinstance(range_, tuple):
            headers["Range"] = f"bytes={range_[0]}-{range_[1]}"
        elif range_:
            headers["Range"] = range_ if range_.startswith("bytes=") else f"bytes={range_}"
        size = 0
        async with self._http().get(URL(url), headers=headers) as resp:
            if resp.status >= 400:
                raise CMGError(resp.status, resp.reason or "", await resp.read(), resp.headers)
            async for chunk in resp.content.iter_chunked(_CHUNK):
                hasher.update(chunk)
                size += len(chunk)
            return resp.status, size, resp.headers.get("Content-Range", "")

    async def download(self, role_id: int, path: str, range: str | tuple[int, int] | None = None) -> tuple[int, str, int]:
        """``GET <role URL>/<path>`` (optionally with ``Range``); streams and hashes the body.

        Returns ``(status, sha256 hex, size)``. ``range`` is ``(first, last)`` inclusive or a
        ``bytes=`` string. An error status is returned, not raised, with the body's hash.
        """
        hasher = hashlib.sha256()
        try:
            status, size, _ = await self._download_url(f"{self.role_url(role_id)}/{path.lstrip('/')}", range, hasher)
        except CMGError as exc:
            return exc.status, hashlib.sha256(exc.body).hexdigest(), len(exc.body)
        return status, hasher.hexdigest(), size

    # --- the cycle ---

    async def _step(self, steps: list[Step], name: str,
                    fn: Callable[[], Awaitable[tuple[int, str]]]) -> bool:
        t0 = time.perf_counter()
        ok, status = False, 0
        try:
            status, detail = await fn()
            ok = True
        except CMGError as exc:
            status, detail = exc.status, str(exc)
        except StepFailure as exc:
            status, detail = exc.status, exc.detail
        except aiohttp.ClientConnectorCertificateError as exc:
            detail = f"TLS: {exc.certificate_error}"
        except aiohttp.ClientSSLError as exc:
            detail = f"TLS: {exc}"
        except (aiohttp.ClientError, OSError) as exc:
            detail = f"{type(exc).__name__}: {exc}"
        except asyncio.TimeoutError:
            detail = f"timed out after {self.timeout} s"
        except (MessageFormatError, ValueError) as exc:
            detail = f"bad answer: {exc}"
        steps.append(Step(name, ok, status, (time.perf_counter() - t0) * 1000, detail))
        return ok

    @staticmethod
    def _skip(steps: list[Step], name: str, why: str) -> None:
        steps.append(Step(name, False, 0, 0.0, f"skipped: {why}"))

    async def run_cycle(self) -> CycleResult:
        """MPLIST, location, registration, policy, upload, update scan, content; never raises
        for a failure on the path (it is in the step's detail)."""
        steps: list[Step] = []
        loc = _Locations()
        active_mp: list[str] = []

        async def mplist() -> tuple[int, str]:
            res = await self.get("SMS_MP/.sms_aut?MPLIST", self.mp_role_id)
            if res.status != 200:
                raise CMGError(res.status, res.reason, res.body, res.headers)
            root = _xml(res.body, res.status, "MPLIST")
            for mp in root.iter("MP"):
                url = mp.get("URL") or (f"https://{mp.get('FQDN')}" if mp.get("FQDN") else "")
                if url and mp.get("Type", "Internet") == "Internet":
                    self.mp_url = self.on_channel(url.rstrip("/"))
                    active_mp.append(self.mp_url)
                    return res.status, f"internet MP {self.mp_url}"
            raise StepFailure(res.status, "MPLIST lists no internet MP")

        async def location() -> tuple[int, str]:
            site = parse_xml((await self.send_message("MP_LocationManager",
                                                      payloads.location_request("SiteInformationRequest"))).body)
            info = site.find("SiteInformation")
            loc.site_code = info.get("SiteCode", "") if info is not None else ""
            wsus = parse_xml((await self.send_message("MP_LocationManager",
                                                      payloads.location_request("WSUSLocationRequest", loc.site_code))).body)
            loc.sup_urls = [self.on_channel(r.get("WSUSURL", "")) for r in wsus.iter("LocationRecord")
                            if r.get("WSUSURL")]
            content = parse_xml((await self.send_message(
                "MP_LocationManager",
                payloads.location_request("ContentLocationRequest", loc.site_code, self.content_id))).body)
            loc.dp_urls = [self.on_channel(u.get("Name", "")) for u in content.iter("URL") if u.get("Name")]
            if not loc.site_code:
                raise StepFailure(200, "SiteInformationReply names no site code")
            return 200, (f"site {loc.site_code}, SUP {loc.sup_urls[0] if loc.sup_urls else '(none)'}, "
                         f"DP {loc.dp_urls[0] if loc.dp_urls else '(none)'}")

        async def registration() -> tuple[int, str]:
            reply = parse_xml((await self.send_message("MP_ClientRegistration", payloads.registration_request(
                self.client_name, self.client_name, self._signing_cert_hex()))).body)
            smsid = reply.get("SMSID", "")
            if not smsid.startswith("GUID:"):
                raise StepFailure(200, f"registration reply carries no SMSID ({reply.tag})")
            self.smsid = smsid
            return 200, f"SMSID {smsid}"

        async def token_registration() -> tuple[int, str]:
            token = self.client_token or self.bulk_token
            reply = parse_xml((await self.send_message("MP_ClientRegistration", payloads.registration_request(
                self.client_name, self.client_name, self._signing_cert_hex()), token=token)).body)
            smsid = reply.get("SMSID", "")
            if not smsid.startswith("GUID:"):
                raise StepFailure(200, f"registration reply carries no SMSID ({reply.tag})")
            element = reply.find("ClientToken")
            client_token = (element.text or "").strip() if element is not None else ""
            if element is None or not client_token:
                raise StepFailure(200, "registration reply carries no <ClientToken>")
            self.smsid, self.client_token, self.access_token = smsid, client_token, client_token
            return 200, f"SMSID {smsid}, client token valid until {element.get('ExpiresOn', '?')}"

        async def ccm_sts() -> tuple[int, str]:
            res = await self.request("POST", f"{self.role_url(self.mp_role_id)}/CCM_STS",
                                     headers={"Authorization": f"Bearer {entra_bearer[0]}", "Content-Length": "0"})
            if res.status != 200:
                raise CMGError(res.status, res.reason, res.body, res.headers)
            try:
                answer = json.loads(res.body)
                token = answer["access_token"]
            except (ValueError, KeyError, TypeError):
                raise StepFailure(res.status, "CCM_STS answer is not JSON with an access_token") from None
            self.access_token = str(token)
            return res.status, f"CCM token for {answer.get('subject', '?')}, valid {answer.get('expires_in', '?')} s"

        async def policy() -> tuple[int, str]:
            assert self.smsid is not None
            reply = parse_xml((await self.send_message("MP_PolicyManager", payloads.request_assignments(
                self.smsid, self.client_name, loc.site_code))).body)
            locations = [p for p in reply.iter("PolicyLocation") if (p.text or "").strip()]
            if not locations:
                raise StepFailure(200, "no policy assignments")
            where = (locations[0].text or "").strip()
            expected = where.rsplit(".SHA256:", 1)[-1].lower()
            path = where.split("<mp>/", 1)[-1] if "<mp>/" in where else where.split("/", 3)[-1]
            res = await self.request("GET", f"{self.mp_url}/{path}", headers=self._mp_headers())
            if res.status != 200:
                raise CMGError(res.status, res.reason, res.body, res.headers)
            got = hashlib.sha256(res.body).hexdigest()
            if got != expected:
                raise StepFailure(res.status, f"policy body SHA256 {got} does not match {expected}")
            pid = where.rsplit("?", 1)[-1].split(".SHA256:")[0]
            return res.status, f"{len(locations)} assignment(s), policy {pid} SHA256 verified"

        async def upload() -> tuple[int, str]:
            name = "{" + str(uuid.uuid4()).upper() + "}"
            r = await self.bits_upload(name, self.upload_size, self.fragment_size)
            return r.status, f"{name} {r.size} bytes in {r.fragments} fragment(s), SHA256 {r.sha256[:16]}..."

        async def update_scan() -> tuple[int, str]:
            return await self._update_scan(loc.sup_urls[0])

        async def content() -> tuple[int, str]:
            from mock_site.content import content_sha256, content_size

            expected_size = content_size(self.content_id, self.content_file)
            if expected_size is None:
                raise StepFailure(0, f"{self.content_id}/{self.content_file} is not in the DP's catalog")
            url = f"{loc.dp_urls[0]}/{self.content_file}"
            hasher = hashlib.sha256()
            half = expected_size // 2
            status, got, ranges = 0, 0, 0
            for rng in ((0, half - 1), (half, expected_size - 1)) if half else ((0, expected_size - 1),):
                if rng[1] < rng[0]:
                    continue
                status, n, content_range = await self._download_url(url, rng, hasher)
                if status != 206:
                    raise StepFailure(status, f"range {rng[0]}-{rng[1]} answered {status}, not 206")
                got += n
                ranges += 1
            if got != expected_size or hasher.hexdigest() != content_sha256(self.content_id, self.content_file):
                raise StepFailure(status, f"{self.content_file}: {got} bytes, SHA256 does not match the DP's")
            return status, f"{self.content_file} {got} bytes in {ranges} range(s), SHA256 verified"

        entra_bearer: list[str] = []
        rest = ["MPLIST", "Location", "Registration", "Policy", "Upload", "UpdateScan", "Content"]
        if self.auth == "entra":
            async def fetch() -> tuple[int, str]:
                status, detail, token = await self._entra_token()
                entra_bearer.append(token)
                return status, detail
            if not await self._step(steps, "EntraToken", fetch):
                for name in ["CCM_STS"] + rest:
                    self._skip(steps, name, "no Entra ID token")
                return self._result(steps, active_mp)
            if not await self._step(steps, "CCM_STS", ccm_sts):
                for name in rest:
                    self._skip(steps, name, "no CCM token")
                return self._result(steps, active_mp)
        elif self.auth == "token":
            rest.remove("Registration")
            name = "Registration (client token)" if self.client_token else "Registration (bulk token)"
            if not await self._step(steps, name, token_registration):
                for other in rest:
                    self._skip(steps, other, "not registered (no client token)")
                return self._result(steps, active_mp)

        if await self._step(steps, "MPLIST", mplist):
            located = await self._step(steps, "Location", location)
            if self.auth == "token":
                registered = self.smsid is not None  # registered first, with the bulk token
            else:
                registered = await self._step(steps, "Registration", registration)
            if registered:
                await self._step(steps, "Policy", policy)
            else:
                self._skip(steps, "Policy", "not registered")
            await self._step(steps, "Upload", upload)
            if located and loc.sup_urls:
                await self._step(steps, "UpdateScan", update_scan)
            else:
                self._skip(steps, "UpdateScan", "no software update point located")
            if located and loc.dp_urls:
                await self._step(steps, "Content", content)
            else:
                self._skip(steps, "Content", "no distribution point located")
        else:
            for name in rest[1:]:
                self._skip(steps, name, "no internet MP (MPLIST failed)")
        return self._result(steps, active_mp)

    def _result(self, steps: list[Step], active_mp: list[str]) -> CycleResult:
        return CycleResult(steps, active_mp[0] if active_mp else None, self.smsid, self.auth,
                           self.client_token if self.auth == "token" else None)

    def device_id(self) -> str:
        """The Entra device id: the configured one, else derived from the client's name."""
        if self.entra is not None and self.entra.device_id:
            return self.entra.device_id
        return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{self.client_name}.{self.entra.tenant_id if self.entra else ''}"))

    async def _entra_token(self) -> tuple[int, str, str]:
        """A device token from the tenant's token endpoint: ``(status, detail, token)``."""
        assert self.entra is not None
        e = self.entra
        form = {"grant_type": "client_credentials", "client_id": e.client_app_id,
                "scope": f"{e.server_app_id_uri.rstrip('/')}/.default", "device_id": self.device_id()}
        async with self._cloud().post(e.token_endpoint, data=form) as resp:
            body = await resp.read()
            status = resp.status
            reason = resp.reason or ""
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if status != 200:
            if isinstance(answer, dict) and "error" in answer:
                raise StepFailure(status, f"{status} {answer['error']}: "
                                          f"{str(answer.get('error_description', '')).split(' Trace ID:')[0]}")
            raise CMGError(status, reason, body)
        if not isinstance(answer, dict) or not isinstance(answer.get("access_token"), str):
            raise StepFailure(status, "the token endpoint's answer has no access_token")
        return status, (f"device {self.device_id()} token from {e.authority} "
                        f"(expires in {answer.get('expires_in', '?')} s)"), answer["access_token"]

    async def _soap(self, url: str, service_ns: str, action: str, envelope: bytes) -> ET.Element:
        res = await self.request("POST", url, data=envelope, headers={
            "Content-Type": "text/xml; charset=utf-8", "SOAPAction": f'"{service_ns}/{action}"',
            "User-Agent": WUA_USER_AGENT,
        })
        if res.status != 200:
            raise CMGError(res.status, res.reason, res.body, res.headers)
        return _xml(res.body, res.status, action)

    async def _update_scan(self, sup_url: str) -> tuple[int, str]:
        ns = payloads.CLIENT_NS
        auth = await self._soap(f"{sup_url}/SimpleAuthWebService/SimpleAuth.asmx", payloads.SIMPLEAUTH_NS,
                                "GetAuthorizationCookie",
                                payloads.get_authorization_cookie(self.smsid or self.client_name, self.client_name))
        cookie_data = auth.findtext(f".//{{{payloads.SIMPLEAUTH_NS}}}CookieData") or ""
        client_url = f"{sup_url}/ClientWebService/client.asmx"
        got = await self._soap(client_url, ns, "GetCookie", payloads.get_cookie(cookie_data))
        expiration = got.findtext(f".//{{{ns}}}Expiration") or ""
        encrypted = got.findtext(f".//{{{ns}}}EncryptedData") or ""
        installed: list[int] = []
        cached: list[int] = []
        leaves = 0
        rounds = 0
        for rounds in range(1, 6):  # WUA syncs in rounds until nothing new comes
            sync = await self._soap(client_url, ns, "SyncUpdates",
                                    payloads.sync_updates(expiration, encrypted, installed, cached))
            new = sync.findall(f".//{{{ns}}}NewUpdates/{{{ns}}}UpdateInfo")
            cookie = sync.find(f".//{{{ns}}}NewCookie")
            if cookie is not None:
                expiration = cookie.findtext(f"{{{ns}}}Expiration") or expiration
                encrypted = cookie.findtext(f"{{{ns}}}EncryptedData") or encrypted
            if not new:
                break
            for info in new:
                rid = int(info.findtext(f"{{{ns}}}ID") or "0")
                if (info.findtext(f"{{{ns}}}IsLeaf") or "").strip() == "true":
                    leaves += 1
                    cached.append(rid)
                else:
                    installed.append(rid)  # detectoids: the emulated machine is applicable
                    cached.append(rid)
        return 200, f"{leaves} applicable update(s) in {rounds} SyncUpdates round(s)"

    def _signing_cert_hex(self) -> str:
        if self.client_cert is None:
            return ""
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        cert = x509.load_pem_x509_certificate(self.client_cert.read_bytes())
        return cert.public_bytes(Encoding.DER).hex().upper()


def _xml(body: bytes, status: int, what: str) -> ET.Element:
    try:
        return parse_xml(body)
    except XMLFormatError as exc:
        raise StepFailure(status, f"{what} answer is not XML: {exc}") from None
