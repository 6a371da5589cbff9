"""Client certificates at the cloud edge, URL filtering, and the identity the MP sees."""

from __future__ import annotations

import datetime as dt
import signal
import subprocess
import sys

import aiohttp
import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from cmg import pki

pytestmark = pytest.mark.integration


def issue(dep, tmp_path, name, **kw):
    ca = pki.Authority.load(dep.path("client_ca_cert"), dep.path("client_ca_key"))
    cert, key = pki.issue_client_certificate(ca, f"{name}.corp.contoso.com", **kw)
    cp, kp = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    pki.write_pem_bundle(cp, [cert, ca.cert])
    pki.write_private_key(kp, key)
    return cp, kp


async def status_of(dep, path, ctx=None, method="GET", **kw):
    async with aiohttp.ClientSession() as s:
        async with await dep.request(s, method, path, ctx, **kw) as r:
            return r.status, r.reason, await r.text()


async def test_mplist_through_the_cmg(single):
    status, _, body = await status_of(single, single.mp_path("SMS_MP/.sms_aut?MPLIST"))
    assert status == 200
    assert f"CCM_Proxy_MutualAuth/{single.role('MP')['role_id']}" in body


async def test_no_client_certificate_is_403_clientcertificaterequired(single):
    ctx = single.ssl_context(default_client=False)
    status, reason, body = await status_of(single, single.mp_path("SMS_MP/.sms_aut?MPLIST"), ctx)
    assert (status, reason) == (403, "CMGConnector_Clientcertificaterequired")
    assert body == "CMGConnector_Clientcertificaterequired"


async def test_untrusted_expired_and_wrong_usage_are_403_forbidden(single, tmp_path):
    now = dt.datetime.now(dt.timezone.utc)
    other = pki.new_authority("Fabrikam Root")
    cert, key = pki.issue_client_certificate(other, "rogue.fabrikam.com")
    untrusted = tmp_path / "u.pem", tmp_path / "u.key"
    pki.write_pem_bundle(untrusted[0], [cert, other.cert])
    pki.write_private_key(untrusted[1], key)
    cases = {
        "untrusted": untrusted,
        "expired": issue(single, tmp_path, "expired", not_before=now - dt.timedelta(days=30),
                         not_after=now - dt.timedelta(days=1)),
        "server-auth only": issue(single, tmp_path, "srv",
                                  extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH,)),
    }
    for name, (c, k) in cases.items():
        status, reason, body = await status_of(single, single.mp_path("SMS_MP/.sms_aut?MPLIST"),
                                               single.ssl_context(c, k))
        assert (status, reason) == (403, "CMGConnector_Forbidden"), name
        assert body == "CMGConnector_Forbidden", name  # the reason is in the log, not the body
    log = (single.path("logs_dir") / "CMGService.log").read_text()
    assert "is not trusted" in log and "rogue.fabrikam.com" in log


async def test_a_fresh_client_certificate_from_the_deployment_ca_works(single, tmp_path):
    c, k = issue(single, tmp_path, "CLIENT77")
    status, _, _ = await status_of(single, single.mp_path("SMS_MP/.sms_aut?MPLIST"), single.ssl_context(c, k))
    assert status == 200


async def test_unpublished_roles_and_paths_are_refused_at_the_gateway(single):
    mp = single.role("MP")["role_id"]
    for path in (
        "/CCM_Proxy_MutualAuth/72057594037927999/SMS_MP/.sms_aut?MPLIST",  # no such role
        f"/CCM_Proxy_MutualAuth/{mp}/_mock/uploads",  # the MP's admin side is not published
        "/SMS_MP/.sms_aut?MPLIST",  # not a CMG path
    ):
        status, reason, _ = await status_of(single, path)
        assert (status, reason) == (404, "CMGService_EndpointNotFound"), path
    status, reason, _ = await status_of(single, f"/CCM_Proxy_MutualAuth/{mp}/SMS_MP/%2e%2e/_mock/uploads")
    assert (status, reason) == (400, "CMGService_BadRequest")


async def test_server_auth_channel_without_token_never_crosses(single):
    mp = single.role("MP")["role_id"]
    status, reason, _ = await status_of(single, f"/CCM_Proxy_ServerAuth/{mp}/SMS_MP/.sms_aut?MPLIST",
                                        single.ssl_context(default_client=False))
    assert (status, reason) == (401, "CMGConnector_Unauthorized")


async def test_service_metadata(single):
    for path in ("/CCM_Proxy_MutualAuth/ServiceMetadata", "/CCM_Proxy_ServerAuth/ServiceMetadata"):
        status, _, body = await status_of(single, path)
        assert status == 200 and single.service_name in body and str(single.role("MP")["role_id"]) in body


async def test_validated_identity_reaches_the_mp_and_cannot_be_forged(single):
    forged = {"X-CMG-Client-Certificate-Thumbprint": "FORGED", "X-CMG-Client-Certificate-Subject": "CN=evil"}
    status, _, _ = await status_of(single, single.mp_path("SMS_MP/.sms_aut?MPCERT"), headers=forged)
    assert status == 200
    mp = single.role("MP")["internal_url"]
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{mp}/_mock/requests") as r:
            seen = await r.json()
    cert = pki.load_pem_certificates(single.path("client_cert"))[0]
    entries = seen if isinstance(seen, list) else seen.get("requests", [])
    mine = [e for e in entries if "MPCERT" in (e.get("path", "") + e.get("query", ""))]
    assert mine, entries
    text = repr(mine[-1])
    assert pki.thumbprint(cert) in text and "FORGED" not in text and "CN=evil" not in text


async def test_all_configmgr_verbs_and_headers_reach_the_mp(single):
    mp = single.role("MP")
    marker = "verbs-" + str(single.port)
    headers = {"CCMClientID": "GUID:" + marker, "CCMClientIDSignature": "AB01", "CCMClientTimestamp": "2026-11-27T00:00:00Z",
               "CCMClientTimestampSignature": "CD02", "Range": "bytes=0-9", "BITS-Packet-Type": "Ping"}
    async with aiohttp.ClientSession() as s:
        for method in ("GET", "HEAD", "PROPFIND", "BITS_POST", "CCM_POST"):
            async with await single.request(s, method, f"/CCM_Proxy_MutualAuth/{mp['role_id']}/CCM_Incoming/{marker}",
                                            headers=headers) as r:
                assert not r.reason.startswith("CMG"), (method, r.status, r.reason)
        async with s.get(f"{mp['internal_url']}/_mock/requests") as r:
            seen = await r.json()
    entries = seen if isinstance(seen, list) else seen.get("requests", [])
    methods = {e["method"] for e in entries if marker in e.get("path", "")}
    assert methods == {"GET", "HEAD", "PROPFIND", "BITS_POST", "CCM_POST"}, methods


def test_gateway_accepts_a_pem_server_certificate_as_well_as_the_pfx(single, tmp_path, lone_gateway):
    with lone_gateway(tmp_path, single.path("ca_cert").parent, "", pem=True) as port:
        assert port > 0


def test_cn_mismatch_refuses_to_start(single, tmp_path):
    cfg = tmp_path / "wrong.toml"
    certs = single.path("ca_cert").parent
    cfg.write_text(f'''
[service]
name = "Other.WestUS.CloudApp.Azure.Com"
[certificates]
dir = "{certs}"
''')
    r = subprocess.run([sys.executable, "-m", "gateway", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert "GraniteFalls.WestUS.CloudApp.Azure.Com" in r.stderr and "Other.WestUS.CloudApp.Azure.Com" in r.stderr


def test_a_resumed_tls_session_keeps_the_client_identity(single):
    import socket

    ctx = single.ssl_context()
    request = (f"GET {single.mp_path('SMS_MP/.sms_aut?MPLIST')} HTTP/1.1\r\nHost: {single.service_name}\r\n"
               "Connection: close\r\n\r\n").encode()

    def get(session=None):
        with socket.create_connection((single.host, single.port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=single.service_name, session=session) as tls:
                tls.sendall(request)
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
                return tls.session, tls.session_reused, data.split(b"\r\n", 1)[0]

    first, reused, status = get()
    assert not reused and b" 200 " in status
    _, reused, status = get(first)
    assert reused, "the gateway did not resume the TLS session"
    assert b" 200 " in status, status  # not 403: the identity survives resumption
