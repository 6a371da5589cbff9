"""Tunnels: round-robin across connection points, reconnection, and hostile peers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import ssl
import time

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from mock_site.content import content_sha256

pytestmark = pytest.mark.integration
MiB = 1024 * 1024


def cp_log(dep, name: str) -> str:
    return (dep.path("logs_dir") / f"SMS_Cloud_ProxyConnector_{name}.log").read_text()


async def get(dep, s, path):
    async with await dep.request(s, "GET", path) as r:
        return r.status, r.reason, await r.read()


async def test_round_robin_across_connection_points(pair):
    before = {n: cp_log(pair, n).count("Forwarding proxy message") for n in pair.data["connection_points"]}
    async with aiohttp.ClientSession() as s:
        for _ in range(20):
            status, _, _ = await get(pair, s, pair.mp_path("SMS_MP/.sms_aut?MPLIST"))
            assert status == 200
    after = {n: cp_log(pair, n).count("Forwarding proxy message") for n in pair.data["connection_points"]}
    served = {n: after[n] - before[n] for n in after}
    assert sum(served.values()) == 20
    assert all(v >= 5 for v in served.values()), served  # strict alternation gives 10/10


def test_every_connection_point_is_connected_to_every_instance(pair):
    for name in pair.data["connection_points"]:
        log = cp_log(pair, name)
        for i in range(2):
            assert f"Connected to CMG instance ProxyService_IN_{i}" in log, (name, i)


def test_connector_log_has_the_real_line_shapes(pair):
    log = cp_log(pair, pair.data["connection_points"][0])
    assert "Switched to internal URL. Replaced 'https://GraniteFalls.WestUS.CloudApp.Azure.Com/CCM_Proxy_MutualAuth/" in log
    assert "EndpointName: SMS_MP ResponseHeader: HTTP/1.1 200 OK ~~ ResponseBodySize:" in log
    line = next(l for l in log.splitlines() if "MessageID:" in l)
    assert line.startswith("<![LOG[MessageID: {") and 'component="SMS_Cloud_ProxyConnector"' in line
    assert "ElapsedTime:" in line and "type=\"1\"" in line


async def test_connector_restart_reconnects_and_traffic_resumes(single):
    proc = single.stack.process("connector-CMGCP01")
    old_pid = proc.pid
    os.kill(old_pid, signal.SIGKILL)
    async with aiohttp.ClientSession() as s:
        # While it is gone: a clear 503, never a hang.
        status, reason, _ = await asyncio.wait_for(get(single, s, single.mp_path("SMS_MP/.sms_aut?MPLIST")), 10)
        if status != 200:
            assert (status, reason) == (503, "CMGConnector_ServiceUnavailable")
        deadline = time.monotonic() + 60
        while True:
            status, reason, _ = await get(single, s, single.mp_path("SMS_MP/.sms_aut?MPLIST"))
            if status == 200 and proc.pid != old_pid:
                break
            assert time.monotonic() < deadline, (status, reason)
            await asyncio.sleep(0.2)
    gw = (single.path("logs_dir") / "CMGService.log").read_text()
    assert gw.count("Connection point CMGCP01 (site PS1) connected") >= 2
    assert "Connection point CMGCP01 disconnected" in gw


def _connector_ssl(dep) -> ssl.SSLContext:
    certs = dep.path("ca_cert").parent
    ctx = ssl.create_default_context(cafile=str(dep.path("ca_cert")))
    ctx.load_cert_chain(str(certs / "connection-point-CMGCP01.pem"), str(certs / "connection-point-CMGCP01.key"))
    return ctx


async def test_wrong_tunnel_version_is_refused_with_a_reason(single):
    url = f"wss://127.0.0.1:{single.data['tunnel_ports'][0]}/CMGTunnel"
    with pytest.raises(InvalidStatus) as err:
        async with connect(url, ssl=_connector_ssl(single), server_hostname=single.service_name,
                           subprotocols=["cmg-tunnel.v0"], proxy=None):
            pass
    assert err.value.response.status_code == 400
    assert b"cmg-tunnel.v0" in err.value.response.body and b"cmg-tunnel.v1" in err.value.response.body


async def test_a_client_certificate_cannot_open_a_tunnel(single):
    url = f"wss://127.0.0.1:{single.data['tunnel_ports'][0]}/CMGTunnel"
    ctx = ssl.create_default_context(cafile=str(single.path("ca_cert")))
    ctx.load_cert_chain(str(single.path("client_cert")), str(single.path("client_key")))
    # TLS 1.3: the server rejects the certificate after the client saw its handshake
    # complete, so the refusal surfaces as a failed websocket handshake.
    with pytest.raises((ssl.SSLError, OSError, WebSocketException)):
        async with connect(url, ssl=ctx, server_hostname=single.service_name,
                           subprotocols=["cmg-tunnel.v1"], proxy=None) as ws:
            await ws.recv()


async def test_rogue_connector_with_malformed_frames_loses_only_its_own_tunnel(single):
    dp = single.role("DP")["role_id"]
    name = f"payload-{40 * MiB}.bin"
    path = f"/CCM_Proxy_MutualAuth/{dp}/SMS_DP_SMSPKG$/Content_0003.1/{name}"
    gateway_pid = single.stack.process("gateway-0").pid

    async def download() -> str:
        digest = hashlib.sha256()
        async with aiohttp.ClientSession() as s:
            async with await single.request(s, "GET", path) as r:
                assert r.status == 200
                async for chunk in r.content.iter_chunked(256 * 1024):
                    digest.update(chunk)
                    await asyncio.sleep(0.002)  # a slowish client keeps the stream in flight
        return digest.hexdigest()

    async def rogue() -> int:
        url = f"wss://127.0.0.1:{single.data['tunnel_ports'][0]}/CMGTunnel"
        async with connect(url, ssl=_connector_ssl(single), server_hostname=single.service_name,
                           subprotocols=["cmg-tunnel.v1"], proxy=None) as ws:
            await ws.send(b"\xff" * 64)  # no such frame type
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            except ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else -1
        return 0

    in_flight = asyncio.ensure_future(download())
    await asyncio.sleep(0.2)
    code = await rogue()
    assert code == 1002
    assert await in_flight == content_sha256("Content_0003.1", name)
    async with aiohttp.ClientSession() as s:
        status, _, _ = await get(single, s, single.mp_path("SMS_MP/.sms_aut?MPLIST"))
    assert status == 200
    assert single.stack.process("gateway-0").pid == gateway_pid and single.stack.process("gateway-0").alive()



def test_a_revoked_connection_point_is_refused(tmp_path_factory, stack_factory):
    from cmg import pki

    dep = stack_factory("revoked", instances=1, connectors=1)
    certs = dep.path("ca_cert").parent
    cert = pki.load_pem_certificates(certs / "connection-point-CMGCP01.pem")[0]
    pki.revoke(certs, cert)
    proc = dep.stack.process("connector-CMGCP01")
    os.kill(proc.pid, signal.SIGKILL)  # the supervisor starts it again; the gateway must refuse it now
    log_path = dep.path("logs_dir") / "CMGService.log"
    deadline = time.monotonic() + 30
    while "Refused connection point CMGCP01" not in log_path.read_text():
        assert time.monotonic() < deadline, log_path.read_text()[-2000:]
        time.sleep(0.2)
    assert "is revoked since" in log_path.read_text()
