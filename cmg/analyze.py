"""``cmg analyze``: the console's Connection Analyzer, for a running deployment.

Reads ``deployment.json`` (and the configuration it points to) and checks, each with a
pass/fail line and, on failure, a plain-language fix:

- the server certificate: CN = service name, validity, chain to the trusted root, key size;
- the TLS policy the gateway really enforces;
- the Entra tenant: metadata and keys reachable, app registrations consistent, the CMG
  answering AADAuthInfo for it;
- each connection point connected to each gateway instance;
- each published role reachable through the CMG with a certificate client and with a
  token client.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yarl
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import DNSName, PolicyBuilder, Store, VerificationError

from . import config as cfg
from . import pki, tokens


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        head = f"[{'PASS' if self.ok else 'FAIL'}] {self.name}: {self.detail}"
        return head if self.ok or not self.fix else f"{head}\n       Fix: {self.fix}"


class Analyzer:
    def __init__(self, deployment_file: Path) -> None:
        self.file = deployment_file.resolve()
        self.base = self.file.parent
        self.d: dict[str, Any] = json.loads(self.file.read_text(encoding="utf-8"))
        self.deployment = cfg.load(self.path("config"), base_dir=self.base)
        host, _, port = self.d["listen"].rpartition(":")
        self.host, self.port = host, int(port)
        self.service = str(self.d["service_name"])
        self.checks: list[Check] = []

    def path(self, key: str) -> Path:
        p = Path(self.d[key])
        return p if p.is_absolute() else self.base / p

    def add(self, name: str, ok: bool, detail: str, fix: str = "") -> None:
        self.checks.append(Check(name, ok, detail, fix))

    # --- server certificate ---

    def server_certificate(self) -> None:
        files = self.deployment.tls_files()
        try:
            from gateway.tls import load_server_identity

            ident = load_server_identity(files)
        except Exception as exc:  # any unreadable certificate is a finding, not a crash
            self.add("Server certificate", False, str(exc),
                     "run `cmg certs init`, or point certificates.server_certificate at the PFX/PEM")
            return
        cert = ident.certificate
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = str(cns[0].value) if cns else ""
        self.add("Server certificate CN", cn == self.service,
                 f"CN '{cn}', service name '{self.service}'",
                 "issue the server certificate with CN = the service name exactly (case included): "
                 f"`cmg certs init --service-name {self.service}`")
        now = dt.datetime.now(dt.timezone.utc)
        valid = cert.not_valid_before_utc <= now < cert.not_valid_after_utc
        days = (cert.not_valid_after_utc - now).days
        self.add("Server certificate validity", valid,
                 f"valid {cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d} ({days} days left)",
                 "renew the server certificate (`cmg certs init` regenerates an expired one)")
        key = cert.public_key()
        bits = key.key_size if isinstance(key, rsa.RSAPublicKey) else None
        self.add("Server certificate key", bits is None or bits >= 2048,
                 f"{bits}-bit RSA" if bits else type(key).__name__.replace("_", " "),
                 "use a 2048- or 4096-bit key")
        try:
            roots = pki.load_pem_certificates(self.path("ca_cert"))
            verifier = PolicyBuilder().store(Store(roots)).build_server_verifier(DNSName(self.service))
            verifier.verify(cert, list(ident.chain))
            self.add("Server certificate chain", True, f"chains to {roots[0].subject.rfc4514_string()}")
        except (VerificationError, ValueError, OSError) as exc:
            self.add("Server certificate chain", False, f"does not chain to the clients' trusted root: {exc}",
                     "include the issuing CA in the PFX and give clients the root (deployment.json ca_cert)")

    # --- TLS policy ---

    def tls_policy(self) -> None:
        ca = str(self.path("ca_cert"))
        version = _handshake(self.host, self.port, self.service, ca, None)
        self.add("TLS 1.2 handshake", version.startswith("TLS"), f"negotiated {version}",
                 "is the gateway running? start it with `cmg up`")
        old = _handshake(self.host, self.port, self.service, ca, ssl.TLSVersion.TLSv1_1)
        if self.deployment.enforce_tls12:
            self.add("Enforce TLS 1.2", not old.startswith("TLS"),
                     "TLS 1.0/1.1 refused" if not old.startswith("TLS") else f"TLS 1.1 accepted ({old})",
                     "set service.enforce_tls12 = true and restart the gateway")
        else:
            self.add("Enforce TLS 1.2 (off)", True,
                     f"TLS 1.1 {'accepted' if old.startswith('TLS') else 'refused by the local OpenSSL: ' + old}")

    # --- Entra ---

    async def entra(self, s: aiohttp.ClientSession) -> str | None:
        e = self.deployment.entra_config()
        if not e.enabled:
            self.add("Entra ID", True, "not enabled for this CMG (entra.enabled = false)")
            return None
        try:
            async with s.get(e.metadata_url) as r:
                meta = await r.json(content_type=None)
            async with s.get(meta["jwks_uri"]) as r:
                jwks = await r.json(content_type=None)
            keys = tokens.keys_from_jwks(jwks)
            ok = meta.get("issuer") == tokens.entra_issuer(e.tenant_id) and bool(keys)
            self.add("Entra tenant metadata", ok,
                     f"issuer {meta.get('issuer')}, {len(keys)} signing key(s)",
                     f"check entra.tenant_id and entra.authority ({e.authority})")
        except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError, TypeError) as exc:
            self.add("Entra tenant metadata", False, f"{e.metadata_url} unreachable: {exc.__class__.__name__}",
                     "check entra.authority and that the tenant (mock site) is running")
            return None
        token = None
        try:
            form = {"grant_type": "client_credentials", "client_id": e.client_app_id,
                    "scope": f"{e.server_app_id_uri}/.default"}
            async with s.post(meta["token_endpoint"], data=form) as r:
                body = await r.json(content_type=None)
            token = body.get("access_token")
            self.add("Entra app registrations", bool(token),
                     f"client app {e.client_app_id} gets tokens for {e.server_app_id_uri}" if token
                     else f"token endpoint refused: {body.get('error_description') or body.get('error')}",
                     "the client app must be allowed the server app's scope; check entra.client_app_id "
                     "and entra.server_app_id_uri")
        except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError, TypeError) as exc:
            self.add("Entra app registrations", False, f"token endpoint failed: {exc.__class__.__name__}",
                     "check the tenant's token endpoint")
        status, text = await self._cmg(s, "GET", f"/CCM_Proxy_ServerAuth/AADAuthInfo?TenantID={e.tenant_id}")
        self.add("CMG AADAuthInfo", status == 200 and e.tenant_id in text,
                 f"HTTP {status}", "onboard the tenant: entra.onboarded_tenants")
        return token

    # --- connection points ---

    async def connection_points(self) -> None:
        certs = self.deployment.certs_dir
        names = list(self.d.get("connection_points", []))
        if not names:
            self.add("Connection points", False, "none configured", "add connection_point.names")
            return
        cert, key = certs / f"connection-point-{names[0]}.pem", certs / f"connection-point-{names[0]}.key"
        ctx = ssl.create_default_context(cafile=str(self.path("ca_cert")))
        ctx.load_cert_chain(str(cert), str(key))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            for i, port in enumerate(self.d["tunnel_ports"]):
                url = yarl.URL(f"https://{self.host}:{port}/CMGStatus")
                try:
                    async with s.get(url, ssl=ctx, server_hostname=self.service) as r:
                        status = await r.json(content_type=None)
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                    self.add(f"Instance {i}", False, f"tunnel port {port} unreachable: {exc.__class__.__name__}",
                             "is the gateway instance running?")
                    continue
                connected = {c["name"] for c in status.get("connection_points", [])}
                for name in names:
                    self.add(f"{name} -> {status.get('instance', i)}", name in connected,
                             "connected" if name in connected else "not connected",
                             f"start the connection point ({name}) and check SMS_Cloud_ProxyConnector_{name}.log "
                             "for certificate or network errors")

    # --- roles ---

    async def roles(self, s: aiohttp.ClientSession, entra_token: str | None) -> None:
        probes = {"MP": "SMS_MP/.sms_aut?MPLIST", "SUP": "ClientWebService/client.asmx",
                  "DP": "SMS_DP_SMSPKG$/PS100001.1/payload-1024.bin", "AdminService": "AdminService/"}
        # A token client: the CCM token an Entra-joined device gets, else a site-issued client token.
        token = await self._ccm_token(s, entra_token) or self._client_token()
        for role in self.d["roles"]:
            probe = probes.get(role["kind"], "")
            rid = role["role_id"]
            status, _ = await self._cmg(s, "GET", f"/CCM_Proxy_MutualAuth/{rid}/{probe}", cert=True)
            reason = self._last_reason
            ok = status not in (0, 502, 503, 504) and not reason.startswith("CMG")
            self.add(f"{role['kind']} {rid} with a client certificate", ok, f"HTTP {status} {reason}".strip(),
                     "check the role is published by a connected connection point and its internal URL answers")
            status, _ = await self._cmg(s, "GET", f"/CCM_Proxy_ServerAuth/{rid}/{probe}",
                                        token=token)
            reason = self._last_reason
            ok = status not in (0, 401, 502, 503, 504) and not reason.startswith("CMG")
            self.add(f"{role['kind']} {rid} with a token", ok, f"HTTP {status} {reason}".strip(),
                     "check token authentication (Entra tenant, site token-signing certificate)")

    async def _ccm_token(self, s: aiohttp.ClientSession, entra_token: str | None) -> str | None:
        if not entra_token:
            return None
        mp = next(r for r in self.d["roles"] if r["kind"] == "MP")
        status, text = await self._cmg(s, "POST", f"/CCM_Proxy_ServerAuth/{mp['role_id']}/CCM_STS", token=entra_token)
        self.add("CCM_STS through the CMG", status == 200, f"HTTP {status} {self._last_reason}".strip(),
                 "the MP must accept the tenant's Entra tokens (CCM_STS.log)")
        return _find_token(text) if status == 200 else None

    def _client_token(self) -> str:
        site = self.deployment.site
        signer = pki.Authority.load(site.token_signing_certificate, site.token_signing_key)
        return tokens.issue_site_token(signer.key, pki.token_signing_kid(signer.cert),  # type: ignore[arg-type]
                                       issuer_id=self.deployment.token_issuer_id, token_type=tokens.TYPE_CLIENT,
                                       subject="GUID:ConnectionAnalyzer", lifetime=dt.timedelta(minutes=10))

    _last_reason = ""

    async def _cmg(self, s: aiohttp.ClientSession, method: str, path: str, *, cert: bool = False,
                   token: str | None = None) -> tuple[int, str]:
        ctx = ssl.create_default_context(cafile=str(self.path("ca_cert")))
        if cert:
            ctx.load_cert_chain(str(self.path("client_cert")), str(self.path("client_key")))
        headers = {"Host": self.service}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            async with s.request(method, yarl.URL(f"https://{self.host}:{self.port}{path}", encoded=True),
                                 ssl=ctx, server_hostname=self.service, headers=headers) as r:
                self._last_reason = r.reason or ""
                return r.status, await r.text(errors="replace")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self._last_reason = exc.__class__.__name__
            return 0, ""

    async def run(self) -> list[Check]:
        self.server_certificate()
        self.tls_policy()
        await self.connection_points()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
            entra_token = await self.entra(s)
            await self.roles(s, entra_token)
        return self.checks


def _find_token(text: str) -> str | None:
    """The CCM token in CCM_STS's answer (JSON or XML)."""
    try:
        data = json.loads(text)
        for key in ("access_token", "token", "Token", "ccm_token"):
            if isinstance(data, dict) and isinstance(data.get(key), str):
                return data[key]
    except ValueError:
        pass
    import re

    m = re.search(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+", text)
    return m.group(0) if m else None


def _handshake(host: str, port: int, service: str, ca: str, maximum: ssl.TLSVersion | None) -> str:
    """The TLS version negotiated, or why the handshake failed."""
    ctx = ssl.create_default_context(cafile=ca)
    if maximum is not None:
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = maximum
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    try:
        with socket.create_connection((host, port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=service) as tls:
                return str(tls.version())
    except (ssl.SSLError, OSError) as exc:
        return f"refused ({exc.__class__.__name__}: {getattr(exc, 'reason', None) or exc})"


def main(deployment_file: Path) -> int:
    analyzer = Analyzer(deployment_file)
    checks = asyncio.run(analyzer.run())
    for c in checks:
        print(c.line())
    failed = [c for c in checks if not c.ok]
    print(f"\nConnection Analyzer: {len(checks) - len(failed)} of {len(checks)} checks passed")
    return 1 if failed else 0
