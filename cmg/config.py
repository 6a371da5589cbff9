"""The deployment configuration: one TOML file, read into typed, frozen configs.

The file describes a deployment the way the console's "Create Cloud Management
Gateway" wizard and the site's role settings do: service name, instances, TLS policy,
trusted client roots, the site code and its published roles with their role ids.
Every component reads its own part (``deployment.gateway(i)``,
``deployment.connection_point(name)``, ``deployment.site``). An unknown key or a bad
value raises :class:`ConfigError` naming it; no file at all gives a working loopback
deployment.

Relative paths in the file are relative to the deployment directory (the folder that
holds the file, or the ``--dir`` given to ``cmg up``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from tunnel.limits import Limits

ROLE_ID_BASE = 2**56
MAX_INSTANCES = 16

DEFAULT_SERVICE_NAME = "GraniteFalls.WestUS.CloudApp.Azure.Com"
DEFAULT_SITE_CODE = "PS1"
# Fixed identities of the default deployment (any GUIDs would do; fixed ones keep
# logs and tokens comparable between runs).
DEFAULT_TENANT_ID = "6f0e1f5c-3d1b-4a8e-9c4f-2b7d8a1e5c30"
DEFAULT_SERVER_APP_ID = "0a4f2d6e-8b1c-4e3f-a5d7-9c2b4e6f8a10"
DEFAULT_CLIENT_APP_ID = "5e7c9a1b-3d5f-4b7e-8c9a-1b3d5f7e9c21"
DEFAULT_TOKEN_ISSUER_ID = "2b9d4f6a-8c1e-4a3b-9d5f-7e1a3c5b7d92"
ROLE_KINDS = ("MP", "SUP", "DP", "AdminService")


class ConfigError(ValueError):
    """A deployment file names an unknown key or holds a bad value."""


# --- the parts each component reads ---------------------------------------------


@dataclass(frozen=True)
class TunnelLimits:
    """Limits of the tunnel protocol; both ends read the same values."""

    max_frame_size: int = 64 * 1024
    max_concurrent_streams: int = 1024
    max_header_size: int = 64 * 1024
    stream_window: int = 1024 * 1024
    tunnel_window: int = 8 * 1024 * 1024
    ping_interval: float = 10.0
    ping_timeout: float = 30.0
    open_timeout: float = 10.0

    def protocol_limits(self) -> Limits:
        """What this end of a tunnel announces it can receive."""
        return Limits(
            max_frame_size=int(self.max_frame_size),
            max_concurrent_streams=int(self.max_concurrent_streams),
            max_header_size=int(self.max_header_size),
            stream_window=int(self.stream_window),
            tunnel_window=int(self.tunnel_window),
        )


@dataclass(frozen=True)
class RoleConfig:
    """A site role published through the CMG (an MP, a SUP, a DP)."""

    role_id: int
    kind: str
    name: str
    internal_url: str
    # Path prefixes (first segment of the internal path) this role publishes.
    endpoints: tuple[str, ...]


@dataclass(frozen=True)
class TLSFiles:
    """Where the deployment's certificates live (all paths absolute)."""

    certs_dir: Path
    server_certificate: Path  # .pfx/.p12 or .pem
    server_key: Path | None  # PEM key when server_certificate is a PEM without its key
    server_pfx_password_file: Path | None
    ca_bundle: Path  # the root a client trusts for the server certificate
    trusted_client_roots: tuple[Path, ...]
    connection_point_ca: Path  # the site's CA, the only issuer accepted for tunnels


@dataclass(frozen=True)
class EntraConfig:
    """The Microsoft Entra ID tenant and the two app registrations (Azure Services wizard)."""

    enabled: bool
    tenant_id: str
    tenant_name: str
    server_app_id: str
    server_app_id_uri: str
    client_app_id: str
    authority: str  # base URL of the tenant's endpoints (the mock tenant by default)
    onboarded_tenants: tuple[str, ...]

    @property
    def metadata_url(self) -> str:
        return f"{self.authority}/{self.tenant_id}/v2.0/.well-known/openid-configuration"


@dataclass(frozen=True)
class ClientAuthConfig:
    """How the CMG authenticates clients beyond TLS."""

    verify_revocation: bool  # "Verify client certificate revocation"
    crl_unavailable: str  # "refuse" or "allow" when a CRL cannot be read (logged either way)
    crl_files: tuple[Path, ...]
    clock_skew: float  # seconds of leeway on token exp/nbf
    entra: EntraConfig
    token_issuer_id: str  # site-issued tokens: iss urn:sccm:oauth2:<this>
    token_signing_certificate: Path  # the site's token-signing certificate (public part)


@dataclass(frozen=True)
class GatewayConfig:
    """One gateway instance (a VM of the CMG's scale set)."""

    service_name: str
    site_code: str
    instance: int
    instances: int
    bind: str
    client_port: int
    tunnel_port: int
    enforce_tls12: bool
    tls: TLSFiles
    logs_dir: Path
    log_format: str
    log_max_bytes: int
    limits: TunnelLimits
    max_request_body: int
    drain_timeout: float
    traffic_summary_interval: float
    client_auth: ClientAuthConfig
    roles: tuple[RoleConfig, ...]  # what the site may publish through this CMG
    client_header_timeout: float  # a request head must be complete this long after its first byte
    client_body_timeout: float  # a request body may pause this long at most
    client_send_timeout: float  # a client may leave a response unread this long at most
    max_connections: int  # client TLS connections per instance; more are closed at once
    monitoring_bind: str  # /metrics, /healthz, /readyz, /status: never on the client port
    monitoring_base_port: int  # instance i: base + i
    # Where instance i's monitoring port is reached: connection_point.gateway_hosts when
    # each instance has a host of its own (containers), else the monitoring address.
    monitoring_peer_hosts: tuple[str, ...]
    listen_grace: float  # at start, wait this long for a connection point before taking clients
    # No response head this long after the last request byte went out: 504, stream reset.
    # A bound of last resort (the connection point answers 504 after its request_timeout).
    response_timeout: float = 630.0

    @property
    def monitoring_port(self) -> int:
        return self.monitoring_base_port + self.instance


@dataclass(frozen=True)
class ConnectionPointConfig:
    """One CMG connection point (the on-prem connector)."""

    name: str
    site_code: str
    service_name: str
    gateway_hosts: tuple[str, ...]  # where instance i is dialled (one container per instance, or one host)
    tunnel_ports: tuple[int, ...]
    certificate: Path
    key: Path
    ca_bundle: Path  # trusts the CMG's server certificate
    roles: tuple[RoleConfig, ...]
    logs_dir: Path
    log_format: str
    log_max_bytes: int
    limits: TunnelLimits
    reconnect_min: float
    reconnect_max: float
    pool_size: int
    drain_timeout: float
    request_timeout: float  # a site role silent this long: 504 to the client
    monitoring_bind: str
    monitoring_port: int  # /metrics, /healthz, /readyz of this connection point
    traffic_report_interval: float  # ProxyTrafficStateDetails in the log, every this many seconds


@dataclass(frozen=True)
class SiteConfig:
    """The mock on-prem site: MP, SUP and DP, each on its own loopback port."""

    site_code: str
    service_name: str
    client_port: int
    bind: str
    mp_port: int
    sup_port: int
    dp_port: int
    roles: tuple[RoleConfig, ...]
    data_dir: Path
    logs_dir: Path
    log_format: str
    log_max_bytes: int
    entra_port: int
    client_auth: ClientAuthConfig
    token_signing_certificate: Path
    token_signing_key: Path


# --- the file's schema ------------------------------------------------------------

DEFAULT_MP_ENDPOINTS = (
    "CCM_System", "ccm_system_tokenauth", "CCM_STS", "CCM_Client", "CCM_Incoming", "SMS_MP", "BGB",
)
DEFAULT_SUP_ENDPOINTS = ("ClientWebService", "SimpleAuthWebService", "ReportingWebService")
DEFAULT_DP_ENDPOINTS = ("SMS_DP_SMSPKG$", "downloadrestservice.svc")
DEFAULT_ENDPOINTS = {
    "MP": DEFAULT_MP_ENDPOINTS,
    "SUP": DEFAULT_SUP_ENDPOINTS,
    "DP": DEFAULT_DP_ENDPOINTS,
    "AdminService": ("AdminService",),
}

_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "service": {
        "name": str,
        "instances": int,
        "bind": str,
        "client_port": int,
        "tunnel_base_port": int,
        "enforce_tls12": bool,
        "max_request_body": int,
        "drain_timeout": (int, float),
        "traffic_summary_interval": (int, float),
        "client_header_timeout": (int, float),
        "client_body_timeout": (int, float),
        "client_send_timeout": (int, float),
        "max_connections": int,
        "monitoring_bind": str,
        "monitoring_base_port": int,
        "listen_grace": (int, float),
        "response_timeout": (int, float),
    },
    "certificates": {
        "dir": str,
        "server_certificate": str,
        "server_key": str,
        "server_pfx_password_file": str,
        "ca_bundle": str,
        "trusted_client_roots": list,
        "connection_point_ca": str,
    },
    "site": {
        "code": str,
        "bind": str,
        "mp_port": int,
        "sup_port": int,
        "dp_port": int,
        "entra_port": int,
        "token_issuer_id": str,
        "data_dir": str,
        "roles": list,
    },
    "connection_point": {
        "names": list,
        "reconnect_min": (int, float),
        "reconnect_max": (int, float),
        "pool_size": int,
        "drain_timeout": (int, float),
        "request_timeout": (int, float),
        "monitoring_base_port": int,
        "monitoring_bind": str,
        "gateway_hosts": list,
        "traffic_report_interval": (int, float),
    },
    "tunnel": {f.name: (int, float) if f.type == "float" else int
               for f in dataclasses.fields(TunnelLimits)},
    "logging": {"dir": str, "format": str, "max_size": int},
    "client_auth": {
        "verify_revocation": bool,
        "crl_unavailable": str,
        "crls": list,
        "clock_skew": (int, float),
    },
    "entra": {
        "enabled": bool,
        "tenant_id": str,
        "tenant_name": str,
        "server_app_id": str,
        "server_app_id_uri": str,
        "client_app_id": str,
        "authority": str,
        "onboarded_tenants": list,
    },
}
_ROLE_SCHEMA: dict[str, type | tuple[type, ...]] = {
    "role_id": int, "kind": str, "name": str, "internal_url": str, "endpoints": list,
}

_SERVICE_NAME_RE = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)
_HOST_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)$")
_SITE_CODE_RE = re.compile(r"^[A-Za-z0-9]{3}$")
_CONNECTOR_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def _check_keys(where: str, table: Mapping[str, Any], schema: Mapping[str, Any]) -> None:
    for key, value in table.items():
        if key not in schema:
            known = ", ".join(sorted(schema))
            raise ConfigError(f"unknown key '{where}.{key}' (known keys: {known})")
        expected = schema[key]
        # bool is an int in Python: never accept one where a number is meant.
        if isinstance(value, bool) and expected is not bool:
            raise ConfigError(f"'{where}.{key}' must be {_type_name(expected)}, not a boolean")
        if not isinstance(value, expected):
            raise ConfigError(
                f"'{where}.{key}' must be {_type_name(expected)}, not {type(value).__name__} ({value!r})"
            )


def _type_name(t: type | tuple[type, ...]) -> str:
    if isinstance(t, tuple):
        return "a number"
    return {str: "a string", int: "an integer", bool: "true or false", list: "a list"}.get(
        t, t.__name__
    )


def _port(where: str, value: int, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise ConfigError(f"'{where}' must be a TCP port ({low}-65535), not {value}")
    return value


def _port_run(where: str, base: int, count: int) -> int:
    """A base port with room for ``count`` ports (one per instance)."""
    _port(where, base)
    if base + count - 1 > 65535:
        raise ConfigError(f"'{where}' {base} leaves no port for instance {count - 1}")
    return base


def _positive(where: str, value: float) -> float:
    if value <= 0:
        raise ConfigError(f"'{where}' must be greater than 0, not {value}")
    return value


@dataclass(frozen=True)
class Deployment:
    """The whole deployment, as read from the file (or the defaults)."""

    base_dir: Path
    service_name: str = DEFAULT_SERVICE_NAME
    instances: int = 1
    bind: str = "127.0.0.1"
    client_port: int = 443
    tunnel_base_port: int = 10124
    enforce_tls12: bool = True
    max_request_body: int = 16 * 1024**3
    drain_timeout: float = 30.0
    traffic_summary_interval: float = 300.0
    client_header_timeout: float = 15.0
    client_body_timeout: float = 120.0
    client_send_timeout: float = 120.0
    max_connections: int = 20000
    monitoring_bind: str = "127.0.0.1"
    monitoring_base_port: int = 9124
    listen_grace: float = 10.0
    response_timeout: float = 0.0  # 0: connection_point.request_timeout + 30 s
    certs: Mapping[str, Any] = field(default_factory=dict)
    site_code: str = DEFAULT_SITE_CODE
    site_bind: str = "127.0.0.1"
    mp_port: int = 8003
    sup_port: int = 8530
    dp_port: int = 8004
    entra_port: int = 8006
    token_issuer_id: str = DEFAULT_TOKEN_ISSUER_ID
    verify_revocation: bool = True
    crl_unavailable: str = "refuse"
    crls: tuple[str, ...] = ("issuing-ca.crl", "root-ca.crl")
    clock_skew: float = 300.0
    entra: Mapping[str, Any] = field(default_factory=dict)
    data_dir: str = "data"
    roles: tuple[RoleConfig, ...] = ()
    connection_point_names: tuple[str, ...] = ("CMGCP01",)
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    pool_size: int = 1024
    cp_drain_timeout: float = 30.0
    request_timeout: float = 600.0
    cp_monitoring_base_port: int = 9224
    cp_monitoring_bind: str = "127.0.0.1"  # a connection point listens on nothing but loopback
    gateway_hosts: tuple[str, ...] = ()  # empty: the gateway's bind address (loopback for 0.0.0.0)
    traffic_report_interval: float = 300.0
    limits: TunnelLimits = TunnelLimits()
    logs_dir: str = "logs"
    log_format: str = "cmtrace"
    log_max_bytes: int = 2 * 1024 * 1024

    # --- derived parts, one per component ---

    def path(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else (self.base_dir / p)

    @property
    def certs_dir(self) -> Path:
        return self.path(self.certs.get("dir", "certs"))

    def tls_files(self) -> TLSFiles:
        c = self.certs
        d = self.certs_dir

        def inside(key: str, default: str) -> Path:
            value = c.get(key, default)
            p = Path(value)
            return p if p.is_absolute() else d / p

        server = inside("server_certificate", "cmg-server.pfx")
        key = c.get("server_key")
        password = c.get("server_pfx_password_file")
        if password is None and server.suffix.lower() in (".pfx", ".p12"):
            password = server.name + ".password"
        return TLSFiles(
            certs_dir=d,
            server_certificate=server,
            server_key=inside("server_key", key) if key else None,
            server_pfx_password_file=inside("server_pfx_password_file", password) if password else None,
            ca_bundle=inside("ca_bundle", "root-ca.pem"),
            trusted_client_roots=tuple(
                (Path(p) if Path(p).is_absolute() else d / p)
                for p in c.get("trusted_client_roots", ["root-ca.pem"])
            ),
            connection_point_ca=inside("connection_point_ca", "site-ca.pem"),
        )

    def entra_config(self) -> EntraConfig:
        e = self.entra
        tenant = e.get("tenant_id", DEFAULT_TENANT_ID)
        host = self.site_bind if self.site_bind not in ("0.0.0.0", "::") else "127.0.0.1"
        return EntraConfig(
            enabled=e.get("enabled", True),
            tenant_id=tenant,
            tenant_name=e.get("tenant_name", "contoso.onmicrosoft.com"),
            server_app_id=e.get("server_app_id", DEFAULT_SERVER_APP_ID),
            server_app_id_uri=e.get("server_app_id_uri", "https://ConfigMgrService"),
            client_app_id=e.get("client_app_id", DEFAULT_CLIENT_APP_ID),
            authority=e.get("authority", f"http://{host}:{self.entra_port}").rstrip("/"),
            onboarded_tenants=tuple(e.get("onboarded_tenants", [tenant])),
        )

    def client_auth(self) -> ClientAuthConfig:
        d = self.certs_dir
        return ClientAuthConfig(
            verify_revocation=self.verify_revocation,
            crl_unavailable=self.crl_unavailable,
            crl_files=tuple(Path(c) if Path(c).is_absolute() else d / c for c in self.crls),
            clock_skew=self.clock_skew,
            entra=self.entra_config(),
            token_issuer_id=self.token_issuer_id,
            token_signing_certificate=d / "token-signing.pem",
        )

    def tunnel_port(self, instance: int) -> int:
        return self.tunnel_base_port + instance

    def gateway(self, instance: int) -> GatewayConfig:
        if not 0 <= instance < self.instances:
            raise ConfigError(
                f"gateway instance {instance} does not exist (service.instances = {self.instances})"
            )
        return GatewayConfig(
            service_name=self.service_name,
            site_code=self.site_code,
            instance=instance,
            instances=self.instances,
            bind=self.bind,
            client_port=self.client_port,
            tunnel_port=self.tunnel_port(instance),
            enforce_tls12=self.enforce_tls12,
            tls=self.tls_files(),
            logs_dir=self.path(self.logs_dir),
            log_format=self.log_format,
            log_max_bytes=self.log_max_bytes,
            limits=self.limits,
            max_request_body=self.max_request_body,
            drain_timeout=self.drain_timeout,
            traffic_summary_interval=self.traffic_summary_interval,
            client_auth=self.client_auth(),
            roles=self.roles,
            client_header_timeout=self.client_header_timeout,
            client_body_timeout=self.client_body_timeout,
            client_send_timeout=self.client_send_timeout,
            max_connections=self.max_connections,
            monitoring_bind=self.monitoring_bind,
            monitoring_base_port=self.monitoring_base_port,
            monitoring_peer_hosts=self.connection_point(self.connection_point_names[0]).gateway_hosts
            if self.gateway_hosts
            else (self.monitoring_bind if self.monitoring_bind not in ("0.0.0.0", "::") else "127.0.0.1",)
            * self.instances,
            listen_grace=self.listen_grace,
            response_timeout=self.response_timeout or self.request_timeout + 30.0,
        )

    def connection_point(self, name: str) -> ConnectionPointConfig:
        if name not in self.connection_point_names:
            known = ", ".join(self.connection_point_names)
            raise ConfigError(f"connection point '{name}' is not in connection_point.names ({known})")
        d = self.certs_dir
        host = self.bind if self.bind not in ("0.0.0.0", "::") else "127.0.0.1"
        return ConnectionPointConfig(
            name=name,
            site_code=self.site_code,
            service_name=self.service_name,
            gateway_hosts=self.gateway_hosts * self.instances if len(self.gateway_hosts) == 1
            else self.gateway_hosts or (host,) * self.instances,
            tunnel_ports=tuple(self.tunnel_port(i) for i in range(self.instances)),
            certificate=d / f"connection-point-{name}.pem",
            key=d / f"connection-point-{name}.key",
            ca_bundle=self.tls_files().ca_bundle,
            roles=self.roles,
            logs_dir=self.path(self.logs_dir),
            log_format=self.log_format,
            log_max_bytes=self.log_max_bytes,
            limits=self.limits,
            reconnect_min=self.reconnect_min,
            reconnect_max=self.reconnect_max,
            pool_size=self.pool_size,
            drain_timeout=self.cp_drain_timeout,
            request_timeout=self.request_timeout,
            monitoring_bind=self.cp_monitoring_bind,
            monitoring_port=self.cp_monitoring_base_port + self.connection_point_names.index(name),
            traffic_report_interval=self.traffic_report_interval,
        )

    @property
    def site(self) -> SiteConfig:
        return SiteConfig(
            site_code=self.site_code,
            service_name=self.service_name,
            client_port=self.client_port,
            bind=self.site_bind,
            mp_port=self.mp_port,
            sup_port=self.sup_port,
            dp_port=self.dp_port,
            roles=self.roles,
            data_dir=self.path(self.data_dir),
            logs_dir=self.path(self.logs_dir),
            log_format=self.log_format,
            log_max_bytes=self.log_max_bytes,
            entra_port=self.entra_port,
            client_auth=self.client_auth(),
            token_signing_certificate=self.certs_dir / "token-signing.pem",
            token_signing_key=self.certs_dir / "token-signing.key",
        )

    def role(self, kind: str) -> RoleConfig:
        for r in self.roles:
            if r.kind == kind:
                return r
        raise ConfigError(f"the deployment publishes no {kind} role")


def default_roles(site_bind: str, mp_port: int, sup_port: int, dp_port: int) -> tuple[RoleConfig, ...]:
    """The site's roles when the file names none: one MP, one SUP, one DP on loopback."""
    host = site_bind if site_bind not in ("0.0.0.0", "::") else "127.0.0.1"
    return (
        RoleConfig(ROLE_ID_BASE + 3, "MP", "MP01", f"http://{host}:{mp_port}", DEFAULT_MP_ENDPOINTS),
        RoleConfig(ROLE_ID_BASE + 4, "SUP", "SUP01", f"http://{host}:{sup_port}", DEFAULT_SUP_ENDPOINTS),
        RoleConfig(ROLE_ID_BASE + 6, "DP", "DP01", f"http://{host}:{dp_port}", DEFAULT_DP_ENDPOINTS),
    )


def load(path: Path | str | None, base_dir: Path | str | None = None,
         overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Deployment:
    """Read a deployment file (or none) into a :class:`Deployment`.

    ``overrides`` are tables merged over the file's (as ``cmg up --port`` does).
    Raises :class:`ConfigError` on an unknown key, a wrong type or a bad value, and
    when the file cannot be read or is not valid TOML.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        data = read_file(p)
        if base_dir is None:
            base_dir = p.resolve().parent
    for table, values in (overrides or {}).items():
        data.setdefault(table, {}).update(values)
    return from_dict(data, Path(base_dir or ".").resolve())


def read_file(p: Path) -> dict[str, Any]:
    """The raw tables of a deployment file: TOML, or JSON (the launcher's resolved copy)."""
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"deployment file {p} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read deployment file {p}: {exc.strerror}") from None
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"deployment file {p} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"deployment file {p} must hold an object of tables")
        return data
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"deployment file {p} is not valid TOML: {exc}") from None


def from_dict(data: Mapping[str, Any], base_dir: Path) -> Deployment:
    """Validate a parsed deployment file; raises :class:`ConfigError`."""
    for table, value in data.items():
        if table not in _SCHEMA:
            raise ConfigError(f"unknown table '[{table}]' (known tables: {', '.join(sorted(_SCHEMA))})")
        if not isinstance(value, dict):
            raise ConfigError(f"'{table}' must be a table")
        _check_keys(table, value, _SCHEMA[table])

    service = data.get("service", {})
    certs = data.get("certificates", {})
    site = data.get("site", {})
    cp = data.get("connection_point", {})
    tunnel = data.get("tunnel", {})
    logging_ = data.get("logging", {})
    kw: dict[str, Any] = {"base_dir": base_dir}

    name = service.get("name", DEFAULT_SERVICE_NAME)
    if not _SERVICE_NAME_RE.match(name) or ".." in name:
        raise ConfigError(f"'service.name' must be a DNS name such as {DEFAULT_SERVICE_NAME}, not {name!r}")
    kw["service_name"] = name
    instances = service.get("instances", 1)
    if not 1 <= instances <= MAX_INSTANCES:
        raise ConfigError(f"'service.instances' must be 1 to {MAX_INSTANCES}, not {instances}")
    kw["instances"] = instances
    if "bind" in service:
        kw["bind"] = _address("service.bind", service["bind"])
    if "client_port" in service:
        kw["client_port"] = _port("service.client_port", service["client_port"])
    for key in ("tunnel_base_port", "monitoring_base_port"):
        if key in service:
            kw[key] = _port_run(f"service.{key}", service[key], instances)
    if "enforce_tls12" in service:
        kw["enforce_tls12"] = service["enforce_tls12"]
    if "max_request_body" in service:
        kw["max_request_body"] = int(_positive("service.max_request_body", service["max_request_body"]))
    for key in ("drain_timeout", "traffic_summary_interval", "client_header_timeout", "client_body_timeout",
                "client_send_timeout",
                "response_timeout"):
        if key in service:
            kw[key] = float(_positive(f"service.{key}", service[key]))
    if "listen_grace" in service:
        if not 0 <= service["listen_grace"] <= 3600:
            raise ConfigError(f"'service.listen_grace' must be 0 to 3600 seconds, not {service['listen_grace']}")
        kw["listen_grace"] = float(service["listen_grace"])
    if "monitoring_bind" in service:
        kw["monitoring_bind"] = _address("service.monitoring_bind", service["monitoring_bind"])
    if "max_connections" in service:
        kw["max_connections"] = int(_positive("service.max_connections", service["max_connections"]))

    roots = certs.get("trusted_client_roots")
    if roots is not None and (not roots or not all(isinstance(r, str) for r in roots)):
        raise ConfigError("'certificates.trusted_client_roots' must be a non-empty list of file names")
    kw["certs"] = dict(certs)

    code = site.get("code", DEFAULT_SITE_CODE)
    if not _SITE_CODE_RE.match(code):
        raise ConfigError(f"'site.code' must be three letters or digits, such as PS1, not {code!r}")
    kw["site_code"] = code.upper()
    site_bind = _address("site.bind", site.get("bind", "127.0.0.1"))
    kw["site_bind"] = site_bind
    ports = {}
    for key, default in (("mp_port", 8003), ("sup_port", 8530), ("dp_port", 8004), ("entra_port", 8006)):
        ports[key] = _port(f"site.{key}", site.get(key, default), allow_zero=True)
        kw[key] = ports[key]
    if "data_dir" in site:
        kw["data_dir"] = site["data_dir"]
    if "token_issuer_id" in site:
        kw["token_issuer_id"] = _guid("site.token_issuer_id", site["token_issuer_id"])

    auth = data.get("client_auth", {})
    if "verify_revocation" in auth:
        kw["verify_revocation"] = auth["verify_revocation"]
    if "crl_unavailable" in auth:
        if auth["crl_unavailable"] not in ("refuse", "allow"):
            raise ConfigError(f"'client_auth.crl_unavailable' must be 'refuse' or 'allow', not {auth['crl_unavailable']!r}")
        kw["crl_unavailable"] = auth["crl_unavailable"]
    if "crls" in auth:
        if not all(isinstance(c, str) and c for c in auth["crls"]):
            raise ConfigError("'client_auth.crls' must be a list of CRL file names")
        kw["crls"] = tuple(auth["crls"])
    if "clock_skew" in auth:
        if not 0 <= auth["clock_skew"] <= 3600:
            raise ConfigError(f"'client_auth.clock_skew' must be 0 to 3600 seconds, not {auth['clock_skew']}")
        kw["clock_skew"] = float(auth["clock_skew"])

    entra = dict(data.get("entra", {}))
    for key in ("tenant_id", "server_app_id", "client_app_id"):
        if key in entra:
            entra[key] = _guid(f"entra.{key}", entra[key])
    if "onboarded_tenants" in entra:
        entra["onboarded_tenants"] = [_guid("entra.onboarded_tenants", t) for t in entra["onboarded_tenants"]]
    if "authority" in entra and not re.match(r"^https?://[^/\s]+(/[^\s]*)?$", entra["authority"]):
        raise ConfigError(f"'entra.authority' must be an http(s) URL, not {entra['authority']!r}")
    if "server_app_id_uri" in entra and not re.match(r"^[a-z][a-z0-9+.-]*:\S+$", entra["server_app_id_uri"]):
        raise ConfigError(f"'entra.server_app_id_uri' must be a URI, not {entra['server_app_id_uri']!r}")
    kw["entra"] = entra
    if "roles" in site:
        kw["roles"] = _roles(site["roles"])
    else:
        kw["roles"] = default_roles(site_bind, ports["mp_port"], ports["sup_port"], ports["dp_port"])

    if "names" in cp:
        names = cp["names"]
        if not names or not all(isinstance(n, str) and _CONNECTOR_NAME_RE.match(n) for n in names):
            raise ConfigError(
                "'connection_point.names' must be a non-empty list of names (letters, digits, . _ -)"
            )
        if len(set(names)) != len(names):
            raise ConfigError("'connection_point.names' lists a name twice")
        kw["connection_point_names"] = tuple(names)
    for key, attr in (("reconnect_min", "reconnect_min"), ("reconnect_max", "reconnect_max"),
                      ("drain_timeout", "cp_drain_timeout"), ("request_timeout", "request_timeout"),
                      ("traffic_report_interval", "traffic_report_interval")):
        if key in cp:
            kw[attr] = float(_positive(f"connection_point.{key}", cp[key]))
    if kw.get("reconnect_min", 0.5) > kw.get("reconnect_max", 30.0):
        raise ConfigError("'connection_point.reconnect_min' is greater than 'connection_point.reconnect_max'")
    if "gateway_hosts" in cp:
        hosts = cp["gateway_hosts"]
        if len(hosts) not in (1, instances) or not all(isinstance(h, str) and _HOST_RE.match(h) for h in hosts):
            raise ConfigError(
                f"'connection_point.gateway_hosts' must list one host name or address, or one per "
                f"instance ({instances}), not {hosts!r}"
            )
        kw["gateway_hosts"] = tuple(hosts)
    if "monitoring_bind" in cp:
        kw["cp_monitoring_bind"] = _address("connection_point.monitoring_bind", cp["monitoring_bind"])
    if "monitoring_base_port" in cp:
        kw["cp_monitoring_base_port"] = _port("connection_point.monitoring_base_port", cp["monitoring_base_port"])
    if "pool_size" in cp:
        kw["pool_size"] = int(_positive("connection_point.pool_size", cp["pool_size"]))

    limits = {}
    for key, value in tunnel.items():
        limits[key] = _positive(f"tunnel.{key}", value)
    if limits:
        kw["limits"] = TunnelLimits(**limits)
    lim = kw.get("limits", TunnelLimits())
    if not 1024 <= lim.max_frame_size <= 16 * 1024 * 1024:
        raise ConfigError(f"'tunnel.max_frame_size' must be 1024 to 16777216, not {lim.max_frame_size}")
    if lim.stream_window > lim.tunnel_window:
        raise ConfigError("'tunnel.stream_window' is greater than 'tunnel.tunnel_window'")
    try:
        lim.protocol_limits()
    except ValueError as exc:
        raise ConfigError(f"'[tunnel]' {exc}") from None
    if lim.ping_timeout <= lim.ping_interval:
        raise ConfigError("'tunnel.ping_timeout' must be greater than 'tunnel.ping_interval'")

    if "dir" in logging_:
        kw["logs_dir"] = logging_["dir"]
    fmt = logging_.get("format", "cmtrace")
    if fmt not in ("cmtrace", "json"):
        raise ConfigError(f"'logging.format' must be 'cmtrace' or 'json', not {fmt!r}")
    kw["log_format"] = fmt
    if "max_size" in logging_:
        if not 10_000 <= logging_["max_size"] <= 2**31:
            raise ConfigError(f"'logging.max_size' must be 10000 to 2147483648 bytes, not {logging_['max_size']}")
        kw["log_max_bytes"] = logging_["max_size"]
    return Deployment(**kw)


_GUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def _guid(where: str, value: Any) -> str:
    if not isinstance(value, str) or not _GUID_RE.match(value):
        raise ConfigError(f"'{where}' must be a GUID such as {DEFAULT_TENANT_ID}, not {value!r}")
    return value.lower()


def _address(where: str, value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if value != "localhost":
            raise ConfigError(f"'{where}' must be an IP address, not {value!r}") from None
    return value


def _roles(raw: list[Any]) -> tuple[RoleConfig, ...]:
    if not raw:
        raise ConfigError("'site.roles' must list at least one role")
    roles: list[RoleConfig] = []
    seen: set[int] = set()
    for i, r in enumerate(raw):
        where = f"site.roles[{i}]"
        if not isinstance(r, dict):
            raise ConfigError(f"'{where}' must be a table")
        _check_keys(where, r, _ROLE_SCHEMA)
        for key in ("role_id", "kind", "internal_url"):
            if key not in r:
                raise ConfigError(f"'{where}.{key}' is missing")
        role_id = r["role_id"]
        if not ROLE_ID_BASE < role_id < 2 * ROLE_ID_BASE:
            raise ConfigError(
                f"'{where}.role_id' must be 2^56 + n, such as {ROLE_ID_BASE + 3}, not {role_id}"
            )
        if role_id in seen:
            raise ConfigError(f"'{where}.role_id' {role_id} is used by another role")
        seen.add(role_id)
        kind = r["kind"]
        if kind not in ROLE_KINDS:
            raise ConfigError(f"'{where}.kind' must be one of {', '.join(ROLE_KINDS)}, not {kind!r}")
        url = r["internal_url"]
        if not re.match(r"^https?://[^/\s]+(/[^\s]*)?$", url):
            raise ConfigError(f"'{where}.internal_url' must be an http(s) URL, not {url!r}")
        endpoints = r.get("endpoints", list(DEFAULT_ENDPOINTS[kind]))
        if not endpoints or not all(isinstance(e, str) and e and "/" not in e for e in endpoints):
            raise ConfigError(f"'{where}.endpoints' must be a non-empty list of path segments")
        roles.append(RoleConfig(role_id, kind, r.get("name", f"{kind}{i + 1:02d}"),
                                url.rstrip("/"), tuple(endpoints)))
    return tuple(roles)
