"""Helpers shared by the mock site's tests (a uniquely named module, not conftest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from cmg.config import from_dict
from cmg.messaging import Message, MessageHeader, decode_message, encode_message, new_message_id
from mock_site import SiteRunner

SERVICE = "GraniteFalls.WestUS.CloudApp.Azure.Com"
MP_ID, SUP_ID, DP_ID = 72057594037927939, 72057594037927940, 72057594037927942


def site_config(base: Path, *, signing: bool = True, entra: dict[str, Any] | None = None, **service: Any):
    """A site on free ports (MP, SUP, DP, Entra) under ``base``; ``signing`` writes a
    token-signing certificate and key to ``base/certs``."""
    data: dict[str, Any] = {"site": {"mp_port": 0, "sup_port": 0, "dp_port": 0, "entra_port": 0}}
    if service:
        data["service"] = service
    if entra is not None:
        data["entra"] = entra
    cfg = from_dict(data, base).site
    if signing:
        write_token_signing(cfg.token_signing_certificate, cfg.token_signing_key)
    _seed_tenant_key(cfg.data_dir)
    return cfg


_CACHE: dict[str, bytes] = {}


def _seed_tenant_key(data_dir: Path) -> None:
    """Give the tenant a first key made once per test run (RSA generation is slow); the
    site loads it as it would its own persisted keys."""
    from mock_site.entra import TenantKeys

    path = data_dir / "entra" / "keys.json"
    if path.exists():
        return
    if "entra" not in _CACHE:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            keys = TenantKeys(Path(tmp))
            keys.load_or_create()
            _CACHE["entra"] = keys.path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_CACHE["entra"])
    path.chmod(0o600)


def write_token_signing(cert_path: Path, key_path: Path, *, fresh: bool = False) -> None:
    """A token-signing certificate and key like ``cmg certs init`` makes (self-signed here:
    the tests need the key pair, not the site CA's chain)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    if cert_path.exists() and key_path.exists():
        return
    if "signing" in _CACHE and not fresh:
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        cert_path.write_bytes(_CACHE["signing"])
        key_path.write_bytes(_CACHE["signing-key"])
        return
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ConfigMgr Token Signing - PS1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=730)).sign(key, hashes.SHA256()))
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    if not fresh:
        _CACHE["signing"], _CACHE["signing-key"] = cert_path.read_bytes(), key_path.read_bytes()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def ccm_post(http: aiohttp.ClientSession, site: SiteRunner, endpoint: str, body: str, *,
                   source_host: str = "CLIENT01", source_id: str = "", headers: dict[str, str] | None = None,
                   path: str = "/ccm_system/request") -> tuple[aiohttp.ClientResponse, Message | None, bytes]:
    header = MessageHeader(id=new_message_id(), source_id=source_id, source_host=source_host,
                           target_endpoint=endpoint)
    ctype, data = encode_message(Message(header, body))
    async with http.request("CCM_POST", site.url("mp") + path, data=data,
                            headers={"Content-Type": ctype, **(headers or {})}) as resp:
        raw = await resp.read()
        reply = decode_message(resp.headers["Content-Type"], raw) if resp.status == 200 else None
        return resp, reply, raw
