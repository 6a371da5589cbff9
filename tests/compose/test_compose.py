"""docker-compose.yml, validated and run for real with podman (no Docker engine here).

The set-up (``podman_env``) follows ``../shared/CONTAINERS.md``: packages with apt-get
when missing, podman's own configuration and storage under ``/var/tmp/cmg-podman``,
a debootstrap stand-in for ``python:3.11-slim`` built once and kept there,
``podman system service`` on our own socket, ``docker-compose`` v1 against it, and a
healthcheck loop beside it. The test builds the image, brings the deployment up
(cert init, site, two gateway instances, two connection points), waits for every
service to be healthy, runs the ``client`` profile (one internet client cycle) and
the same cycle from the host through the published port, checks that on-prem is
unreachable from the internet and cloud networks, then tears everything down
(``compose down -v``, the service stopped; the cached base image stays).

Time: about 3 minutes on a fresh machine (apt-get, debootstrap, image build), about
1 minute when the base image is cached.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import podman_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROJECT = f"cmgtest{os.getpid()}"
LONG_RUNNING = ("site", "gateway-0", "gateway-1", "connector-1", "connector-2")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]


def _compose_binary() -> str:
    if not shutil.which("docker-compose"):
        try:
            podman_env.ensure_packages()
        except podman_env.Unavailable as exc:
            pytest.skip(str(exc))
    return "docker-compose"


def test_compose_file_validates() -> None:
    r = subprocess.run([_compose_binary(), "-f", str(COMPOSE_FILE), "config", "-q"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    config = subprocess.run([_compose_binary(), "-f", str(COMPOSE_FILE), "config"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60).stdout
    assert "internal: true" in config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


class Deployment:
    def __init__(self, service: podman_env.PodmanService, https_port: int) -> None:
        self.service = service
        self.https_port = https_port

    def compose(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return self.service.compose(COMPOSE_FILE, *args, project=PROJECT, check=check, timeout=timeout)

    def podman(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return podman_env.podman(self.service.env, *args, check=check, timeout=120)

    def container(self, service: str) -> str:
        ids = self.podman("ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}",
                          "--filter", f"label=com.docker.compose.service={service}",
                          "--filter", "label=com.docker.compose.oneoff=False").stdout.split()
        assert ids, f"no container for {service}"
        return ids[0]

    def inspect(self, service: str) -> dict[str, Any]:
        return dict(json.loads(self.podman("inspect", self.container(service)).stdout)[0])

    def health(self, service: str) -> str:
        state = self.inspect(service)["State"]
        health = state.get("Health") or state.get("Healthcheck") or {}
        return str(health.get("Status", "")) if state.get("Running") else f"not running ({state.get('Status')})"

    def exec(self, service: str, *argv: str) -> subprocess.CompletedProcess[str]:
        return self.podman("exec", self.container(service), *argv, check=False)


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    if os.geteuid() != 0:
        pytest.skip("podman here runs rootful (its own storage and networks): needs root")
    t0 = time.monotonic()
    try:
        env = podman_env.prepare()
    except podman_env.Unavailable as exc:
        pytest.skip(f"podman cannot run here: {exc}")
    print(f"podman ready in {time.monotonic() - t0:.0f} s", flush=True)
    service = podman_env.PodmanService(env).start()
    service.env["CMG_HTTPS_PORT"] = str(free_port())
    d = Deployment(service, int(service.env["CMG_HTTPS_PORT"]))
    try:
        t1 = time.monotonic()
        # One build (every service names the same image; `up --build` would build it
        # once per service under podman's compat API, which keeps no layer cache), then up.
        d.compose("build", "cert-init", timeout=1200)
        print(f"image built in {time.monotonic() - t1:.0f} s", flush=True)
        t1 = time.monotonic()
        d.compose("up", "-d", timeout=600)
        print(f"compose up in {time.monotonic() - t1:.0f} s", flush=True)
        deadline = time.monotonic() + 120
        while True:
            states = {s: d.health(s) for s in LONG_RUNNING}
            if all(v == "healthy" for v in states.values()):
                break
            if time.monotonic() > deadline:
                logs = d.compose("logs", "--no-color", "--tail", "40", check=False).stdout
                pytest.fail(f"services not healthy after 120 s: {states}\n{logs[-6000:]}")
            time.sleep(2)
        print(f"every service healthy {time.monotonic() - t1:.0f} s after up", flush=True)
        yield d
    finally:
        r = d.compose("down", "-v", "--remove-orphans", "-t", "15", check=False)
        print(f"compose down: exit {r.returncode}\n{r.stdout[-1500:]}{r.stderr[-1500:]}", flush=True)
        # Whatever compose left of this project (it must be nothing): containers,
        # networks, volumes, by compose's project label.
        left = podman_env.remove_project(service.env, PROJECT)
        service.stop()
        if left:
            print(f"compose down left {left} behind: removed with podman", flush=True)


def test_every_service_is_healthy_and_init_completed(deployment: Deployment) -> None:
    ps = deployment.compose("ps", "-a").stdout
    init = deployment.inspect("cert-init")["State"]
    assert init.get("ExitCode") == 0 and not init.get("Running"), init
    for s in LONG_RUNNING:
        assert deployment.health(s) == "healthy", ps


def test_components_run_with_mimalloc(deployment: Deployment) -> None:
    """The image installs mimalloc and the entry point preloads it (cmg/allocator.py)."""
    probe = ("import glob; print(sorted(open(p).read().count('libmimalloc') > 0 "
             "for p in glob.glob('/proc/[0-9]*/maps')))")
    for service in LONG_RUNNING:
        r = deployment.exec(service, "python", "-c", probe)
        assert r.returncode == 0 and "True" in r.stdout, f"{service}: {r.stdout} {r.stderr}"


def test_client_profile_runs_a_cycle(deployment: Deployment) -> None:
    r = deployment.compose("run", "--rm", "client", check=False, timeout=300)
    assert r.returncode == 0, f"client cycle failed:\n{r.stdout[-4000:]}\n{r.stderr[-3000:]}"
    assert "SMS_ActiveMPCandidate" in r.stdout or "MPLIST" in r.stdout, r.stdout


def test_status_page_sees_both_instances_and_both_connection_points(deployment: Deployment) -> None:
    probe = ("import json, urllib.request; "
             "print(urllib.request.urlopen('http://127.0.0.1:9124/status/all.json', timeout=10).read().decode())")
    r = deployment.exec("gateway-0", "python", "-c", probe)
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["status"] == "Ready", status
    assert [i["status"] for i in status["instances"]] == ["Ready", "Ready"]
    for cp in status["connection_points"]:
        assert set(cp["instances"].values()) == {"Connected"}, cp


def test_client_from_the_host_through_the_published_port(deployment: Deployment, tmp_path: Path) -> None:
    volume = f"{PROJECT}_client-kit"
    mount = Path(json.loads(deployment.podman("volume", "inspect", volume).stdout)[0]["Mountpoint"])
    kit = json.loads((mount / "deployment.json").read_text(encoding="utf-8"))
    shutil.copytree(mount / "certs", tmp_path / "certs")
    kit["listen"] = f"127.0.0.1:{deployment.https_port}"
    (tmp_path / "deployment.json").write_text(json.dumps(kit), encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "cmg", "client", "--deployment", str(tmp_path / "deployment.json")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, f"client cycle failed:\n{r.stdout[-4000:]}\n{r.stderr[-3000:]}"


PROBE = """
import socket, sys
from concurrent.futures import ThreadPoolExecutor
def probe(target):
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1.5).close()
        return "open"
    except OSError as exc:
        return f"{type(exc).__name__} {exc.errno}"
targets = sys.argv[1:]
with ThreadPoolExecutor(len(targets)) as pool:
    for target, result in zip(targets, pool.map(probe, targets)):
        print(target, result)
"""


def probe(run: Any, targets: list[str]) -> dict[str, str]:
    r = run("python", "-c", PROBE, *targets)
    assert r.returncode == 0, r.stderr
    return dict(line.split(" ", 1) for line in r.stdout.strip().splitlines())


def test_onprem_is_unreachable_from_internet_and_cloud(deployment: Deployment) -> None:
    networks = deployment.inspect("site")["NetworkSettings"]["Networks"]
    assert list(networks) == [f"{PROJECT}_onprem"], networks
    site_ip = networks[f"{PROJECT}_onprem"]["IPAddress"]
    connector_onprem_ip = deployment.inspect("connector-1")["NetworkSettings"]["Networks"][f"{PROJECT}_onprem"]["IPAddress"]
    # MP, SUP, DP (the mock Entra tenant is off in compose: docker/deployment.toml)
    site_targets = [f"{host}:{port}" for host in ("site", site_ip) for port in (8003, 8530, 8004)]
    # Positive control: a connection point reaches every site port, by name and address.
    seen = probe(lambda *a: deployment.exec("connector-1", *a), site_targets)
    assert set(seen.values()) == {"open"}, seen
    # A connection point listens on nothing but its loopback tunnel relays.
    tcp = deployment.exec("connector-1", "cat", "/proc/net/tcp", "/proc/net/tcp6").stdout.splitlines()
    listening = [line.split()[1] for line in tcp if len(line.split()) > 3 and line.split()[3] == "0A"]
    assert listening and all(addr.startswith("0100007F:") for addr in listening), listening
    # From the cloud (a gateway) and the internet (a client container): nothing on-prem.
    client = deployment.compose("run", "-d", "--rm", "--entrypoint", "sleep", "client", "300").stdout.strip()
    try:
        for who, run in (("gateway-0 (cloud)", lambda *a: deployment.exec("gateway-0", *a)),
                         ("a client (internet)", lambda *a: deployment.podman("exec", client, *a, check=False))):
            seen = probe(run, [*site_targets, f"{connector_onprem_ip}:10124"])
            print(who, seen, flush=True)
            assert "open" not in seen.values(), f"{who} reached on-prem: {seen}"
    finally:
        deployment.podman("rm", "-f", "-t", "0", client, check=False)
