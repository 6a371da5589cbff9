"""The mock Entra ID tenant: OIDC metadata, JWKS, token endpoint, rollover, test minting."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import jwt
import pytest

from cmg.tokens import TokenError, entra_issuer, keys_from_jwks, validate_entra_token
from mock_site import start_site
from site_helpers import site_config

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT_APP = "3b7c1d5e-0000-4000-8000-00000000c11e"
SERVER_APP = "9a1f2e3d-0000-4000-8000-00000000fe01"
ENTRA = {"tenant_id": TENANT, "tenant_name": "granitefalls.onmicrosoft.com", "client_app_id": CLIENT_APP,
         "server_app_id": SERVER_APP}


@pytest.fixture
async def tenant_site(tmp_path: Path):
    runner = await start_site(site_config(tmp_path, entra=ENTRA))
    yield runner
    await runner.close()


def base(site) -> str:
    return site.url("entra")


async def get_token(http, site, **form: str):
    data = {"grant_type": "client_credentials", "client_id": CLIENT_APP,
            "scope": "https://ConfigMgrService/.default", **form}
    async with http.post(f"{base(site)}/{TENANT}/oauth2/v2.0/token", data=data) as r:
        return r.status, await r.json()


async def jwks(http, site) -> dict:
    async with http.get(f"{base(site)}/{TENANT}/discovery/v2.0/keys") as r:
        assert r.status == 200
        return await r.json()


def check(token: str, keys: dict) -> None:
    validate_entra_token(token, keys, tenant_id=TENANT, audiences=["https://ConfigMgrService", SERVER_APP])


async def test_openid_metadata_by_id_and_by_name(tenant_site, http):
    for tenant in (TENANT, "GraniteFalls.onmicrosoft.com"):
        async with http.get(f"{base(tenant_site)}/{tenant}/v2.0/.well-known/openid-configuration") as r:
            assert r.status == 200
            meta = await r.json()
        assert meta["issuer"] == entra_issuer(TENANT) == f"https://login.microsoftonline.com/{TENANT}/v2.0"
        assert meta["jwks_uri"] == f"{base(tenant_site)}/{tenant}/discovery/v2.0/keys"
        assert meta["token_endpoint"] == f"{base(tenant_site)}/{tenant}/oauth2/v2.0/token"
        assert meta["id_token_signing_alg_values_supported"] == ["RS256"]
        assert meta["cloud_instance_name"] == "microsoftonline.com"
    # the authority is the URL the request came to
    async with http.get(f"{base(tenant_site)}/{TENANT}/v2.0/.well-known/openid-configuration",
                        headers={"Host": "login.example.test:4443"}) as r:
        assert (await r.json())["jwks_uri"] == f"http://login.example.test:4443/{TENANT}/discovery/v2.0/keys"


async def test_unknown_tenant_is_aadsts90002(tenant_site, http):
    other = "00000000-1111-2222-3333-444444444444"
    for url in (f"/{other}/v2.0/.well-known/openid-configuration", f"/{other}/discovery/v2.0/keys"):
        async with http.get(base(tenant_site) + url) as r:
            assert r.status == 400
            err = await r.json()
        assert err["error"] == "invalid_tenant" and err["error_codes"] == [90002]
        assert err["error_description"].startswith(f"AADSTS90002: Tenant '{other}' not found.")
    async with http.post(f"{base(tenant_site)}/{other}/oauth2/v2.0/token", data={"grant_type": "client_credentials"}) as r:
        assert r.status == 400 and (await r.json())["error_codes"] == [90002]


async def test_device_and_user_tokens_validate_against_the_jwks(tenant_site, http):
    keys = keys_from_jwks(await jwks(http, tenant_site))
    assert list(keys) == [tenant_site.ctx.entra.keys.current.kid]
    device = "6a1e0c7f-2f39-4b71-9c1a-1d2f3e4a5b6c"
    status, body = await get_token(http, tenant_site, device_id=device)
    assert status == 200 and body["token_type"] == "Bearer" and body["expires_in"] == 3600
    check(body["access_token"], keys)
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["aud"] == "https://ConfigMgrService" and claims["appid"] == CLIENT_APP
    assert claims["tid"] == TENANT and claims["deviceid"] == device and claims["idtyp"] == "device"
    assert claims["exp"] - claims["iat"] == 3600
    assert jwt.get_unverified_header(body["access_token"])["kid"] in keys

    status, body = await get_token(http, tenant_site, username="pat@granitefalls.onmicrosoft.com")
    assert status == 200
    check(body["access_token"], keys)
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["upn"] == "pat@granitefalls.onmicrosoft.com" and claims["idtyp"] == "user"

    status, body = await get_token(http, tenant_site)  # a new device id each time
    first = jwt.decode(body["access_token"], options={"verify_signature": False})["deviceid"]
    status, body = await get_token(http, tenant_site)
    assert jwt.decode(body["access_token"], options={"verify_signature": False})["deviceid"] != first
    assert "Issued device token for device" in (Path(tenant_site.ctx.config.logs_dir) / "MockEntraID.log").read_text()


@pytest.mark.parametrize("form,error,code", [
    ({"client_id": "11111111-2222-3333-4444-555555555555"}, "invalid_client", 700016),
    ({"scope": "https://graph.microsoft.com/.default"}, "invalid_scope", 70011),
    ({"scope": "https://ConfigMgrService"}, "invalid_scope", 70011),
    ({"grant_type": "password"}, "unsupported_grant_type", 70003),
    ({"grant_type": ""}, "invalid_request", 900144),
    ({"device_id": "not-a-guid"}, "invalid_request", 90014),
])
async def test_token_endpoint_errors(tenant_site, http, form, error, code):
    status, body = await get_token(http, tenant_site, **form)
    assert status == 400 and body["error"] == error and body["error_codes"] == [code]
    assert body["error_description"].startswith(f"AADSTS{code}: ")
    if error == "invalid_client":
        assert "was not found in the directory 'granitefalls.onmicrosoft.com'" in body["error_description"]


async def test_rollover_publishes_the_new_key_and_keeps_the_previous(tenant_site, http):
    first = tenant_site.ctx.entra.keys.current.kid
    _, body = await get_token(http, tenant_site)
    old_token = body["access_token"]
    async with http.post(f"{base(tenant_site)}/_mock/entra/rollover") as r:
        assert r.status == 200
        state = await r.json()
    second = state["current_kid"]
    assert second != first and state["published_kids"] == [first, second]
    keys = keys_from_jwks(await jwks(http, tenant_site))
    assert set(keys) == {first, second}
    _, body = await get_token(http, tenant_site)
    assert jwt.get_unverified_header(body["access_token"])["kid"] == second
    check(body["access_token"], keys)
    check(old_token, keys)  # tokens signed before the rollover still validate
    # a cache from before the rollover meets an unknown kid
    with pytest.raises(TokenError) as e:
        check(body["access_token"], {first: keys[first]})
    assert e.value.unknown_key
    # at most the 2 newest are published
    async with http.post(f"{base(tenant_site)}/_mock/entra/rollover") as r:
        third = (await r.json())["current_kid"]
    assert set(keys_from_jwks(await jwks(http, tenant_site))) == {second, third}


async def test_keys_persist_across_restarts_with_0600(tmp_path: Path, http):
    cfg = site_config(tmp_path, entra=ENTRA)
    site = await start_site(cfg)
    try:
        async with http.post(f"{site.url('entra')}/_mock/entra/rollover") as r:
            kids = (await r.json())["published_kids"]
    finally:
        await site.close()
    path = cfg.data_dir / "entra" / "keys.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    site = await start_site(cfg)
    try:
        async with http.get(f"{site.url('entra')}/{TENANT}/discovery/v2.0/keys") as r:
            assert [k["kid"] for k in (await r.json())["keys"]] == kids
        assert site.ctx.entra.keys.current.kid == kids[-1]
    finally:
        await site.close()


async def mint(http, site, **fields) -> str:
    async with http.post(f"{base(site)}/_mock/entra/token", json={"kind": "device", **fields}) as r:
        assert r.status == 200, r.reason
        return (await r.json())["access_token"]


@pytest.mark.parametrize("fields,reason", [
    ({}, None),
    ({"kind": "user", "username": "pat@granitefalls.onmicrosoft.com"}, None),
    ({"issued_s": -7200, "lifetime_s": 3600}, "the token has expired"),
    ({"not_before_s": 3600}, "the token is not valid yet (nbf/iat in the future)"),
    ({"issued_s": 3600}, "the token is not valid yet (nbf/iat in the future)"),
    ({"audience": "https://graph.microsoft.com"}, "the token's audience is not this CMG's"),
    ({"tenant_id": "00000000-1111-2222-3333-444444444444"}, "the token's issuer is not trusted"),
    ({"tenant_id": "00000000-1111-2222-3333-444444444444", "issuer": entra_issuer(TENANT)},
     "the token is for tenant '00000000-1111-2222-3333-444444444444', not " + TENANT),
    ({"issuer": "https://sts.windows.net/" + TENANT + "/"}, "the token's issuer is not trusted"),
    ({"sign_with": "tampered"}, "the token's signature does not verify"),
    ({"sign_with": "unpublished"}, "is not in the tenant's JWKS"),
    ({"issued_s": -3600 - 200, "lifetime_s": 3600}, None),  # inside the 5 minutes of clock skew
])
async def test_minted_tokens_are_judged_by_validate_entra_token(tenant_site, http, fields, reason):
    token = await mint(http, tenant_site, **fields)
    keys = keys_from_jwks(await jwks(http, tenant_site))
    if reason is None:
        check(token, keys)
        return
    with pytest.raises(TokenError) as e:
        check(token, keys)
    assert reason in e.value.reason
    assert e.value.unknown_key == (fields.get("sign_with") == "unpublished")


async def test_unpublished_kid_is_never_in_the_jwks(tenant_site, http):
    async with http.post(f"{base(tenant_site)}/_mock/entra/token", json={"kind": "device", "sign_with": "unpublished"}) as r:
        kid = (await r.json())["kid"]
    assert kid not in keys_from_jwks(await jwks(http, tenant_site))
    async with http.get(f"{base(tenant_site)}/_mock/entra") as r:
        assert (await r.json())["unpublished_kid"] == kid


@pytest.mark.parametrize("body,reason", [
    ({"kind": "robot"}, 'kind must be "device" or "user"'),
    ({"kind": "device", "sign_with": "other"}, "sign_with must be"),
    ({"kind": "device", "lifetime_s": "1h"}, "lifetime_s must be an integer"),
    ({"kind": "device", "colour": "red"}, "unknown field(s) colour"),
])
async def test_mint_refuses_bad_requests(tenant_site, http, body, reason):
    async with http.post(f"{base(tenant_site)}/_mock/entra/token", json=body) as r:
        assert r.status == 400 and r.reason.startswith(reason)


async def test_entra_disabled_means_no_port(tmp_path: Path):
    site = await start_site(site_config(tmp_path, entra={"enabled": False}))
    try:
        assert "entra" not in site.ports and site.ctx.entra is None
    finally:
        await site.close()

