"""Certificate revocation from CRL files ("Verify client certificate revocation").

CRLs are read from the configured files, each accepted only if it is signed by the CA
it names and not past its next update; files are re-read as soon as they change (a
stat per check: cheap next to a TLS handshake). When a certificate's issuer has no usable CRL the status is
*unknown*, and the configured policy decides: ``refuse`` (the default, as a Windows
client with revocation checking fails with CERT_REV_FAILED) or ``allow``; both are logged.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes


@dataclass(frozen=True, slots=True)
class RevocationStatus:
    revoked: bool
    unknown: bool
    reason: str = ""


class CRLStore:
    """The CRLs of the configured files, by issuer name."""

    def __init__(self, files: tuple[Path, ...]) -> None:
        self._files = files
        self._mtimes: dict[Path, tuple[int, int] | None] = {}
        self._crls: dict[x509.Name, x509.CertificateRevocationList] = {}
        self._problems: dict[Path, str] = {}

    @property
    def problems(self) -> dict[Path, str]:
        self._refresh()
        return dict(self._problems)

    def _refresh(self) -> None:
        mtimes: dict[Path, tuple[int, int] | None] = {}
        for f in self._files:
            try:
                st = f.stat()
                mtimes[f] = (st.st_mtime_ns, st.st_size)
            except OSError:
                mtimes[f] = None
        if mtimes == self._mtimes:
            return
        self._mtimes = mtimes
        crls: dict[x509.Name, x509.CertificateRevocationList] = {}
        problems: dict[Path, str] = {}
        for f in self._files:
            try:
                data = f.read_bytes()
                crl = (x509.load_pem_x509_crl(data) if b"-----BEGIN" in data
                       else x509.load_der_x509_crl(data))
            except OSError as exc:
                problems[f] = f"cannot read {f}: {exc.strerror}"
                continue
            except ValueError:
                problems[f] = f"{f} is not a CRL"
                continue
            crls[crl.issuer] = crl
        self._crls = crls
        self._problems = problems

    def status(self, cert: x509.Certificate, issuer: x509.Certificate,
               now: dt.datetime | None = None) -> RevocationStatus:
        """Is ``cert`` (issued by ``issuer``) revoked, by its issuer's CRL?"""
        self._refresh()
        subject = cert.subject.rfc4514_string()
        crl = self._crls.get(issuer.subject)
        if crl is None:
            return RevocationStatus(False, True, f"no CRL of {issuer.subject.rfc4514_string()} is available")
        key: CertificatePublicKeyTypes = issuer.public_key()
        if not crl.is_signature_valid(key):  # type: ignore[arg-type]
            return RevocationStatus(False, True, f"the CRL of {issuer.subject.rfc4514_string()} is not signed by it")
        when = now or dt.datetime.now(dt.timezone.utc)
        if crl.next_update_utc is not None and crl.next_update_utc < when:
            return RevocationStatus(False, True, f"the CRL of {issuer.subject.rfc4514_string()} expired "
                                                 f"{crl.next_update_utc:%Y-%m-%d %H:%M} UTC")
        entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        if entry is not None:
            return RevocationStatus(True, False, f"'{subject}' (serial {cert.serial_number:X}) is revoked "
                                                 f"since {entry.revocation_date_utc:%Y-%m-%d %H:%M} UTC")
        return RevocationStatus(False, False)
