"""clientsim against the mock site behind a small TLS test proxy standing in for the CMG.

The proxy (written here, not the real gateway) terminates TLS with a trustme
certificate for the service name. On ``/CCM_Proxy_MutualAuth/<role id>`` it asks for a
client certificate, answers ``403 CMGConnector_Clientcertificaterequired`` without one,
and passes the ``X-CMG-Client-Certificate-*`` headers. On ``/CCM_Proxy_ServerAuth/<role
id>`` it wants ``Authorization: Bearer`` (``401 CMGConnector_Unauthorized`` without),
validates the token with :mod:`cmg.tokens` against the tenant's keys or the site's
token-signing key (a bulk registration token only on ``ccm_system_tokenauth``;
``401 CMGService_Invalid_Token`` otherwise), passes ``X-CMG-Client-Auth`` and keeps the
Authorization header. Either way it strips the prefix and forwards, streaming, to the
role's port. Enough to prove the client's cycle logic.
"""

from __future__ import annotations

import hashlib
import re
import ssl
import sys
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import pytest
import trustme
from aiohttp import web
from yarl import URL

from clientsim import EntraSettings, InternetClient, format_cycle
from cmg import tokens
from cmg.site_tokens import new_bulk_token
from mock_site import SiteRunner, start_site
from mock_site.content import content_sha256
from mock_site.httpserver import ConfigMgrAppRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "mock_site"))
from site_helpers import site_config  # noqa: E402

SERVICE = "GraniteFalls.WestUS.CloudApp.Azure.Com"
MP_ID, SUP_ID, DP_ID = 72057594037927939, 72057594037927940, 72057594037927942
_HOP = {"host", "connection", "transfer-encoding", "keep-alive"}


class TestCMGProxy:
    __test__ = False

    def __init__(self, site: SiteRunner, ca: trustme.CA) -> None:
        self.site = site
        self.roles = {MP_ID: site.ports["mp"], SUP_ID: site.ports["sup"], DP_ID: site.ports["dp"]}
        self.ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(SERVICE).configure_cert(self.ssl)
        ca.configure_trust(self.ssl)
        self.ssl.verify_mode = ssl.CERT_OPTIONAL
        self.session: aiohttp.ClientSession | None = None
        self.runner: ConfigMgrAppRunner | None = None
        self.port = 0
        self.refusals: list[str] = []

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.forward)
        self.runner = ConfigMgrAppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.ssl)
        await site.start()
        self.port = self.runner.addresses[0][1]
        self.session = aiohttp.ClientSession(auto_decompress=False)

    async def close(self) -> None:
        if self.session:
            await self.session.close()
        if self.runner:
            await self.runner.cleanup()

    def token_auth(self, authorization: str, path: str) -> str:
        """The X-CMG-Client-Auth name of a valid bearer token; TokenError otherwise."""
        token = authorization.split(" ", 1)[1].strip()
        skew = self.site.ctx.clock_skew
        if tokens.unverified_issuer(token).startswith("https://login.microsoftonline.com/"):
            self.site.ctx.entra.validate(token, skew)
            return "EntraID"
        types = [tokens.TYPE_CCM, tokens.TYPE_CLIENT]
        if path.lower().startswith("/ccm_system_tokenauth/"):
            types.append(tokens.TYPE_BULK_REGISTRATION)
        valid = self.site.ctx.token_signer().validate(token, types)
        return {tokens.TYPE_CCM: "CCMToken", tokens.TYPE_CLIENT: "ClientToken"}.get(valid.kind, "BulkRegistration")

    async def forward(self, request: web.Request) -> web.StreamResponse:
        m = re.match(r"^/CCM_Proxy_(MutualAuth|ServerAuth)/(\d+)(/.*)$", request.raw_path, re.IGNORECASE)
        if not m or int(m.group(2)) not in self.roles:
            return web.Response(status=404, reason="Not Found")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        if m.group(1).lower() == "serverauth":
            authorization = request.headers.get("Authorization", "")
            if not authorization.lower().startswith("bearer "):
                return web.Response(status=401, reason="CMGConnector_Unauthorized", text="CMGConnector_Unauthorized")
            try:
                headers["X-CMG-Client-Auth"] = self.token_auth(authorization, m.group(3))
            except tokens.TokenError as exc:
                self.refusals.append(exc.reason)
                return web.Response(status=401, reason="CMGService_Invalid_Token", text="CMGService_Invalid_Token")
        else:
            ssl_object = request.transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True)
            if not der:
                return web.Response(status=403, reason="CMGConnector_Clientcertificaterequired",
                                    text="CMGConnector_Clientcertificaterequired")
            subject = ", ".join(f"{k}={v}" for rdn in ssl_object.getpeercert()["subject"] for k, v in rdn)
            headers["X-CMG-Client-Certificate-Thumbprint"] = hashlib.sha1(der).hexdigest().upper()
            headers["X-CMG-Client-Certificate-Subject"] = subject
        url = URL(f"http://127.0.0.1:{self.roles[int(m.group(2))]}{m.group(3)}", encoded=True)
        data = request.content.iter_chunked(256 * 1024) if request.can_read_body else None
        assert self.session is not None
        async with self.session.request(request.method, url, headers=headers, data=data) as upstream:
            resp = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                      headers={k: v for k, v in upstream.headers.items() if k.lower() not in _HOP})
            await resp.prepare(request)
            async for chunk in upstream.content.iter_chunked(256 * 1024):
                await resp.write(chunk)
            await resp.write_eof()
            return resp


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[SiteRunner]:
    runner = await start_site(site_config(tmp_path), bgb_hold=2.0)
    yield runner
    await runner.close()


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca = trustme.CA()
    leaf = ca.issue_cert("CLIENT01")
    paths = {"ca": tmp_path / "root-ca.pem", "cert": tmp_path / "client.pem", "key": tmp_path / "client.key"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    leaf.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    paths["_ca"] = ca  # type: ignore[assignment]
    return paths


@pytest.fixture
async def cmg(site, pki) -> AsyncIterator[TestCMGProxy]:
    proxy = TestCMGProxy(site, pki["_ca"])  # type: ignore[arg-type]
    await proxy.start()
    yield proxy
    await proxy.close()


def client(cmg: TestCMGProxy, pki: dict[str, Path], *, with_cert: bool = True, service: str = SERVICE,
           **kw) -> InternetClient:
    return InternetClient(service, ("127.0.0.1", cmg.port), MP_ID, pki["ca"],
                          pki["cert"] if with_cert else None, pki["key"] if with_cert else None, timeout=20, **kw)


async def test_full_cycle_through_the_cmg(site, cmg, pki):
    async with client(cmg, pki, upload_size=700_000, fragment_size=256 * 1024) as c:
        result = await c.run_cycle()
    report = format_cycle(result)
    assert result.ok, report
    assert [s.name for s in result.steps] == ["MPLIST", "Location", "Registration", "Policy", "Upload",
                                              "UpdateScan", "Content"]
    internet_mp = f"https://{SERVICE}/CCM_Proxy_MutualAuth/{MP_ID}"
    assert result.active_mp == internet_mp
    assert f'SMS_ActiveMPCandidate: MP="{internet_mp}" Type="Internet"' in report
    assert re.search(r"^\[ OK \] MPLIST\s+200\s+[\d.]+ ms  internet MP " + re.escape(internet_mp), report, re.M)
    steps = {s.name: s for s in result.steps}
    assert "SHA256 verified" in steps["Policy"].detail and "3 assignment(s)" in steps["Policy"].detail
    assert "3 applicable update(s)" in steps["UpdateScan"].detail
    assert "2 range(s), SHA256 verified" in steps["Content"].detail
    assert all(s.elapsed_ms > 0 for s in result.steps)

    # What the site saw: the client's identity as the proxy passed it, the upload, the registration.
    thumbprint = hashlib.sha1(_der(pki["cert"])).hexdigest().upper()
    assert site.ctx.clients.get(result.smsid).identity == thumbprint
    uploads = site.uploads.uploads()
    assert len(uploads) == 1 and uploads[0]["complete"] and uploads[0]["size"] == 700_000
    assert uploads[0]["identity"]["X-CMG-Client-Certificate-Thumbprint"] == thumbprint
    entries = site.ctx.requests.entries()
    assert {e["client_identity"].get("X-CMG-Client-Certificate-Thumbprint") for e in entries} == {thumbprint}
    assert {e["user_agent"] for e in entries if e["path"].lower() == "/ccm_system/request"} == {
        "ConfigMgr Messaging HTTP Sender"}


def _der(pem: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


async def test_without_client_certificate_the_cmg_error_is_verbatim(cmg, pki):
    async with client(cmg, pki, with_cert=False) as c:
        result = await c.run_cycle()
    assert not result.ok and result.active_mp is None
    first = result.steps[0]
    assert first.name == "MPLIST" and first.status == 403
    assert first.detail == "403 CMGConnector_Clientcertificaterequired"
    assert all(s.detail.startswith("skipped:") for s in result.steps[1:])
    report = format_cycle(result)
    assert "[FAIL] MPLIST" in report and "403 CMGConnector_Clientcertificaterequired" in report
    assert "SMS_ActiveMPCandidate: (none)" in report


async def test_certificate_name_mismatch_is_a_tls_failure(cmg, pki):
    async with client(cmg, pki, service="Other.CloudApp.Net") as c:
        result = await c.run_cycle()
    assert result.steps[0].detail.startswith("TLS:"), result.steps[0].detail
    assert "Other.CloudApp.Net" in result.steps[0].detail or "hostname" in result.steps[0].detail.lower()


async def test_low_level_methods(site, cmg, pki):
    async with client(cmg, pki) as c:
        res = await c.get("SMS_MP/.sms_aut?MPCERT", MP_ID)
        assert res.status == 200 and bytes.fromhex(res.body.decode())
        reply = await c.send_message("MP_LocationManager",
                                     '<LocationRequest><SiteInformationRequest/></LocationRequest>')
        assert "SiteInformationReply" in reply.body and reply.header.compression == "zlib"

        file = "payload-5000000.bin"
        status, sha, size = await c.download(DP_ID, f"SMS_DP_SMSPKG$/PS100001.1/{file}", range=(1000, 1999))
        assert (status, size) == (206, 1000) and sha == content_sha256("PS100001.1", file, 1000, 2000)
        status, sha, size = await c.download(DP_ID, f"SMS_DP_SMSPKG$/PS100001.1/{file}")
        assert (status, size, sha) == (200, 5_000_000, content_sha256("PS100001.1", file))
        status, _, _ = await c.download(DP_ID, f"SMS_DP_SMSPKG$/PS100001.1/{file}", range="bytes=9999999-")
        assert status == 416

        data = bytes(range(256)) * 4000
        up = await c.bits_upload("{00000000-AAAA-BBBB-CCCC-000000000001}", data, fragment_size=100_000)
        assert up.status == 200 and up.fragments == 11 and up.sha256 == hashlib.sha256(data).hexdigest()

        async def source():
            for i in range(10):
                yield bytes([i]) * 30_000
        up = await c.bits_upload("{00000000-AAAA-BBBB-CCCC-000000000002}", source(), 64 * 1024, size=300_000)
        rec = site.uploads.upload("{00000000-AAAA-BBBB-CCCC-000000000002}")
        assert rec["complete"] and rec["sha256"] == up.sha256 and rec["size"] == 300_000

        with pytest.raises(Exception, match="404"):
            await c.send_message("MP_Nonexistent", "<x/>")


# --- token authentication: Entra ID (CCM token) and site-issued tokens ---------------

TOKEN_STEPS = ["MPLIST", "Location", "Policy", "Upload", "UpdateScan", "Content"]


def entra_settings(site: SiteRunner, **kw) -> EntraSettings:
    e = site.ctx.config.client_auth.entra
    return EntraSettings(site.url("entra"), e.tenant_id, kw.pop("client_app_id", e.client_app_id),
                         e.server_app_id_uri, **kw)


def token_client(cmg: TestCMGProxy, pki: dict[str, Path], **kw) -> InternetClient:
    return InternetClient(SERVICE, ("127.0.0.1", cmg.port), MP_ID, pki["ca"], None, None, timeout=20,
                          upload_size=300_000, **kw)


def _requests(site: SiteRunner, role: str) -> list[dict]:
    return [e for e in site.ctx.requests.entries() if e["role"] == role]


async def test_entra_cycle_through_server_auth(site, cmg, pki):
    device = "6a1e0c7f-2f39-4b71-9c1a-1d2f3e4a5b6c"
    async with token_client(cmg, pki, auth="entra", entra=entra_settings(site, device_id=device)) as c:
        result = await c.run_cycle()
    report = format_cycle(result)
    assert result.ok, report
    assert [s.name for s in result.steps] == ["EntraToken", "CCM_STS", "MPLIST", "Location", "Registration",
                                              "Policy", "Upload", "UpdateScan", "Content"]
    steps = {s.name: s for s in result.steps}
    assert steps["EntraToken"].detail.startswith(f"device {device} token from {site.url('entra')}")
    assert steps["CCM_STS"].detail == f"CCM token for {device}, valid 28800 s"
    assert result.active_mp == f"https://{SERVICE}/CCM_Proxy_ServerAuth/{MP_ID}"
    assert "(authentication: Microsoft Entra ID, CCM token)" in report
    assert re.search(r"^\[ OK \] CCM_STS\s+200 ", report, re.M)
    reg = site.ctx.clients.get(result.smsid)
    assert (reg.identity_kind, reg.identity) == ("entra-device", device)

    # what the site saw: no certificate, the CMG's auth name, the bearer token on every role
    mp = _requests(site, "mp")
    assert {e["path"].lower() for e in mp if e["client_auth"] == "EntraID"} == {"/ccm_sts"}
    messaging = [e for e in mp if e["path"] == "/ccm_system_tokenauth/request"]
    assert messaging and {e["client_auth"] for e in messaging} == {"CCMToken"}
    assert not [e for e in mp if e["path"].lower() == "/ccm_system/request"]
    for role in ("mp", "sup", "dp"):
        entries = _requests(site, role)
        assert entries and all(e["authorization"] and e["authorization"]["scheme"] == "Bearer" for e in entries)
        assert all("X-CMG-Client-Certificate-Thumbprint" not in e["client_identity"] for e in entries)
    assert {e["client_auth"] for e in _requests(site, "sup") + _requests(site, "dp")} == {"CCMToken"}
    assert site.uploads.uploads()[0]["complete"]


async def test_token_cycle_registers_with_the_bulk_token_then_uses_the_client_token(site, cmg, pki):
    bulk = new_bulk_token(site.ctx.config)
    async with token_client(cmg, pki, auth="token", bulk_token=bulk, client_name="TOKENPC") as c:
        result = await c.run_cycle()
    report = format_cycle(result)
    assert result.ok, report
    assert [s.name for s in result.steps] == ["Registration (bulk token)"] + TOKEN_STEPS
    assert result.client_token and result.smsid.startswith("GUID:")
    assert site.ctx.token_signer().validate(result.client_token, [tokens.TYPE_CLIENT]).subject == result.smsid
    assert "[ OK ] Registration (bulk token) 200" in report
    assert "(authentication: site-issued client token)" in report
    mp = _requests(site, "mp")
    assert [e["client_auth"] for e in mp][0] == "BulkRegistration"
    bulk_hash = hashlib.sha256(bulk.encode()).hexdigest()
    assert [e for e in mp if e["authorization"]["token_sha256"] == bulk_hash] == mp[:1]  # used once
    assert {e["client_auth"] for e in mp[1:] + _requests(site, "sup") + _requests(site, "dp")} == {"ClientToken"}

    # the next run uses the client token alone (renewal) and keeps the SMSID
    async with token_client(cmg, pki, auth="token", client_token=result.client_token, client_name="TOKENPC") as c:
        again = await c.run_cycle()
    assert again.ok, format_cycle(again)
    assert again.steps[0].name == "Registration (client token)" and again.smsid == result.smsid


async def test_entra_token_endpoint_error_is_reported(site, cmg, pki):
    settings = entra_settings(site, client_app_id="11111111-2222-3333-4444-555555555555")
    async with token_client(cmg, pki, auth="entra", entra=settings) as c:
        result = await c.run_cycle()
    first = result.steps[0]
    assert (first.name, first.ok, first.status) == ("EntraToken", False, 400)
    assert first.detail.startswith("400 invalid_client: AADSTS700016: Application with identifier "
                                   "'11111111-2222-3333-4444-555555555555' was not found")
    assert all(s.detail == "skipped: no Entra ID token" for s in result.steps[1:])
    assert not site.ctx.requests.entries()


async def test_bad_bulk_token_stops_at_registration(site, cmg, pki):
    signer = site.ctx.token_signer()
    import datetime as dt
    expired = signer.issue(tokens.TYPE_BULK_REGISTRATION, "BulkRegistration", dt.timedelta(minutes=5),
                           now=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1))
    async with token_client(cmg, pki, auth="token", bulk_token=expired) as c:
        result = await c.run_cycle()
    first = result.steps[0]
    assert (first.name, first.status, first.detail) == ("Registration (bulk token)", 401,
                                                        "401 CMGService_Invalid_Token")
    assert cmg.refusals == ["the token has expired"]
    assert all(s.detail == "skipped: not registered (no client token)" for s in result.steps[1:])
    assert not site.ctx.requests.entries()  # nothing unauthenticated reached the site


async def test_low_level_methods_on_server_auth_carry_the_token(site, cmg, pki):
    async with token_client(cmg, pki, auth="token", bulk_token=new_bulk_token(site.ctx.config)) as c:
        assert c.role_url(SUP_ID) == f"https://{SERVICE}/CCM_Proxy_ServerAuth/{SUP_ID}"
        assert c.on_channel(f"https://{SERVICE}/CCM_Proxy_MutualAuth/{DP_ID}/x") == \
            f"https://{SERVICE}/CCM_Proxy_ServerAuth/{DP_ID}/x"
        res = await c.get("SMS_MP/.sms_aut?MPLIST", MP_ID)
        assert res.status == 401 and res.reason == "CMGConnector_Unauthorized"  # no token yet
        # a bulk token is for registration only
        res = await c.get("SMS_MP/.sms_aut?MPLIST", MP_ID, headers={"Authorization": f"Bearer {c.bulk_token}"})
        assert res.status == 401 and res.reason == "CMGService_Invalid_Token"
        result = await c.run_cycle()
        assert result.ok
        file = "payload-5000000.bin"
        status, sha, size = await c.download(DP_ID, f"SMS_DP_SMSPKG$/PS100001.1/{file}", range=(0, 999))
        assert (status, size) == (206, 1000) and sha == content_sha256("PS100001.1", file, 0, 1000)


def test_auth_arguments_are_checked(pki):
    with pytest.raises(ValueError, match="auth must be one of pki, entra, token"):
        InternetClient(SERVICE, ("127.0.0.1", 1), MP_ID, pki["ca"], None, None, auth="kerberos")
    with pytest.raises(ValueError, match="needs entra="):
        InternetClient(SERVICE, ("127.0.0.1", 1), MP_ID, pki["ca"], None, None, auth="entra")
    with pytest.raises(ValueError, match="needs bulk_token="):
        InternetClient(SERVICE, ("127.0.0.1", 1), MP_ID, pki["ca"], None, None, auth="token")
