"""The connection point's forwarder over a real tunnel session and a real (loopback) role:
a request without a body runs from callbacks while nothing has to wait, and goes on in a
task, from where it stands, the moment something does."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cmg.config import RoleConfig
from connector import forwarder as forwarder_module
from connector.forwarder import Forwarder
from connector.url_map import UrlMap
from tunnel import ErrorCode, Limits, Role, StreamResetError, TunnelProtocol, TunnelSession, TunnelStream

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tunnel"))
from tunnel_helpers import ROLES, memory_pair  # noqa: E402

ROLE_ID = 72057594037927942
PREFIX = f"/CCM_Proxy_MutualAuth/{ROLE_ID}/SMS_MP"
BODY = bytes(range(256)) * 4  # 1 KiB


class SiteRole:
    """A site role on loopback whose answers the tests choose by path; it counts the
    connections it accepted and the requests each carried."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[str] = []
        self.release = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        on_this = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                self.requests.append(path)
                on_this += 1
                if path.endswith("/close-second") and on_this == 2:
                    return  # a kept-alive connection closed under the request, unanswered
                if path.endswith("/silent"):
                    await asyncio.sleep(30)
                    return
                if path.endswith("/later"):
                    await self.release.wait()
                if path.endswith("/split"):  # the head, then the body a moment later
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY[:100])
                    await writer.drain()
                    await asyncio.sleep(0.1)
                    writer.write(BODY[100:])
                elif path.endswith("/big"):
                    big = BODY * 64
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big)
                elif path.endswith("/empty"):
                    writer.write(b"HTTP/1.1 204 No Content\r\nX-Role: mp\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n"
                                 % len(BODY) + BODY)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


class Site:
    def __init__(self, gateway: TunnelSession, connector: TunnelSession, role: SiteRole, in_task: list[int]) -> None:
        self.gateway, self.connector, self.role, self.in_task = gateway, connector, role, in_task

    async def get(self, path: str) -> tuple[int, bytes]:
        stream = await self.gateway.open_stream("GET", PREFIX + path, [(b"Accept", b"*/*")], end_stream=True)
        response = await asyncio.wait_for(stream.response(), 10)
        return response.status, await read_all(stream)


async def read_all(stream: TunnelStream) -> bytes:
    body = bytearray()
    while chunk := await asyncio.wait_for(stream.read(), 10):
        body += chunk
    return bytes(body)


@contextlib.asynccontextmanager
async def site(monkeypatch: pytest.MonkeyPatch, direct: bool, timeout: float = 600.0,
               limits: Limits = Limits()) -> AsyncIterator[Site]:
    """A gateway session, a connector session whose requests go to a Forwarder, the role."""
    in_task: list[int] = []  # one entry per exchange run in a task
    run = forwarder_module._Exchange.run

    def counted(self: forwarder_module._Exchange):  # type: ignore[no-untyped-def]
        in_task.append(1)
        return run(self)

    monkeypatch.setattr(forwarder_module._Exchange, "run", counted)
    role = SiteRole()
    server = await asyncio.start_server(role.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url_map = UrlMap("cmg.contoso.com", (RoleConfig(ROLE_ID, "MP", "SMS_MP", f"http://127.0.0.1:{port}",
                                                    ("SMS_MP",)),))
    fwd = Forwarder(url_map, logging.getLogger("test.forwarder"), pool_size=8, request_timeout=timeout)
    await fwd.start()
    gateway_ws, connector_ws = memory_pair(direct=direct)
    gateway = TunnelSession(TunnelProtocol(Role.GATEWAY, limits), gateway_ws, name="gw")
    connector = TunnelSession(TunnelProtocol(Role.CONNECTOR, limits), connector_ws, on_request=fwd.handle, name="cp")
    tasks = [asyncio.create_task(gateway.run()), asyncio.create_task(connector.run())]
    connector.send_hello("ABC", "cp1.contoso.local", ROLES)
    await gateway.wait_hello()
    gateway.send_welcome("instance-0")
    await asyncio.wait_for(asyncio.gather(gateway.wait_handshake(), connector.wait_handshake()), 5)
    try:
        yield Site(gateway, connector, role, in_task)
    finally:
        role.release.set()
        await gateway.close()
        await connector.close()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        await fwd.close()
        server.close()


@pytest.fixture(params=[False, True], ids=["writer-task", "send-now"])
def direct(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


async def test_whole_answers_on_a_kept_alive_connection_need_no_task(
        monkeypatch: pytest.MonkeyPatch, direct: bool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "test.forwarder")
    async with site(monkeypatch, direct) as s:
        for i in range(20):
            assert await s.get("/whole") == (200, BODY)
        assert await s.get("/empty") == (204, b"")
        assert s.role.connections == 1
        assert len(s.in_task) == 1  # the first, which had to open the connection
        assert s.connector.open_streams == s.gateway.open_streams == 0
    lines = [r.getMessage() for r in caplog.records]
    assert sum("ResponseHeader: HTTP/1.1 200 OK ~~ ResponseBodySize: 1024" in m for m in lines) == 20
    assert sum("ResponseHeader: HTTP/1.1 204 No Content ~~ ResponseBodySize: 0" in m for m in lines) == 1
    assert sum(m.startswith("Forwarding proxy message") for m in lines) == 21


async def test_an_answer_still_streaming_goes_on_in_a_task(monkeypatch: pytest.MonkeyPatch, direct: bool) -> None:
    async with site(monkeypatch, direct) as s:
        assert await s.get("/whole") == (200, BODY)
        assert await s.get("/split") == (200, BODY)
        assert len(s.in_task) == 2
        assert await s.get("/whole") == (200, BODY)  # the connection was kept
        assert s.role.connections == 1 and len(s.in_task) == 2


async def test_a_kept_alive_connection_closed_under_the_request_is_retried_fresh(
        monkeypatch: pytest.MonkeyPatch, direct: bool) -> None:
    async with site(monkeypatch, direct) as s:
        assert await s.get("/close-second") == (200, BODY)
        assert await s.get("/close-second") == (200, BODY)  # from callbacks, then retried in a task
        assert s.role.connections == 2
        assert s.role.requests == ["/SMS_MP/close-second"] * 3
        assert len(s.in_task) == 2


async def test_a_whole_answer_beyond_the_stream_credit_is_streamed(monkeypatch: pytest.MonkeyPatch,
                                                                   direct: bool) -> None:
    async with site(monkeypatch, direct, limits=Limits(stream_window=16384, tunnel_window=65536)) as s:
        assert await s.get("/whole") == (200, BODY)
        assert await s.get("/big") == (200, BODY * 64)
        assert await s.get("/whole") == (200, BODY)
        assert s.connector.open_streams == s.gateway.open_streams == 0


async def test_a_silent_role_times_out_from_callbacks(monkeypatch: pytest.MonkeyPatch, direct: bool,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    async with site(monkeypatch, direct, timeout=0.3) as s:
        assert await s.get("/whole") == (200, BODY)
        with pytest.raises(StreamResetError) as failed:
            await s.get("/silent")
        assert failed.value.code is ErrorCode.TIMEOUT
        assert any("timed out: no data from the role" in r.getMessage() for r in caplog.records)
        assert await s.get("/whole") == (200, BODY)


async def test_a_stream_reset_by_the_gateway_meanwhile_drops_the_connection(
        monkeypatch: pytest.MonkeyPatch, direct: bool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "test.forwarder")
    async with site(monkeypatch, direct) as s:
        assert await s.get("/whole") == (200, BODY)
        stream = await s.gateway.open_stream("GET", PREFIX + "/later", [], end_stream=True)
        while s.role.requests[-1] != "/SMS_MP/later":
            await asyncio.sleep(0.01)
        stream.reset(ErrorCode.CANCEL, "client went away")
        await asyncio.sleep(0.05)
        s.role.release.set()
        for _ in range(100):
            if any("cancelled by the CMG" in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("no 'cancelled by the CMG' line")
        assert len(s.in_task) == 1  # relayed (and refused by the stream) from callbacks
        assert await s.get("/whole") == (200, BODY)
        assert s.role.connections == 2  # the cancelled exchange's connection was not kept
        assert s.connector.open_streams == s.gateway.open_streams == 0


async def test_a_head_write_that_fails_in_the_callbacks_starts_afresh_in_a_task(
        monkeypatch: pytest.MonkeyPatch, direct: bool) -> None:
    send_head = forwarder_module._Exchange._send_head
    calls: list[int] = []

    def breaks_once(self: forwarder_module._Exchange, conn: forwarder_module._Conn) -> None:
        calls.append(1)
        if len(calls) == 2:  # the second request's, from the callbacks
            raise ConnectionResetError("broken under the write")
        send_head(self, conn)

    monkeypatch.setattr(forwarder_module._Exchange, "_send_head", breaks_once)
    async with site(monkeypatch, direct) as s:
        assert await s.get("/whole") == (200, BODY)
        assert await s.get("/whole") == (200, BODY)
        assert len(calls) == 3 and len(s.in_task) == 2
        assert s.role.connections == 2  # the connection it broke on was not kept
        assert await s.get("/whole") == (200, BODY)
        assert len(s.in_task) == 2


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True


async def test_progress_is_called_back_at_the_end_of_data_received() -> None:
    """An exchange without a task hears of the role's progress as soon as the bytes that
    made it were parsed (no turn of the loop in between), once per delivery of bytes, and
    never from inside the parser; a callback that raises is reported as the loop reports
    a callback's, and the connection is not broken for it."""
    loop = asyncio.get_running_loop()
    conn = forwarder_module._Conn(loop, ("http", "127.0.0.1", 80))
    transport = _Transport()
    conn.connection_made(transport)
    seen: list[tuple[bool, bool]] = []
    conn.on_progress = lambda: seen.append((conn.head_done, conn.complete))
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Le")
    assert seen == []  # no progress yet
    conn.data_received(b"ngth: 4\r\n\r\nab")
    assert seen == [(True, False)]  # head and first bytes: one call, after the parser was done
    conn.data_received(b"cd")
    assert seen == [(True, False), (True, True)]
    await asyncio.sleep(0)
    assert len(seen) == 2  # nothing more from the loop
    assert b"".join(conn.chunks) == b"abcd" and not transport.aborted

    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        conn._begin(False)

        def fails() -> None:
            raise RuntimeError("the exchange failed")

        conn.on_progress = fails
        conn.data_received(b"HTTP/1.1 204 No Content\r\n\r\n")  # does not raise into the transport
    finally:
        loop.set_exception_handler(None)
    assert len(reported) == 1 and isinstance(reported[0]["exception"], RuntimeError)
    assert conn.complete and not transport.aborted
