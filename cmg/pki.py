"""The emulator's own PKI: the certificates a CMG deployment needs, made locally.

A real Cloud Management Gateway needs:

* a server-authentication certificate whose CN is the *service name* (for example
  ``GraniteFalls.WestUS.CloudApp.Azure.Com``), uploaded to Azure as a PFX;
* for PKI client authentication, client-auth certificates chaining to a root that is
  uploaded to the CMG (with intermediates), and reachable CRLs;
* for the connection point, a "cloud proxy connector" certificate that the *site*
  issues from its own CA (``SMS Issuing - <site code>``), which the CMG trusts only for
  the tunnel.

This module creates all of that in one directory with ``cryptography`` alone:

==============================  =====================================================
``root-ca.pem`` / ``.key``      self-signed root (the trusted client root), 10 years
``issuing-ca.pem`` / ``.key``   intermediate under the root (pathlen 0), 5 years
``root-ca.crl``                 CRL signed by the root, next update in 7 days
``issuing-ca.crl``              CRL signed by the issuing CA, next update in 7 days
``cmg-server.pem`` / ``.key``   server cert (leaf + issuing CA), CN = service name
``cmg-server.pfx``              the same as PKCS#12, password in
                                ``cmg-server.pfx.password`` (mode 0600)
``client.pem`` / ``.key``       the default internet client ``CLIENT01.corp.contoso.com``
``client-<NN>.pem`` / ``.key``  further clients (``CLIENT<NN>...``), NN from 02
``site-ca.pem`` / ``.key``      the site's separate self-signed connector CA
``site-ca.crl``                 CRL signed by the site CA, next update in 7 days
``connection-point-<N>.pem``    connection point certificate (issued by the site CA)
``token-signing.pem`` / ``.key``  the site's token-signing certificate (issued by the
                                site CA, 2 years, always RSA: site tokens are RS256)
==============================  =====================================================

Every file holding a private key (``*.key``, the PFX and its password file) is
created mode 0600 from the start; files are written to a temporary name and renamed
into place, so a reader never sees a half-written file.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "KEY_TYPES",
    "DEFAULT_SERVICE_NAME",
    "DEFAULT_CLIENT_NAME",
    "PrivateKey",
    "Authority",
    "CertificateSet",
    "generate_key",
    "key_type_of",
    "init_certificates",
    "certificates_present",
    "issue_client_certificate",
    "issue_server_certificate",
    "issue_connection_point_certificate",
    "issue_token_signing_certificate",
    "new_authority",
    "write_pem_bundle",
    "write_private_key",
    "write_pfx",
    "load_pfx",
    "load_pem_certificates",
    "read_password_file",
    "revoke",
    "thumbprint",
    "token_signing_kid",
    "describe",
]

PrivateKey = Union[rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey]

KEY_TYPES = ("rsa2048", "rsa4096", "ec")
# "rsa1024" is accepted by generate_key() only, so tests can build a too-weak key and
# hand it to issue_client_certificate(key=...). It is deliberately not in KEY_TYPES.
_ALL_KEY_TYPES = KEY_TYPES + ("rsa1024",)

DEFAULT_SERVICE_NAME = "GraniteFalls.WestUS.CloudApp.Azure.Com"
DEFAULT_CLIENT_NAME = "CLIENT01.corp.contoso.com"
DEFAULT_SITE_CODE = "PS1"
DEFAULT_CONNECTION_POINT = "CMGCP01"

ROOT_CA_NAME = "CMG Emulator Root CA"
ISSUING_CA_NAME = "CMG Emulator Issuing CA"
CONNECTION_POINT_ORGANIZATION = "Cloud Proxy Connector"
TOKEN_SIGNING_ORGANIZATION = "Configuration Manager"

ROOT_LIFETIME = _dt.timedelta(days=3650)
ISSUING_LIFETIME = _dt.timedelta(days=5 * 365)
LEAF_LIFETIME = _dt.timedelta(days=365)
TOKEN_SIGNING_LIFETIME = _dt.timedelta(days=2 * 365)
CRL_LIFETIME = _dt.timedelta(days=7)
# Certificates start a little in the past so a peer whose clock is slightly behind
# still accepts a certificate made a moment ago.
BACKDATE = _dt.timedelta(minutes=5)

# File names (a contract: cmg/config.py and the CLI use them).
ROOT_CA_CERT = "root-ca.pem"
ROOT_CA_KEY = "root-ca.key"
ROOT_CRL = "root-ca.crl"
ISSUING_CA_CERT = "issuing-ca.pem"
ISSUING_CA_KEY = "issuing-ca.key"
ISSUING_CRL = "issuing-ca.crl"
SERVER_CERT = "cmg-server.pem"
SERVER_KEY = "cmg-server.key"
SERVER_PFX = "cmg-server.pfx"
SERVER_PFX_PASSWORD = "cmg-server.pfx.password"
CLIENT_CERT = "client.pem"
CLIENT_KEY = "client.key"
SITE_CA_CERT = "site-ca.pem"
SITE_CA_KEY = "site-ca.key"
SITE_CRL = "site-ca.crl"
TOKEN_SIGNING_CERT = "token-signing.pem"
TOKEN_SIGNING_KEY = "token-signing.key"

# Same rules as cmg/config.py applies to its settings.
_SITE_CODE_RE = re.compile(r"^[A-Za-z0-9]{3}$")
_CONNECTOR_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def connection_point_files(name: str) -> tuple[str, str]:
    """File names (certificate, key) of connection point ``name``."""
    return f"connection-point-{name}.pem", f"connection-point-{name}.key"


def client_files(number: int) -> tuple[str, str]:
    """File names of simulated client ``number`` (1 is the default ``client.pem``)."""
    if number == 1:
        return CLIENT_CERT, CLIENT_KEY
    return f"client-{number:02d}.pem", f"client-{number:02d}.key"


def client_common_name(number: int) -> str:
    return f"CLIENT{number:02d}.corp.contoso.com"


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


# --------------------------------------------------------------------------- keys


def generate_key(key_type: str = "rsa2048") -> PrivateKey:
    """A new private key: ``rsa2048`` (default), ``rsa4096`` or ``ec`` (P-256).

    ``rsa1024`` is also accepted, only so tests can make a deliberately weak key.
    """
    if key_type == "rsa2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "rsa4096":
        return rsa.generate_private_key(public_exponent=65537, key_size=4096)
    if key_type == "rsa1024":
        return rsa.generate_private_key(public_exponent=65537, key_size=1024)
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"unknown key type {key_type!r} (choose from {', '.join(KEY_TYPES)})")


def _check_key_type(key_type: str) -> None:
    if key_type not in KEY_TYPES:
        raise ValueError(f"unknown key type {key_type!r} (choose from {', '.join(KEY_TYPES)})")


def key_type_of(key: object) -> str:
    """A short description of a public or private key: ``rsa2048``, ``ec-secp256r1``..."""
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return f"rsa{key.key_size}"
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return "ec" if key.curve.name == "secp256r1" else f"ec-{key.curve.name}"
    return type(key).__name__


def _signature_hash(key: PrivateKey) -> hashes.HashAlgorithm:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _public_bytes(key) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _key_matches(cert: x509.Certificate, key: PrivateKey) -> bool:
    return _public_bytes(cert.public_key()) == _public_bytes(key.public_key())


# --------------------------------------------------------------------------- files


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a temporary file created with ``mode``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600 already; set the exact final mode explicitly
        # (a restrictive umask would otherwise not matter, a permissive one cannot
        # widen it).
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd != -1:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _ensure_directory(directory: Path) -> Path:
    directory = Path(directory)
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
    elif not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    return directory


def write_pem_bundle(path: Path, certs: Sequence[x509.Certificate]) -> None:
    """Write certificates (leaf first) as one PEM file, mode 0644."""
    if not certs:
        raise ValueError("no certificates to write")
    data = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    _atomic_write(Path(path), data, 0o644)


def write_private_key(path: Path, key: PrivateKey) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM, mode 0600 from creation."""
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _atomic_write(Path(path), data, 0o600)


def load_pem_certificates(path: Path) -> list[x509.Certificate]:
    """All certificates in a PEM file, in file order."""
    return x509.load_pem_x509_certificates(Path(path).read_bytes())


def _load_private_key(path: Path) -> PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise ValueError(f"{path}: unsupported key type {type(key).__name__}")
    return key


def read_password_file(path: Path) -> bytes:
    """The password in ``path``, without one trailing newline (LF or CRLF) if present."""
    data = Path(path).read_bytes()
    if data.endswith(b"\r\n"):
        return data[:-2]
    if data.endswith(b"\n"):
        return data[:-1]
    return data


def write_pfx(
    path: Path,
    password_path: Path,
    cert: x509.Certificate,
    key: PrivateKey,
    chain: Sequence[x509.Certificate],
) -> None:
    """Write key + cert + chain as PKCS#12 under a new random password.

    The password (``secrets.token_urlsafe(24)``, no trailing newline) goes to
    ``password_path``; both files are mode 0600. The PFX uses the strongest
    encryption ``cryptography`` offers (PBES2, AES-256-CBC, SHA-256 MAC), which
    OpenSSL 1.1+/3 and Windows Server 2019+/Windows 10 1709+ read.
    """
    password = secrets.token_urlsafe(24).encode("ascii")
    name = _common_name(cert) or "certificate"
    data = pkcs12.serialize_key_and_certificates(
        name=name.encode("utf-8"),
        key=key,
        cert=cert,
        cas=list(chain) or None,
        encryption_algorithm=serialization.BestAvailableEncryption(password),
    )
    # Password first: a PFX on disk is never without its password file.
    _atomic_write(Path(password_path), password, 0o600)
    _atomic_write(Path(path), data, 0o600)


def load_pfx(
    path: Path, password: bytes
) -> tuple[PrivateKey, x509.Certificate, list[x509.Certificate]]:
    """(key, certificate, chain) from a PKCS#12 file. A wrong password raises ValueError."""
    if isinstance(password, str):
        password = password.encode("utf-8")
    key, cert, chain = pkcs12.load_key_and_certificates(Path(path).read_bytes(), password)
    if key is None or cert is None:
        raise ValueError(f"{path}: PKCS#12 file has no private key or no certificate")
    return key, cert, list(chain)


# --------------------------------------------------------------------------- certificates


def _common_name(cert: x509.Certificate) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = []
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _authority_key_identifier(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())


def _leaf_key_usage(key: PrivateKey, encipherment: bool = True) -> x509.KeyUsage:
    """digitalSignature, plus keyEncipherment for an RSA key unless ``encipherment=False``."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=encipherment and isinstance(key, rsa.RSAPrivateKey),
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class Authority:
    """A certificate authority: its certificate and private key."""

    cert: x509.Certificate
    key: PrivateKey

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> "Authority":
        """Load from PEM files (the first certificate of ``cert_path`` is the CA's)."""
        certs = load_pem_certificates(cert_path)
        key = _load_private_key(key_path)
        if not _key_matches(certs[0], key):
            raise ValueError(f"{key_path} is not the private key of {cert_path}")
        return cls(certs[0], key)

    @property
    def name(self) -> str:
        return _common_name(self.cert) or self.cert.subject.rfc4514_string()

    def sign(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        return builder.sign(self.key, _signature_hash(self.key))


def _default_window(
    issuer: x509.Certificate | None,
    lifetime: _dt.timedelta,
    not_before: _dt.datetime | None,
    not_after: _dt.datetime | None,
) -> tuple[_dt.datetime, _dt.datetime]:
    now = _now()
    start = not_before if not_before is not None else now - BACKDATE
    if not_after is not None:
        return start, not_after
    end = now + lifetime
    # A default validity never outlives the issuer (explicit not_after is honoured as
    # given, so tests can build odd certificates on purpose).
    if issuer is not None:
        end = min(end, issuer.not_valid_after_utc)
    return start, end


def new_authority(
    common_name: str,
    *,
    key_type: str = "rsa2048",
    parent: Authority | None = None,
    path_length: int | None = None,
    organization: str | None = None,
    lifetime: _dt.timedelta | None = None,
) -> Authority:
    """A new CA: self-signed when ``parent`` is None, otherwise issued by ``parent``.

    Default lifetime is 10 years for a root and 5 for an intermediate (capped at the
    parent's expiry). ``path_length`` None means unlimited.
    """
    _check_key_type(key_type)
    key = generate_key(key_type)
    subject = _name(common_name, organization)
    if lifetime is None:
        lifetime = ROOT_LIFETIME if parent is None else ISSUING_LIFETIME
    start, end = _default_window(parent.cert if parent else None, lifetime, None, None)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(parent.cert.subject if parent else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
    )
    if parent is not None:
        builder = builder.add_extension(_authority_key_identifier(parent.cert), critical=False)
        cert = parent.sign(builder)
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        cert = builder.sign(key, _signature_hash(key))
    return Authority(cert, key)


def _issue_leaf(
    ca: Authority,
    subject: x509.Name,
    *,
    key: PrivateKey,
    dns_names: Sequence[str],
    extended_key_usage: Sequence[x509.ObjectIdentifier] | None,
    not_before: _dt.datetime | None,
    not_after: _dt.datetime | None,
    key_usage: x509.KeyUsage | None = None,
    lifetime: _dt.timedelta = LEAF_LIFETIME,
) -> x509.Certificate:
    start, end = _default_window(ca.cert, lifetime, not_before, not_after)
    if key_usage is None:
        key_usage = _leaf_key_usage(key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_identifier(ca.cert), critical=False)
    )
    if dns_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False
        )
    if extended_key_usage is not None:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(list(extended_key_usage)), critical=False
        )
    return ca.sign(builder)


def issue_client_certificate(
    ca: Authority,
    common_name: str,
    *,
    key_type: str = "rsa2048",
    not_before: _dt.datetime | None = None,
    not_after: _dt.datetime | None = None,
    extended_key_usage: Sequence[x509.ObjectIdentifier] | None = (ExtendedKeyUsageOID.CLIENT_AUTH,),
    key: PrivateKey | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """A client-auth leaf for ``common_name`` (also its SAN dNSName), 1 year by default.

    For negative tests: explicit ``not_before``/``not_after`` (expired, not yet valid),
    another ``extended_key_usage`` (``None`` leaves the extension out), or a ready
    ``key`` (for example ``generate_key("rsa1024")``; ``key_type`` is then ignored).
    """
    if key is None:
        _check_key_type(key_type)
        key = generate_key(key_type)
    cert = _issue_leaf(
        ca,
        _name(common_name),
        key=key,
        dns_names=[common_name],
        extended_key_usage=extended_key_usage,
        not_before=not_before,
        not_after=not_after,
    )
    return cert, key


def issue_server_certificate(
    ca: Authority,
    service_name: str,
    *,
    key_type: str = "rsa2048",
    not_after: _dt.datetime | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """The CMG server-auth certificate: CN and SAN dNSName = ``service_name`` exactly."""
    _check_service_name(service_name)
    _check_key_type(key_type)
    key = generate_key(key_type)
    cert = _issue_leaf(
        ca,
        _name(service_name),
        key=key,
        dns_names=[service_name],
        extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH,),
        not_before=None,
        not_after=not_after,
    )
    return cert, key


def issue_connection_point_certificate(
    site_ca: Authority, name: str, *, key_type: str = "rsa2048"
) -> tuple[x509.Certificate, PrivateKey]:
    """The site-issued "cloud proxy connector" certificate of connection point ``name``."""
    _check_connection_point_name(name)
    _check_key_type(key_type)
    key = generate_key(key_type)
    cert = _issue_leaf(
        site_ca,
        _name(name, CONNECTION_POINT_ORGANIZATION),
        key=key,
        dns_names=[name],
        extended_key_usage=(ExtendedKeyUsageOID.CLIENT_AUTH,),
        not_before=None,
        not_after=None,
    )
    return cert, key


def _token_signing_name(site_code: str) -> str:
    return f"ConfigMgr Token Signing - {site_code.upper()}"


def _token_signing_key_type(key_type: str) -> str:
    # Site-issued tokens are RS256, so the key is RSA whatever the deployment's
    # key_type: 4096 bits when asked for, otherwise 2048 (also for "ec").
    return "rsa4096" if key_type == "rsa4096" else "rsa2048"


def issue_token_signing_certificate(
    site_ca: Authority, site_code: str, *, key_type: str = "rsa2048"
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """The site's token-signing certificate, issued by the site CA.

    CN ``ConfigMgr Token Signing - <SITE CODE>``, O ``Configuration Manager``, key
    usage digitalSignature only, no EKU, no SAN, 2 years (capped at the site CA's
    validity). The key is always RSA (site tokens are RS256): 4096 bits for
    ``key_type="rsa4096"``, 2048 otherwise, including ``"ec"``.
    """
    _check_site_code(site_code)
    _check_key_type(key_type)
    key = generate_key(_token_signing_key_type(key_type))
    cert = _issue_leaf(
        site_ca,
        _name(_token_signing_name(site_code), TOKEN_SIGNING_ORGANIZATION),
        key=key,
        dns_names=(),
        extended_key_usage=None,
        not_before=None,
        not_after=None,
        key_usage=_leaf_key_usage(key, encipherment=False),  # digitalSignature only
        lifetime=TOKEN_SIGNING_LIFETIME,
    )
    return cert, key


def thumbprint(cert: x509.Certificate) -> str:
    """SHA-1 thumbprint as Windows shows it: 40 upper-case hex digits, no separators."""
    return cert.fingerprint(hashes.SHA1()).hex().upper()


def token_signing_kid(cert: x509.Certificate) -> str:
    """The ``kid`` JWT header for tokens signed with ``cert``'s key: its thumbprint
    (SHA-1, 40 upper-case hex digits), stable for as long as the certificate is."""
    return thumbprint(cert)


# --------------------------------------------------------------------------- CRLs


def _build_crl(
    ca: Authority,
    revoked: Iterable[x509.RevokedCertificate],
    number: int,
) -> x509.CertificateRevocationList:
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - BACKDATE)
        .next_update(now + CRL_LIFETIME)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(_authority_key_identifier(ca.cert), critical=False)
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(ca.key, _signature_hash(ca.key))


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


def _write_crl(path: Path, crl: x509.CertificateRevocationList) -> None:
    _atomic_write(Path(path), crl.public_bytes(serialization.Encoding.PEM), 0o644)


def _load_crl(path: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(Path(path).read_bytes())


# (CA certificate, CA key, its CRL), in the order revoke() tries them.
_REVOCATION_AUTHORITIES = (
    (ISSUING_CA_CERT, ISSUING_CA_KEY, ISSUING_CRL),
    (SITE_CA_CERT, SITE_CA_KEY, SITE_CRL),
    (ROOT_CA_CERT, ROOT_CA_KEY, ROOT_CRL),
)


def _revoking_authority(directory: Path, cert: x509.Certificate) -> tuple[Authority, Path]:
    """The directory's CA that issued ``cert`` (name and signature) and its CRL path."""
    tried: list[str] = []
    for cert_name, key_name, crl_name in _REVOCATION_AUTHORITIES:
        try:
            ca_cert = load_pem_certificates(directory / cert_name)[0]
        except FileNotFoundError:
            continue
        tried.append(ca_cert.subject.rfc4514_string())
        if cert.issuer == ca_cert.subject and _issued_by(cert, ca_cert):
            return Authority.load(directory / cert_name, directory / key_name), directory / crl_name
    if not tried:
        raise FileNotFoundError(f"no CA certificate in {directory}")
    raise ValueError(
        f"certificate (issuer {cert.issuer.rfc4514_string()}) was not issued by any CA in "
        f"{directory} ({'; '.join(tried)}); its serial belongs in none of its CRLs"
    )


def revoke(
    directory: Path,
    cert: x509.Certificate,
    reason: x509.ReasonFlags = x509.ReasonFlags.key_compromise,
) -> None:
    """Add ``cert`` to its issuer's CRL (keeping existing entries) and re-sign it.

    The CRL is chosen by the CA that issued ``cert`` (subject name and signature):
    the issuing CA -> ``issuing-ca.crl`` (clients, the server), the site CA ->
    ``site-ca.crl`` (connection points, token signing), the root -> ``root-ca.crl``
    (the issuing CA). A certificate from any other CA raises ValueError. Revoking a
    serial that is already listed only refreshes the CRL. The CRL number goes up by one.
    """
    directory = Path(directory)
    ca, crl_path = _revoking_authority(directory, cert)
    entries: list[x509.RevokedCertificate] = []
    number = 0
    old = _crl_usable(crl_path, ca.cert)  # None when missing, unreadable or not ca's
    if old is not None:
        entries = list(old)
        number = _crl_number(old)
    if not any(e.serial_number == cert.serial_number for e in entries):
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(_now())
        )
        if reason is not None and reason != x509.ReasonFlags.unspecified:
            entry = entry.add_extension(x509.CRLReason(reason), critical=False)
        entries.append(entry.build())
    _write_crl(crl_path, _build_crl(ca, entries, number + 1))


# --------------------------------------------------------------------------- the set


@dataclass(frozen=True)
class CertificateSet:
    """Paths of every file in a certificates directory, and which were just written."""

    directory: Path
    root_ca: Path
    root_ca_key: Path
    issuing_ca: Path
    issuing_ca_key: Path
    issuing_crl: Path
    root_crl: Path
    server_cert: Path
    server_key: Path
    server_pfx: Path
    server_pfx_password: Path
    client_cert: Path
    client_key: Path
    site_ca: Path
    site_ca_key: Path
    site_crl: Path
    # (certificate, key) of the site's token-signing certificate.
    token_signing: tuple[Path, Path]
    connection_points: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    # Every client (cert, key) including the default one first.
    clients: tuple[tuple[Path, Path], ...] = ()
    # File names (not paths) written by the call that returned this set.
    created: tuple[str, ...] = ()


def _check_service_name(service_name: str) -> None:
    if (
        not service_name
        or len(service_name) > 253
        or any(c.isspace() or c in "/\\:@" for c in service_name)
        or not service_name.isascii()
    ):
        raise ValueError(f"invalid service name {service_name!r}")


def _check_connection_point_name(name: str) -> None:
    if not _CONNECTOR_NAME_RE.match(name):
        raise ValueError(f"invalid connection point name {name!r}")


def _check_site_code(site_code: str) -> None:
    if not _SITE_CODE_RE.match(site_code):
        raise ValueError(f"invalid site code {site_code!r} (three letters or digits)")


def _site_ca_name(site_code: str) -> str:
    return f"SMS Issuing - {site_code.upper()}"


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def _current(cert: x509.Certificate) -> bool:
    now = _now()
    return cert.not_valid_before_utc <= now + BACKDATE and now < cert.not_valid_after_utc


def _load_usable(
    cert_path: Path, key_path: Path, issuer: x509.Certificate | None
) -> tuple[x509.Certificate, PrivateKey] | None:
    """(cert, key) if both files load, match, are currently valid and ``issuer`` (or,
    for None, the certificate itself) signed the certificate; otherwise None."""
    try:
        cert = load_pem_certificates(cert_path)[0]
        key = _load_private_key(key_path)
    except (OSError, ValueError, TypeError):
        return None
    if not _key_matches(cert, key) or not _current(cert):
        return None
    if not _issued_by(cert, issuer if issuer is not None else cert):
        return None
    if issuer is None and not _is_ca(cert):  # the self-signed ones here are all CAs
        return None
    return cert, key


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _crl_usable(path: Path, ca: x509.Certificate) -> x509.CertificateRevocationList | None:
    try:
        crl = _load_crl(path)
    except (OSError, ValueError):
        return None
    if crl.issuer != ca.subject or not crl.is_signature_valid(ca.public_key()):
        return None
    return crl


def _crl_fresh(crl: x509.CertificateRevocationList) -> bool:
    nu = crl.next_update_utc
    return nu is not None and nu > _now()


def _pfx_usable(pfx: Path, password_file: Path, cert: x509.Certificate) -> bool:
    try:
        _, pcert, _ = load_pfx(pfx, read_password_file(password_file))
    except (OSError, ValueError, TypeError):
        return False
    return pcert == cert


def _paths(d: Path, connection_points: Sequence[str], clients: int) -> CertificateSet:
    return CertificateSet(
        directory=d,
        root_ca=d / ROOT_CA_CERT,
        root_ca_key=d / ROOT_CA_KEY,
        issuing_ca=d / ISSUING_CA_CERT,
        issuing_ca_key=d / ISSUING_CA_KEY,
        issuing_crl=d / ISSUING_CRL,
        root_crl=d / ROOT_CRL,
        server_cert=d / SERVER_CERT,
        server_key=d / SERVER_KEY,
        server_pfx=d / SERVER_PFX,
        server_pfx_password=d / SERVER_PFX_PASSWORD,
        client_cert=d / CLIENT_CERT,
        client_key=d / CLIENT_KEY,
        site_ca=d / SITE_CA_CERT,
        site_ca_key=d / SITE_CA_KEY,
        site_crl=d / SITE_CRL,
        token_signing=(d / TOKEN_SIGNING_CERT, d / TOKEN_SIGNING_KEY),
        connection_points={
            n: tuple(d / f for f in connection_point_files(n)) for n in connection_points
        },
        clients=tuple(
            tuple(d / f for f in client_files(i)) for i in range(1, clients + 1)
        ),
    )


def _validate(
    service_name: str,
    site_code: str,
    connection_points: Sequence[str],
    clients: int,
    key_type: str,
) -> tuple[str, ...]:
    _check_service_name(service_name)
    _check_site_code(site_code)
    _check_key_type(key_type)
    if isinstance(connection_points, str):
        connection_points = (connection_points,)
    for n in connection_points:
        _check_connection_point_name(n)
    if not isinstance(clients, int) or not 1 <= clients <= 99:
        raise ValueError(f"clients must be between 1 and 99, not {clients!r}")
    return tuple(dict.fromkeys(connection_points))


def init_certificates(
    directory: Path,
    *,
    service_name: str = DEFAULT_SERVICE_NAME,
    site_code: str = DEFAULT_SITE_CODE,
    connection_points: Sequence[str] = (DEFAULT_CONNECTION_POINT,),
    clients: int = 1,
    key_type: str = "rsa2048",
    force: bool = False,
) -> CertificateSet:
    """Create whatever is missing from ``directory`` (everything with ``force``).

    A file pair is (re)made when it is missing, unreadable, expired, its key does not
    match, or it is not signed by the CA now in the directory; making a CA anew
    re-makes everything under it. The server certificate (and PFX) is also re-made
    when its CN is not exactly ``service_name``; the site CA when its CN is not
    ``SMS Issuing - <site_code>``. Existing files are kept whatever their key type:
    ``key_type`` applies to what is created. The returned set's ``created`` lists the
    file names written by this call.
    """
    connection_points = _validate(service_name, site_code, connection_points, clients, key_type)
    d = _ensure_directory(directory)
    cs = _paths(d, connection_points, clients)
    created: list[str] = []

    def keep(cert_path: Path, key_path: Path, issuer: x509.Certificate | None, fresh_issuer: bool):
        if force or fresh_issuer:
            return None
        return _load_usable(cert_path, key_path, issuer)

    def save(cert_path: Path, key_path: Path, certs: Sequence[x509.Certificate], key) -> None:
        write_private_key(key_path, key)
        write_pem_bundle(cert_path, certs)
        created.extend((cert_path.name, key_path.name))

    # Root CA.
    pair = keep(cs.root_ca, cs.root_ca_key, None, False)
    root_new = pair is None
    root = new_authority(ROOT_CA_NAME, key_type=key_type) if root_new else Authority(*pair)
    if root_new:
        save(cs.root_ca, cs.root_ca_key, [root.cert], root.key)

    # Issuing CA.
    pair = keep(cs.issuing_ca, cs.issuing_ca_key, root.cert, root_new)
    issuing_new = pair is None
    if issuing_new:
        issuing = new_authority(ISSUING_CA_NAME, key_type=key_type, parent=root, path_length=0)
        save(cs.issuing_ca, cs.issuing_ca_key, [issuing.cert], issuing.key)
    else:
        issuing = Authority(*pair)

    def refresh_crl(ca: Authority, path: Path, ca_new: bool) -> None:
        # A new CRL when missing or not signed by the current CA; a stale one is
        # re-signed with its entries.
        crl = None if (force or ca_new) else _crl_usable(path, ca.cert)
        if crl is None:
            _write_crl(path, _build_crl(ca, [], 1))
            created.append(path.name)
        elif not _crl_fresh(crl):
            _write_crl(path, _build_crl(ca, list(crl), _crl_number(crl) + 1))
            created.append(path.name)

    refresh_crl(root, cs.root_crl, root_new)
    refresh_crl(issuing, cs.issuing_crl, issuing_new)

    # Server certificate and PFX.
    pair = keep(cs.server_cert, cs.server_key, issuing.cert, issuing_new)
    if pair is not None and _common_name(pair[0]) != service_name:
        pair = None
    if pair is None:
        server_cert, server_key = issue_server_certificate(issuing, service_name, key_type=key_type)
        save(cs.server_cert, cs.server_key, [server_cert, issuing.cert], server_key)
        server_new = True
    else:
        server_cert, server_key = pair
        server_new = False
    if server_new or not _pfx_usable(cs.server_pfx, cs.server_pfx_password, server_cert):
        write_pfx(cs.server_pfx, cs.server_pfx_password, server_cert, server_key, [issuing.cert])
        created.extend((cs.server_pfx_password.name, cs.server_pfx.name))

    # Simulated internet clients.
    for number, (cert_path, key_path) in enumerate(cs.clients, start=1):
        if keep(cert_path, key_path, issuing.cert, issuing_new) is None:
            cert, key = issue_client_certificate(
                issuing, client_common_name(number), key_type=key_type
            )
            save(cert_path, key_path, [cert, issuing.cert], key)

    # The site's own CA and the connection point certificates it issues.
    pair = keep(cs.site_ca, cs.site_ca_key, None, False)
    if pair is not None and _common_name(pair[0]) != _site_ca_name(site_code):
        pair = None
    site_new = pair is None
    if site_new:
        site = new_authority(_site_ca_name(site_code), key_type=key_type)
        save(cs.site_ca, cs.site_ca_key, [site.cert], site.key)
    else:
        site = Authority(*pair)
    refresh_crl(site, cs.site_crl, site_new)
    for name, (cert_path, key_path) in cs.connection_points.items():
        pair = keep(cert_path, key_path, site.cert, site_new)
        if pair is not None and _common_name(pair[0]) != name:
            pair = None
        if pair is None:
            cert, key = issue_connection_point_certificate(site, name, key_type=key_type)
            save(cert_path, key_path, [cert], key)

    # The site's token-signing certificate (always RSA: site tokens are RS256).
    cert_path, key_path = cs.token_signing
    pair = keep(cert_path, key_path, site.cert, site_new)
    if pair is not None and not _token_signing_ok(pair, _token_signing_name(site_code)):
        pair = None
    if pair is None:
        cert, key = issue_token_signing_certificate(site, site_code, key_type=key_type)
        save(cert_path, key_path, [cert], key)

    return dataclasses.replace(cs, created=tuple(created))


def _token_signing_ok(pair: tuple[x509.Certificate, PrivateKey], common_name: str | None) -> bool:
    """An RSA key of at least 2048 bits and, unless None, exactly this CN."""
    cert, key = pair
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < 2048:
        return False
    return common_name is None or _common_name(cert) == common_name


def _site_code_of(site_ca: x509.Certificate) -> str | None:
    """The site code in a site CA's CN ``SMS Issuing - <code>``, or None."""
    name = _common_name(site_ca) or ""
    prefix = _site_ca_name("")
    code = name[len(prefix):] if name.startswith(prefix) else ""
    return code if _SITE_CODE_RE.match(code) else None


def certificates_present(
    directory: Path,
    service_name: str,
    connection_points: Sequence[str],
) -> bool:
    """True when ``init_certificates`` (same names, one client) would write nothing:
    every file is there, loads, is current, chains to the CAs in the directory, the
    server CN is exactly ``service_name`` and the PFX opens with its password file.
    (The site code is not checked: any site CA in place counts, and the token-signing
    certificate must carry that site CA's site code.)"""
    d = Path(directory)
    if isinstance(connection_points, str):
        connection_points = (connection_points,)
    cs = _paths(d, tuple(connection_points), 1)
    root = _load_usable(cs.root_ca, cs.root_ca_key, None)
    if root is None:
        return False
    issuing = _load_usable(cs.issuing_ca, cs.issuing_ca_key, root[0])
    if issuing is None:
        return False
    for path, ca in ((cs.root_crl, root[0]), (cs.issuing_crl, issuing[0])):
        crl = _crl_usable(path, ca)
        if crl is None or not _crl_fresh(crl):
            return False
    server = _load_usable(cs.server_cert, cs.server_key, issuing[0])
    if server is None or _common_name(server[0]) != service_name:
        return False
    if not _pfx_usable(cs.server_pfx, cs.server_pfx_password, server[0]):
        return False
    if _load_usable(cs.client_cert, cs.client_key, issuing[0]) is None:
        return False
    site = _load_usable(cs.site_ca, cs.site_ca_key, None)
    if site is None:
        return False
    crl = _crl_usable(cs.site_crl, site[0])
    if crl is None or not _crl_fresh(crl):
        return False
    for name, (cert_path, key_path) in cs.connection_points.items():
        pair = _load_usable(cert_path, key_path, site[0])
        if pair is None or _common_name(pair[0]) != name:
            return False
    site_code = _site_code_of(site[0])
    token = _load_usable(*cs.token_signing, site[0])
    if token is None or not _token_signing_ok(
        token, _token_signing_name(site_code) if site_code else None
    ):
        return False
    return True


def describe(cs: CertificateSet) -> list[str]:
    """Human-readable lines, one per file: name, subject, expiry, key type, thumbprint.

    Files written by the call that made ``cs`` are marked ``(new)``. Never shows the
    PFX password.
    """
    created = set(cs.created)
    lines: list[str] = [f"Certificates in {cs.directory}:"]

    def mark(path: Path) -> str:
        return " (new)" if path.name in created else ""

    def cert_line(path: Path, key_path: Path | None) -> str:
        try:
            cert = load_pem_certificates(path)[0]
        except (OSError, ValueError) as e:
            return f"  {path.name}: unreadable ({e})"
        expires = cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC")
        key_note = f", key {key_path.name}" if key_path is not None else ""
        return (
            f"  {path.name}{mark(path)}: {cert.subject.rfc4514_string()}, "
            f"expires {expires}, {key_type_of(cert.public_key())}{key_note}, "
            f"thumbprint {thumbprint(cert)}"
        )

    def crl_line(path: Path) -> str:
        try:
            crl = _load_crl(path)
        except (OSError, ValueError) as e:
            return f"  {path.name}: unreadable ({e})"
        nu = crl.next_update_utc
        when = nu.strftime("%Y-%m-%d %H:%M UTC") if nu else "never"
        return (
            f"  {path.name}{mark(path)}: CRL of {crl.issuer.rfc4514_string()}, "
            f"{len(list(crl))} revoked, next update {when}"
        )

    lines.append(cert_line(cs.root_ca, cs.root_ca_key))
    lines.append(crl_line(cs.root_crl))
    lines.append(cert_line(cs.issuing_ca, cs.issuing_ca_key))
    lines.append(crl_line(cs.issuing_crl))
    lines.append(cert_line(cs.server_cert, cs.server_key))
    lines.append(
        f"  {cs.server_pfx.name}{mark(cs.server_pfx)}: PKCS#12 of {cs.server_cert.name} "
        f"with chain, password in {cs.server_pfx_password.name}"
    )
    clients = cs.clients or ((cs.client_cert, cs.client_key),)
    for cert_path, key_path in clients:
        lines.append(cert_line(cert_path, key_path))
    lines.append(cert_line(cs.site_ca, cs.site_ca_key))
    lines.append(crl_line(cs.site_crl))
    for cert_path, key_path in cs.connection_points.values():
        lines.append(cert_line(cert_path, key_path))
    lines.append(cert_line(*cs.token_signing))
    return lines
