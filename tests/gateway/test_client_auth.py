"""PKI client authentication verdicts, with certificates made by cmg.pki."""

import datetime as dt

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from cmg import pki
from gateway.client_auth import ClientCertificateVerifier, Verdict


@pytest.fixture(scope="module")
def authorities():
    root = pki.new_authority("Test Root")
    issuing = pki.new_authority("Test Issuing", parent=root, path_length=0)
    return root, issuing


def verifier(root):
    return ClientCertificateVerifier((root.cert,))


def test_trusted_chain_gives_identity(authorities):
    root, issuing = authorities
    cert, _ = pki.issue_client_certificate(issuing, "CLIENT01.corp.contoso.com")
    check = verifier(root).check((cert, issuing.cert))
    assert check.verdict is Verdict.TRUSTED
    assert check.identity.thumbprint == pki.thumbprint(cert)
    assert "CLIENT01.corp.contoso.com" in check.identity.subject


def test_no_certificate(authorities):
    assert verifier(authorities[0]).check(()).verdict is Verdict.NO_CERTIFICATE


def test_missing_intermediate_is_rejected(authorities):
    root, issuing = authorities
    cert, _ = pki.issue_client_certificate(issuing, "c")
    assert verifier(root).check((cert,)).verdict is Verdict.REJECTED


def test_untrusted_expired_notyet_and_wrong_usage_are_rejected(authorities):
    root, issuing = authorities
    now = dt.datetime.now(dt.timezone.utc)
    other = pki.new_authority("Someone Else")
    cases = {
        "untrusted": pki.issue_client_certificate(other, "c")[0],
        "expired": pki.issue_client_certificate(issuing, "c", not_before=now - dt.timedelta(days=10),
                                                not_after=now - dt.timedelta(days=1))[0],
        "not yet valid": pki.issue_client_certificate(issuing, "c", not_before=now + dt.timedelta(days=1),
                                                      not_after=now + dt.timedelta(days=10))[0],
        "server auth only": pki.issue_client_certificate(
            issuing, "c", extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH,))[0],
        "no EKU": pki.issue_client_certificate(issuing, "c", extended_key_usage=None)[0],
        "1024-bit": pki.issue_client_certificate(issuing, "c", key=pki.generate_key("rsa1024"))[0],
    }
    for name, cert in cases.items():
        check = verifier(root).check((cert, issuing.cert))
        assert check.verdict is Verdict.REJECTED, name
        assert check.reason, name


def test_a_resumed_session_without_the_chain_is_verified_with_remembered_intermediates(authorities):
    root, issuing = authorities
    cert, _ = pki.issue_client_certificate(issuing, "CLIENT01.corp.contoso.com")
    v = verifier(root)
    assert v.check((cert,)).verdict is Verdict.REJECTED  # never saw the issuing CA yet
    assert v.check((cert, issuing.cert)).verdict is Verdict.TRUSTED  # a full handshake
    assert v.check((cert,)).verdict is Verdict.TRUSTED  # a resumed one: leaf only


def test_an_untrusted_intermediate_is_not_remembered(authorities):
    root, _ = authorities
    rogue_root = pki.new_authority("Rogue Root")
    rogue_issuing = pki.new_authority("Rogue Issuing", parent=rogue_root, path_length=0)
    cert, _ = pki.issue_client_certificate(rogue_issuing, "x")
    v = verifier(root)
    assert v.check((cert, rogue_issuing.cert)).verdict is Verdict.REJECTED
    assert v._intermediates == {}
