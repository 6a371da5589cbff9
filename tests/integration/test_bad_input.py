"""Hostile and broken input, at the client edge and on the tunnel port: each gets a
clear answer and harms nobody else (the process lives, other clients carry on)."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
import urllib.request

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidMessage

from tunnel import Frame, FrameType, PublishedRole, Role, TunnelProtocol

pytestmark = pytest.mark.integration


def raw_exchange(dep, data: bytes, *, wait: float = 5.0, tls: bool = True) -> bytes:
    """Send bytes on a fresh connection (TLS with the client certificate) and read the answer."""
    raw = socket.create_connection((dep.host, dep.port), timeout=wait)
    sock: socket.socket = raw
    if tls:
        sock = dep.ssl_context().wrap_socket(raw, server_hostname=dep.service_name)
    try:
        sock.sendall(data)
        out = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += chunk
    except (OSError, ssl.SSLError):
        pass
    finally:
        sock.close()
    return out


def status_line(answer: bytes) -> bytes:
    return answer.split(b"\r\n", 1)[0]


async def still_serving(dep) -> None:
    async with aiohttp.ClientSession() as s:
        async with await dep.request(s, "GET", dep.mp_path("SMS_MP/.sms_aut?MPLIST")) as r:
            assert r.status == 200


def request(dep, head: str, body: bytes = b"") -> bytes:
    return (head.replace("\n", "\r\n").format(host=dep.service_name, mp=dep.mp_path("CCM_System/request"))
            .encode() + b"\r\n" + body)


@pytest.mark.parametrize("case, head, body, expected", [
    ("bad request line", "GARBAGE\n", b"", b"400 CMGService_BadRequest"),
    ("Content-Length with Transfer-Encoding",
     "POST {mp} HTTP/1.1\nHost: {host}\nContent-Length: 5\nTransfer-Encoding: chunked\n", b"0\r\n\r\nGET /x HTTP/1.1\r\n\r\n",
     b"400 CMGService_BadRequest"),
    ("duplicate Content-Length", "POST {mp} HTTP/1.1\nHost: {host}\nContent-Length: 5\nContent-Length: 6\n", b"hello!",
     b"400 CMGService_BadRequest"),
    ("header line too long", "GET {mp} HTTP/1.1\nHost: {host}\nX-Big: " + "a" * 20000 + "\n", b"",
     b"431 CMGService_RequestHeaderFieldsTooLarge"),
    ("too many headers", "GET {mp} HTTP/1.1\nHost: {host}\n" + "".join(f"X-H{i}: v\n" for i in range(300)), b"",
     b"431 CMGService_RequestHeaderFieldsTooLarge"),
    ("absurd Content-Length", "POST {mp} HTTP/1.1\nHost: {host}\nContent-Length: 99999999999999999999\n", b"",
     b"413 CMGService_RequestEntityTooLarge"),
])
async def test_malformed_requests_get_the_cmgs_answer_and_nothing_else(single, case, head, body, expected):
    answer = await asyncio.to_thread(raw_exchange, single, request(single, head, body), wait=20)
    assert expected in status_line(answer), (case, answer[:300])
    assert answer.count(b"HTTP/1.") == 1, "a smuggled second request was answered"
    assert b"aaaa" not in answer and b"GARBAGE" not in answer  # never an echo of the input
    await still_serving(single)


@pytest.mark.parametrize("path", [
    "SMS_MP/../_mock/uploads", "SMS_MP/%2e%2e/_mock/uploads", "SMS_MP/%252e%252e/_mock/uploads",
    "SMS_MP%2f..%2f_mock/uploads", "_MOCK/uploads", "SMS_MP/..%5c_mock",
])
async def test_path_tricks_never_leave_the_published_endpoints(single, path):
    async with aiohttp.ClientSession() as s:
        async with await single.request(s, "GET", single.mp_path(path)) as r:
            body = await r.text()
    assert r.status in (400, 404), (path, r.status, r.reason)
    assert "uploads" not in body.lower() or r.reason.startswith("CMG")


def test_non_http_bytes_and_broken_tls_on_the_client_port(single):
    for junk in (b"\x16\x03\x01\x00\x05hello",  # a broken TLS record
                 b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # plain HTTP on the TLS port
                 bytes(range(256)) * 4):  # noise
        answer = raw_exchange(single, junk, tls=False)
        assert b"HTTP/" not in answer, answer[:100]  # at most a TLS alert, then the door closes
    asyncio.run(still_serving(single))


def test_a_slow_header_client_is_cut_off(single, monkeypatch):
    t0 = time.monotonic()
    answer = raw_exchange(single, request(single, "GET {mp} HTTP/1.1\nHost: {host}\n")[:-2], wait=30)
    assert answer == b"" and 10 < time.monotonic() - t0 < 25  # client_header_timeout = 15 s


async def test_connection_flood_is_capped_and_served_connections_carry_on(stack_factory):
    dep = stack_factory("flood", instances=1, connectors=1, overrides={"service": {"max_connections": 20}})
    ctx = dep.ssl_context()
    held: list[ssl.SSLSocket] = []
    refused = 0
    for _ in range(30):
        try:
            raw = socket.create_connection((dep.host, dep.port), timeout=5)
            tls = ctx.wrap_socket(raw, server_hostname=dep.service_name)
            held.append(tls)
        except (OSError, ssl.SSLError):
            refused += 1
    try:
        assert len(held) == 20 and refused == 10, (len(held), refused)
        # the connections inside the limit are served
        req = request(dep, "GET {mp} HTTP/1.1\nHost: {host}\n").replace(b"CCM_System/request", b"SMS_MP/.sms_aut?MPLIST")
        held[0].sendall(req)
        assert b" 200 " in held[0].recv(65536).split(b"\r\n", 1)[0]
    finally:
        for t in held:
            t.close()
    await asyncio.sleep(0.3)
    await still_serving(dep)  # and once they are gone, new ones are accepted
    assert "Connection limit 20 reached" in (dep.path("logs_dir") / "CMGService.log").read_text()


def _connector_ssl(dep) -> ssl.SSLContext:
    certs = dep.path("ca_cert").parent
    ctx = ssl.create_default_context(cafile=str(dep.path("ca_cert")))
    ctx.load_cert_chain(str(certs / "connection-point-CMGCP01.pem"), str(certs / "connection-point-CMGCP01.key"))
    return ctx


async def rogue_tunnel(dep, first_bytes: bytes) -> tuple[int, str]:
    url = f"wss://127.0.0.1:{dep.data['tunnel_ports'][0]}/CMGTunnel"
    async with connect(url, ssl=_connector_ssl(dep), server_hostname=dep.service_name,
                       subprotocols=["cmg-tunnel.v1"], proxy=None) as ws:
        await ws.send(first_bytes)
        try:
            while True:
                await asyncio.wait_for(ws.recv(), 10)
        except ConnectionClosed as closed:
            return (closed.rcvd.code, closed.rcvd.reason) if closed.rcvd else (-1, "")
    return 0, ""


def hello(roles) -> bytes:
    proto = TunnelProtocol(Role.CONNECTOR)
    proto.send_hello("PS1", "CMGCP01", roles)
    return b"".join(proto.data_to_send())


async def test_a_hello_publishing_what_the_site_does_not_is_refused(single):
    mp = single.role("MP")
    for roles in (
        [PublishedRole(72057594037927999, "MP", "EVIL", "http://10.0.0.1", ("SMS_MP",))],
        [PublishedRole(mp["role_id"], "MP", "MP01", mp["internal_url"], ("SMS_MP", "_mock"))],
    ):
        code, _ = await rogue_tunnel(single, hello(roles))
        assert code in (1000, 1002), code  # closed by the gateway, with the reason in its log
    log = (single.path("logs_dir") / "CMGService.log").read_text()
    assert "which is not a role of site PS1" in log and "_mock of role" in log
    await still_serving(single)


async def test_a_ping_flood_costs_the_flooder_its_tunnel(single):
    proto = TunnelProtocol(Role.CONNECTOR)
    mp = single.role("MP")
    proto.send_hello("PS1", "CMGCP01", [PublishedRole(mp["role_id"], "MP", "MP01", mp["internal_url"], ("SMS_MP",))])
    pings = b"".join(Frame(FrameType.PING, 0, 0, i.to_bytes(8, "big")).serialize() for i in range(500))
    code, _ = await rogue_tunnel(single, b"".join(proto.data_to_send()) + pings)
    assert code == 1002
    assert "ping flood" in (single.path("logs_dir") / "CMGService.log").read_text()
    await still_serving(single)


_token = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ_abc-!#$%&'*+.^`|~0123456789", min_size=0, max_size=12)
_junk = st.binary(max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(method=st.one_of(_token, _junk.map(lambda b: b.decode("latin-1"))),
       target=st.one_of(st.sampled_from(["/CCM_Proxy_MutualAuth/72057594037927939/SMS_MP/.sms_aut?MPLIST",
                                         "/CCM_Proxy_MutualAuth/72057594037927939/%2e%2e/x", "*", "", "/"]),
                        _junk.map(lambda b: b.decode("latin-1"))),
       version=st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/9", "", "http/1.1"]),
       headers=st.lists(st.tuples(_token, _junk.map(lambda b: b.decode("latin-1"))), max_size=4))
def test_fuzzed_request_heads_get_an_answer_or_a_close_and_the_gateway_lives(single, method, target, version, headers):
    head = f"{method} {target} {version}\r\nHost: {single.service_name}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    answer = raw_exchange(single, head.encode("latin-1"), wait=5)
    if answer:
        line = status_line(answer)
        assert line.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), answer[:200]
        code = int(line.split()[1])
        assert 200 <= code < 600
        if code >= 400 and code not in (405, 416):
            reason = line.split(b" ", 2)[2] if line.count(b" ") >= 2 else b""
            assert reason.startswith(b"CMG") or code in (400, 404, 501), line  # the CMG's own words, or the MP's
    assert single.stack.process("gateway-0").alive()


def test_a_stalled_request_body_is_cut_off_and_never_reaches_the_mp_complete(stack_factory):
    dep = stack_factory("slow-body", instances=1, connectors=1, overrides={"service": {"client_body_timeout": 2}})
    job = "{" + "0" * 8 + "-0000-0000-0000-" + "1" * 12 + "}"
    path = dep.mp_path(f"CCM_Incoming/{job}")
    head = (f"BITS_POST {path} HTTP/1.1\r\nHost: {dep.service_name}\r\nBITS-Packet-Type: Create-Session\r\n"
            "BITS-Supported-Protocols: {7df0354d-249b-430f-820d-3d2a9bef4931}\r\nContent-Length: 0\r\n\r\n")
    answer = raw_exchange(dep, head.encode(), wait=5)
    session = [l.split(b": ", 1)[1] for l in answer.split(b"\r\n") if l.lower().startswith(b"bits-session-id")][0]
    fragment = (f"BITS_POST {path} HTTP/1.1\r\nHost: {dep.service_name}\r\nBITS-Packet-Type: Fragment\r\n"
                f"BITS-Session-Id: {session.decode()}\r\nContent-Range: bytes 0-99999/100000\r\n"
                "Content-Length: 100000\r\n\r\n").encode() + b"x" * 1000  # then nothing more
    t0 = time.monotonic()
    answer = raw_exchange(dep, fragment, wait=20)
    assert time.monotonic() - t0 < 10, "the stalled body was not cut off"
    assert b" 200 " not in status_line(answer)
    with urllib.request.urlopen(f"{dep.role('MP')['internal_url']}/_mock/uploads", timeout=5) as r:
        uploads = json.loads(r.read())
    ups = uploads if isinstance(uploads, list) else uploads.get("uploads", [])
    assert not [u for u in ups if u.get("name") == job and u.get("complete")]
    assert "Request body broke off after 1000 bytes: stalled for 2 s" in (dep.path("logs_dir") / "CMGService.log").read_text()


def test_a_tunnel_without_a_certificate_is_refused_at_the_handshake(single):
    url = f"wss://127.0.0.1:{single.data['tunnel_ports'][0]}/CMGTunnel"
    ctx = ssl.create_default_context(cafile=str(single.path("ca_cert")))  # no client certificate

    async def attempt() -> None:
        async with connect(url, ssl=ctx, server_hostname=single.service_name,
                           subprotocols=["cmg-tunnel.v1"], proxy=None) as ws:
            await ws.recv()

    with pytest.raises((ssl.SSLError, OSError, ConnectionClosed, InvalidMessage)):
        asyncio.run(attempt())
    asyncio.run(still_serving(single))
