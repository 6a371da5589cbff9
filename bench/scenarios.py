"""The scenarios: what sits between the client and the backend, started and stopped.

Each scenario is a context manager that starts its servers, yields a
:class:`Running` (where to send requests, which process groups to measure) and stops
everything it started on exit, on an error or on Ctrl-C alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from cmg import config as cmg_config
from cmg import pki
from cmg.config import ROLE_ID_BASE
from cmg.launcher import Stack, free_port, free_port_run

from . import nginx_conf
from .load import Target
from .servers import Backend, MockSite, Nginx, SshTunnel

MP_ROLE_ID = ROLE_ID_BASE + 3
DP_ROLE_ID = ROLE_ID_BASE + 6
SCENARIOS = ("direct", "cmg-1i1c", "cmg-2i2c", "nginx", "ssh-tunnel")
CONNECTION_POINTS = ("CMGCP01", "CMGCP02")


@dataclass
class Shared:
    """What every scenario uses: programs, the work folder, the PKI, the backend."""

    tools: dict[str, str]
    workdir: Path
    certs: Path
    backend: Backend
    service_name: str = pki.DEFAULT_SERVICE_NAME
    # The gateway's cap on client TLS connections per instance (service.max_connections):
    # above what idle-6000 opens, plus the other workloads' connections.
    max_client_connections: int = 20000
    # Run the mock site's MP behind nginx and the SSH tunnel too (for cmgmix).
    mix_site: bool = False

    @property
    def tls(self) -> nginx_conf.TLSFiles:
        return server_tls(self.certs)

    def target(self, port: int, prefix: str = "") -> Target:
        return Target(url=f"https://127.0.0.1:{port}", host=self.service_name, prefix=prefix,
                      ca=self.certs / pki.ROOT_CA_CERT, client_cert=self.certs / pki.CLIENT_CERT,
                      client_key=self.certs / pki.CLIENT_KEY)


@dataclass
class Running:
    name: str
    target: Target
    groups: dict[str, Callable[[], list[int]]]
    description: str
    # The same files without a client certificate (handshake-*-nocert): for the CMG the
    # CCM_Proxy_ServerAuth path with a site-issued CCM token in Authorization: Bearer.
    nocert: Target | None = None
    # The ConfigMgr mix (cmgmix): the management point's path prefix on this scenario
    # (None: there is no ConfigMgr site behind it).
    mp_prefix: str | None = None
    # The process group that holds the client TLS connections (idle-6000's RSS per connection).
    serving_group: str = "backend"
    # Measured in the mix's rows besides ``groups``: the mock site (the MP's process).
    mix_groups: dict[str, Callable[[], list[int]]] = dataclasses.field(default_factory=dict)


def without_cert(target: Target, prefix: str | None = None, headers: tuple[str, ...] = ()) -> Target:
    """``target`` with no client certificate (and another path prefix / extra headers)."""
    return dataclasses.replace(target, client_cert=None, client_key=None,
                               prefix=target.prefix if prefix is None else prefix, headers=headers)


def ccm_token(stack: Stack) -> str:
    """A CCM token as the site's ``CCM_STS`` issues it (8 hours), signed with the site's
    token-signing key from the stack's resolved configuration."""
    from cmg.site_tokens import load_signer

    deployment = cmg_config.load(stack.resolved_path, base_dir=stack.dir)
    device = str(uuid.uuid5(uuid.NAMESPACE_DNS, "bench-client.cmg"))
    return load_signer(deployment.site).ccm_token(device, extra={"deviceid": device, "idtyp": "device"})


def init_pki(certs: Path) -> Path:
    """The deployment's certificates (once), and the client-CA bundle nginx verifies with."""
    pki.init_certificates(certs, service_name=pki.DEFAULT_SERVICE_NAME,
                          site_code=pki.DEFAULT_SITE_CODE, connection_points=list(CONNECTION_POINTS))
    bundle = certs / "bench-client-cas.pem"
    bundle.write_bytes((certs / pki.ROOT_CA_CERT).read_bytes() + (certs / pki.ISSUING_CA_CERT).read_bytes())
    chain = certs / "bench-server-chain.pem"
    # The server certificate file may hold the chain already; nginx sends what it is given.
    chain.write_bytes((certs / pki.SERVER_CERT).read_bytes())
    return bundle


def server_tls(certs: Path) -> nginx_conf.TLSFiles:
    return nginx_conf.TLSFiles(certificate=certs / "bench-server-chain.pem", key=certs / pki.SERVER_KEY,
                               client_ca=certs / "bench-client-cas.pem")


def cmg_overrides(certs: Path, backend_url: str, instances: int,
                  max_connections: int = 20000, connectors: int = 2,
                  taken: set[int] | None = None) -> dict[str, dict[str, object]]:
    """Stack overrides: the DP role points at the backend; MP and SUP stay on the mock site.

    Roles given here replace the default roles, so all three are listed; the mock site
    gets fixed free ports so that the MP and SUP URLs are right. Every port chosen is
    told from the others (and from ``taken``, to which they are added): each is free
    when chosen, and nothing binds them until the stack starts.
    """
    taken = set() if taken is None else taken
    mp_port, sup_port, dp_port = free_port(avoid=taken), free_port(avoid=taken), free_port(avoid=taken)
    return {
        # Monitoring ports too: their defaults clash with any other stack on the machine.
        "service": {"tunnel_base_port": free_port_run(instances, avoid=taken), "max_connections": max_connections,
                    "monitoring_base_port": free_port_run(instances, avoid=taken)},
        "connection_point": {"monitoring_base_port": free_port_run(connectors, avoid=taken)},
        "certificates": {"dir": str(certs)},
        "site": {
            # The mock Entra ID tenant's port too: its default (8006) may be taken by
            # another stack on the machine.
            "mp_port": mp_port, "sup_port": sup_port, "dp_port": dp_port, "entra_port": free_port(avoid=taken),
            "roles": [
                {"role_id": ROLE_ID_BASE + 3, "kind": "MP", "name": "MP01",
                 "internal_url": f"http://127.0.0.1:{mp_port}"},
                {"role_id": ROLE_ID_BASE + 4, "kind": "SUP", "name": "SUP01",
                 "internal_url": f"http://127.0.0.1:{sup_port}"},
                {"role_id": DP_ROLE_ID, "kind": "DP", "name": "DP01", "internal_url": backend_url,
                 "endpoints": ["SMS_DP_SMSPKG$"]},
            ],
        },
    }


@contextlib.contextmanager
def direct(shared: Shared) -> Iterator[Running]:
    be = shared.backend
    target = shared.target(be.https_port)
    yield Running("direct", target, {"backend": lambda: [be.nginx.proc.pid]},
                  "HTTPS straight to the backend nginx", nocert=without_cert(target), serving_group="backend")


@contextlib.contextmanager
def cmg(shared: Shared, instances: int, connectors: int) -> Iterator[Running]:
    name = f"cmg-{instances}i{connectors}c"
    d = shared.workdir / name
    d.mkdir(parents=True, exist_ok=True)
    taken: set[int] = set()
    stack = Stack(d, port=free_port(avoid=taken), instances=instances, connectors=connectors,
                  overrides=cmg_overrides(shared.certs, f"http://127.0.0.1:{shared.backend.http_port}",
                                          instances, shared.max_client_connections, connectors, taken))
    stack.start()
    try:
        def pids(kind: str) -> Callable[[], list[int]]:
            return lambda: [p.pid for p in stack.processes if p.kind == kind and p.alive()]

        port = int(stack.deployment["listen"].rpartition(":")[2])
        be = shared.backend
        target = shared.target(port, f"/CCM_Proxy_MutualAuth/{DP_ROLE_ID}")
        nocert = without_cert(target, f"/CCM_Proxy_ServerAuth/{DP_ROLE_ID}",
                              (f"Authorization: Bearer {ccm_token(stack)}",))
        yield Running(name, target,
                      {"gateway": pids("gateway"), "connector": pids("connector"),
                       "backend": lambda: [be.nginx.proc.pid]},
                      f"gateway x{instances} -> tunnel -> connection point x{connectors} -> backend "
                      f"(memory allocator: {_allocators(stack)})",
                      nocert=nocert, mp_prefix=f"/CCM_Proxy_MutualAuth/{MP_ROLE_ID}", serving_group="gateway",
                      mix_groups={"site": pids("site")})
    finally:
        stack.stop()


def _allocators(stack: Stack) -> str:
    """What the stack's gateways and connection points say they run with (their READY lines)."""
    seen = sorted({str(p.ready.get("allocator", "?")) for p in stack.processes if p.kind in ("gateway", "connector")})
    return ", ".join(seen)


def _mix_site(shared: Shared, name: str) -> MockSite | None:
    """The mock site for the mix behind a proxy (its MP), or None when the mix is not run."""
    if not shared.mix_site:
        return None
    site = cmg_overrides(shared.certs, f"http://127.0.0.1:{shared.backend.http_port}", 1)["site"]
    return MockSite(shared.workdir, name, shared.certs, site)


@contextlib.contextmanager
def nginx_proxy(shared: Shared) -> Iterator[Running]:
    port = free_port()
    site = _mix_site(shared, "proxy-site")
    proxy = Nginx(shared.tools["nginx"], shared.workdir, "proxy",
                  nginx_conf.proxy_conf(shared.workdir, "proxy", port, shared.backend.http_port, shared.tls,
                                        mp_port=site.mp_port if site else None),
                  [port])
    try:
        if site is not None:
            site.start()
        proxy.start()
        be = shared.backend
        target = shared.target(port)
        yield Running("nginx", target, {"proxy": lambda: [proxy.proc.pid],
                                        "backend": lambda: [be.nginx.proc.pid]},
                      "nginx TLS reverse proxy -> backend" + (" (MP paths -> mock site)" if site else ""),
                      nocert=without_cert(target), serving_group="proxy",
                      mp_prefix="" if site else None,
                      mix_groups={"site": lambda: [site.proc.pid]} if site else {})
    finally:
        proxy.stop()
        if site is not None:
            site.stop()


@contextlib.contextmanager
def ssh_tunnel(shared: Shared) -> Iterator[Running]:
    site = _mix_site(shared, "ssh-site")
    tunnel = SshTunnel(shared.tools["sshd"], shared.tools["ssh"], shared.tools["ssh-keygen"],
                       shared.workdir, shared.backend.http_port, mp_port=site.mp_port if site else None)
    port = free_port()
    proxy = Nginx(shared.tools["nginx"], shared.workdir, "sshproxy",
                  nginx_conf.proxy_conf(shared.workdir, "sshproxy", port, tunnel.remote_port, shared.tls,
                                        mp_port=tunnel.remote_mp_port),
                  [port])
    try:
        if site is not None:
            site.start()
        tunnel.start()
        proxy.start()
        be = shared.backend
        target = shared.target(port)
        yield Running("ssh-tunnel", target,
                      {"proxy": lambda: [proxy.proc.pid], "sshd": lambda: [tunnel.sshd.pid],
                       "ssh": lambda: [tunnel.ssh.pid], "backend": lambda: [be.nginx.proc.pid]},
                      "nginx TLS -> sshd -> ssh -R (on-prem) -> backend" + (" (MP paths -> mock site)" if site else ""),
                      nocert=without_cert(target), serving_group="proxy", mp_prefix="" if site else None,
                      mix_groups={"site": lambda: [site.proc.pid]} if site else {})
    finally:
        proxy.stop()
        tunnel.stop()
        if site is not None:
            site.stop()


def open_scenario(name: str, shared: Shared) -> contextlib.AbstractContextManager[Running]:
    if name == "direct":
        return direct(shared)
    if name == "cmg-1i1c":
        return cmg(shared, 1, 1)
    if name == "cmg-2i2c":
        return cmg(shared, 2, 2)
    if name == "nginx":
        return nginx_proxy(shared)
    if name == "ssh-tunnel":
        return ssh_tunnel(shared)
    raise ValueError(f"unknown scenario {name!r} (known: {', '.join(SCENARIOS)})")


def select(only: str | None) -> list[str]:
    """Scenario names for ``--only a,b``; ``cmg`` selects every cmg variant.

    Raises ``ValueError`` naming an unknown scenario.
    """
    if not only:
        return list(SCENARIOS)
    chosen: list[str] = []
    for want in (w.strip() for w in only.split(",") if w.strip()):
        matches = [s for s in SCENARIOS if s == want or s.startswith(want + "-")]
        if not matches:
            raise ValueError(f"unknown scenario {want!r} (known: {', '.join(SCENARIOS)})")
        chosen.extend(m for m in matches if m not in chosen)
    return [s for s in SCENARIOS if s in chosen]
