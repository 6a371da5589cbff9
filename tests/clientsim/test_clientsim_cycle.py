"""clientsim against the mock site behind a small TLS test proxy standing in for the CMG.

The proxy (written here, not the real gateway) terminates TLS with a trustme
certificate for the service name, asks for a client certificate, answers
``403 CMGConnector_Clientcertificaterequired`` without one, strips
``/CCM_Proxy_MutualAuth/<role id>`` and forwards, streaming, to the role's port with
the ``X-CMG-Client-*`` identity headers. Enough to prove the client's cycle logic.
"""

from __future__ import annotations

import hashlib
import re
import ssl
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import pytest
import trustme
from aiohttp import web
from yarl import URL

from clientsim import InternetClient, format_cycle
from cmg.config import from_dict
from mock_site import SiteRunner, start_site
from mock_site.content import content_sha256
from mock_site.httpserver import ConfigMgrAppRunner

SERVICE = "GraniteFalls.WestUS.CloudApp.Azure.Com"
MP_ID, SUP_ID, DP_ID = 72057594037927939, 72057594037927940, 72057594037927942
_HOP = {"host", "connection", "transfer-encoding", "keep-alive"}


class TestCMGProxy:
    __test__ = False

    def __init__(self, site: SiteRunner, ca: trustme.CA) -> None:
        self.roles = {MP_ID: site.ports["mp"], SUP_ID: site.ports["sup"], DP_ID: site.ports["dp"]}
        self.ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(SERVICE).configure_cert(self.ssl)
        ca.configure_trust(self.ssl)
        self.ssl.verify_mode = ssl.CERT_OPTIONAL
        self.session: aiohttp.ClientSession | None = None
        self.runner: ConfigMgrAppRunner | None = None
        self.port = 0

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

    async def forward(self, request: web.Request) -> web.StreamResponse:
        m = re.match(r"^/CCM_Proxy_MutualAuth/(\d+)(/.*)$", request.raw_path, re.IGNORECASE)
        if not m or int(m.group(1)) not in self.roles:
            return web.Response(status=404, reason="Not Found")
        ssl_object = request.transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        if not der:
            return web.Response(status=403, reason="CMGConnector_Clientcertificaterequired",
                                text="CMGConnector_Clientcertificaterequired")
        subject = ", ".join(f"{k}={v}" for rdn in ssl_object.getpeercert()["subject"] for k, v in rdn)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        headers["X-CMG-Client-Certificate-Thumbprint"] = hashlib.sha1(der).hexdigest().upper()
        headers["X-CMG-Client-Certificate-Subject"] = subject
        url = URL(f"http://127.0.0.1:{self.roles[int(m.group(1))]}{m.group(2)}", encoded=True)
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
    cfg = from_dict({"site": {"mp_port": 0, "sup_port": 0, "dp_port": 0}}, tmp_path).site
    runner = await start_site(cfg, bgb_hold=2.0)
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
