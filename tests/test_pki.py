"""Tests for cmg/pki.py: the emulator's certificate authority and file layout."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from cmg import pki

SERVICE = pki.DEFAULT_SERVICE_NAME

PUBLIC_FILES = {
    "root-ca.pem",
    "issuing-ca.pem",
    "root-ca.crl",
    "issuing-ca.crl",
    "cmg-server.pem",
    "client.pem",
    "site-ca.pem",
    "site-ca.crl",
    "connection-point-CMGCP01.pem",
    "token-signing.pem",
}
SECRET_FILES = {
    "root-ca.key",
    "issuing-ca.key",
    "cmg-server.key",
    "cmg-server.pfx",
    "cmg-server.pfx.password",
    "client.key",
    "site-ca.key",
    "connection-point-CMGCP01.key",
    "token-signing.key",
}
SERVER_FILES = {"cmg-server.pem", "cmg-server.key", "cmg-server.pfx", "cmg-server.pfx.password"}


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def first_cert(path: Path) -> x509.Certificate:
    return pki.load_pem_certificates(path)[0]


def cn(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def ext(cert: x509.Certificate, cls):
    return cert.extensions.get_extension_for_class(cls)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def client_verifier(*roots: x509.Certificate):
    return PolicyBuilder().store(Store(list(roots))).time(now()).build_client_verifier()


def server_verifier(root: x509.Certificate, name: str = SERVICE):
    return PolicyBuilder().store(Store([root])).time(now()).build_server_verifier(x509.DNSName(name))


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One default certificate directory for the read-only tests."""
    directory = tmp_path_factory.mktemp("shared") / "certs"
    return pki.init_certificates(directory)


@pytest.fixture(scope="module")
def cas(shared):
    return (
        pki.Authority.load(shared.root_ca, shared.root_ca_key),
        pki.Authority.load(shared.issuing_ca, shared.issuing_ca_key),
        pki.Authority.load(shared.site_ca, shared.site_ca_key),
    )


# --------------------------------------------------------------------------- layout


def test_init_creates_every_file_with_the_right_modes(tmp_path):
    directory = tmp_path / "not" / "yet" / "there"
    cs = pki.init_certificates(directory)

    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    names = {p.name for p in directory.iterdir()}
    assert names == PUBLIC_FILES | SECRET_FILES  # and no temporary files left behind
    assert set(cs.created) == names
    for name in SECRET_FILES:
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600, name
    for name in PUBLIC_FILES:
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o644, name

    assert cs.root_ca == directory / "root-ca.pem"
    assert cs.root_ca_key == directory / "root-ca.key"
    assert cs.issuing_ca == directory / "issuing-ca.pem"
    assert cs.issuing_ca_key == directory / "issuing-ca.key"
    assert cs.issuing_crl == directory / "issuing-ca.crl"
    assert cs.root_crl == directory / "root-ca.crl"
    assert cs.server_cert == directory / "cmg-server.pem"
    assert cs.server_key == directory / "cmg-server.key"
    assert cs.server_pfx == directory / "cmg-server.pfx"
    assert cs.server_pfx_password == directory / "cmg-server.pfx.password"
    assert cs.client_cert == directory / "client.pem"
    assert cs.client_key == directory / "client.key"
    assert cs.site_ca == directory / "site-ca.pem"
    assert cs.site_ca_key == directory / "site-ca.key"
    assert cs.site_crl == directory / "site-ca.crl"
    assert cs.token_signing == (directory / "token-signing.pem", directory / "token-signing.key")
    assert cs.connection_points == {
        "CMGCP01": (directory / "connection-point-CMGCP01.pem", directory / "connection-point-CMGCP01.key")
    }
    assert pki.certificates_present(directory, SERVICE, ["CMGCP01"])


def test_keys_are_unencrypted_pkcs8_pem(shared):
    data = shared.server_key.read_bytes()
    assert data.startswith(b"-----BEGIN PRIVATE KEY-----")
    key = serialization.load_pem_private_key(data, password=None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048


def test_write_private_key_tightens_an_existing_world_readable_file(tmp_path):
    path = tmp_path / "k.key"
    path.write_text("old")
    os.chmod(path, 0o644)
    pki.write_private_key(path, pki.generate_key("ec"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in path.read_bytes()


def test_certificate_contents(shared, cas):
    root, issuing, site = cas

    assert cn(root.cert) == "CMG Emulator Root CA"
    assert root.cert.issuer == root.cert.subject
    assert ext(root.cert, x509.BasicConstraints).value.ca
    assert ext(root.cert, x509.BasicConstraints).critical
    ku = ext(root.cert, x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    assert 3640 <= (root.cert.not_valid_after_utc - now()).days <= 3650

    assert cn(issuing.cert) == "CMG Emulator Issuing CA"
    assert issuing.cert.issuer == root.cert.subject
    bc = ext(issuing.cert, x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    assert 1815 <= (issuing.cert.not_valid_after_utc - now()).days <= 1825

    server_chain = pki.load_pem_certificates(shared.server_cert)
    assert [cn(c) for c in server_chain] == [SERVICE, "CMG Emulator Issuing CA"]
    server = server_chain[0]
    assert ext(server, x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [SERVICE]
    assert list(ext(server, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not ext(server, x509.BasicConstraints).value.ca
    assert 360 <= (server.not_valid_after_utc - now()).days <= 365

    client_chain = pki.load_pem_certificates(shared.client_cert)
    assert [cn(c) for c in client_chain] == ["CLIENT01.corp.contoso.com", "CMG Emulator Issuing CA"]
    client = client_chain[0]
    assert ext(client, x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [
        "CLIENT01.corp.contoso.com"
    ]
    assert list(ext(client, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]

    assert cn(site.cert) == "SMS Issuing - PS1"
    assert site.cert.issuer == site.cert.subject
    assert ext(site.cert, x509.BasicConstraints).value.ca

    cp = pki.load_pem_certificates(shared.connection_points["CMGCP01"][0])
    assert len(cp) == 1
    assert cn(cp[0]) == "CMGCP01"
    assert cp[0].subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Cloud Proxy Connector"
    assert cp[0].issuer == site.cert.subject
    assert list(ext(cp[0], x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]

    # Subject/authority key identifiers link every certificate to its issuer.
    for cert, issuer in (
        (issuing.cert, root.cert),
        (server, issuing.cert),
        (client, issuing.cert),
        (cp[0], site.cert),
    ):
        aki = ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier
        assert aki == ext(issuer, x509.SubjectKeyIdentifier).value.digest
    # Serial numbers are random (not 1, 2, 3 ...).
    serials = {c.serial_number for c in (root.cert, issuing.cert, server, client, cp[0], site.cert)}
    assert len(serials) == 6 and min(serials) > 2**32


def test_crls_are_signed_and_due_in_seven_days(shared, cas):
    root, issuing, _ = cas
    for path, ca in ((shared.root_crl, root), (shared.issuing_crl, issuing)):
        crl = x509.load_pem_x509_crl(path.read_bytes())
        assert crl.issuer == ca.cert.subject
        assert crl.is_signature_valid(ca.cert.public_key())
        assert len(list(crl)) == 0
        assert dt.timedelta(days=6, hours=23) < crl.next_update_utc - now() <= dt.timedelta(days=7)


def test_site_crl_is_signed_by_the_site_ca(shared, cas):
    root, issuing, site = cas
    crl = x509.load_pem_x509_crl(shared.site_crl.read_bytes())
    assert crl.issuer == site.cert.subject
    assert crl.is_signature_valid(site.cert.public_key())
    assert not crl.is_signature_valid(issuing.cert.public_key())
    assert not crl.is_signature_valid(root.cert.public_key())
    assert len(list(crl)) == 0
    assert ext(crl, x509.CRLNumber).value.crl_number == 1
    assert ext(crl, x509.AuthorityKeyIdentifier).value.key_identifier == \
        ext(site.cert, x509.SubjectKeyIdentifier).value.digest
    assert dt.timedelta(days=6, hours=23) < crl.next_update_utc - now() <= dt.timedelta(days=7)


def test_token_signing_certificate(shared, cas):
    root, issuing, site = cas
    chain = pki.load_pem_certificates(shared.token_signing[0])
    assert len(chain) == 1
    token = chain[0]
    assert cn(token) == "ConfigMgr Token Signing - PS1"
    assert token.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Configuration Manager"
    assert token.issuer == site.cert.subject
    token.verify_directly_issued_by(site.cert)
    assert ext(token, x509.AuthorityKeyIdentifier).value.key_identifier == \
        ext(site.cert, x509.SubjectKeyIdentifier).value.digest
    assert not ext(token, x509.BasicConstraints).value.ca
    ku = ext(token, x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature
    assert not any((ku.value.content_commitment, ku.value.key_encipherment, ku.value.data_encipherment,
                    ku.value.key_agreement, ku.value.key_cert_sign, ku.value.crl_sign))
    for cls in (x509.ExtendedKeyUsage, x509.SubjectAlternativeName):
        with pytest.raises(x509.ExtensionNotFound):
            ext(token, cls)
    assert 725 <= (token.not_valid_after_utc - now()).days <= 730
    assert token.not_valid_after_utc <= site.cert.not_valid_after_utc

    # Chains to the site CA (and to nothing else here; cryptography's WebPKI verifier
    # is not used because it requires a SAN); the key signs RS256 (PKCS#1 v1.5, SHA-256).
    for other in (root.cert, issuing.cert):
        with pytest.raises(ValueError):
            token.verify_directly_issued_by(other)
    key = serialization.load_pem_private_key(shared.token_signing[1].read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    signature = key.sign(b"header.payload", padding.PKCS1v15(), hashes.SHA256())
    token.public_key().verify(signature, b"header.payload", padding.PKCS1v15(), hashes.SHA256())


def test_token_signing_kid_is_the_thumbprint(shared):
    token = first_cert(shared.token_signing[0])
    kid = pki.token_signing_kid(token)
    assert kid == pki.thumbprint(token)
    assert re.fullmatch(r"[0-9A-F]{40}", kid)
    assert kid == pki.token_signing_kid(first_cert(shared.token_signing[0]))  # stable
    assert any("token-signing.pem" in line and kid in line for line in pki.describe(shared))


def test_issue_token_signing_certificate_is_always_rsa(cas):
    _, _, site = cas
    for key_type, bits in (("ec", 2048), ("rsa2048", 2048)):
        cert, key = pki.issue_token_signing_certificate(site, "ps9", key_type=key_type)
        assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == bits
        assert cn(cert) == "ConfigMgr Token Signing - PS9"
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert ku.digital_signature and not ku.key_encipherment and not ku.key_cert_sign
    with pytest.raises(ValueError):
        pki.issue_token_signing_certificate(site, "TOOLONG")
    with pytest.raises(ValueError):
        pki.issue_token_signing_certificate(site, "PS1", key_type="rsa1024")


def test_token_signing_is_regenerated_when_unusable(tmp_path):
    token_files = {"token-signing.pem", "token-signing.key"}
    cs = pki.init_certificates(tmp_path, key_type="ec")
    site = pki.Authority.load(cs.site_ca, cs.site_ca_key)
    cert_path, key_path = cs.token_signing

    # Missing key.
    key_path.unlink()
    assert not pki.certificates_present(tmp_path, SERVICE, ["CMGCP01"])
    assert set(pki.init_certificates(tmp_path).created) == token_files
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600

    # Not issued by the site CA (the issuing CA signed it instead).
    issuing = pki.Authority.load(cs.issuing_ca, cs.issuing_ca_key)
    cert, key = pki.issue_token_signing_certificate(issuing, "PS1")
    pki.write_pem_bundle(cert_path, [cert])
    pki.write_private_key(key_path, key)
    assert not pki.certificates_present(tmp_path, SERVICE, ["CMGCP01"])
    assert set(pki.init_certificates(tmp_path).created) == token_files
    first_cert(cert_path).verify_directly_issued_by(site.cert)

    # An EC key, even in a certificate the site CA issued: tokens are RS256.
    ec_cert, ec_key = pki.issue_connection_point_certificate(site, "TOKENEC", key_type="ec")
    pki.write_pem_bundle(cert_path, [ec_cert])
    pki.write_private_key(key_path, ec_key)
    assert not pki.certificates_present(tmp_path, SERVICE, ["CMGCP01"])
    assert set(pki.init_certificates(tmp_path).created) == token_files
    assert isinstance(first_cert(cert_path).public_key(), rsa.RSAPublicKey)

    # The CN of another site code.
    cert, key = pki.issue_token_signing_certificate(site, "XYZ")
    pki.write_pem_bundle(cert_path, [cert])
    pki.write_private_key(key_path, key)
    assert not pki.certificates_present(tmp_path, SERVICE, ["CMGCP01"])
    assert set(pki.init_certificates(tmp_path).created) == token_files
    assert cn(first_cert(cert_path)) == "ConfigMgr Token Signing - PS1"

    # Expired.
    cert = pki._issue_leaf(
        site, first_cert(cert_path).subject, key=key, dns_names=(), extended_key_usage=None,
        not_before=now() - dt.timedelta(days=30), not_after=now() - dt.timedelta(days=1),
    )
    pki.write_pem_bundle(cert_path, [cert])
    pki.write_private_key(key_path, key)
    assert set(pki.init_certificates(tmp_path).created) == token_files
    assert first_cert(cert_path).not_valid_after_utc > now()

    # An existing RSA 2048 key is kept when key_type asks for 4096 (as for every file).
    assert pki.init_certificates(tmp_path, key_type="rsa4096").created == ()
    assert pki.certificates_present(tmp_path, SERVICE, ["CMGCP01"])


def test_site_crl_is_recreated_or_refreshed(tmp_path):
    cs = pki.init_certificates(tmp_path, key_type="ec")
    site = pki.Authority.load(cs.site_ca, cs.site_ca_key)

    # Missing, or signed by someone else: a new empty one.
    cs.site_crl.unlink()
    assert not pki.certificates_present(tmp_path, SERVICE, ["CMGCP01"])
    assert pki.init_certificates(tmp_path).created == ("site-ca.crl",)
    cs.site_crl.write_bytes(cs.issuing_crl.read_bytes())
    assert pki.init_certificates(tmp_path).created == ("site-ca.crl",)
    crl = x509.load_pem_x509_crl(cs.site_crl.read_bytes())
    assert crl.issuer == site.cert.subject and crl.is_signature_valid(site.cert.public_key())

    # Past its next update: re-signed with its entries and the next number.
    cp = first_cert(cs.connection_points["CMGCP01"][0])
    pki.revoke(tmp_path, cp)
    old = x509.load_pem_x509_crl(cs.site_crl.read_bytes())
    stale = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(site.cert.subject)
        .last_update(now() - dt.timedelta(days=10))
        .next_update(now() - dt.timedelta(days=3))
        .add_extension(x509.CRLNumber(7), critical=False)
        .add_revoked_certificate(list(old)[0])
        .sign(site.key, hashes.SHA256())
    )
    cs.site_crl.write_bytes(stale.public_bytes(serialization.Encoding.PEM))
    assert not pki.certificates_present(tmp_path, SERVICE, ["CMGCP01"])
    assert pki.init_certificates(tmp_path).created == ("site-ca.crl",)
    crl = x509.load_pem_x509_crl(cs.site_crl.read_bytes())
    assert [e.serial_number for e in crl] == [cp.serial_number]
    assert ext(crl, x509.CRLNumber).value.crl_number == 8
    assert crl.next_update_utc > now() + dt.timedelta(days=6)
    assert pki.certificates_present(tmp_path, SERVICE, ["CMGCP01"])


# --------------------------------------------------------------------------- verification


def test_client_and_server_certificates_verify_against_the_root(shared, cas):
    root, issuing, _ = cas
    client = first_cert(shared.client_cert)
    verified = client_verifier(root.cert).verify(client, [issuing.cert])
    assert verified.chain[-1] == root.cert

    server = first_cert(shared.server_cert)
    chain = server_verifier(root.cert).verify(server, [issuing.cert])
    assert chain[0] == server and chain[-1] == root.cert

    # Wrong name, wrong purpose, or the intermediate left out: rejected.
    with pytest.raises(VerificationError):
        server_verifier(root.cert, "other.cloudapp.net").verify(server, [issuing.cert])
    with pytest.raises(VerificationError):
        client_verifier(root.cert).verify(server, [issuing.cert])
    with pytest.raises(VerificationError):
        client_verifier(root.cert).verify(client, [])


def test_connection_point_trusts_only_the_site_ca(shared, cas):
    root, issuing, site = cas
    cp = first_cert(shared.connection_points["CMGCP01"][0])
    with pytest.raises(VerificationError):
        client_verifier(root.cert).verify(cp, [issuing.cert])
    verified = client_verifier(site.cert).verify(cp, [])
    assert verified.chain == [cp, site.cert]
    # ... and a client certificate does not pass as a connection point.
    with pytest.raises(VerificationError):
        client_verifier(site.cert).verify(first_cert(shared.client_cert), [issuing.cert])


def test_negative_client_certificates_are_rejected(cas):
    root, issuing, _ = cas
    verifier = client_verifier(root.cert)

    expired, _ = pki.issue_client_certificate(
        issuing, "EXPIRED.corp.contoso.com",
        not_before=now() - dt.timedelta(days=30), not_after=now() - dt.timedelta(days=1),
    )
    future, _ = pki.issue_client_certificate(
        issuing, "FUTURE.corp.contoso.com", not_before=now() + dt.timedelta(days=1)
    )
    server_only, _ = pki.issue_client_certificate(
        issuing, "WRONGEKU.corp.contoso.com", extended_key_usage=[ExtendedKeyUsageOID.SERVER_AUTH]
    )
    untrusted_ca = pki.new_authority("Untrusted Root", key_type="ec")
    stranger, _ = pki.issue_client_certificate(untrusted_ca, "STRANGER.corp.contoso.com", key_type="ec")

    assert expired.not_valid_after_utc < now()
    assert future.not_valid_before_utc > now()
    for cert, chain in ((expired, [issuing.cert]), (future, [issuing.cert]),
                        (server_only, [issuing.cert]), (stranger, [untrusted_ca.cert])):
        with pytest.raises(VerificationError):
            verifier.verify(cert, chain)


def test_helpers_for_checks_the_verifier_does_not_make(cas):
    # cryptography's verifier accepts a leaf without EKU and a 1024-bit RSA key, so the
    # gateway has to check those itself; the helpers must at least build them right.
    _, issuing, _ = cas
    no_eku, _ = pki.issue_client_certificate(issuing, "NOEKU.corp.contoso.com", extended_key_usage=None)
    with pytest.raises(x509.ExtensionNotFound):
        ext(no_eku, x509.ExtendedKeyUsage)

    weak_key = pki.generate_key("rsa1024")
    weak, key = pki.issue_client_certificate(issuing, "WEAK.corp.contoso.com", key=weak_key)
    assert key is weak_key
    assert weak.public_key().key_size == 1024
    assert "rsa1024" not in pki.KEY_TYPES
    with pytest.raises(ValueError):
        pki.issue_client_certificate(issuing, "WEAK.corp.contoso.com", key_type="rsa1024")


def test_new_authority_with_parent_and_path_length(cas):
    root, _, _ = cas
    sub = pki.new_authority("Test Sub CA", parent=root, path_length=1, key_type="ec")
    assert sub.cert.issuer == root.cert.subject
    assert ext(sub.cert, x509.BasicConstraints).value.path_length == 1
    assert sub.cert.not_valid_after_utc <= root.cert.not_valid_after_utc
    leaf, _ = pki.issue_client_certificate(sub, "DEEP.corp.contoso.com", key_type="ec")
    client_verifier(root.cert).verify(leaf, [sub.cert])


# --------------------------------------------------------------------------- idempotence


def test_second_init_creates_nothing(tmp_path):
    pki.init_certificates(tmp_path, key_type="ec")
    before = snapshot(tmp_path)
    cs = pki.init_certificates(tmp_path)
    assert cs.created == ()
    assert snapshot(tmp_path) == before


def test_service_name_change_regenerates_only_the_server_certificate(tmp_path):
    pki.init_certificates(tmp_path, key_type="ec")
    before = snapshot(tmp_path)

    other = "Contoso.WestEurope.CloudApp.Azure.Com"
    assert not pki.certificates_present(tmp_path, other, ["CMGCP01"])
    cs = pki.init_certificates(tmp_path, service_name=other)
    assert set(cs.created) == SERVER_FILES
    after = snapshot(tmp_path)
    for name in before:
        assert (after[name] == before[name]) == (name not in SERVER_FILES), name
    assert cn(first_cert(cs.server_cert)) == other
    _, cert, _ = pki.load_pfx(cs.server_pfx, pki.read_password_file(cs.server_pfx_password))
    assert cn(cert) == other

    # The CN must match exactly, case included.
    cs = pki.init_certificates(tmp_path, service_name=other.lower())
    assert set(cs.created) == SERVER_FILES
    assert cn(first_cert(cs.server_cert)) == other.lower()
    assert pki.certificates_present(tmp_path, other.lower(), ["CMGCP01"])


def test_new_connection_point_and_clients_are_added(tmp_path):
    pki.init_certificates(tmp_path, key_type="ec")
    cs = pki.init_certificates(tmp_path, connection_points=("CMGCP01", "CMGCP02"), clients=3)
    assert set(cs.created) == {
        "connection-point-CMGCP02.pem", "connection-point-CMGCP02.key",
        "client-02.pem", "client-02.key", "client-03.pem", "client-03.key",
    }
    assert cn(first_cert(cs.connection_points["CMGCP02"][0])) == "CMGCP02"
    assert [c for c, _ in cs.clients] == [tmp_path / "client.pem", tmp_path / "client-02.pem",
                                          tmp_path / "client-03.pem"]
    assert cn(first_cert(tmp_path / "client-03.pem")) == "CLIENT03.corp.contoso.com"
    assert not pki.certificates_present(tmp_path, SERVICE, ["CMGCP01", "CMGCP03"])
    assert pki.certificates_present(tmp_path, SERVICE, ["CMGCP01", "CMGCP02"])


def test_missing_files_are_recreated_with_what_depends_on_them(tmp_path):
    pki.init_certificates(tmp_path, key_type="ec")
    (tmp_path / "client.key").unlink()
    assert not pki.certificates_present(tmp_path, SERVICE, ["CMGCP01"])
    assert set(pki.init_certificates(tmp_path).created) == {"client.pem", "client.key"}

    (tmp_path / "cmg-server.pfx.password").unlink()
    assert set(pki.init_certificates(tmp_path).created) == {"cmg-server.pfx", "cmg-server.pfx.password"}

    # A new issuing CA invalidates everything it signed, but not the root or the site.
    (tmp_path / "issuing-ca.key").unlink()
    created = set(pki.init_certificates(tmp_path).created)
    assert created == {"issuing-ca.pem", "issuing-ca.key", "issuing-ca.crl", "client.pem", "client.key"} | SERVER_FILES
    root = pki.Authority.load(tmp_path / "root-ca.pem", tmp_path / "root-ca.key")
    issuing = first_cert(tmp_path / "issuing-ca.pem")
    client_verifier(root.cert).verify(first_cert(tmp_path / "client.pem"), [issuing])

    # A new site code means a new site CA and new connection point certificates.
    created = set(pki.init_certificates(tmp_path, site_code="ps2").created)
    assert created == {"site-ca.pem", "site-ca.key", "site-ca.crl",
                       "connection-point-CMGCP01.pem", "connection-point-CMGCP01.key",
                       "token-signing.pem", "token-signing.key"}
    assert cn(first_cert(tmp_path / "site-ca.pem")) == "SMS Issuing - PS2"
    assert cn(first_cert(tmp_path / "token-signing.pem")) == "ConfigMgr Token Signing - PS2"
    assert pki.init_certificates(tmp_path, site_code="PS2").created == ()


def test_force_regenerates_everything(tmp_path):
    pki.init_certificates(tmp_path, key_type="ec")
    before = snapshot(tmp_path)
    cs = pki.init_certificates(tmp_path, force=True)
    assert set(cs.created) == PUBLIC_FILES | SECRET_FILES
    after = snapshot(tmp_path)
    assert all(after[name] != before[name] for name in before)


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError):
        pki.init_certificates(tmp_path, key_type="rsa1024")
    with pytest.raises(ValueError):
        pki.init_certificates(tmp_path, connection_points=["../evil"])
    with pytest.raises(ValueError):
        pki.init_certificates(tmp_path, site_code="TOOLONG")
    with pytest.raises(ValueError):
        pki.init_certificates(tmp_path, service_name="has space.example.com")
    with pytest.raises(ValueError):
        pki.generate_key("dsa")
    assert list(tmp_path.iterdir()) == []  # validated before anything is written


# --------------------------------------------------------------------------- PFX


def test_pfx_loads_with_its_password_and_not_with_another(shared, cas):
    _, issuing, _ = cas
    password = pki.read_password_file(shared.server_pfx_password)
    assert len(password) == 32 and b"\n" not in password  # token_urlsafe(24)
    key, cert, chain = pki.load_pfx(shared.server_pfx, password)
    assert cert == first_cert(shared.server_cert)
    assert chain == [issuing.cert]
    pem_key = serialization.load_pem_private_key(shared.server_key.read_bytes(), None)
    assert key.private_numbers() == pem_key.private_numbers()
    with pytest.raises(ValueError):
        pki.load_pfx(shared.server_pfx, b"not the password")


def test_password_file_tolerates_a_trailing_newline(tmp_path):
    path = tmp_path / "pw"
    path.write_bytes(b"s3cret\n")
    assert pki.read_password_file(path) == b"s3cret"
    path.write_bytes(b"s3cret\r\n")
    assert pki.read_password_file(path) == b"s3cret"
    path.write_bytes(b"s3cret")
    assert pki.read_password_file(path) == b"s3cret"


def test_write_pfx_uses_a_new_random_password_each_time(tmp_path, cas):
    _, issuing, _ = cas
    cert, key = pki.issue_server_certificate(issuing, "a.example.com", key_type="ec")
    pki.write_pfx(tmp_path / "a.pfx", tmp_path / "a.pfx.password", cert, key, [issuing.cert])
    first = pki.read_password_file(tmp_path / "a.pfx.password")
    pki.write_pfx(tmp_path / "a.pfx", tmp_path / "a.pfx.password", cert, key, [issuing.cert])
    second = pki.read_password_file(tmp_path / "a.pfx.password")
    assert first != second
    assert stat.S_IMODE((tmp_path / "a.pfx.password").stat().st_mode) == 0o600
    assert pki.load_pfx(tmp_path / "a.pfx", second)[1] == cert


# --------------------------------------------------------------------------- key types


def test_ec_certificates(tmp_path):
    cs = pki.init_certificates(tmp_path, key_type="ec")
    for path in (cs.root_ca, cs.issuing_ca, cs.server_cert, cs.client_cert, cs.site_ca,
                 cs.connection_points["CMGCP01"][0]):
        key = first_cert(path).public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    # ... except the token-signing key: site tokens are RS256, so it is RSA 2048 even here,
    # in a certificate the (EC) site CA signed.
    token = first_cert(cs.token_signing[0])
    assert isinstance(token.public_key(), rsa.RSAPublicKey) and token.public_key().key_size == 2048
    token_key = serialization.load_pem_private_key(cs.token_signing[1].read_bytes(), None)
    assert isinstance(token_key, rsa.RSAPrivateKey) and token_key.key_size == 2048
    token.verify_directly_issued_by(first_cert(cs.site_ca))
    assert isinstance(token.signature_hash_algorithm, hashes.SHA256)
    root, issuing = first_cert(cs.root_ca), first_cert(cs.issuing_ca)
    client_verifier(root).verify(first_cert(cs.client_cert), [issuing])
    server_verifier(root).verify(first_cert(cs.server_cert), [issuing])
    key, _, _ = pki.load_pfx(cs.server_pfx, pki.read_password_file(cs.server_pfx_password))
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert any("cmg-server.pem" in line and ", ec, " in line for line in pki.describe(cs))


def test_rsa4096_certificates(tmp_path):
    # The only RSA-4096 test: generating nine 4096-bit keys takes a few seconds.
    cs = pki.init_certificates(tmp_path, key_type="rsa4096")
    for path in (cs.root_ca, cs.issuing_ca, cs.server_cert, cs.client_cert, cs.site_ca,
                 cs.connection_points["CMGCP01"][0], cs.token_signing[0]):
        assert first_cert(path).public_key().key_size == 4096
    root, issuing = first_cert(cs.root_ca), first_cert(cs.issuing_ca)
    server_verifier(root).verify(first_cert(cs.server_cert), [issuing])
    client_verifier(root).verify(first_cert(cs.client_cert), [issuing])


# --------------------------------------------------------------------------- revocation


def test_revoke_adds_serials_and_keeps_existing_entries(tmp_path):
    cs = pki.init_certificates(tmp_path)
    issuing = pki.Authority.load(cs.issuing_ca, cs.issuing_ca_key)
    client = first_cert(cs.client_cert)
    other, _ = pki.issue_client_certificate(issuing, "CLIENT09.corp.contoso.com", key_type="ec")

    def crl():
        return x509.load_pem_x509_crl(cs.issuing_crl.read_bytes())

    number_before = ext(crl(), x509.CRLNumber).value.crl_number
    pki.revoke(tmp_path, client)
    entry = crl().get_revoked_certificate_by_serial_number(client.serial_number)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    assert crl().get_revoked_certificate_by_serial_number(other.serial_number) is None

    pki.revoke(tmp_path, other, x509.ReasonFlags.superseded)
    current = crl()
    assert current.is_signature_valid(issuing.cert.public_key())
    assert current.get_revoked_certificate_by_serial_number(client.serial_number) is not None
    assert current.get_revoked_certificate_by_serial_number(other.serial_number) is not None
    assert len(list(current)) == 2
    assert ext(current, x509.CRLNumber).value.crl_number == number_before + 2

    # Revoking again does not duplicate; a later init keeps the CRL as it is.
    pki.revoke(tmp_path, client)
    assert len(list(crl())) == 2
    data = cs.issuing_crl.read_bytes()
    assert pki.init_certificates(tmp_path).created == ()
    assert cs.issuing_crl.read_bytes() == data


def test_revoke_refuses_a_certificate_from_another_issuer(tmp_path):
    cs = pki.init_certificates(tmp_path, key_type="ec")
    before = snapshot(tmp_path)
    stranger_ca = pki.new_authority("Untrusted Root", key_type="ec")
    stranger, _ = pki.issue_client_certificate(stranger_ca, "STRANGER.corp.contoso.com", key_type="ec")
    with pytest.raises(ValueError):
        pki.revoke(tmp_path, stranger)
    # The issuing CA's name is not enough: the signature has to be the issuing CA's too.
    impostor_ca = pki.new_authority("CMG Emulator Issuing CA", key_type="ec")
    impostor, _ = pki.issue_client_certificate(impostor_ca, "CLIENT01.corp.contoso.com", key_type="ec")
    assert impostor.issuer == first_cert(cs.issuing_ca).subject
    with pytest.raises(ValueError):
        pki.revoke(tmp_path, impostor)
    assert snapshot(tmp_path) == before


def test_revoke_picks_the_crl_of_the_issuer(tmp_path):
    cs = pki.init_certificates(tmp_path, key_type="ec")
    site = pki.Authority.load(cs.site_ca, cs.site_ca_key)
    root = pki.Authority.load(cs.root_ca, cs.root_ca_key)
    cp = first_cert(cs.connection_points["CMGCP01"][0])
    issuing_crl = cs.issuing_crl.read_bytes()
    root_crl = cs.root_crl.read_bytes()

    def load(path):
        return x509.load_pem_x509_crl(path.read_bytes())

    # A connection point certificate lands in the site CA's CRL, and only there.
    pki.revoke(tmp_path, cp, x509.ReasonFlags.cessation_of_operation)
    crl = load(cs.site_crl)
    assert crl.issuer == site.cert.subject and crl.is_signature_valid(site.cert.public_key())
    entry = crl.get_revoked_certificate_by_serial_number(cp.serial_number)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == \
        x509.ReasonFlags.cessation_of_operation
    assert ext(crl, x509.CRLNumber).value.crl_number == 2
    assert cs.issuing_crl.read_bytes() == issuing_crl
    assert load(cs.issuing_crl).get_revoked_certificate_by_serial_number(cp.serial_number) is None
    assert cs.root_crl.read_bytes() == root_crl

    # So does the token-signing certificate; the site CRL keeps both entries.
    token = first_cert(cs.token_signing[0])
    pki.revoke(tmp_path, token)
    crl = load(cs.site_crl)
    assert {e.serial_number for e in crl} == {cp.serial_number, token.serial_number}
    assert ext(crl, x509.CRLNumber).value.crl_number == 3

    # The issuing CA itself is revoked in the root's CRL.
    issuing = first_cert(cs.issuing_ca)
    pki.revoke(tmp_path, issuing)
    crl = load(cs.root_crl)
    assert crl.is_signature_valid(root.cert.public_key())
    assert [e.serial_number for e in crl] == [issuing.serial_number]
    assert cs.issuing_crl.read_bytes() == issuing_crl

    # A later init keeps every CRL (and everything else) as it is.
    before = snapshot(tmp_path)
    assert pki.init_certificates(tmp_path).created == ()
    assert snapshot(tmp_path) == before
    assert pki.certificates_present(tmp_path, SERVICE, ["CMGCP01"])


def test_revoke_into_a_missing_site_crl_starts_a_new_one(tmp_path):
    cs = pki.init_certificates(tmp_path, key_type="ec")
    cs.site_crl.unlink()
    cp = first_cert(cs.connection_points["CMGCP01"][0])
    pki.revoke(tmp_path, cp)
    assert stat.S_IMODE(cs.site_crl.stat().st_mode) == 0o644
    crl = x509.load_pem_x509_crl(cs.site_crl.read_bytes())
    assert [e.serial_number for e in crl] == [cp.serial_number]
    assert pki.certificates_present(tmp_path, SERVICE, ["CMGCP01"])


# --------------------------------------------------------------------------- misc


def test_thumbprint_is_upper_case_sha1_hex(shared):
    cert = first_cert(shared.server_cert)
    tp = pki.thumbprint(cert)
    assert re.fullmatch(r"[0-9A-F]{40}", tp)
    assert tp == hashlib.sha1(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()


def test_authority_load_rejects_a_mismatched_key(shared):
    with pytest.raises(ValueError):
        pki.Authority.load(shared.root_ca, shared.issuing_ca_key)


def test_describe_lists_every_file_without_the_password(shared):
    lines = pki.describe(shared)
    text = "\n".join(lines)
    for name in PUBLIC_FILES | {"cmg-server.pfx"}:
        assert name in text, name
    assert "CN=" + SERVICE in text
    assert "rsa2048" in text and "expires" in text
    assert pki.read_password_file(shared.server_pfx_password).decode() not in text
