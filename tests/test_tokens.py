"""Token issue and validation (cmg/tokens.py), with keys made here."""

import datetime as dt

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from cmg import tokens
from cmg.tokens import TokenError

TENANT = "6f0e1f5c-3d1b-4a8e-9c4f-2b7d8a1e5c30"
CLIENT_APP = "5e7c9a1b-3d5f-4b7e-8c9a-1b3d5f7e9c21"
ISSUER_ID = "2b9d4f6a-8c1e-4a3b-9d5f-7e1a3c5b7d92"


@pytest.fixture(scope="module")
def key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def entra(key, **kw):
    args = dict(tenant_id=TENANT, audience=tokens.SERVER_APP_ID_URI, client_app_id=CLIENT_APP, subject="dev1")
    args.update(kw)
    return tokens.issue_entra_token(key, "k1", **args)


def check(token, key):
    return tokens.validate_entra_token(token, {"k1": key.public_key()}, tenant_id=TENANT,
                                       audiences=[tokens.SERVER_APP_ID_URI])


def test_valid_entra_token(key):
    v = check(entra(key, device_id="d1"), key)
    assert v.kind == "entra" and v.claims["tid"] == TENANT and v.claims["appid"] == CLIENT_APP


@pytest.mark.parametrize("kw, reason", [
    (dict(now=dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=3)), "expired"),
    (dict(not_before=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)), "not valid yet"),
    (dict(audience="https://Other"), "audience"),
    (dict(issuer="https://login.microsoftonline.com/other/v2.0"), "issuer"),
])
def test_bad_entra_tokens(key, kw, reason):
    with pytest.raises(TokenError, match=reason):
        check(entra(key, **kw), key)


def test_wrong_tenant_with_matching_issuer_is_refused(key):
    token = entra(key, extra={"tid": "00000000-0000-0000-0000-000000000000"})
    with pytest.raises(TokenError, match="tenant"):
        check(token, key)


def test_signature_and_unknown_key(key, other):
    with pytest.raises(TokenError, match="signature"):
        check(entra(other), key)
    token = tokens.issue_entra_token(key, "k2", tenant_id=TENANT, audience=tokens.SERVER_APP_ID_URI,
                                     client_app_id=CLIENT_APP, subject="x")
    with pytest.raises(TokenError) as err:
        check(token, key)
    assert err.value.unknown_key


def test_clock_skew_is_tolerated(key):
    t = entra(key, not_before=dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=60))
    assert check(t, key).kind == "entra"  # 5 minutes of skew by default


def test_site_tokens_by_type(key):
    bulk = tokens.issue_site_token(key, "s", issuer_id=ISSUER_ID, token_type=tokens.TYPE_BULK_REGISTRATION,
                                   subject="b", lifetime=tokens.bulk_lifetime(None))
    v = tokens.validate_site_token(bulk, key.public_key(), issuer_id=ISSUER_ID, types=[tokens.TYPE_BULK_REGISTRATION])
    assert v.claims["aud"] == "urn:sccm:service" and v.claims["iss"] == f"urn:sccm:oauth2:{ISSUER_ID}"
    assert v.claims["exp"] - v.claims["iat"] == 4320 * 60
    with pytest.raises(TokenError, match="not accepted here"):
        tokens.validate_site_token(bulk, key.public_key(), issuer_id=ISSUER_ID, types=[tokens.TYPE_CLIENT])


def test_bulk_lifetime_limits():
    assert tokens.bulk_lifetime(10080) == dt.timedelta(minutes=10080)
    for bad in (0, 10081):
        with pytest.raises(ValueError, match="10080"):
            tokens.bulk_lifetime(bad)


def test_jwks_round_trip(key):
    jwks = {"keys": [tokens.jwk_of(key.public_key(), "k1"), {"kid": "broken", "kty": "RSA"}]}
    keys = tokens.keys_from_jwks(jwks)
    assert list(keys) == ["k1"]
    assert tokens.validate_entra_token(entra(key), keys, tenant_id=TENANT, audiences=[tokens.SERVER_APP_ID_URI])
