"""The CMG's server identity and the TLS contexts of its two listeners.

Client side: pyOpenSSL, because the CMG must *accept* any client certificate during
the handshake and judge it afterwards, so that an untrusted or expired certificate
gets ``403 CMGConnector_Forbidden`` in HTTP rather than a TLS alert. The standard
``ssl`` module has no verify callback and cannot do that; this is the one place the
project uses pyOpenSSL.

Tunnel side: the standard ``ssl`` module with ``CERT_REQUIRED`` against the site's CA
only: a connection point that cannot prove it is the site's gets no tunnel at all.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from cmg.config import TLSFiles


class StartupError(Exception):
    """The gateway cannot start with this configuration; the message says why."""


@dataclass(frozen=True)
class ServerIdentity:
    """The CMG server-auth certificate, its key and its chain (no root)."""

    certificate: x509.Certificate
    key: object
    chain: tuple[x509.Certificate, ...]

    @property
    def common_name(self) -> str:
        names = self.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else ""


def load_server_identity(files: TLSFiles) -> ServerIdentity:
    """Read the server certificate from a PFX (with its password file) or PEM files."""
    path = files.server_certificate
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read the CMG server certificate {path}: {exc.strerror}") from None
    if path.suffix.lower() in (".pfx", ".p12"):
        password = None
        if files.server_pfx_password_file is not None:
            try:
                password = files.server_pfx_password_file.read_bytes().strip()
            except OSError as exc:
                raise StartupError(
                    f"cannot read the PFX password file {files.server_pfx_password_file}: {exc.strerror}"
                ) from None
        try:
            key, cert, extra = pkcs12.load_key_and_certificates(data, password)
        except ValueError:
            raise StartupError(
                f"cannot open the PFX {path}: wrong password or not a PKCS#12 file"
            ) from None
        if cert is None or key is None:
            raise StartupError(f"the PFX {path} must hold the certificate and its private key")
        return ServerIdentity(cert, key, tuple(extra))
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise StartupError(f"{path} is neither a PFX nor a PEM certificate") from None
    key_data = files.server_key.read_bytes() if files.server_key else data
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError):
        raise StartupError(
            f"no usable private key for {path} (set certificates.server_key to the PEM key file)"
        ) from None
    return ServerIdentity(certs[0], key, tuple(certs[1:]))


def check_service_name(identity: ServerIdentity, service_name: str) -> None:
    """Refuse to start when the certificate's CN is not exactly the service name."""
    cn = identity.common_name
    if cn != service_name:
        raise StartupError(
            f"the CMG server certificate's CN '{cn}' does not match the service name "
            f"'{service_name}': the CN must be the service name exactly, case included"
        )


def client_context(identity: ServerIdentity, trusted_roots: tuple[x509.Certificate, ...],
                   enforce_tls12: bool) -> SSL.Context:
    """The client-facing TLS context: asks for a client certificate, accepts any."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    if enforce_tls12:
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    else:
        # "Enforce TLS 1.2" off: allow 1.0/1.1 where the local OpenSSL build allows.
        ctx.set_min_proto_version(SSL.TLS1_VERSION)
        ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    # OP_NO_TICKET: sessions resume from this instance's session cache (TLS 1.2: session
    # ids; TLS 1.3: stateful tickets), not from tickets the client carries. A stateless
    # ticket is decoded into a new session object on every resumption, the client's
    # certificate parsed again with it, and that copy lives as long as the connection:
    # ~7 KiB more per idle connection. Cached sessions share the certificate.
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION
                    | SSL.OP_NO_TICKET)
    # An idle connection keeps no record buffers (about 34 KiB each otherwise), as nginx does.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    ctx.use_certificate(identity.certificate)
    ctx.use_privatekey(identity.key)  # type: ignore[arg-type]
    for cert in identity.chain:
        ctx.add_extra_chain_cert(cert)
    ctx.check_privatekey()
    for root in trusted_roots:
        ctx.add_client_ca(root)  # the CA names the client uses to pick its certificate
    # Accept every certificate at the TLS layer; gateway.client_auth judges it.
    ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: True)
    ctx.set_session_id(b"cmg-gateway")
    ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    ctx.set_alpn_select_callback(_select_http11)
    return ctx


def _select_http11(conn: SSL.Connection, offered: list[bytes]) -> bytes:
    return b"http/1.1" if b"http/1.1" in offered else SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]


def tunnel_context(files: TLSFiles) -> ssl.SSLContext:
    """The tunnel endpoint's context: mutual TLS, connection points of this site only."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    identity_pem = files.server_certificate
    if identity_pem.suffix.lower() in (".pfx", ".p12"):
        # ssl cannot read PKCS#12: hand it the same identity through a private temp file.
        ident = load_server_identity(files)
        _load_identity(ctx, ident)
    else:
        ctx.load_cert_chain(str(identity_pem), str(files.server_key) if files.server_key else None)
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=str(files.connection_point_ca))
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"cannot load the site CA {files.connection_point_ca}: {exc}") from None
    return ctx


def _load_identity(ctx: ssl.SSLContext, ident: ServerIdentity) -> None:
    import tempfile

    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (ident.certificate, *ident.chain))
    key = ident.key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd, name = tempfile.mkstemp(prefix="cmg-identity-", suffix=".pem")
    try:
        os.write(fd, key + pem)
        os.close(fd)
        ctx.load_cert_chain(name)
    finally:
        os.unlink(name)


def load_certificates(paths: tuple[Path, ...]) -> tuple[x509.Certificate, ...]:
    """Read PEM (or DER) certificates from files; StartupError names a bad one."""
    out: list[x509.Certificate] = []
    for p in paths:
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise StartupError(f"cannot read trusted root {p}: {exc.strerror}") from None
        try:
            out.extend(x509.load_pem_x509_certificates(data) if b"-----BEGIN" in data
                       else [x509.load_der_x509_certificate(data)])
        except ValueError:
            raise StartupError(f"{p} holds no certificate") from None
    return tuple(out)
