"""Issue 5, "no request waits forever": the ways a request could wait without bound, each
reproduced deterministically through a whole stack (see docs/reliability.md, "Issue 5")."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time

import ssl

import aiohttp
import pytest

from mock_site.content import content_sha256

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


def _dp_file(dep, size: int) -> tuple[str, str]:
    name = f"payload-{size}.bin"
    return f"/CCM_Proxy_MutualAuth/{dep.role('DP')['role_id']}/SMS_DP_SMSPKG$/Content_0005.1/{name}", name


async def test_a_client_that_gives_up_before_the_answer_leaks_no_tunnel_credit(stack_factory):
    """A client that goes away while its GET waits for the response head (here: the DP
    holds the answer) cancels the gateway's request handler. Its stream must be reset
    towards the connection point: otherwise the answer that comes later is buffered at
    the gateway, never read and never credited back. The connection point's handler then
    waits for credit forever, and once the abandoned answers hold the tunnel's whole
    window, every later response body on that tunnel waits forever too."""
    dep = stack_factory("abandon", instances=1, connectors=1,
                        overrides={"tunnel": {"stream_window": MIB, "tunnel_window": 2 * MIB}})
    path, name = _dp_file(dep, 4 * MIB)
    dep.cmg.stall("DP")
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(3):  # 3 x 1 MiB of abandoned answers > the 2 MiB tunnel window
                with pytest.raises(asyncio.TimeoutError):
                    async with await dep.request(s, "GET", path, timeout=aiohttp.ClientTimeout(total=0.5)) as r:
                        await r.read()
    finally:
        dep.cmg.unstall("DP")
    # The DP now answers the abandoned requests; the tunnel must still carry a whole download.
    await asyncio.sleep(1.0)
    digest = hashlib.sha256()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        try:
            async with await dep.request(s, "GET", path) as r:
                assert r.status == 200
                async for chunk in r.content.iter_chunked(256 * 1024):
                    digest.update(chunk)
        except asyncio.TimeoutError:
            pytest.fail("a download after the abandoned ones hung: the tunnel has no credit left")
    assert digest.hexdigest() == content_sha256("Content_0005.1", name)
    # The connection point saw each abandoned stream reset ("cancelled by the CMG").
    log = dep.path("logs_dir") / "SMS_Cloud_ProxyConnector_CMGCP01.log"
    deadline = time.monotonic() + 10
    while log.read_text().count("cancelled by the CMG") < 3:
        assert time.monotonic() < deadline, "the abandoned streams were never reset towards the connection point"
        await asyncio.sleep(0.1)


async def test_no_response_head_within_response_timeout_is_a_504(stack_factory):
    """The bound of last resort: whatever keeps a response head from coming (a stream
    lost between the ends, a connection point that never answers), the gateway answers
    504 CMGConnector_GatewayTimeout once service.response_timeout has passed since the
    last request byte, and resets the stream. Here the MP holds every request, and the
    connection point's own request_timeout (600 s) is far away."""
    dep = stack_factory("head-deadline", instances=1, connectors=1,
                        overrides={"service": {"response_timeout": 2}})
    dep.cmg.stall("MP")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
            for method, tail, body in (("CCM_POST", "CCM_System/request", b"<not a message>" * 64),
                                       ("GET", "SMS_MP/.sms_aut?MPLIST", None)):
                t0 = time.monotonic()
                async with await dep.request(s, method, dep.mp_path(tail), data=body) as r:
                    assert (r.status, r.reason) == (504, "CMGConnector_GatewayTimeout"), (method, r.status, r.reason)
                    await r.read()
                assert 1.5 < time.monotonic() - t0 < 10, method
    finally:
        dep.cmg.unstall("MP")
    log = dep.path("logs_dir") / "CMGService.log"
    assert log.read_text().count("within 2 s") == 2
    # Once the MP answers, the connection point finds both streams reset.
    cp_log = dep.path("logs_dir") / "SMS_Cloud_ProxyConnector_CMGCP01.log"
    deadline = time.monotonic() + 10
    while cp_log.read_text().count("cancelled by the CMG") < 2:
        assert time.monotonic() < deadline, "the streams were not reset towards the connection point"
        await asyncio.sleep(0.1)


def test_a_client_that_reads_nothing_of_its_response_is_cut_off(stack_factory):
    """A client that sends a request and then never reads holds the gateway's handler,
    its tunnel stream and (during a drain) the instance itself. Once the client has read
    nothing for service.client_send_timeout, the gateway closes the connection and the
    stream is reset towards the connection point."""
    import socket

    dep = stack_factory("stalled-reader", instances=1, connectors=1,
                        overrides={"service": {"client_send_timeout": 2}})
    path, _ = _dp_file(dep, 16 * MIB)
    raw = socket.create_connection((dep.host, dep.port), timeout=10)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock = dep.ssl_context().wrap_socket(raw, server_hostname=dep.service_name)
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {dep.service_name}\r\n\r\n".encode())
        log = dep.path("logs_dir") / "CMGService.log"
        deadline = time.monotonic() + 20
        while "read nothing of its response for 2 s; connection reset" not in log.read_text():
            assert time.monotonic() < deadline, "a client that reads nothing was never cut off"
            time.sleep(0.2)
        # The gateway reset the connection (no lingering flush to a reader that stalls):
        # what the client reads now ends early, at once.
        received = 0
        sock.settimeout(5)
        t0 = time.monotonic()
        try:
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        except (OSError, ssl.SSLError):
            pass
        assert received < 16 * MIB and time.monotonic() - t0 < 5
    finally:
        sock.close()
    cp_log = dep.path("logs_dir") / "SMS_Cloud_ProxyConnector_CMGCP01.log"
    deadline = time.monotonic() + 10
    while "cancelled by the CMG" not in cp_log.read_text():
        assert time.monotonic() < deadline, "the stream was not reset towards the connection point"
        time.sleep(0.1)


def test_a_response_that_stalls_mid_body_is_cut_off_after_response_timeout(cmg_stack_factory):
    """A bound of last resort for the body too: a site role that stops mid-body (and a
    connection point whose own request_timeout is far away) never holds the client for
    ever. After service.response_timeout of silence the gateway cuts the client off (so
    a short body is never taken for a complete one) and resets the stream."""
    import http.server
    import threading

    from cmg.testing import role

    release = threading.Event()

    class Stalling(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"x" * 10000)
            self.wfile.flush()
            release.wait(30)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cmg = cmg_stack_factory(extra_roles=[role("AdminService", f"http://127.0.0.1:{server.server_port}")],
                                overrides={"service": {"response_timeout": 2}})
        t0 = time.monotonic()
        with cmg.client(auth="pki") as client:
            with pytest.raises(Exception):
                client.request("GET", "AdminService/wmi/SMS_Site", role="AdminService")
        assert time.monotonic() - t0 < 15
        deadline = time.monotonic() + 10
        while "stalled after 10000 bytes for 2 s; connection closed" not in (cmg.logs_dir / "CMGService.log").read_text():
            assert time.monotonic() < deadline, "the stalled response was not cut off by the gateway"
            time.sleep(0.1)
    finally:
        release.set()
        server.shutdown()


def test_a_drain_that_times_out_says_what_is_still_in_flight_and_where_it_waits(stack_factory):
    """Operations: when a drain ends at drain_timeout with requests still in flight, the
    instance's log names each one (method, path, age) and where its handler waits."""
    import socket
    import threading

    dep = stack_factory("drain-report", instances=1, connectors=1, overrides={"service": {"drain_timeout": 1}})
    path = dep.mp_path("SMS_MP/.sms_aut?MPLIST")
    dep.cmg.stall("MP")
    answers: list[bytes] = []

    def client() -> None:
        raw = socket.create_connection((dep.host, dep.port), timeout=20)
        with dep.ssl_context().wrap_socket(raw, server_hostname=dep.service_name) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {dep.service_name}\r\n\r\n".encode())
            try:
                answers.append(sock.recv(65536))
            except OSError:
                answers.append(b"")

    t = threading.Thread(target=client, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while "Forwarding proxy message" not in dep.cmg.log("SMS_Cloud_ProxyConnector_CMGCP01.log"):
            assert time.monotonic() < deadline, "the request never reached the connection point"
            time.sleep(0.1)
        dep.cmg.stop_component("gateway-0")
    finally:
        dep.cmg.unstall("MP")
    t.join(20)
    log = dep.cmg.log("CMGService.log")
    assert "Drain timeout: 1 requests still in flight" in log
    line = next(l for l in log.splitlines() if "Still in flight: GET " in l)
    # A request without a body waits in its _Exchange (no task: see ClientRequestHandler.begin).
    assert "/SMS_MP/.sms_aut?MPLIST for " in line and "_Exchange" in line and "response head" in line, line


def test_a_drain_lets_a_request_body_under_way_arrive(stack_factory):
    """SIGTERM on an instance while a client is still sending a request body: the drain
    stops new requests, but the body under way must still be read (aiohttp drops every
    byte after close(), so such an upload used to wait for its body until drain_timeout,
    then fail). The soak's 30 s drains were this."""
    import http.server
    import socket
    import threading

    from cmg.testing import role

    class Counting(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            answer = str(len(body)).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Counting)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dep = stack_factory("drain-body", instances=1, connectors=1, overrides={"service": {"drain_timeout": 20}},
                            extra_roles=[role("AdminService", f"http://127.0.0.1:{server.server_port}")])
        cmg = dep.cmg
        path = f"/CCM_Proxy_MutualAuth/{cmg.role('AdminService')['role_id']}/AdminService/upload"
        raw = socket.create_connection((dep.host, dep.port), timeout=20)
        sock = dep.ssl_context().wrap_socket(raw, server_hostname=dep.service_name)
        half = b"u" * 100_000
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {dep.service_name}\r\nContent-Length: 200000\r\n\r\n".encode()
                     + half)
        time.sleep(0.5)  # the first half went through
        stopper = threading.Thread(target=cmg.stop_component, args=("gateway-0",), daemon=True)
        t0 = time.monotonic()
        stopper.start()
        deadline = time.monotonic() + 10
        while "Draining 1 in-flight requests" not in cmg.log("CMGService.log"):
            assert time.monotonic() < deadline, "the drain did not start"
            time.sleep(0.05)
        sock.sendall(half)  # the rest of the body, during the drain
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"200000"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        sock.close()
        stopper.join(30)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"200000"), answer[:200]
        assert time.monotonic() - t0 < 10, "the drain waited for a body it had stopped reading"
        assert "Drain timeout" not in cmg.log("CMGService.log")
    finally:
        server.shutdown()


def test_sigterm_waits_for_a_client_that_reads_nothing_only_within_drain_timeout(stack_factory):
    """A stopping instance sends each client what it still holds before it leaves, but a
    client that reads nothing holds it only until service.drain_timeout has passed since
    the SIGTERM (here the request in flight uses all of it: then aiohttp's shutdown takes
    up to 1 s and the connections get their minimum of 1 s); then that connection is
    aborted and the instance stops, long before client_send_timeout (60 s here)."""
    import socket

    dep = stack_factory("drain-stalled-reader", instances=1, connectors=1,
                        overrides={"service": {"drain_timeout": 3, "client_send_timeout": 60}})
    path, _ = _dp_file(dep, 16 * MIB)
    raw = socket.create_connection((dep.host, dep.port), timeout=10)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock = dep.ssl_context().wrap_socket(raw, server_hostname=dep.service_name)
    log = dep.path("logs_dir") / "CMGService.log"
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {dep.service_name}\r\n\r\n".encode())
        sock.recv(1024)  # the answer has begun: the request is in flight
        t0 = time.monotonic()
        os.kill(dep.stack.process("gateway-0").pid, signal.SIGTERM)
        while "CMG instance 0 stopped" not in log.read_text():
            assert time.monotonic() - t0 < 15, "the instance waited for a client that reads nothing"
            time.sleep(0.1)
        stopped_after = time.monotonic() - t0
    finally:
        sock.close()
    text = log.read_text()
    assert "client connections still sending their response; closed" in text, text[-2000:]
    assert 2.5 < stopped_after < 12, stopped_after  # 6.0 s when written
