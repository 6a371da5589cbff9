"""Whole-stack fixtures: real processes on loopback, started through ``cmg.testing``
(the same API and launcher users get; no second way to start a stack here).

``single`` and ``pair`` are shared by a module's tests; ``stack_factory`` gives a test
stacks of its own; the ``cmg_stack`` fixture (cmg/pytest_plugin.py) is available too."""

from __future__ import annotations

import contextlib
import json
import signal
import ssl
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest
import yarl

from cmg.launcher import Stack, free_port
from cmg.testing import CMGStack


@dataclass
class Deployment:
    """deployment.json, read the way a user's script would read it."""

    dir: Path
    data: dict[str, Any]
    stack: Stack  # the launcher (processes, wait_connected...)
    cmg: CMGStack  # the test API (clients, site_requests, faults)

    def path(self, key: str) -> Path:
        p = Path(self.data[key])
        return p if p.is_absolute() else self.dir / p

    @property
    def host(self) -> str:
        return self.data["listen"].rpartition(":")[0]

    @property
    def port(self) -> int:
        return int(self.data["listen"].rpartition(":")[2])

    @property
    def service_name(self) -> str:
        return str(self.data["service_name"])

    def role(self, kind: str) -> dict[str, Any]:
        return next(r for r in self.data["roles"] if r["kind"] == kind)

    def ssl_context(self, cert: Path | None = None, key: Path | None = None,
                    default_client: bool = True) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.path("ca_cert")))
        if cert is not None:
            # A test client may present what a real one would not (a 1024-bit key):
            # the CMG, not the client's OpenSSL, must be the one to refuse it.
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
            ctx.load_cert_chain(str(cert), str(key))
        elif default_client:
            ctx.load_cert_chain(str(self.path("client_cert")), str(self.path("client_key")))
        return ctx

    def url(self, path: str) -> str:
        return f"https://{self.host}:{self.port}{path}"

    def mp_path(self, tail: str) -> str:
        return f"/CCM_Proxy_MutualAuth/{self.role('MP')['role_id']}/{tail}"

    async def request(self, session: aiohttp.ClientSession, method: str, path: str,
                      ctx: ssl.SSLContext | None = None, **kw: Any) -> aiohttp.ClientResponse:
        headers = {"Host": self.service_name, **kw.pop("headers", {})}
        # encoded=True: the path goes on the wire exactly as written (no dot-segment folding)
        return await session.request(method, yarl.URL(self.url(path), encoded=True), ssl=ctx or self.ssl_context(),
                                     server_hostname=self.service_name, headers=headers, **kw)


def start_stack(tmp_path_factory: pytest.TempPathFactory | None, name: str, **kw: Any) -> Deployment:
    """A started stack (``kw``: :class:`cmg.testing.CMGStack` options); stop with ``dep.cmg.stop()``."""
    cmg = CMGStack(**kw).start()
    assert cmg.directory is not None and cmg.stack is not None
    return Deployment(cmg.directory, cmg.deployment, cmg.stack, cmg)


@pytest.fixture
def stack_factory(tmp_path_factory: pytest.TempPathFactory):
    """Stacks of a test's own (stopped after it), for tests that break them."""
    made: list[Deployment] = []

    def make(name: str, **kw: Any) -> Deployment:
        dep = start_stack(tmp_path_factory, name, **kw)
        made.append(dep)
        return dep

    yield make
    for dep in made:
        dep.cmg.stop()


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory):
    """One instance, one connection point: every request shares one tunnel."""
    dep = start_stack(tmp_path_factory, "single", instances=1, connectors=1)
    yield dep
    dep.cmg.stop()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    """Two instances, two connection points: the high-availability shape."""
    dep = start_stack(tmp_path_factory, "pair", instances=2, connectors=2)
    yield dep
    dep.cmg.stop()


@contextlib.contextmanager
def _lone_gateway(tmp_path: Path, certs: Path, service_lines: str, pem: bool = False) -> Iterator[int]:
    """One gateway instance of its own (no connection point), on free ports; yields its port."""
    cfg = tmp_path / f"gw-{uuid.uuid4().hex[:8]}.toml"
    server = 'server_certificate = "cmg-server.pem"\nserver_key = "cmg-server.key"' if pem else ""
    cfg.write_text(f"""
[service]
{service_lines}
client_port = {free_port()}
tunnel_base_port = {free_port()}
monitoring_base_port = {free_port()}
listen_grace = 0
[certificates]
dir = "{certs}"
{server}
[logging]
dir = "{tmp_path / 'logs'}"
[entra]
enabled = false
""")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("READY "), proc.stderr.read() if proc.stderr else line
        yield int(json.loads(line[6:])["client_port"])
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


@pytest.fixture
def lone_gateway():
    """``with lone_gateway(tmp_path, certs_dir, "enforce_tls12 = false") as port:``"""
    return _lone_gateway
