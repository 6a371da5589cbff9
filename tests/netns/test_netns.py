"""Network separation without containers: three network namespaces on this machine.

    internet (10.213.1.2) ──veth── (10.213.1.1) cloud (10.213.2.1) ──veth── (10.213.2.2) onprem
    internet client                 gateway instance                          connector + site

Routes: internet knows only its link to cloud; onprem has one route, to the cloud's
public subnet (where the gateway listens); cloud does not forward (ip_forward = 0).
The on-prem edge is a stateful firewall (nftables in the onprem namespace): replies
to what on-prem opened are let in, new connections from the cloud link are refused.
The stack is started by the one launcher (``Stack``) with ``command_prefix`` putting
each kind of component in its namespace. The test shows that the internet client's
cycle works, that the site really listens on its on-prem address (from on-prem), and
that nothing listening on-prem accepts a connection from the cloud or internet side.

Needs root, ``ip netns`` and nftables (installed with apt-get when missing). Every
namespace is the test's own (named after its pid) and is deleted in ``finally``; no
traffic leaves them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

from cmg.launcher import Stack
from cmg.testing import CMGStack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

TAG = f"cmgt{os.getpid()}"
NS = {zone: f"{TAG}-{zone}" for zone in ("internet", "cloud", "onprem")}
INTERNET_IP, CLOUD_PUBLIC_IP = "10.213.1.2", "10.213.1.1"
CLOUD_PRIVATE_IP, ONPREM_IP = "10.213.2.1", "10.213.2.2"
CLIENT_PORT, TUNNEL_BASE = 8443, 10124

# The on-prem edge: outbound only. Loopback and replies pass; anything new from
# outside is refused with a reset (a DROP would do too, only slower to observe).
EDGE_RULES = """
table inet cmg_edge {
    chain input {
        type filter hook input priority 0; policy drop;
        iif "lo" accept
        ct state established,related accept
        meta l4proto tcp reject with tcp reset
        reject
    }
}
"""


def run(*argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, text=True, capture_output=True, input=input, timeout=120)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def in_ns(zone: str, *argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return run("ip", "netns", "exec", NS[zone], *argv, check=check, input=input)


def ensure_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if not shutil.which("ip"):
        pytest.skip("iproute2 (ip) is not installed")
    if not shutil.which("nft"):
        if not shutil.which("apt-get"):
            pytest.skip("nftables is missing and apt-get is not available to install it")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        r = subprocess.run(["apt-get", "install", "-y", "-q", "nftables"], env=env, capture_output=True, text=True)
        if r.returncode != 0 or not shutil.which("nft"):
            pytest.skip(f"could not install nftables: {r.stderr.strip()[-300:]}")


def delete_namespaces() -> None:
    for ns in NS.values():
        if run("ip", "netns", "pids", ns, check=False).returncode == 0:
            # Only processes in our own namespaces: what this test started.
            for pid in run("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            run("ip", "netns", "delete", ns, check=False)


def make_namespaces() -> None:
    for ns in NS.values():
        r = run("ip", "netns", "add", ns, check=False)
        if r.returncode != 0:
            pytest.skip(f"cannot create network namespaces here: {r.stderr.strip()}")
    for zone in NS:
        in_ns(zone, "ip", "link", "set", "lo", "up")
    # The two links, created straight inside their namespaces.
    run("ip", "link", "add", "to-cloud", "netns", NS["internet"], "type", "veth",
        "peer", "name", "to-internet", "netns", NS["cloud"])
    run("ip", "link", "add", "to-cloud", "netns", NS["onprem"], "type", "veth",
        "peer", "name", "to-onprem", "netns", NS["cloud"])
    for zone, dev, addr in (("internet", "to-cloud", INTERNET_IP), ("cloud", "to-internet", CLOUD_PUBLIC_IP),
                            ("cloud", "to-onprem", CLOUD_PRIVATE_IP), ("onprem", "to-cloud", ONPREM_IP)):
        in_ns(zone, "ip", "addr", "add", f"{addr}/24", "dev", dev)
        in_ns(zone, "ip", "link", "set", dev, "up")
    # Routes only from on-prem towards the cloud (the gateway's public address).
    in_ns("onprem", "ip", "route", "add", "10.213.1.0/24", "via", CLOUD_PRIVATE_IP)
    in_ns("cloud", "sysctl", "-q", "-w", "net.ipv4.ip_forward=0")
    in_ns("onprem", "nft", "-f", "-", input=EDGE_RULES)


@pytest.fixture(scope="module")
def namespaces() -> Iterator[dict[str, str]]:
    ensure_tools()
    delete_namespaces()
    try:
        make_namespaces()
        yield NS
    finally:
        delete_namespaces()


@pytest.fixture(scope="module")
def stack(namespaces: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("netns")
    prefix = {kind: ["ip", "netns", "exec", namespaces[zone]]
              for kind, zone in (("gateway", "cloud"), ("connector", "onprem"), ("site", "onprem"))}
    cmg = CMGStack(directory=directory, ephemeral=False, instances=1, connectors=1,
                   command_prefix=prefix, connect_timeout=30,
                   overrides={
                       # The gateway listens on the cloud's public address: the client's
                       # port and the tunnel port; connectors dial it there.
                       "service": {"bind": CLOUD_PUBLIC_IP, "client_port": CLIENT_PORT,
                                   "tunnel_base_port": TUNNEL_BASE},
                       # The site listens on its on-prem address (its roles' internal URLs).
                       "site": {"bind": ONPREM_IP},
                   })
    try:
        cmg.start()
        yield cmg.stack
    finally:
        cmg.stop()


def probe(zone: str, host: str, port: int) -> str:
    """'open' when a TCP connection from the zone succeeds, else the error's name."""
    code = textwrap.dedent(f"""
        import socket
        try:
            socket.create_connection(({host!r}, {port}), timeout=3).close()
            print("open")
        except OSError as exc:
            print(type(exc).__name__ + ":" + str(exc.errno))
    """)
    return in_ns(zone, sys.executable, "-c", code).stdout.strip()


def onprem_listening_ports() -> set[int]:
    out = in_ns("onprem", "ss", "-ltnH").stdout
    return {int(line.split()[3].rpartition(":")[2]) for line in out.splitlines() if line.strip()}


def test_client_cycle_from_the_internet(stack: Stack) -> None:
    assert stack.deployment["listen"] == f"{CLOUD_PUBLIC_IP}:{CLIENT_PORT}"
    r = in_ns("internet", sys.executable, "-m", "cmg", "client",
              "--deployment", str(stack.dir / "deployment.json"), check=False)
    assert r.returncode == 0, f"client cycle failed:\n{r.stdout}\n{r.stderr}"
    assert "MPLIST" in r.stdout or "SMS_ActiveMPCandidate" in r.stdout, r.stdout


def test_routes_only_from_onprem_to_cloud(stack: Stack) -> None:
    routes = {zone: in_ns(zone, "ip", "-4", "route").stdout for zone in NS}
    assert "10.213.2." not in routes["internet"]  # the internet knows nothing of on-prem
    assert f"10.213.1.0/24 via {CLOUD_PRIVATE_IP}" in routes["onprem"]
    assert "default" not in "".join(routes.values())
    assert in_ns("cloud", "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "0"
    # Connection points dial out: from on-prem the gateway's tunnel port is open.
    assert probe("onprem", CLOUD_PUBLIC_IP, TUNNEL_BASE) == "open"


def test_nothing_onprem_accepts_connections_from_cloud_or_internet(stack: Stack) -> None:
    ports = onprem_listening_ports()
    site_ports = {int(v) for k, v in stack.process("mock_site").ready["ports"].items() if k in ("mp", "sup", "dp")}
    assert site_ports <= ports, (site_ports, ports)
    for port in site_ports:  # positive control: the site serves on its on-prem address
        assert probe("onprem", ONPREM_IP, port) == "open"
    for zone in ("cloud", "internet"):
        for port in sorted(ports):
            result = probe(zone, ONPREM_IP, port)
            assert result != "open", f"{zone} reached on-prem port {port}"
            # refused by the edge (cloud) or no route at all (internet): never a timeout
            assert result.startswith(("ConnectionRefusedError", "OSError:101")), (zone, port, result)
