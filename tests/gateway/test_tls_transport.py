"""The client TLS transport (pyOpenSSL on the accepted socket) and its listener, on
asyncio's own event loop and on uvloop, against stdlib ``ssl`` clients."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import threading
import time
import warnings
from typing import Any, Awaitable, Callable

import pytest

from cmg import pki
from gateway.tls import ServerIdentity, client_context
from gateway.tls_transport import TLSListener, TLSServerSettings, TLSServerTransport

SERVICE = "gw.test.cloudapp.net"
LOOPS = ["asyncio", "uvloop"]


@pytest.fixture(scope="module")
def pkiset(tmp_path_factory):
    root = pki.new_authority("Transport Test Root")
    cert, key = pki.issue_server_certificate(root, SERVICE)
    client_cert, client_key = pki.issue_client_certificate(root, "CLIENT01.corp.contoso.com")
    d = tmp_path_factory.mktemp("tlspki")
    pki.write_pem_bundle(d / "root.pem", [root.cert])
    pki.write_pem_bundle(d / "client.pem", [client_cert])
    pki.write_private_key(d / "client.key", client_key)
    server_ctx = client_context(ServerIdentity(cert, key, ()), (root.cert,), enforce_tls12=True)
    return {"server_ctx": server_ctx, "root": str(d / "root.pem"), "client_cert": str(d / "client.pem"),
            "client_key": str(d / "client.key")}


def client_ssl(pkiset, with_cert: bool = True, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pkiset["root"])
    if with_cert:
        ctx.load_cert_chain(pkiset["client_cert"], pkiset["client_key"])
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def run(loop_kind: str, coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(asyncio.wait_for(coro_fn(), 60))


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def has(self, text: str) -> bool:
        return any(text in line for line in self.lines)


class App(asyncio.Protocol):
    """Echoes each line; on "SEND n" writes n bytes honouring pause_writing."""

    def __init__(self, pause_reading_above: int = 0, sink: bool = False) -> None:
        self.sink = sink  # keeps what arrives, answers nothing
        self.transport: TLSServerTransport | None = None
        self.received = bytearray()
        self.events: list[str] = []
        self.lost = asyncio.get_running_loop().create_future()
        self.writable = asyncio.Event()
        self.writable.set()
        self.max_buffered = 0
        self.pause_reading_above = pause_reading_above
        self.close_after_send = False
        self.eof_keep_open: bool | None = None
        self.deliveries: list[int] = []  # the size of each data_received

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        self.deliveries.append(len(data))
        self.received += data
        if self.pause_reading_above and len(self.received) > self.pause_reading_above:
            self.transport.pause_reading()
            self.events.append("paused")
        while b"\n" in self.received and not self.sink:
            line, _, rest = bytes(self.received).partition(b"\n")
            self.received = bytearray(rest)
            if line.startswith(b"SEND "):
                words = line.split()
                self.close_after_send = b"close" in words
                asyncio.ensure_future(self.send(int(words[1])))
            else:
                self.transport.write(line + b"\n")

    async def send(self, n: int) -> None:
        chunk = bytes(range(256)) * 256  # 64 KiB
        sent = 0
        while sent < n:
            await self.writable.wait()
            if self.transport is None or self.transport.is_closing():
                return
            piece = chunk[: min(len(chunk), n - sent)]
            self.transport.write(bytearray(piece))  # a mutable buffer: the transport copies what it keeps
            sent += len(piece)
            self.max_buffered = max(self.max_buffered, self.transport.get_write_buffer_size())
        if self.close_after_send:
            self.transport.close()

    def pause_writing(self) -> None:
        self.events.append("pause_writing")
        self.writable.clear()

    def resume_writing(self) -> None:
        self.events.append("resume_writing")
        self.writable.set()

    def eof_received(self) -> bool | None:
        self.events.append("eof")
        return self.eof_keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        if not self.lost.done():
            self.lost.set_result(exc)


class Server:
    def __init__(self, pkiset, app_factory=App, **settings: Any) -> None:
        self.apps: list[App] = []
        self.connections: set[TLSServerTransport] = set()
        self.refuse = False
        self.recorder = Recorder()
        self.log = logging.getLogger(f"test.tls.{id(self)}")
        self.log.addHandler(self.recorder)
        self.log.setLevel(logging.INFO)

        def make_app() -> App:
            app = app_factory()
            self.apps.append(app)
            return app

        self.settings = TLSServerSettings(pkiset["server_ctx"], make_app, log=self.log,
                                          on_lost=self.connections.discard, **settings)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.listener = TLSListener(sock, self._connect, backlog=64, log=self.log)

    def _connect(self, sock: socket.socket, peer: Any) -> TLSServerTransport | None:
        if self.refuse:
            return None
        conn = TLSServerTransport(self.settings, sock, peer)
        self.connections.add(conn)
        return conn

    async def app(self, index: int = 0) -> App:
        while len(self.apps) <= index:
            await asyncio.sleep(0.01)
        return self.apps[index]


async def connect(server: Server, pkiset, **kw: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port, ssl=client_ssl(pkiset, **kw),
                                         server_hostname=SERVICE)


async def _echoed(pkiset) -> tuple["Server", asyncio.StreamReader, asyncio.StreamWriter, Any]:
    """A serving listener and a client connection that has had one line echoed."""
    server = Server(pkiset)
    await server.listener.start_serving()
    reader, writer = await connect(server, pkiset)
    writer.write(b"x\n")
    assert await reader.readline() == b"x\n"
    return server, reader, writer, await server.app()


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_handshake_exchange_extra_info_and_resumption(pkiset, loop_kind):
    async def main() -> None:
        server = Server(pkiset)
        assert not server.listener.is_serving()
        with pytest.raises(OSError):  # bound, not listening: the door is shut
            await asyncio.open_connection("127.0.0.1", server.port)
        await server.listener.start_serving()
        assert server.listener.is_serving()
        ctx = client_ssl(pkiset)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=ctx, server_hostname=SERVICE)
        writer.write(b"hello\n")
        assert await reader.readline() == b"hello\n"
        app = await server.app()
        t = app.transport
        assert t.get_extra_info("peername") == writer.get_extra_info("sockname")
        assert t.get_extra_info("sockname") == ("127.0.0.1", server.port)
        assert t.get_extra_info("socket").fileno() >= 0
        assert t.get_extra_info("sslcontext") is pkiset["server_ctx"]
        assert t.get_extra_info("ssl_object").get_protocol_version_name().startswith("TLS")
        chain = t.get_extra_info("peercert_chain")
        assert chain and "CLIENT01" in chain[0].subject.rfc4514_string()  # leaf first
        assert t.get_extra_info("nothing", 7) == 7
        t.set_extra("verdict", "ok")
        assert t.get_extra_info("verdict") == "ok"
        session = writer.get_extra_info("ssl_object").session
        writer.close()
        await writer.wait_closed()
        assert await asyncio.wait_for(app.lost, 5) is None
        assert app.events[0] == "made" and "eof" in app.events  # close_notify
        # a second connection resumes from the server's session cache
        raw = await asyncio.get_running_loop().run_in_executor(None, _resume, server.port, ctx, session)
        assert raw
        server.listener.close()
        assert not server.listener.is_serving()
        await asyncio.sleep(0.05)
        assert not server.connections

    run(loop_kind, main)


def _resume(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=SERVICE, session=session) as tls:
            tls.sendall(b"again\n")
            assert tls.recv(100) == b"again\n"
            return tls.session_reused


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_big_answer_streams_with_bounded_buffer_then_close_notify(pkiset, loop_kind):
    async def main() -> None:
        server = Server(pkiset)
        await server.listener.start_serving()
        reader, writer = await connect(server, pkiset)
        size = 32 * 1024 * 1024
        writer.write(b"SEND %d close\n" % size)
        app = await server.app()
        got = 0
        first = b""
        while True:
            await asyncio.sleep(0.001 if got < 4 * 1024 * 1024 else 0)  # a slow start: the server queues
            data = await reader.read(1 << 20)
            if not data:
                break
            if len(first) < 256:
                first += data[:256]
            got += len(data)
        assert got == size and first[:256] == bytes(range(256))
        assert "pause_writing" in app.events and "resume_writing" in app.events
        assert app.max_buffered <= 64 * 1024 + 64 * 1024  # high-water mark plus one write
        assert await asyncio.wait_for(app.lost, 5) is None
        writer.close()
        server.listener.close()

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("record_size", [None, 10_000], ids=["16k-records", "10000-byte-records"])
def test_big_upload_and_pause_reading(pkiset, loop_kind, record_size):
    # 10,000-byte records: a read loop filling a fixed buffer would end inside one and
    # OpenSSL would keep the rest, which no poll announces; fetching that must wait for
    # resume_reading too. (A read loop of that kind, tried for uploads, read on while
    # paused and let the gateway buffer 200 MiB; this case caught it.)
    async def main() -> None:
        server = Server(pkiset, app_factory=lambda: App(pause_reading_above=1024 * 1024, sink=True))
        await server.listener.start_serving()
        reader, writer = await connect(server, pkiset)
        body = os.urandom(8 * 1024 * 1024)
        step = record_size or len(body)  # one write: the client's TLS cuts 16 KiB records
        for i in range(0, len(body), step):
            writer.write(body[i : i + step])
        app = await server.app()
        while "paused" not in app.events:
            await asyncio.sleep(0.01)
        held = len(app.received)
        await asyncio.sleep(0.3)
        assert len(app.received) == held < len(body)  # paused: nothing more arrives
        app.pause_reading_above = 0
        app.transport.resume_reading()
        await writer.drain()
        while len(app.received) < len(body):
            await asyncio.sleep(0.01)
        assert bytes(app.received) == body
        writer.close()
        server.listener.close()

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_tcp_eof_without_close_notify_is_an_eof_not_an_error(pkiset, loop_kind):
    async def main() -> None:
        server, reader, writer, app = await _echoed(pkiset)
        app.eof_keep_open = True  # the TCP stream ended: closed all the same
        fd = writer.transport.get_extra_info("socket").fileno()
        with socket.socket(fileno=os.dup(fd)) as dup:  # uvloop's pseudo-socket has no shutdown()
            dup.shutdown(socket.SHUT_WR)
        assert await asyncio.wait_for(app.lost, 5) is None
        assert app.events[-2:] == ["eof", "lost"]
        assert not server.recorder.has("TLS error"), server.recorder.lines
        writer.close()
        server.listener.close()

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_reset_is_reported_to_the_app(pkiset, loop_kind):
    async def main() -> None:
        server, reader, writer, app = await _echoed(pkiset)
        sock = writer.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()
        exc = await asyncio.wait_for(app.lost, 5)
        assert isinstance(exc, ConnectionResetError)
        assert not server.recorder.has("TLS error")
        server.listener.close()

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_handshake_failure_and_timeout_are_logged(pkiset, loop_kind):
    async def main() -> None:
        server = Server(pkiset, handshake_timeout=0.5)
        await server.listener.start_serving()
        # not TLS at all
        r, w = await asyncio.open_connection("127.0.0.1", server.port)
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(r.read(), 5)  # and the connection is closed
        assert answer == b"" or answer[:1] == b"\x15", answer  # nothing, or a TLS alert record
        w.close()
        # TLS 1.1 against "TLS 1.2 minimum": refused with an alert the client reads
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx = client_ssl(pkiset, max_version=ssl.TLSVersion.TLSv1_1)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        with pytest.raises(ssl.SSLError) as err:
            await asyncio.open_connection("127.0.0.1", server.port, ssl=ctx, server_hostname=SERVICE)
        assert "ALERT" in str(err.value).upper() or "VERSION" in str(err.value).upper()
        # connected, silent
        r2, w2 = await asyncio.open_connection("127.0.0.1", server.port)
        assert await asyncio.wait_for(r2.read(), 5) == b""
        w2.close()
        # gone mid-handshake: not worth a line
        r3, w3 = await asyncio.open_connection("127.0.0.1", server.port)
        w3.write(b"\x16\x03\x01\x00")
        w3.close()
        await asyncio.sleep(0.2)
        lines = server.recorder.lines
        assert sum("TLS handshake failed from 127.0.0.1:" in line for line in lines) == 2, lines
        assert any("wrong version number" in line or "unsupported protocol" in line for line in lines), lines
        assert sum("TLS handshake timed out from 127.0.0.1:" in line for line in lines) == 1, lines
        assert not server.connections and not server.apps
        server.listener.close()

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_client_that_reads_nothing_is_reset_after_send_timeout(pkiset, loop_kind):
    async def main() -> None:
        server = Server(pkiset, send_timeout=1.0)
        await server.listener.start_serving()
        raw = socket.create_connection(("127.0.0.1", server.port))
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        tls = client_ssl(pkiset).wrap_socket(raw, server_hostname=SERVICE, do_handshake_on_connect=False,
                                             suppress_ragged_eofs=False)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, tls.do_handshake)
        await loop.run_in_executor(None, tls.sendall, b"SEND 67108864\n")
        app = await server.app()
        exc = await asyncio.wait_for(app.lost, 10)
        assert exc is None
        assert server.recorder.has("read nothing of its response for 1 s; connection reset")

        def read_all() -> int:
            n = 0
            tls.settimeout(5)
            try:
                while chunk := tls.recv(1 << 20):
                    n += len(chunk)
            except (OSError, ssl.SSLError) as e:
                return (n, repr(e))
            return (n, "end")

        received, how = await loop.run_in_executor(None, read_all)
        assert received < 64 * 1024 * 1024 and how != "end", how  # a reset, not an end
        tls.close()
        server.listener.close()

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_refused_connections_and_listener_close(pkiset, loop_kind):
    async def main() -> None:
        server = Server(pkiset)
        await server.listener.start_serving()
        server.refuse = True
        r, w = await asyncio.open_connection("127.0.0.1", server.port)
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        server.refuse = False
        reader, writer = await connect(server, pkiset)
        server.listener.close()
        writer.write(b"still\n")  # open connections carry on after the listener closes
        assert await reader.readline() == b"still\n"
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", server.port)
        app = await server.app()
        app.transport.close()
        assert await reader.read() == b""
        assert await asyncio.wait_for(app.lost, 5) is None
        writer.close()

    run(loop_kind, main)


def test_close_notify_reaches_a_blocking_client(pkiset):
    """close_tls: the answer, then close_notify, then FIN (a clean SSL EOF for the client)."""
    result: dict[str, Any] = {}

    async def main() -> None:
        server = Server(pkiset)
        await server.listener.start_serving()
        done = threading.Event()

        def client() -> None:
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
                ctx = client_ssl(pkiset)
                with ctx.wrap_socket(raw, server_hostname=SERVICE, suppress_ragged_eofs=False) as tls:
                    tls.sendall(b"SEND 300000 close\n")
                    got = 0
                    while chunk := tls.recv(65536):  # raises on an EOF without close_notify
                        got += len(chunk)
                    result["got"] = got
            done.set()

        thread = threading.Thread(target=client)
        thread.start()
        await asyncio.get_running_loop().run_in_executor(None, done.wait, 20)
        thread.join()
        server.listener.close()

    run("uvloop", main)
    assert result["got"] == 300000


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_short_record_goes_up_at_once_and_full_ones_are_gathered(pkiset, loop_kind):
    """A record shorter than a full one (16 KiB) is handed to the app as soon as it is
    read, without reading on until the socket is empty: two small records that arrive in
    one TCP segment go up one by one, in order. Full records are gathered up to the read
    budget, so a body does not cost a turn per record."""
    async def main() -> None:
        server = Server(pkiset, app_factory=lambda: App(sink=True))
        await server.listener.start_serving()
        body = os.urandom(1024 * 1024)
        sent = threading.Event()

        def client() -> None:
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
                with client_ssl(pkiset).wrap_socket(raw, server_hostname=SERVICE) as tls:
                    tls.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
                    tls.sendall(b"first\n")
                    tls.sendall(b"second\n")  # a record of its own, in the same segment
                    tls.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
                    time.sleep(0.3)
                    tls.sendall(body)  # 16 KiB records
                    time.sleep(0.5)
            sent.set()

        thread = threading.Thread(target=client)
        thread.start()
        app = await server.app()
        while len(app.received) < 13 + len(body):
            await asyncio.sleep(0.01)
        assert app.deliveries[:2] == [6, 7]
        assert bytes(app.received) == b"first\nsecond\n" + body
        assert max(app.deliveries[2:]) > 16384  # full records gathered
        await asyncio.get_running_loop().run_in_executor(None, sent.wait, 20)
        thread.join()
        server.listener.close()

    run(loop_kind, main)
