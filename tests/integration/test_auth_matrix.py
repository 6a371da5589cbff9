"""Client authentication, method by method: every refusal exact, and invisible to the MP.

Each case sends a request whose path carries a unique marker; refused ones must answer
the CMG's exact status and error name, and the MP's request log must not contain the
marker (nothing unauthenticated crosses the tunnel). Accepted ones must reach the MP.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import uuid

import aiohttp
import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from cmg import pki, tokens
from cmg.config import DEFAULT_TOKEN_ISSUER_ID

pytestmark = pytest.mark.integration

FORBIDDEN = (403, "CMGConnector_Forbidden")
CERT_REQUIRED = (403, "CMGConnector_Clientcertificaterequired")
UNAUTHORIZED = (401, "CMGConnector_Unauthorized")
INVALID_TOKEN = (401, "CMGService_Invalid_Token")


def marker() -> str:
    return "m" + uuid.uuid4().hex


async def mp_saw(dep, mark: str) -> bool:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{dep.role('MP')['internal_url']}/_mock/requests") as r:
            seen = await r.json()
    entries = seen if isinstance(seen, list) else seen.get("requests", [])
    return any(mark in (e.get("path", "") + "?" + str(e.get("query", ""))) for e in entries)


async def call(dep, path: str, *, ctx: ssl.SSLContext | None = None, token: str | None = None,
               method: str = "GET") -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s:
        async with await dep.request(s, method, path, ctx, headers=headers) as r:
            await r.read()
            return r.status, r.reason or ""


def mutual(dep, mark: str) -> str:
    return f"/CCM_Proxy_MutualAuth/{dep.role('MP')['role_id']}/CCM_Incoming/{mark}"


def server(dep, mark: str, endpoint: str = "CCM_Incoming") -> str:
    return f"/CCM_Proxy_ServerAuth/{dep.role('MP')['role_id']}/{endpoint}/{mark}"


async def refused(dep, path: str, mark: str, expected: tuple[int, str], **kw) -> None:
    got = await call(dep, path, **kw)
    assert got == expected, (path, got)
    assert not await mp_saw(dep, mark), f"the MP saw refused request {mark}"


async def accepted(dep, path: str, mark: str, **kw) -> None:
    status, reason = await call(dep, path, **kw)
    assert not reason.startswith("CMG"), (path, status, reason)
    assert await mp_saw(dep, mark)


# --- PKI -------------------------------------------------------------------------

def client_files(dep, tmp_path, name, **kw):
    ca = pki.Authority.load(dep.path("client_ca_cert"), dep.path("client_ca_key"))
    cert, key = pki.issue_client_certificate(ca, f"{name}.corp.contoso.com", **kw)
    c, k = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    pki.write_pem_bundle(c, [cert, ca.cert])
    pki.write_private_key(k, key)
    return cert, dep.ssl_context(c, k)


async def test_pki_matrix(single, tmp_path):
    now = dt.datetime.now(dt.timezone.utc)
    _, valid = client_files(single, tmp_path, "valid")
    m = marker()
    await accepted(single, mutual(single, m), m, ctx=valid)
    cases = {
        "expired": dict(not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)),
        "not yet valid": dict(not_before=now + dt.timedelta(days=1), not_after=now + dt.timedelta(days=30)),
        "wrong EKU": dict(extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH,)),
        "short key": dict(key=pki.generate_key("rsa1024")),
    }
    for name, kw in cases.items():
        _, ctx = client_files(single, tmp_path, name.replace(" ", "-"), **kw)
        m = marker()
        await refused(single, mutual(single, m), m, FORBIDDEN, ctx=ctx)
    m = marker()
    await refused(single, mutual(single, m), m, CERT_REQUIRED, ctx=single.ssl_context(default_client=False))
    # A valid certificate on the ServerAuth path is no token.
    m = marker()
    await refused(single, server(single, m), m, UNAUTHORIZED, ctx=valid)


async def test_revoked_certificate_is_refused(single, tmp_path):
    cert, ctx = client_files(single, tmp_path, "revoked")
    m = marker()
    await accepted(single, mutual(single, m), m, ctx=ctx)
    pki.revoke(single.path("ca_cert").parent, cert)
    # The CRL file is re-read within seconds; each new TLS connection is judged afresh.
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        m = marker()
        got = await call(single, mutual(single, m), ctx=ctx)
        if got == FORBIDDEN:
            assert not await mp_saw(single, m)
            break
        assert asyncio.get_running_loop().time() < deadline, got
        await asyncio.sleep(0.5)
    log = (single.path("logs_dir") / "CMGService.log").read_text()
    assert "is revoked since" in log


# --- Entra ID --------------------------------------------------------------------

async def mint(dep, **claims) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{dep.data['entra']['authority']}/_mock/entra/token", json={"kind": "device", **claims}) as r:
            assert r.status == 200, await r.text()
            return str((await r.json())["access_token"])


async def test_entra_matrix(single):
    e = single.data["entra"]
    m = marker()
    await accepted(single, server(single, m), m, token=await mint(single),
                   ctx=single.ssl_context(default_client=False))
    cases = {
        "expired": dict(issued_s=-7200, lifetime_s=600),
        "not yet valid": dict(not_before_s=3600),
        "wrong audience": dict(audience="https://SomeOtherService"),
        "wrong tenant": dict(tenant_id=str(uuid.uuid4())),
        "tampered signature": dict(sign_with="tampered"),
        "unknown key id": dict(sign_with="unpublished"),
        "unknown issuer": dict(issuer="https://sts.fabrikam.example/v2.0"),
    }
    for name, claims in cases.items():
        m = marker()
        await refused(single, server(single, m), m, INVALID_TOKEN, token=await mint(single, **claims),
                      ctx=single.ssl_context(default_client=False))
    # A token on the MutualAuth path is no certificate.
    m = marker()
    await refused(single, mutual(single, m), m, CERT_REQUIRED, token=await mint(single),
                  ctx=single.ssl_context(default_client=False))
    assert e["server_app_id_uri"] == "https://ConfigMgrService"


async def test_entra_key_rollover_is_followed(single):
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{single.data['entra']['authority']}/_mock/entra/rollover") as r:
            assert r.status == 200
    token = await mint(single)  # signed with the new key, unknown to the gateway's cache
    m = marker()
    await accepted(single, server(single, m), m, token=token, ctx=single.ssl_context(default_client=False))
    assert "signing keys loaded (unknown key id)" in (single.path("logs_dir") / "CMGService.log").read_text()


async def test_aad_auth_info_answers_for_onboarded_tenants_only(single):
    tenant = single.data["entra"]["tenant_id"]
    async with aiohttp.ClientSession() as s:
        async with await single.request(s, "GET", f"/CCM_Proxy_ServerAuth/AADAuthInfo?TenantID={tenant}",
                                        single.ssl_context(default_client=False)) as r:
            assert r.status == 200
            body = await r.text()
        assert tenant in body and "https://ConfigMgrService" in body
        async with await single.request(s, "GET", f"/CCM_Proxy_ServerAuth/AADAuthInfo?TenantID={uuid.uuid4()}",
                                        single.ssl_context(default_client=False)) as r:
            assert (r.status, r.reason) == (404, "CMGService_EndpointNotFound")


# --- site-issued tokens ----------------------------------------------------------

def site_key(dep):
    certs = dep.path("ca_cert").parent
    key = pki.Authority.load(certs / pki.TOKEN_SIGNING_CERT, certs / pki.TOKEN_SIGNING_KEY)
    return key.key, pki.token_signing_kid(key.cert)


async def test_site_token_matrix(single):
    key, kid = site_key(single)
    no_cert = single.ssl_context(default_client=False)

    def token(kind, **kw):
        return tokens.issue_site_token(key, kid, issuer_id=DEFAULT_TOKEN_ISSUER_ID, token_type=kind,
                                       subject="GUID:test", lifetime=kw.pop("lifetime", dt.timedelta(hours=1)), **kw)

    bulk = token(tokens.TYPE_BULK_REGISTRATION)
    m = marker()
    await accepted(single, server(single, m, "ccm_system_tokenauth"), m, token=bulk, ctx=no_cert)
    m = marker()  # a bulk token is for registration only
    await refused(single, server(single, m), m, INVALID_TOKEN, token=bulk, ctx=no_cert)
    m = marker()
    await accepted(single, server(single, m), m, token=token(tokens.TYPE_CLIENT), ctx=no_cert)
    m = marker()
    await accepted(single, server(single, m), m, token=token(tokens.TYPE_CCM), ctx=no_cert)
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=2)
    other = pki.generate_key("rsa2048")
    bad = {
        "expired": token(tokens.TYPE_CLIENT, now=past, lifetime=dt.timedelta(hours=1)),
        "not yet valid": token(tokens.TYPE_CLIENT, not_before=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=2)),
        "other signer": tokens.issue_site_token(other, kid, issuer_id=DEFAULT_TOKEN_ISSUER_ID,
                                                token_type=tokens.TYPE_CLIENT, subject="x",
                                                lifetime=dt.timedelta(hours=1)),
        "other site": tokens.issue_site_token(key, kid, issuer_id=str(uuid.uuid4()), token_type=tokens.TYPE_CLIENT,
                                              subject="x", lifetime=dt.timedelta(hours=1)),
        "garbage": "not.a.jwt",
    }
    for name, t in bad.items():
        m = marker()
        await refused(single, server(single, m), m, INVALID_TOKEN, token=t, ctx=no_cert)
    m = marker()
    await refused(single, server(single, m), m, UNAUTHORIZED, ctx=no_cert)


# --- TLS policy ------------------------------------------------------------------

def tls11_handshake(host: str, port: int, service_name: str, ca: str) -> str | None:
    """None when a TLS 1.1 handshake succeeds, else the error."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    import socket

    try:
        with socket.create_connection((host, port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=service_name) as tls:
                return None if tls.version() == "TLSv1.1" else f"negotiated {tls.version()}"
    except ssl.SSLError as exc:  # a refused handshake; anything else (no listener) fails the test
        return str(exc)


def test_enforce_tls12_on_refuses_tls11_and_off_allows_it_where_openssl_can(single, tmp_path, lone_gateway):
    ca = str(single.path("ca_cert"))
    with lone_gateway(tmp_path, single.path("ca_cert").parent, "enforce_tls12 = false") as port:
        off = tls11_handshake("127.0.0.1", port, single.service_name, ca)
    on = tls11_handshake(single.host, single.port, single.service_name, ca)
    assert on is not None, "TLS 1.1 was accepted with Enforce TLS 1.2 on"
    if off is not None:
        pytest.skip(f"this machine's OpenSSL cannot do TLS 1.1 at all ({off}); the 'off' half is untestable here")
