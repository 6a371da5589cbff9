"""The site's signing certificates: the MP's signing certificate and the site server's.

Made with ``cryptography`` on first start and kept in ``data_dir/signing/`` so that
MPCERT and SITESIGNCERT return the same bytes across restarts (a client pins them).
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class SigningCertificates:
    mp_signing_der: bytes
    site_signing_der: bytes

    @property
    def mp_signing_hex(self) -> str:
        return self.mp_signing_der.hex().upper()

    @property
    def site_signing_hex(self) -> str:
        return self.site_signing_der.hex().upper()


def _atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _self_signed(common_name: str, friendly: str) -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, friendly),
    ])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False,
                          crl_sign=False, encipher_only=False, decipher_only=False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.DER), key_pem


def _load_or_make(folder: Path, stem: str, common_name: str, friendly: str) -> bytes:
    cert_path = folder / f"{stem}.cer"
    key_path = folder / f"{stem}.key"
    if cert_path.exists() and key_path.exists():
        der = cert_path.read_bytes()
        x509.load_der_x509_certificate(der)  # a damaged file must fail loudly at start-up
        return der
    der, key_pem = _self_signed(common_name, friendly)
    _atomic_write(key_path, key_pem)
    _atomic_write(cert_path, der, 0o644)
    return der


def load_or_create(data_dir: Path, site_code: str, mp_name: str) -> SigningCertificates:
    """Read the signing certificates from ``data_dir/signing``, creating them the first time."""
    folder = data_dir / "signing"
    folder.mkdir(parents=True, exist_ok=True)
    return SigningCertificates(
        mp_signing_der=_load_or_make(folder, "mp-signing", mp_name, "SMS Signing Certificate"),
        site_signing_der=_load_or_make(folder, "site-signing", f"Site Server {site_code}",
                                       "Site Server Signing Certificate"),
    )
