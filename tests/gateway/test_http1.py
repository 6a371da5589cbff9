"""gateway/http1.py, the gateway's own HTTP/1.1 server side, seen from the wire.

The pure body decoders first; then a :class:`GatewayServer` on 127.0.0.1 with small
handlers, driven through raw sockets: ConfigMgr verbs, pipelining, chunked bodies,
refusals that close (a smuggled second request is never answered), keep-alive,
timeouts, 100-continue, failing and cancelled handlers, early answers, flow control and
the framing of streamed responses. Every wait on the wire is bounded by ``WAIT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from gateway import errors
from gateway.http1 import (BODY_HIGH_WATER, MAX_HEAD_SIZE, MAX_HEADERS, BadRequest, ChunkedDecoder, ClientRequest,
                           GatewayServer, LengthDecoder, StreamedResponse, WholeResponse)

LOG = logging.getLogger("test.gateway.http1")
WAIT = 5.0  # the bound of every wait on the wire
#: The most an asyncio transport reads in one go (its ``max_size``): what can arrive
#: after the server decides to pause reading.
READ_SIZE = 256 * 1024

Handler = Callable[[ClientRequest], Awaitable[WholeResponse | StreamedResponse]]


# --- the client's side of the wire ---

@dataclass
class Answer:
    """One response as the client parsed it."""

    version: bytes
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    chunks: list[int] = field(default_factory=list)  # chunk sizes of a chunked body

    def header(self, name: bytes) -> bytes | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        assert len(values) <= 1, f"{name!r} appears {len(values)} times"
        return values[0] if values else None


async def read_answer(reader: asyncio.StreamReader, *, to_head: bool = False) -> Answer:
    """Reads one response, framed as a client would (``to_head``: answer to a HEAD)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    status_line, *lines = head[:-4].split(b"\r\n")
    version, status, reason = status_line.split(b" ", 2)
    headers = [(k, v.strip()) for k, _, v in (line.partition(b":") for line in lines)]
    answer = Answer(version, int(status), reason, headers, b"")
    length = answer.header(b"content-length")
    if to_head or answer.status in (204, 304) or 100 <= answer.status < 200:
        pass
    elif length is not None:
        answer.body = await asyncio.wait_for(reader.readexactly(int(length)), WAIT)
    elif answer.header(b"transfer-encoding") == b"chunked":
        answer.body, answer.chunks = await read_chunked(reader)
    else:
        answer.body = await read_to_end(reader)
    return answer


async def read_chunked(reader: asyncio.StreamReader) -> tuple[bytes, list[int]]:
    """A chunked body, decoded independently of the module under test."""
    body, sizes = b"", []
    while True:
        line = await asyncio.wait_for(reader.readuntil(b"\r\n"), WAIT)
        size = int(line[:-2], 16)
        if not size:
            assert await asyncio.wait_for(reader.readexactly(2), WAIT) == b"\r\n"  # no trailers
            return body, sizes
        sizes.append(size)
        body += await asyncio.wait_for(reader.readexactly(size), WAIT)
        assert await asyncio.wait_for(reader.readexactly(2), WAIT) == b"\r\n"


async def read_to_end(reader: asyncio.StreamReader, *, reset_ok: bool = False) -> bytes:
    """Everything until the server closes (fails if it does not within ``WAIT``)."""
    data = b""

    async def drain() -> None:
        nonlocal data
        while chunk := await reader.read(65536):
            data += chunk

    try:
        await asyncio.wait_for(drain(), WAIT)
    except ConnectionResetError:
        if not reset_ok:
            raise
    return data


def request(method: str = "GET", path: str = "/", *, version: bytes = b"HTTP/1.1",
            headers: list[bytes] | None = None, body: bytes | None = None) -> bytes:
    """A request's bytes; a ``body`` gets its Content-Length."""
    head = b"%s %s %s\r\nHost: cmg.example\r\n" % (method.encode(), path.encode(), version)
    for line in headers or []:
        head += line + b"\r\n"
    if body is not None:
        head += b"Content-Length: %d\r\n" % len(body)
    return head + b"\r\n" + (body or b"")


SMUGGLED = request("GET", "/smuggled")


# --- the server's side ---

@dataclass
class Served:
    server: GatewayServer
    port: int
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), WAIT)
        self.writers.append(writer)
        return reader, writer

    async def only_connection(self):  # type: ignore[no-untyped-def]
        """The server's one client connection, once it has it."""
        async def registered():  # type: ignore[no-untyped-def]
            while not self.server.connections:
                await asyncio.sleep(0.01)
            (conn,) = self.server.connections
            return conn
        return await asyncio.wait_for(registered(), WAIT)


@contextlib.asynccontextmanager
async def serve(handler: Handler, **options: float) -> AsyncIterator[Served]:
    """A GatewayServer on 127.0.0.1, port 0, closed at the end with its clients."""
    server = GatewayServer(handler, log=LOG, **options)  # type: ignore[arg-type]
    listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    served = Served(server, listener.sockets[0].getsockname()[1])
    try:
        yield served
    finally:
        for writer in served.writers:
            writer.close()
        listener.close()
        await server.shutdown(1.0)
        await asyncio.wait_for(listener.wait_closed(), WAIT)


async def read_body(req: ClientRequest) -> bytes:
    parts = []
    while chunk := await req.content.readany():
        parts.append(chunk)
    return b"".join(parts)


async def echo(req: ClientRequest) -> WholeResponse:
    """Answers with the request's body, its method and path in headers."""
    body = await read_body(req)
    return WholeResponse(200, "OK", [(b"X-Method", req.method.encode()), (b"X-Path", req.raw_path.encode())], body)


async def path_answer(req: ClientRequest) -> WholeResponse:
    """Answers with the request's path as the body (the body, if any, unread)."""
    return WholeResponse(200, "OK", [], req.raw_path.encode())


# --- 1. the body decoders (pure) ---

CHUNKED = (b"5;name=value\r\nhello\r\n"
           b'1a;a=1;b="x y"\r\nabcdefghijklmnopqrstuvwxyz\r\n'
           b"0000000000000003\r\n!!!\r\n"  # 16 hex digits: the most allowed
           b"0;last=yes\r\nX-Trailer: dropped\r\nX-Other: also\r\n\r\n")
CHUNKED_BODY = b"hello" + b"abcdefghijklmnopqrstuvwxyz" + b"!!!"
AFTER = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"


def decode(decoder: ChunkedDecoder | LengthDecoder, pieces: list[bytes]) -> tuple[bytes, bool, bytes]:
    """Feeds ``pieces`` until the body is done: (body, done, the bytes after the body)."""
    out: list[bytes] = []
    done, rest = False, b""
    for piece in pieces:
        if done:
            rest += piece
            continue
        got, done, rest = decoder.feed(piece)
        assert done or not rest, "bytes after an unfinished body"
        out += got
    return b"".join(out), done, rest


def test_chunked_decoder_at_every_split() -> None:
    """Any two cuts of the wire give the same body (extensions ignored, trailers dropped)
    and the same rest; byte by byte too."""
    data = CHUNKED + AFTER
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            assert decode(ChunkedDecoder(), [data[:i], data[i:j], data[j:]]) == (CHUNKED_BODY, True, AFTER), (i, j)
    assert decode(ChunkedDecoder(), [data[k:k + 1] for k in range(len(data))]) == (CHUNKED_BODY, True, AFTER)


def test_chunked_decoder_is_not_done_before_the_last_crlf() -> None:
    """Every proper prefix of a chunked body leaves it unfinished (trailers included)."""
    for k in range(len(CHUNKED)):
        body, done, rest = decode(ChunkedDecoder(), [CHUNKED[:k]])
        assert (done, rest) == (False, b""), k
        assert CHUNKED_BODY.startswith(body)


@pytest.mark.parametrize("wire", [
    pytest.param(b"z\r\nhello\r\n0\r\n\r\n", id="non-hex size"),
    pytest.param(b"0x5\r\nhello\r\n0\r\n\r\n", id="0x prefix"),
    pytest.param(b"+5\r\nhello\r\n0\r\n\r\n", id="plus sign"),
    pytest.param(b"-5\r\nhello\r\n0\r\n\r\n", id="minus sign"),
    pytest.param(b" 5\r\nhello\r\n0\r\n\r\n", id="leading space"),
    pytest.param(b"5 \r\nhello\r\n0\r\n\r\n", id="trailing space"),
    pytest.param(b"1 0\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n", id="space inside"),
    pytest.param(b"\r\nhello\r\n0\r\n\r\n", id="empty size"),
    pytest.param(b"0" * 16 + b"5\r\nhello\r\n0\r\n\r\n", id="17 hex digits"),
    pytest.param(b"5\r\nhello0\r\n\r\n", id="no CRLF after data"),
    pytest.param(b"3\r\nhello\r\n0\r\n\r\n", id="data longer than its size"),
    pytest.param(b"5\nhello\r\n0\r\n\r\n", id="bare LF after size"),
    pytest.param(b"5\r\nhello\n0\r\n\r\n", id="bare LF after data"),
    pytest.param(b"5\r\nhello\r\n0\n\r\n", id="bare LF after last chunk"),
    pytest.param(b"5\r\nhello\r\n0\r\n\n", id="bare LF ending trailers"),
    pytest.param(b"5\r\r\nhello\r\n0\r\n\r\n", id="CR before CRLF"),
    pytest.param(b"5;a\rb\r\nhello\r\n0\r\n\r\n", id="CR in extension"),
    pytest.param(b"5;" + b"x" * 5000 + b"\r\nhello\r\n0\r\n\r\n", id="size line too long"),
    pytest.param(b"0\r\nno colon\r\n\r\n", id="trailer without colon"),
    pytest.param(b"0\r\n folded: x\r\n\r\n", id="folded trailer"),
])
@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_chunked_decoder_refuses(wire: bytes, bytewise: bool) -> None:
    """Broken chunked framing is a 400, whole or byte by byte."""
    pieces = [wire[k:k + 1] for k in range(len(wire))] if bytewise else [wire]
    with pytest.raises(BadRequest) as caught:
        decode(ChunkedDecoder(), pieces)
    assert caught.value.error == errors.BAD_REQUEST


def test_chunked_decoder_refuses_huge_trailers_with_431() -> None:
    wire = b"0\r\n" + b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 1000) for i in range(20)) + b"\r\n"
    with pytest.raises(BadRequest) as caught:
        decode(ChunkedDecoder(), [wire])
    assert caught.value.error.status == 431


def test_length_decoder_splits_the_rest_off() -> None:
    """The body is the first Content-Length bytes, at every split; what follows is rest."""
    body = b"0123456789"
    data = body + AFTER
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            assert decode(LengthDecoder(10), [data[:i], data[i:j], data[j:]]) == (body, True, AFTER), (i, j)
    assert LengthDecoder(10).feed(b"01234") == ([b"01234"], False, b"")
    assert LengthDecoder(10).feed(body) == ([body], True, b"")
    for k in range(len(body)):
        assert decode(LengthDecoder(10), [body[:k]]) == (body[:k], False, b"")


# --- 2. ConfigMgr verbs ---

@pytest.mark.parametrize("method", ["CCM_POST", "BITS_POST"])
async def test_configmgr_verbs_reach_the_handler_with_their_body(method: str) -> None:
    seen = []

    async def handler(req: ClientRequest) -> WholeResponse:
        body = await read_body(req)
        seen.append((req.method, req.raw_path, req.content_length, req.body_exists, body))
        return WholeResponse(200, "OK", [], b"ok")

    body = b"<Msg>" + bytes(range(256)) + b"</Msg>"
    async with serve(handler) as s:
        reader, writer = await s.connect()
        writer.write(request(method, "/ccm_system/request?x=1", body=body))
        answer = await read_answer(reader)
    assert (answer.status, answer.body) == (200, b"ok")
    assert seen == [(method, "/ccm_system/request?x=1", len(body), True, body)]


# --- 3. pipelining ---

@pytest.mark.parametrize("together", [True, False], ids=["one write", "second while the first is handled"])
async def test_pipelined_requests_are_answered_in_order_one_at_a_time(together: bool) -> None:
    """The second request waits for the first (slower) one, on the same connection."""
    transports, running, overlaps = [], [0], []
    first_started = asyncio.Event()

    async def handler(req: ClientRequest) -> WholeResponse:
        running[0] += 1
        overlaps.append(running[0])
        transports.append(req.transport)
        if req.raw_path == "/first":
            first_started.set()
            await asyncio.sleep(0.1)
        running[0] -= 1
        return await path_answer(req)

    async with serve(handler) as s:
        reader, writer = await s.connect()
        if together:
            writer.write(request("GET", "/first") + request("GET", "/second"))
        else:
            writer.write(request("GET", "/first"))
            await asyncio.wait_for(first_started.wait(), WAIT)
            writer.write(request("GET", "/second"))
        first = await read_answer(reader)
        second = await read_answer(reader)
        assert len(s.server.connections) == 1
    assert (first.body, second.body) == (b"/first", b"/second")
    assert overlaps == [1, 1]
    assert transports[0] is not None and transports[0] is transports[1]


@pytest.mark.parametrize("read", [True, False], ids=["body read", "body unread"])
async def test_pipelined_post_body_then_get(read: bool) -> None:
    """A POST's body and the GET after it in one write: the body ends where its length
    says, whether the handler reads it or not."""
    body = b"GET /inside-the-body HTTP/1.1\r\n\r\n"
    async with serve(echo if read else path_answer) as s:
        reader, writer = await s.connect()
        writer.write(request("POST", "/post", body=body) + request("GET", "/get"))
        post = await read_answer(reader)
        get = await read_answer(reader)
    assert post.body == (body if read else b"/post")
    assert (get.status, get.body) == (200, b"" if read else b"/get")
    if read:
        assert get.header(b"x-path") == b"/get"


# --- 4. chunked request bodies ---

async def test_chunked_request_body_arrives_whole_then_the_next_request() -> None:
    seen = []

    async def handler(req: ClientRequest) -> WholeResponse:
        seen.append((req.raw_path, req.content_length, req.body_exists))
        return await echo(req)

    wire = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-Trailer: t\r\n\r\n"
    async with serve(handler) as s:
        reader, writer = await s.connect()
        writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for k in range(0, len(wire), 7):  # cut anywhere, in separate segments
            writer.write(wire[k:k + 7])
            await writer.drain()
            await asyncio.sleep(0.005)
        posted = await read_answer(reader)
        writer.write(request("GET", "/after"))
        after = await read_answer(reader)
    assert posted.body == b"Wikipedia in\r\n\r\nchunks."
    assert (after.status, after.header(b"x-path"), after.body) == (200, b"/after", b"")
    assert seen == [("/up", None, True), ("/after", None, False)]


async def test_broken_chunk_never_lets_the_next_request_through() -> None:
    """A chunked body that breaks its framing ends the connection: what follows it (a
    smuggled request) is never answered."""
    calls = []

    async def handler(req: ClientRequest) -> WholeResponse:
        calls.append(req.raw_path)
        with contextlib.suppress(ConnectionError):
            await read_body(req)
        return WholeResponse(200, "OK", [], b"answered")

    async with serve(handler) as s:
        reader, writer = await s.connect()
        writer.write(b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhelloXX\r\n0\r\n\r\n" + SMUGGLED)
        data = await read_to_end(reader, reset_ok=True)
    assert "/smuggled" not in calls
    assert b"answered" not in data
    assert data.count(b"HTTP/1.") <= 1


async def test_broken_chunk_is_answered_400() -> None:
    """The module's docstring: a broken chunk gets ``400 CMGService_BadRequest``."""
    async with serve(echo) as s:
        reader, writer = await s.connect()
        writer.write(b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")
        data = await read_to_end(reader, reset_ok=True)
    assert data.startswith(b"HTTP/1.1 400 CMGService_BadRequest\r\n")


# --- 5. refusals, then the connection closes ---

BAD = b"HTTP/1.1 400 CMGService_BadRequest\r\n"
TOO_LARGE = b"HTTP/1.1 431 CMGService_RequestHeaderFieldsTooLarge\r\n"
POST_A = b"POST /a HTTP/1.1\r\nHost: x\r\n"
REFUSED = {
    "Content-Length and Transfer-Encoding":
        (POST_A + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", BAD),
    "Transfer-Encoding and Content-Length":
        (POST_A + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", BAD),
    "duplicate Content-Length": (POST_A + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", BAD),
    "differing Content-Lengths": (POST_A + b"Content-Length: 5\r\nContent-Length: 0\r\n\r\nhello", BAD),
    "non-numeric Content-Length": (POST_A + b"Content-Length: 5x\r\n\r\nhello", BAD),
    "signed Content-Length": (POST_A + b"Content-Length: +5\r\n\r\nhello", BAD),
    "negative Content-Length": (POST_A + b"Content-Length: -1\r\n\r\n", BAD),
    "listed Content-Length": (POST_A + b"Content-Length: 5, 5\r\n\r\nhello", BAD),
    "Transfer-Encoding gzip, chunked": (POST_A + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", BAD),
    "Transfer-Encoding chunked twice":
        (POST_A + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", BAD),
    "Transfer-Encoding on HTTP/1.0":
        (b"POST /a HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", BAD),
    "space before the colon": (POST_A + b"Content-Length : 5\r\n\r\nhello", BAD),
    "folded header": (POST_A + b"Content-Length: 5\r\n X: y\r\n\r\nhello", BAD),
    "Expect other than 100-continue": (POST_A + b"Expect: 200-ok\r\nContent-Length: 5\r\n\r\nhello", BAD),
    "HTTP/2.0": (b"GET /a HTTP/2.0\r\nHost: x\r\n\r\n", BAD),
    "HTTP/1.2": (b"GET /a HTTP/1.2\r\nHost: x\r\n\r\n", BAD),
    "bad request line": (b"NOT A REQUEST\r\n\r\n", BAD),
    "space in the target": (b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n", BAD),
    "NUL before the method": (b"\x00GET /a HTTP/1.1\r\nHost: x\r\n\r\n", BAD),
    f"{MAX_HEADERS + 1} headers": (b"GET /a HTTP/1.1\r\n" + b"".join(
        b"X-H%d: v\r\n" % i for i in range(MAX_HEADERS + 1)) + b"\r\n", TOO_LARGE),
    "field over max_field_size": (b"GET /a HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 2000 + b"\r\n\r\n", TOO_LARGE),
    "request line over max_field_size": (b"GET /" + b"p" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", TOO_LARGE),
}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_refusal_answers_once_then_closes(case: str) -> None:
    """One CMG error answer with ``Connection: close``, then the end: the request written
    after it (a smuggling attempt) never reaches the handler nor gets an answer."""
    wire, status_line = REFUSED[case]
    calls = []

    async def handler(req: ClientRequest) -> WholeResponse:
        calls.append(req.raw_path)
        return WholeResponse(200, "OK", [], b"should not be")

    async with serve(handler, max_field_size=1024) as s:
        reader, writer = await s.connect()
        writer.write(wire + SMUGGLED)
        data = await read_to_end(reader)  # the server closes
    assert data.startswith(status_line)
    assert data.count(b"HTTP/1.") == 1
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"\r\nConnection: close\r\n" in head + b"\r\n"
    assert body == status_line.split(b" ", 2)[2].strip()  # the error's name, never an echo
    assert calls == []


async def test_head_over_64k_without_an_end_is_refused_with_431() -> None:
    """A head still unfinished past MAX_HEAD_SIZE bytes: 431, then the connection closes
    (exactly MAX_HEAD_SIZE + 1 bytes sent, so the server has read all of them)."""
    start = b"GET /a HTTP/1.1\r\nHost: x\r\nX-Endless: "
    async with serve(path_answer) as s:
        reader, writer = await s.connect()
        writer.write(start + b"a" * (MAX_HEAD_SIZE + 1 - len(start)))
        data = await read_to_end(reader)
    assert data.startswith(TOO_LARGE)
    assert data.count(b"HTTP/1.") == 1


# --- 6. keep-alive ---

async def test_http11_keeps_alive_by_default() -> None:
    async with serve(path_answer) as s:
        reader, writer = await s.connect()
        writer.write(request("GET", "/one"))
        one = await read_answer(reader)
        writer.write(request("GET", "/two"))
        two = await read_answer(reader)
    assert one.version == b"HTTP/1.1" and one.header(b"connection") is None
    assert (two.status, two.body) == (200, b"/two")


async def test_http11_connection_close() -> None:
    async with serve(path_answer) as s:
        reader, writer = await s.connect()
        writer.write(request("GET", "/one", headers=[b"Connection: close"]))
        one = await read_answer(reader)
        assert one.header(b"connection") == b"close"
        assert await read_to_end(reader) == b""


async def test_http10_closes_by_default() -> None:
    async with serve(path_answer) as s:
        reader, writer = await s.connect()
        writer.write(request("GET", "/one", version=b"HTTP/1.0"))
        one = await read_answer(reader)
        assert (one.version, one.body) == (b"HTTP/1.0", b"/one")
        assert one.header(b"connection") is None
        assert await read_to_end(reader) == b""


async def test_http10_keep_alive() -> None:
    async with serve(path_answer) as s:
        reader, writer = await s.connect()
        for path in ("/one", "/two"):
            writer.write(request("GET", path, version=b"HTTP/1.0", headers=[b"Connection: keep-alive"]))
            answer = await read_answer(reader)
            assert (answer.version, answer.body) == (b"HTTP/1.0", path.encode())
            assert answer.header(b"connection") == b"keep-alive"


async def test_large_whole_response_arrives_intact() -> None:
    """A body over the one-write size goes out after its head, whole."""
    body = os.urandom(300_000)

    async def handler(req: ClientRequest) -> WholeResponse:
        return WholeResponse(200, "OK", [], body)

    async with serve(handler) as s:
        reader, writer = await s.connect()
        writer.write(request() + request())
        assert (await read_answer(reader)).body == body
        assert (await read_answer(reader)).body == body


# --- 7. timeouts ---

async def test_partial_head_is_cut_off_after_header_timeout() -> None:
    async with serve(path_answer, header_timeout=0.3) as s:
        reader, writer = await s.connect()
        loop = asyncio.get_running_loop()
        start = loop.time()
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
        data = await read_to_end(reader, reset_ok=True)
        elapsed = loop.time() - start
    assert data == b""
    assert 0.2 <= elapsed < 2.0


async def test_header_timeout_counts_from_the_first_byte_not_the_last() -> None:
    """A head trickling in a byte at a time is cut off all the same."""
    async with serve(path_answer, header_timeout=0.3) as s:
        reader, writer = await s.connect()
        loop = asyncio.get_running_loop()

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                for byte in b"GET /trickle HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.03)

        start = loop.time()
        trickling = asyncio.create_task(trickle())
        try:
            data = await read_to_end(reader, reset_ok=True)
            elapsed = loop.time() - start
        finally:
            trickling.cancel()
    assert data == b""
    assert elapsed < 1.5  # the trickle alone lasts over 3 s


@pytest.mark.parametrize("used", [False, True], ids=["never used", "after an answer"])
async def test_idle_connection_closes_after_keepalive_timeout(used: bool) -> None:
    async with serve(path_answer, keepalive_timeout=0.3) as s:
        reader, writer = await s.connect()
        if used:
            writer.write(request())
            assert (await read_answer(reader)).status == 200
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await read_to_end(reader) == b""
        assert loop.time() - start < 2.0


# --- 8. Expect: 100-continue ---

async def test_expect_100_continue_when_the_handler_reads() -> None:
    go = asyncio.Event()

    async def handler(req: ClientRequest) -> WholeResponse:
        await go.wait()
        return WholeResponse(200, "OK", [], (await read_body(req))[::-1])

    async with serve(handler) as s:
        reader, writer = await s.connect()
        writer.write(request("POST", "/up", headers=[b"Expect: 100-continue", b"Content-Length: 5"]))
        with pytest.raises(TimeoutError):  # nothing before the handler reads
            await asyncio.wait_for(reader.read(1), 0.2)
        go.set()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        answer = await read_answer(reader)
        assert (answer.status, answer.body) == (200, b"olleh")
        assert answer.header(b"connection") is None
        writer.write(request("GET", "/after"))  # still usable
        assert (await read_answer(reader)).status == 200


async def test_no_100_continue_when_the_handler_answers_without_reading() -> None:
    async def handler(req: ClientRequest) -> WholeResponse:
        return WholeResponse(413, "Request Entity Too Large", [], b"no")

    async with serve(handler) as s:
        reader, writer = await s.connect()
        writer.write(request("POST", "/up", headers=[b"Expect: 100-continue", b"Content-Length: 5"]))
        answer = await read_answer(reader)
    assert (answer.status, answer.body) == (413, b"no")
    assert answer.header(b"connection") == b"close"


# --- 9. failing handlers ---

async def test_handler_exception_is_a_500_then_close_and_the_server_carries_on() -> None:
    async def handler(req: ClientRequest) -> WholeResponse:
        if req.raw_path == "/boom":
            raise RuntimeError("boom")
        return await path_answer(req)

    async with serve(handler) as s:
        reader, writer = await s.connect()
        writer.write(request("GET", "/boom") + request("GET", "/pipelined"))
        data = await read_to_end(reader)
        assert data.startswith(b"HTTP/1.1 500 CMGConnector_InternalServerError\r\n")
        assert data.count(b"HTTP/1.") == 1  # the pipelined request is not answered
        head, _, body = data.partition(b"\r\n\r\n")
        assert b"\r\nConnection: close" in head
        assert body == b"CMGConnector_InternalServerError"
        reader, writer = await s.connect()
        writer.write(request("GET", "/after"))
        assert (await read_answer(reader)).body == b"/after"


async def test_handler_exception_after_the_head_cuts_the_connection() -> None:
    """Once a streamed head is out, a failure must cut the connection, never write a
    second status line into the body (aiohttp refused to send one)."""
    async def handler(req: ClientRequest) -> StreamedResponse:
        resp = StreamedResponse(200, "OK", [(b"Content-Length", b"20")])
        await resp.prepare(req)
        await resp.write(b"part")
        raise RuntimeError("upstream broke mid-body")

    async with serve(handler) as s:
        reader, writer = await s.connect()
        writer.write(request("GET", "/stream"))
        data = await read_to_end(reader, reset_ok=True)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert data.count(b"HTTP/1.") == 1
    assert len(data.partition(b"\r\n\r\n")[2]) < 20  # never a complete body


# --- 10. clients that go away ---

@pytest.mark.parametrize("how", ["reset", "hang-up"])
async def test_a_client_that_goes_away_cancels_the_handler(how: str) -> None:
    """A reset, or the client ending its side (FIN, or close_notify over TLS) while its
    request is held: the handler is cancelled and the connection closes (a BGB long poll
    of a client that went away must not hold its stream)."""
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def handler(req: ClientRequest) -> WholeResponse:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return await path_answer(req)

    async with serve(handler) as s:
        reader, writer = await s.connect()
        writer.write(request("GET", "/held"))
        await asyncio.wait_for(started.wait(), WAIT)
        if how == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # an RST
        else:
            writer.write_eof()
        await asyncio.wait_for(cancelled.wait(), WAIT)
        if how == "hang-up":
            assert await asyncio.wait_for(reader.read(), WAIT) == b""
        while s.server.connections:
            await asyncio.sleep(0.01)


async def test_client_ending_mid_body_fails_the_handlers_read() -> None:
    outcome: asyncio.Future[BaseException | bytes] = asyncio.get_running_loop().create_future()

    async def handler(req: ClientRequest) -> WholeResponse:
        try:
            outcome.set_result(await read_body(req))
        except ConnectionError as exc:
            outcome.set_result(exc)
            raise
        return WholeResponse(200, "OK", [], b"")

    async with serve(handler) as s:
        reader, writer = await s.connect()
        writer.write(request("POST", "/up", headers=[b"Content-Length: 100"]) + b"0123456789")
        await writer.drain()
        writer.write_eof()
        result = await asyncio.wait_for(outcome, WAIT)
    assert isinstance(result, ConnectionResetError)


# --- 11. answers before the whole body ---

async def test_early_answer_then_the_body_is_read_and_the_connection_closes() -> None:
    """An answer before a 1 MiB body: the client gets it whole with ``Connection: close``
    while still sending, the server reads the rest, then closes cleanly (no reset)."""
    size = 1 << 20
    handled = asyncio.Event()

    async def handler(req: ClientRequest) -> WholeResponse:
        handled.set()
        return WholeResponse(413, "Request Entity Too Large", [], b"too big")

    async with serve(handler, linger_timeout=5.0) as s:
        reader, writer = await s.connect()
        writer.write(request("POST", "/big", headers=[b"Content-Length: %d" % size]))

        async def send_body() -> None:
            await asyncio.wait_for(handled.wait(), WAIT)
            for _ in range(size // 65536):
                writer.write(b"x" * 65536)
                await asyncio.wait_for(writer.drain(), WAIT)
                await asyncio.sleep(0)

        sending = asyncio.create_task(send_body())
        try:
            answer = await read_answer(reader)
            await asyncio.wait_for(sending, WAIT)
        finally:
            sending.cancel()
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await read_to_end(reader) == b""  # no reset
        assert loop.time() - start < 2.0  # the end of the body closes it, not linger_timeout
    assert (answer.status, answer.body) == (413, b"too big")
    assert answer.header(b"connection") == b"close"


async def test_early_answer_waits_no_longer_than_linger_timeout() -> None:
    async with serve(path_answer, linger_timeout=0.3) as s:
        reader, writer = await s.connect()
        writer.write(request("POST", "/big", headers=[b"Content-Length: 100000"]) + b"x" * 1000)
        answer = await read_answer(reader)
        assert answer.header(b"connection") == b"close"
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await read_to_end(reader, reset_ok=True) == b""
        assert loop.time() - start < 2.0


# --- 12. flow control ---

async def test_unread_body_stays_bounded_then_arrives_whole_in_order() -> None:
    """A handler that does not read yet: the server stops reading near BODY_HIGH_WATER
    (the client's sending blocks), then the whole 20 MiB arrives in order."""
    size = 20 << 20
    payload = os.urandom(size)
    go = asyncio.Event()

    async def handler(req: ClientRequest) -> WholeResponse:
        await go.wait()
        digest, n = hashlib.sha256(), 0
        while chunk := await req.content.readany():
            digest.update(chunk)
            n += len(chunk)
        return WholeResponse(200, "OK", [], b"%d %s" % (n, digest.hexdigest().encode()))

    async with serve(handler) as s:
        reader, writer = await s.connect()
        writer.write(request("POST", "/big", headers=[b"Content-Length: %d" % size]))

        async def send_body() -> None:
            view = memoryview(payload)
            for k in range(0, size, 1 << 18):
                writer.write(view[k:k + (1 << 18)])
                await writer.drain()

        sending = asyncio.create_task(send_body())
        try:
            conn = await s.only_connection()

            async def body_arrives() -> None:
                while conn._body is None or not conn._body.received:
                    await asyncio.sleep(0.01)

            await asyncio.wait_for(body_arrives(), WAIT)
            await asyncio.sleep(0.3)
            body = conn._body
            assert not sending.done()  # held back
            assert body._size == body.received <= BODY_HIGH_WATER + READ_SIZE
            go.set()
            await asyncio.wait_for(sending, WAIT)
            answer = await read_answer(reader)
        finally:
            sending.cancel()
    assert answer.body == b"%d %s" % (size, hashlib.sha256(payload).hexdigest().encode())


# --- 13. streamed responses ---

PIECES = [b"first,", b"", b"second,", b"x" * 70000]


def streamer(headers: list[tuple[bytes, bytes]], pieces: list[bytes]) -> Handler:
    async def handler(req: ClientRequest) -> StreamedResponse:
        resp = StreamedResponse(200, "OK", list(headers))
        await resp.prepare(req)
        if req.method != "HEAD":
            for piece in pieces:
                await resp.write(piece)
        await resp.write_eof()
        return resp
    return handler


async def test_streamed_with_content_length_is_written_as_is() -> None:
    body = b"".join(PIECES)
    async with serve(streamer([(b"Content-Length", b"%d" % len(body))], PIECES)) as s:
        reader, writer = await s.connect()
        writer.write(request() + request())
        first = await read_answer(reader)
        second = await read_answer(reader)  # the connection carries on after it
    assert first.header(b"content-length") == b"%d" % len(body)
    assert first.header(b"transfer-encoding") is None
    assert first.body == second.body == body


async def test_streamed_without_length_is_chunked_on_http11() -> None:
    async with serve(streamer([(b"X-A", b"1")], PIECES)) as s:
        reader, writer = await s.connect()
        writer.write(request() + request())
        first = await read_answer(reader)
        second = await read_answer(reader)
    assert first.header(b"transfer-encoding") == b"chunked"
    assert first.header(b"content-length") is None
    assert first.body == second.body == b"".join(PIECES)
    assert first.chunks == [len(p) for p in PIECES if p]  # an empty write is no (final) chunk


@pytest.mark.parametrize("keep_alive", [False, True], ids=["HTTP/1.0", "HTTP/1.0 keep-alive"])
async def test_streamed_without_length_on_http10_ends_with_the_connection(keep_alive: bool) -> None:
    headers = [b"Connection: keep-alive"] if keep_alive else []
    async with serve(streamer([], PIECES)) as s:
        reader, writer = await s.connect()
        writer.write(request(version=b"HTTP/1.0", headers=headers))
        answer = await read_answer(reader)  # read to the end: no length, not chunked
    assert answer.version == b"HTTP/1.0"
    assert answer.header(b"content-length") is None and answer.header(b"transfer-encoding") is None
    assert answer.header(b"connection") is None  # never "keep-alive" for a close-delimited body
    assert answer.body == b"".join(PIECES)


@pytest.mark.parametrize("headers", [[(b"Content-Length", b"10")], []], ids=["with length", "without"])
async def test_streamed_answer_to_head_has_no_body(headers: list[tuple[bytes, bytes]]) -> None:
    """The next (pipelined) answer follows the HEAD's head directly."""
    async with serve(streamer(headers, [b"0123456789"])) as s:
        reader, writer = await s.connect()
        writer.write(request("HEAD", "/h") + request("GET", "/g"))
        head = await read_answer(reader, to_head=True)
        get = await read_answer(reader)
    assert head.status == 200
    assert head.header(b"content-length") == (b"10" if headers else None)
    assert head.header(b"transfer-encoding") is None
    assert (get.status, get.body) == (200, b"0123456789")


async def test_whole_answer_to_head_has_no_body() -> None:
    """As aiohttp's web.Response: Content-Length of the body, but no body, for HEAD."""
    async def handler(req: ClientRequest) -> WholeResponse:
        return WholeResponse(200, "OK", [], b"hello")

    async with serve(handler) as s:
        reader, writer = await s.connect()
        writer.write(request("HEAD", "/h") + request("GET", "/g"))
        head = await read_answer(reader, to_head=True)
        assert head.header(b"content-length") == b"5"
        get = await asyncio.wait_for(reader.readuntil(b"\r\n"), WAIT)
    assert get == b"HTTP/1.1 200 OK\r\n"


@pytest.mark.parametrize("case", ["longer", "shorter"])
async def test_streamed_body_off_its_content_length_is_cut_off(case: str) -> None:
    """A body that does not match the relayed Content-Length never looks complete."""
    failures = []

    async def handler(req: ClientRequest) -> StreamedResponse:
        resp = StreamedResponse(200, "OK", [(b"Content-Length", b"10")])
        await resp.prepare(req)
        try:
            await resp.write(b"0123456789ab" if case == "longer" else b"01234")
            await resp.write_eof()
        except ConnectionResetError as exc:
            failures.append(exc)
            raise
        return resp

    async with serve(handler) as s:
        reader, writer = await s.connect()
        writer.write(request())
        data = await read_to_end(reader, reset_ok=True)
    assert len(failures) == 1
    assert data.count(b"HTTP/1.") <= 1
    assert len(data.partition(b"\r\n\r\n")[2]) < 10


# --- 14. requests taken without a task (handler.begin) ---

class BeginHandler:
    """Takes requests without a body (``begin``) and answers them from a later loop turn,
    as the gateway's proxy does; the rest go to ``__call__`` in a task."""

    def __init__(self, answer: Callable[[ClientRequest], object] | None = None) -> None:
        self.begun: list[str] = []
        self.called: list[str] = []
        self.abandoned: list[str] = []
        self.pending: list[ClientRequest] = []
        self.answer = answer or (lambda req: WholeResponse(200, "OK", [(b"X-Begun", b"1")], req.raw_path.encode()))
        self.hold = False

    async def __call__(self, req: ClientRequest) -> WholeResponse:
        self.called.append(req.raw_path)
        return await echo(req)

    def begin(self, req: ClientRequest) -> bool:
        if req.body_exists or req.raw_path.startswith("/task"):
            return False
        self.begun.append(req.raw_path)
        req.on_abandon = lambda: self.abandoned.append(req.raw_path)
        if self.hold:
            self.pending.append(req)
        else:
            asyncio.get_running_loop().call_soon(lambda: req.respond(self.answer(req)))  # type: ignore[arg-type]
        return True


async def test_begin_takes_bodiless_requests_and_the_rest_go_to_a_task() -> None:
    handler = BeginHandler()
    async with serve(handler) as s:  # type: ignore[arg-type]
        reader, writer = await s.connect()
        writer.write(request("GET", "/a") + request("POST", "/b", body=b"body") + request("GET", "/task")
                     + request("HEAD", "/c"))
        a = await read_answer(reader)
        b = await read_answer(reader)
        t = await read_answer(reader)
        c = await read_answer(reader, to_head=True)
        assert (a.body, a.header(b"x-begun")) == (b"/a", b"1")
        assert (b.body, b.header(b"x-method")) == (b"body", b"POST")
        assert t.header(b"x-path") == b"/task" and t.header(b"x-begun") is None
        assert c.status == 200 and c.header(b"content-length") == b"2" and c.body == b""
        assert handler.begun == ["/a", "/c"] and handler.called == ["/b", "/task"]
        assert handler.abandoned == []


async def test_begin_can_hand_a_streamed_answer_to_a_task() -> None:
    async def streamed(req: ClientRequest) -> StreamedResponse:
        resp = StreamedResponse(200, "OK", [])
        await resp.prepare(req)
        for part in (b"one ", b"two"):
            await resp.write(part)
        await resp.write_eof()
        return resp

    handler = BeginHandler(lambda req: streamed(req))
    async with serve(handler) as s:  # type: ignore[arg-type]
        reader, writer = await s.connect()
        writer.write(request("GET", "/s1") + request("GET", "/s2"))
        for _ in range(2):
            answer = await read_answer(reader)
            assert answer.body == b"one two" and answer.header(b"transfer-encoding") == b"chunked"


async def test_a_client_that_goes_away_abandons_a_request_taken_without_a_task() -> None:
    handler = BeginHandler()
    handler.hold = True
    async with serve(handler) as s:  # type: ignore[arg-type]
        reader, writer = await s.connect()
        writer.write(request("GET", "/held"))
        while not handler.pending:
            await asyncio.sleep(0.01)
        writer.transport.abort()
        while s.server.connections:
            await asyncio.sleep(0.01)
        assert handler.abandoned == ["/held"]
        # An answer that comes after is dropped quietly; a coroutine is closed unawaited.
        handler.pending[0].respond(WholeResponse(200, "OK", [], b"late"))

        async def never() -> WholeResponse:
            raise AssertionError("awaited")

        handler.pending[0].respond(never())


async def test_a_whole_answer_the_client_does_not_read_holds_the_next_request() -> None:
    """Answered without a task, a response the client does not read still stops the
    connection: the next pipelined request is taken only once the answer has drained."""
    big = os.urandom(8 * 1024 * 1024)
    handler = BeginHandler(lambda req: WholeResponse(200, "OK", [], big))
    async with serve(handler) as s:  # type: ignore[arg-type]
        reader, writer = await s.connect()
        writer.write(request("GET", "/first") + request("GET", "/second"))
        await asyncio.sleep(0.3)
        assert handler.begun == ["/first"]  # the first answer is stuck in the client's window
        first = await read_answer(reader)
        second = await read_answer(reader)
        assert first.body == big and second.body == big
        assert handler.begun == ["/first", "/second"]
