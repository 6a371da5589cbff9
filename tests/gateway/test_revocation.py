"""CRL-based revocation of client certificates (gateway/revocation.py, client_auth)."""

import os
import time

import pytest

from cmg import pki
from gateway.client_auth import ClientCertificateVerifier, Verdict
from gateway.revocation import CRLStore


@pytest.fixture
def certs(tmp_path):
    made = pki.init_certificates(tmp_path / "certs")
    return made


def chain(cs):
    return tuple(pki.load_pem_certificates(cs.client_cert))


def verifier(cs, refuse_unknown=True, files=None):
    root = pki.load_pem_certificates(cs.root_ca)[0]
    store = CRLStore(files if files is not None else (cs.issuing_crl, cs.root_crl))
    return ClientCertificateVerifier((root,), store, refuse_unknown=refuse_unknown)


def test_good_certificate_passes_with_crls(certs):
    assert verifier(certs).check(chain(certs)).verdict is Verdict.TRUSTED


def test_revoked_certificate_is_rejected_after_the_crl_changes(certs):
    v = verifier(certs)
    assert v.check(chain(certs)).verdict is Verdict.TRUSTED
    time.sleep(0.01)
    pki.revoke(certs.directory, chain(certs)[0])
    os.utime(certs.issuing_crl)  # a new mtime even on coarse clocks
    check = v.check(chain(certs))
    assert check.verdict is Verdict.REJECTED and "revoked" in check.reason


def test_unreadable_crl_follows_the_policy(certs, tmp_path):
    missing = (tmp_path / "nope.crl", certs.root_crl)
    refused = verifier(certs, True, missing).check(chain(certs))
    assert refused.verdict is Verdict.REJECTED and "unknown" in refused.reason
    assert verifier(certs, False, missing).check(chain(certs)).verdict is Verdict.TRUSTED


def test_crl_signed_by_someone_else_counts_as_unavailable(certs, tmp_path):
    other = pki.new_authority("CMG Emulator Issuing CA")  # same name, other key
    forged = tmp_path / "forged.crl"
    crl = pki._build_crl(other, [], 1)
    pki._write_crl(forged, crl)
    check = verifier(certs, True, (forged, certs.root_crl)).check(chain(certs))
    assert check.verdict is Verdict.REJECTED and "not signed by it" in check.reason
