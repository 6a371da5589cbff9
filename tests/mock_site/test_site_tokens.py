"""Site-issued tokens: the bulk registration token, CCM_STS, and token authentication on
``ccm_system_tokenauth`` (registration with a bulk token, then the client token)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from clientsim import payloads
from cmg.messaging import parse_xml
from cmg.site_tokens import SigningKeyMissing, load_signer, new_bulk_token
from cmg.tokens import (SITE_AUDIENCE, TYPE_BULK_REGISTRATION, TYPE_CCM, TYPE_CLIENT, TokenError, issue_entra_token,
                        site_issuer, validate_site_token)
from mock_site import start_site
from site_helpers import bearer, ccm_post, site_config, write_token_signing

TOKENAUTH = "/ccm_system_tokenauth/request"


def claims_of(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def test_bulk_token_has_the_real_claims(tmp_path: Path):
    cfg = site_config(tmp_path)
    token = new_bulk_token(cfg)
    cert = x509.load_pem_x509_certificate(cfg.token_signing_certificate.read_bytes())
    valid = validate_site_token(token, cert.public_key(), issuer_id=cfg.client_auth.token_issuer_id,
                                types=[TYPE_BULK_REGISTRATION])
    c = valid.claims
    assert c["iss"] == site_issuer(cfg.client_auth.token_issuer_id) and c["iss"].startswith("urn:sccm:oauth2:")
    assert c["aud"] == SITE_AUDIENCE == "urn:sccm:service"
    assert c["type"] == "BulkRegistration" and c["sub"] == "BulkRegistration" and c["jti"]
    assert c["exp"] - c["nbf"] == 4320 * 60
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "RS256"
    assert header["kid"] == hashlib.sha1(cert.public_bytes(Encoding.DER)).hexdigest().upper()
    for minutes in (10080, 1):  # one token each: two could straddle a second
        c = claims_of(new_bulk_token(cfg, minutes))
        assert c["exp"] - c["nbf"] == minutes * 60
    for bad in (10081, 0, -5):
        with pytest.raises(ValueError, match="1 to 10080 minutes"):
            new_bulk_token(cfg, bad)


def test_bulk_token_without_a_signing_key(tmp_path: Path):
    cfg = site_config(tmp_path, signing=False)
    with pytest.raises(SigningKeyMissing, match="token-signing"):
        new_bulk_token(cfg)
    with pytest.raises(ValueError):  # a bad lifetime is refused before the files are read
        new_bulk_token(cfg, 20000)


# --- CCM_STS ----------------------------------------------------------------------


async def entra_token(http, site, **fields) -> str:
    async with http.post(f"{site.url('entra')}/_mock/entra/token", json={"kind": "device", **fields}) as r:
        assert r.status == 200
        return (await r.json())["access_token"]


async def sts(http, site, token: str | None, method: str = "POST", path: str = "/CCM_STS"):
    headers = {"X-CMG-Client-Auth": "EntraID", **(bearer(token) if token else {})}
    async with http.request(method, site.url("mp") + path, headers=headers) as r:
        body = await r.json() if r.status == 200 else await r.text()
        return r.status, r.reason, body, r.headers


async def test_ccm_sts_exchanges_an_entra_token_for_a_ccm_token(site, http):
    device = "6a1e0c7f-2f39-4b71-9c1a-1d2f3e4a5b6c"
    token = await entra_token(http, site, device_id=device)
    for method, path in (("POST", "/CCM_STS"), ("CCM_POST", "/ccm_sts")):
        status, _, body, headers = await sts(http, site, token, method, path)
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        assert body["token_type"] == "Bearer" and body["type"] == "CCMToken" and body["expires_in"] == 8 * 3600
        assert body["subject"] == device
        signer = site.ctx.token_signer()
        valid = validate_site_token(body["access_token"], signer.public_key, issuer_id=signer.issuer_id,
                                    types=[TYPE_CCM])
        assert valid.subject == device and valid.claims["deviceid"] == device
        assert valid.claims["exp"] - valid.claims["iat"] == 8 * 3600
        assert jwt.get_unverified_header(body["access_token"])["kid"] == signer.kid
    log = (Path(site.ctx.config.logs_dir) / "CCM_STS.log").read_text()
    assert f"Issued a CCM token to device {device}" in log and 'component="CCM_STS"' in log


@pytest.mark.parametrize("fields,reason", [
    ({"issued_s": -7200, "lifetime_s": 3600}, "Entra token refused: the token has expired"),
    ({"not_before_s": 3600}, "Entra token refused: the token is not valid yet"),
    ({"audience": "https://graph.microsoft.com"}, "Entra token refused: the token's audience is not this CMG's"),
    ({"tenant_id": "00000000-1111-2222-3333-444444444444"}, "Entra token refused: the token's issuer is not trusted"),
    ({"sign_with": "tampered"}, "Entra token refused: the token's signature does not verify"),
    ({"sign_with": "unpublished"}, "Entra token refused: signing key"),
])
async def test_ccm_sts_refuses_bad_entra_tokens(site, http, fields, reason):
    status, why, body, headers = await sts(http, site, await entra_token(http, site, **fields))
    assert status == 401 and why.startswith(reason) and body.startswith(reason)
    assert headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    logged = reason.replace("Entra token refused: ", "refused: Entra token invalid: ")
    assert logged in (Path(site.ctx.config.logs_dir) / "CCM_STS.log").read_text()


async def test_ccm_sts_refuses_missing_token_other_app_and_site_tokens(site, http):
    status, why, _, _ = await sts(http, site, None)
    assert status == 401 and why == "CCM_STS needs Authorization: Bearer <Microsoft Entra ID token>"
    tenant = site.ctx.entra
    other_app = issue_entra_token(tenant.keys.current.key, tenant.keys.current.kid, tenant_id=tenant.config.tenant_id,
                                  audience="https://ConfigMgrService",
                                  client_app_id="11111111-2222-3333-4444-555555555555", subject="x")
    status, why, _, _ = await sts(http, site, other_app)
    assert status == 401 and "was issued to app 11111111-2222-3333-4444-555555555555" in why
    status, why, _, _ = await sts(http, site, site.ctx.token_signer().ccm_token("x"))
    assert status == 401 and "is not in the tenant's JWKS" in why  # a CCM token is not an Entra token
    async with http.get(site.url("mp") + "/CCM_STS") as r:
        assert r.status == 405


async def test_without_a_signing_key_ccm_sts_and_tokenauth_answer_503(tmp_path: Path, http):
    site = await start_site(site_config(tmp_path, signing=False))
    try:
        status, why, _, _ = await sts(http, site, await entra_token(http, site))
        assert status == 503 and why.startswith("cannot issue a CCM token")
        resp, _, _ = await ccm_post(http, site, "MP_LocationManager", payloads.location_request("SiteInformationRequest"),
                                    path=TOKENAUTH, headers=bearer("x.y.z"))
        assert resp.status == 503
    finally:
        await site.close()


# --- ccm_system_tokenauth -----------------------------------------------------------


async def register(http, site, token: str, name: str = "TOKENPC01"):
    resp, reply, raw = await ccm_post(http, site, "MP_ClientRegistration",
                                      payloads.registration_request(name, name, ""), source_host=name,
                                      path=TOKENAUTH, headers={"X-CMG-Client-Auth": "BulkRegistration", **bearer(token)})
    return resp, reply


async def test_bulk_registration_then_the_client_token(site, http):
    bulk = new_bulk_token(site.ctx.config)
    resp, reply = await register(http, site, bulk)
    assert resp.status == 200, resp.reason
    root = parse_xml(reply.body)
    smsid = root.get("SMSID")
    assert root.tag == "ClientRegistrationResponse" and smsid.startswith("GUID:")
    el = root.find("ClientToken")
    assert el.get("Type") == "ClientToken"
    client_token = el.text
    signer = site.ctx.token_signer()
    valid = signer.validate(client_token, [TYPE_CLIENT])
    assert valid.subject == smsid
    assert valid.claims["exp"] - valid.claims["iat"] == 90 * 86400
    expires = dt.datetime.strptime(el.get("ExpiresOn"), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    assert abs(expires.timestamp() - valid.claims["exp"]) <= 2
    reg = site.ctx.clients.get(smsid)
    assert reg.identity_kind == "bulk-registration-token" and reg.identity == f"bulk:{claims_of(bulk)['jti']}"
    assert "with a BulkRegistration token" in (Path(site.ctx.config.logs_dir) / "MP_RegistrationManager.log").read_text()

    # the client token is accepted afterwards, for location and policy
    auth = {"X-CMG-Client-Auth": "ClientToken", **bearer(client_token)}
    resp, reply, _ = await ccm_post(http, site, "MP_LocationManager", payloads.location_request("SiteInformationRequest"),
                                    path=TOKENAUTH, source_id=smsid, headers=auth)
    assert resp.status == 200 and "SiteInformationReply" in reply.body
    resp, reply, _ = await ccm_post(http, site, "MP_PolicyManager", payloads.request_assignments(smsid, "TOKENPC01", "PS1"),
                                    path=TOKENAUTH, source_id=smsid, headers=auth)
    assert resp.status == 200 and "ReplyAssignments" in reply.body

    # renewal: registering with the client token keeps the SMSID and gives a new token
    resp, reply = await register(http, site, client_token)
    root = parse_xml(reply.body)
    assert resp.status == 200 and root.get("SMSID") == smsid
    assert signer.validate(root.findtext("ClientToken"), [TYPE_CLIENT]).subject == smsid

    # the MP recorded what the gateway passed: X-CMG-Client-Auth and the Authorization header
    async with http.get(site.url("mp") + "/_mock/requests") as r:
        entries = [e for e in await r.json() if e["path"] == TOKENAUTH]
    assert [e["client_auth"] for e in entries] == ["BulkRegistration", "ClientToken", "ClientToken", "BulkRegistration"]
    assert entries[0]["authorization"] == {"scheme": "Bearer", "token_sha256": hashlib.sha256(bulk.encode()).hexdigest()}
    assert entries[0]["client_identity"]["X-CMG-Client-Auth"] == "BulkRegistration"


async def test_bulk_token_is_refused_for_anything_but_registration(site, http):
    bulk = new_bulk_token(site.ctx.config)
    for endpoint, body in (("MP_LocationManager", payloads.location_request("SiteInformationRequest")),
                           ("MP_PolicyManager", payloads.request_assignments("GUID:X", "PC", "PS1"))):
        resp, _, _ = await ccm_post(http, site, endpoint, body, path=TOKENAUTH, headers=bearer(bulk))
        assert resp.status == 401
        assert resp.reason == f"a BulkRegistration token is accepted for MP_ClientRegistration only, not {endpoint}"


async def test_ccm_token_is_accepted_and_registers_an_entra_device(site, http):
    device = "0f0e0d0c-0b0a-4909-8807-060504030201"
    status, _, body, _ = await sts(http, site, await entra_token(http, site, device_id=device))
    ccm = body["access_token"]
    resp, reply, _ = await ccm_post(http, site, "MP_ClientRegistration", payloads.registration_request("AADPC", "AADPC", ""),
                                    path=TOKENAUTH, headers=bearer(ccm))
    root = parse_xml(reply.body)
    assert resp.status == 200 and root.find("ClientToken") is None
    reg = site.ctx.clients.get(root.get("SMSID"))
    assert (reg.identity_kind, reg.identity) == ("entra-device", device)
    resp, reply, _ = await ccm_post(http, site, "MP_PolicyManager",
                                    payloads.request_assignments(reg.smsid, "AADPC", "PS1"), path=TOKENAUTH,
                                    source_id=reg.smsid, headers=bearer(ccm))
    assert resp.status == 200


@pytest.mark.parametrize("make,reason", [
    (lambda s: None, "ccm_system_tokenauth needs Authorization: Bearer"),
    (lambda s: "not-a-jwt", "token refused: not a JWT"),
    (lambda s: s.issue(TYPE_CLIENT, "GUID:X", dt.timedelta(days=1), now=dt.datetime.now(dt.timezone.utc)
                       - dt.timedelta(days=2)), "token refused: the token has expired"),
    (lambda s: s.issue("Other", "x", dt.timedelta(hours=1)), "token refused: a 'Other' token is not accepted here"),
    (lambda s: s.client_token("GUID:00000000-0000-0000-0000-000000000000"),
     "the client token names GUID:00000000-0000-0000-0000-000000000000, which is not a registered client"),
])
async def test_tokenauth_refusals(site, http, make, reason):
    token = make(site.ctx.token_signer())
    resp, _, raw = await ccm_post(http, site, "MP_LocationManager", payloads.location_request("SiteInformationRequest"),
                                  path=TOKENAUTH, headers=bearer(token) if token else {})
    assert resp.status == 401 and resp.reason.startswith(reason), resp.reason
    assert resp.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


async def test_a_token_signed_by_another_key_is_refused(site, http, tmp_path: Path):
    cert, key = tmp_path / "other.pem", tmp_path / "other.key"
    write_token_signing(cert, key, fresh=True)
    other = dataclasses.replace(site.ctx.config, token_signing_certificate=cert, token_signing_key=key)
    forged = load_signer(other).client_token("GUID:X")
    with pytest.raises(TokenError, match="signature"):
        site.ctx.token_signer().validate(forged, [TYPE_CLIENT])
    resp, _, _ = await ccm_post(http, site, "MP_LocationManager", payloads.location_request("SiteInformationRequest"),
                                path=TOKENAUTH, headers=bearer(forged))
    assert resp.status == 401 and resp.reason == "token refused: the token's signature does not verify"


async def test_client_token_of_another_client_is_refused(site, http):
    _, reply_a = await register(http, site, new_bulk_token(site.ctx.config), "PCA")
    _, reply_b = await register(http, site, new_bulk_token(site.ctx.config), "PCB")
    a, b = parse_xml(reply_a.body), parse_xml(reply_b.body)
    resp, _, _ = await ccm_post(http, site, "MP_PolicyManager", payloads.request_assignments(b.get("SMSID"), "PCB", "PS1"),
                                path=TOKENAUTH, source_id=b.get("SMSID"), headers=bearer(a.findtext("ClientToken")))
    assert resp.status == 401 and resp.reason == f"the client token of {a.get('SMSID')} was presented by {b.get('SMSID')}"
    resp, _, _ = await ccm_post(http, site, "MP_PolicyManager", payloads.request_assignments(b.get("SMSID"), "PCB", "PS1"),
                                path=TOKENAUTH, headers=bearer(a.findtext("ClientToken")))
    assert resp.status == 403 and resp.reason == f"the client token of {a.get('SMSID')} may not ask policy for {b.get('SMSID')}"
