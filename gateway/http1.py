"""The gateway's HTTP/1.1 server side: client connections, requests, responses.

Built for the internet edge and for the CMG's one job, relaying requests one at a time
per connection:

- request heads are parsed by ``httparse`` (Rust's httparse, which hyper uses): it
  accepts ConfigMgr's verbs (``CCM_POST``, ``BITS_POST``: any RFC 9110 token), which the
  C parsers of aiohttp and httptools (llhttp) refuse, at a seventh of the cost of
  aiohttp's pure-Python parser;
- request bodies are framed here (``Content-Length``, or ``chunked`` by
  :class:`ChunkedDecoder`) and handed to the handler as they arrive, under flow
  control: reading from the client pauses while more than ``BODY_HIGH_WATER`` bytes wait;
- a request head must arrive whole within ``header_timeout`` seconds of its first
  byte, and an idle keep-alive connection closes after ``keepalive_timeout``;
- unparsable requests get the CMG's own answer, never an echo of the input: ``431
  CMGService_RequestHeaderFieldsTooLarge`` for a header over the limit or too many
  headers, ``400 CMGService_BadRequest`` for the rest (bad request line or version,
  Content-Length with Transfer-Encoding, duplicate or non-numeric Content-Length, a
  transfer coding other than chunked, a broken chunk); the connection closes after it,
  so a smuggled second request is never read;
- a response that comes before the whole request body closes the connection after the
  rest of the body was read and dropped (up to ``linger_timeout``), so the client never
  gets a reset instead of its answer;
- a client that goes away cancels the handler of its request;
- a handler may take a request without a body without a task of its own
  (``handler.begin``) and answer it later from a callback (``request.respond``): the
  common small exchange then costs no task and no coroutine chain.

Responses are :class:`WholeResponse` (head and body in one write) or
:class:`StreamedResponse` (head, then the body as it comes: ``Content-Length`` framing
when the relayed head has one, else chunked on HTTP/1.1 or close-delimited on 1.0).
Their heads are what aiohttp's ``web.Response`` and ``web.StreamResponse`` write for the
same answer (``tests/gateway/test_http1_responses.py`` compares the bytes).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl, unquote

import httparse
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion, HttpVersion10, HttpVersion11
from multidict import MultiDict, MultiDictProxy

from . import errors

HEADER_TOO_LARGE = errors.CMGError(431, "CMGService_RequestHeaderFieldsTooLarge")

#: A request head larger than this is refused with 431 (aiohttp's limit was per line).
MAX_HEAD_SIZE = 65536
#: Request headers beyond this many are refused with 431.
MAX_HEADERS = 128
#: Bytes of request body waiting for the handler before reading from the client pauses.
BODY_HIGH_WATER = 256 * 1024
BODY_LOW_WATER = 64 * 1024
#: Bytes of a pipelined next request held while one is handled before reading pauses.
PIPELINE_LIMIT = 65536
#: Bodies up to this size go out in the head's write (one copy, one TLS write).
JOIN_BODY_UP_TO = 65536

_SERVER_LINE = b"Server: " + SERVER_SOFTWARE.encode("latin-1") + b"\r\n"
_VERSIONS = (HttpVersion10, HttpVersion11)
_STATUS_LINES: dict[tuple[int, int, str], bytes] = {}

# Which headers a response head defaults when they were not relayed (by lower-cased name).
_HAS_CONTENT_TYPE, _HAS_DATE, _HAS_SERVER = 1, 2, 4
_DEFAULTED = {b"content-type": _HAS_CONTENT_TYPE, b"date": _HAS_DATE, b"server": _HAS_SERVER}

# Request header names the framing and the connection care about, by lower-cased name.
_CONTENT_LENGTH, _TRANSFER_ENCODING, _CONNECTION, _EXPECT = 1, 2, 3, 4
_FRAMING = {"content-length": _CONTENT_LENGTH, "transfer-encoding": _TRANSFER_ENCODING,
            "connection": _CONNECTION, "expect": _EXPECT}
# A header name as the client spelled it -> (its bytes, its _FRAMING kind or 0); memoised.
_NAMES: dict[str, tuple[bytes, int]] = {}
_NAME_CACHE_SIZE = 1024


def _name(name: str) -> tuple[bytes, int]:
    entry = (name.encode("latin-1"), _FRAMING.get(name.lower(), 0))
    if len(_NAMES) < _NAME_CACHE_SIZE:
        _NAMES[name] = entry
    return entry


class BadRequest(Exception):
    """A request that cannot be parsed or framed: the CMG's answer and why."""

    def __init__(self, error: errors.CMGError, why: str) -> None:
        super().__init__(why)
        self.error = error


def _status_line(version: HttpVersion, status: int, reason: str) -> bytes:
    key = (version.minor, status, reason)
    line = _STATUS_LINES.get(key)
    if line is None:
        line = b"HTTP/1.%d %d %s\r\n" % (version.minor, status, reason.encode("utf-8", "surrogateescape"))
        if len(_STATUS_LINES) < 256:
            _STATUS_LINES[key] = line
    return line


def response_head(version: HttpVersion, status: int, reason: str, headers: Iterable[tuple[bytes, bytes]],
                  keep_alive: bool, length: int | None = None, chunked: bool = False,
                  default_type: bool = False) -> list[bytes]:
    """A response head as aiohttp writes it: the status line in the request's version, the
    relayed headers as given, then ``Content-Length`` (when ``length`` is given) or
    ``Transfer-Encoding: chunked``, ``Content-Type: application/octet-stream`` when
    ``default_type`` and none was relayed, ``Date`` and ``Server`` unless relayed, and
    ``Connection`` when the connection's fate differs from the version's default."""
    head = [_status_line(version, status, reason)]
    given = 0
    for k, v in headers:
        head += (k, b": ", v, b"\r\n")
        given |= _DEFAULTED.get(k.lower(), 0)
    if length is not None:
        head.append(b"Content-Length: %d\r\n" % length)
    elif chunked:
        head.append(b"Transfer-Encoding: chunked\r\n")
    if default_type and not given & _HAS_CONTENT_TYPE:
        head.append(b"Content-Type: application/octet-stream\r\n")
    if not given & _HAS_DATE:
        head += (b"Date: ", rfc822_formatted_time().encode("ascii"), b"\r\n")
    if not given & _HAS_SERVER:
        head.append(_SERVER_LINE)
    if keep_alive:
        if version == HttpVersion10:
            head.append(b"Connection: keep-alive\r\n")
    elif version == HttpVersion11:
        head.append(b"Connection: close\r\n")
    head.append(b"\r\n")
    return head


# --- request bodies ---

class LengthDecoder:
    """A body of ``Content-Length`` bytes."""

    __slots__ = ("remaining",)

    def __init__(self, length: int) -> None:
        self.remaining = length

    def feed(self, data: bytes) -> tuple[list[bytes], bool, bytes]:
        """(body pieces, whether the body is complete, the bytes after it)."""
        remaining = self.remaining
        if len(data) < remaining:
            self.remaining = remaining - len(data)
            return [data], False, b""
        self.remaining = 0
        if len(data) == remaining:
            return [data], True, b""
        return [data[:remaining]], True, data[remaining:]


class ChunkedDecoder:
    """A ``Transfer-Encoding: chunked`` body (RFC 9112, 7.1), strictly: hexadecimal sizes
    of at most 16 digits, chunk extensions skipped, CRLF line ends, trailer fields read
    and dropped (never relayed); lines and trailers bounded. No maintained Python
    package decodes chunked bodies on their own (httparse's chunk-size parser is not in
    its Python binding), hence this one."""

    __slots__ = ("_state", "_left", "_line", "_trailers")

    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)
    MAX_LINE = 4096
    MAX_TRAILERS = 16384

    def __init__(self) -> None:
        self._state = self._SIZE
        self._left = 0
        self._line = b""
        self._trailers = 0

    def _take_line(self, data: bytes, pos: int) -> tuple[bytes | None, int]:
        end = data.find(b"\n", pos)
        if end < 0:
            self._line += data[pos:]
            if len(self._line) > self.MAX_LINE:
                raise BadRequest(errors.BAD_REQUEST, "chunk line too long")
            return None, len(data)
        line = self._line + data[pos:end + 1] if self._line else data[pos:end + 1]
        self._line = b""
        if len(line) > self.MAX_LINE:
            raise BadRequest(errors.BAD_REQUEST, "chunk line too long")
        if not line.endswith(b"\r\n"):
            raise BadRequest(errors.BAD_REQUEST, "chunk line without CRLF")
        return line[:-2], end + 1

    def feed(self, data: bytes) -> tuple[list[bytes], bool, bytes]:
        """(body pieces, whether the body is complete, the bytes after it)."""
        out: list[bytes] = []
        pos, n = 0, len(data)
        while pos < n:
            state = self._state
            if state == self._DATA:
                take = min(self._left, n - pos)
                out.append(data[pos:pos + take] if take < n or pos else data)
                pos += take
                self._left -= take
                if not self._left:
                    self._state = self._DATA_END
                continue
            line, pos = self._take_line(data, pos)
            if line is None:
                break
            if state == self._SIZE:
                size = line.partition(b";")[0]
                if not size or len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
                    raise BadRequest(errors.BAD_REQUEST, f"bad chunk size {size[:20]!r}")
                if 0 in line or 13 in line:
                    raise BadRequest(errors.BAD_REQUEST, "control character in a chunk extension")
                self._left = int(size, 16)
                self._state = self._DATA if self._left else self._TRAILER
            elif state == self._DATA_END:
                if line:
                    raise BadRequest(errors.BAD_REQUEST, "chunk data longer than its size")
                self._state = self._SIZE
            else:  # trailer fields, up to the empty line
                if not line:
                    return out, True, data[pos:]
                self._trailers += len(line)
                if self._trailers > self.MAX_TRAILERS:
                    raise BadRequest(HEADER_TOO_LARGE, "trailer fields too large")
                if b":" not in line or 0 in line or 13 in line or line[:1] in (b" ", b"\t"):
                    raise BadRequest(errors.BAD_REQUEST, "bad trailer field")
        return out, False, b""


class RequestBody:
    """The request body as it arrives, read by the handler with ``readany()``."""

    __slots__ = ("_conn", "_chunks", "_size", "_eof", "_exc", "_waiter", "_continue", "received", "dropping")

    def __init__(self, conn: ClientConnection, expect_continue: bool) -> None:
        self._conn = conn
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._continue = expect_continue  # "100 Continue" owed before the first read
        self.received = 0
        self.dropping = False  # the handler is done: what still arrives is dropped

    def feed(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            if piece:
                self.received += len(piece)
                if not self.dropping:
                    self._chunks.append(piece)
                    self._size += len(piece)
        if self._size > BODY_HIGH_WATER:
            self._conn._pause(body=True)
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        if not self._eof:
            self._exc = exc
            self._wake()

    def drop(self) -> None:
        self.dropping = True
        self._chunks.clear()
        self._size = 0
        self._conn._resume(body=True)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def readany(self) -> bytes:
        """What has arrived (b"" at the end); raises when the body broke off."""
        if self._continue:
            self._continue = False
            self._conn._write(b"HTTP/1.1 100 Continue\r\n\r\n")
        while not self._chunks:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            waiter = self._waiter = self._conn._loop.create_future()
            await waiter
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size -= len(data)
        if self._size <= BODY_LOW_WATER:
            self._conn._resume(body=True)
        return data


class _EmptyBody:
    __slots__ = ()

    async def readany(self) -> bytes:
        return b""


EMPTY_BODY = _EmptyBody()


# --- requests ---

class ClientRequest:
    """One client request: what the handler reads of it (the names are aiohttp's)."""

    __slots__ = ("method", "raw_path", "version", "raw_headers", "keep_alive", "content_length",
                 "body_exists", "content", "remote", "connection", "on_abandon", "_conn", "__weakref__")

    def __init__(self, conn: ClientConnection, method: str, raw_path: str, version: HttpVersion,
                 raw_headers: list[tuple[bytes, bytes]], keep_alive: bool, content_length: int | None,
                 content: RequestBody | _EmptyBody, connection: list[bytes]) -> None:
        self._conn = conn
        self.connection = connection  # the Connection headers' tokens, lower-cased
        self.method = method
        self.raw_path = raw_path
        self.version = version
        self.raw_headers = raw_headers
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.content = content
        self.body_exists = content is not EMPTY_BODY
        self.remote: str | None = conn.remote
        # Set by a handler that took the request without a task (GatewayServer.begin):
        # called if the client goes away before the response was handed over.
        self.on_abandon: Callable[[], None] | None = None

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._conn.transport

    def header(self, name: str) -> str | None:
        """The first header of that name (any case), as text; None when there is none."""
        wanted = name.lower().encode("latin-1")
        for k, v in self.raw_headers:
            if len(k) == len(wanted) and k.lower() == wanted:
                return v.decode("latin-1")
        return None

    @property
    def path(self) -> str:
        """The path without its query, percent-decoded."""
        return unquote(self.raw_path.partition("?")[0])

    @property
    def query(self) -> MultiDictProxy[str]:
        return MultiDictProxy(MultiDict(parse_qsl(self.raw_path.partition("?")[2], keep_blank_values=True)))

    async def drain(self) -> None:
        """Wait while the client reads too slowly (its connection's write buffer is full)."""
        await self._conn._drain()

    def write(self, data: bytes) -> None:
        self._conn._write(data)

    def writelines(self, data: list[bytes]) -> None:
        self._conn._writelines(data)

    def will_keep_alive(self) -> bool:
        """Whether the connection can carry another request after this one's response."""
        return self._conn._keeps_alive(self)

    def respond(self, result: WholeResponse | Awaitable[Response]) -> None:
        """For a request a handler took without a task (``begin``): its answer, written at
        once, or an awaitable of it, awaited in a task (a streamed response)."""
        self._conn._respond(self, result)


# --- responses ---

class WholeResponse:
    """A response whose body is in hand: one head and its body in one write."""

    __slots__ = ("status", "reason", "headers", "body", "written", "__weakref__")

    def __init__(self, status: int, reason: str, headers: list[tuple[bytes, bytes]], body: bytes,
                 written: Callable[[], None] | None = None) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers  # no hop-by-hop header, no Content-Length
        self.body = body
        self.written = written  # called once the answer was handed to the client (or failed to be)

    async def send(self, request: ClientRequest) -> None:
        self.write_to(request)
        await request.drain()

    def write_to(self, request: ClientRequest) -> None:
        """The whole answer, handed to the connection (without waiting for the client to
        read it: see ``send``)."""
        body = self.body
        head = response_head(request.version, self.status, self.reason, self.headers, request.will_keep_alive(),
                             length=len(body), default_type=bool(body))
        request._conn._head_sent = True
        try:
            if request.method == "HEAD":  # the length a GET would get, and no body
                request.write(b"".join(head))
            elif len(body) <= JOIN_BODY_UP_TO:
                head.append(body)
                request.write(b"".join(head))
            else:
                request.write(b"".join(head))
                request.write(body)
        finally:
            self.body = b""
            written, self.written = self.written, None
            if written is not None:
                written()


class StreamedResponse:
    """A response written as its body arrives: ``prepare`` writes the head, ``write`` each
    piece (waiting while the client reads slower), ``write_eof`` the end.

    Framing: none for HEAD, 1xx, 204 and 304; the relayed ``Content-Length`` when there is
    one (a body that comes out longer or shorter than it says is cut off, never passed on
    as complete); else chunked on HTTP/1.1, or the end of the connection on HTTP/1.0."""

    __slots__ = ("status", "reason", "headers", "_request", "_chunked", "_left", "finished")

    def __init__(self, status: int, reason: str, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers  # no hop-by-hop header
        self._request: ClientRequest | None = None
        self._chunked = False
        self._left: int | None = None  # body bytes still owed by Content-Length
        self.finished = False

    async def prepare(self, request: ClientRequest) -> None:
        self._request = request
        status = self.status
        length: int | None = None
        for k, v in self.headers:
            if k.lower() == b"content-length":
                try:
                    length = int(v)
                except ValueError:
                    length = None
        headers = self.headers
        if status in (204, 304) or 100 <= status < 200:
            self._left = 0  # no body, and no length: it would describe another
            headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
        elif request.method == "HEAD":
            self._left = 0  # no body; the length is the one a GET would get
        elif length is not None and length >= 0:
            self._left = length
        elif request.version == HttpVersion11:
            self._chunked = True
        else:
            request._conn._closing = True  # HTTP/1.0 without a length: the close ends the body
        head = response_head(request.version, status, self.reason, headers, request.will_keep_alive(),
                             chunked=self._chunked, default_type=self._left != 0)
        request._conn._head_sent = True
        request.write(b"".join(head))
        await request.drain()

    async def write(self, data: bytes) -> None:
        request = self._request
        assert request is not None
        if not data:
            return
        left = self._left
        if left is not None:
            if len(data) > left:
                request._conn._abort()
                raise ConnectionResetError("response body longer than its Content-Length")
            self._left = left - len(data)
            request.write(data)
        elif self._chunked:
            request.writelines([b"%x\r\n" % len(data), data, b"\r\n"])
        else:
            request.write(data)
        await request.drain()

    async def write_eof(self) -> None:
        request = self._request
        assert request is not None
        if self._left:
            request._conn._abort()
            raise ConnectionResetError(f"response body {self._left} bytes short of its Content-Length")
        if self._chunked:
            request.write(b"0\r\n\r\n")
        self.finished = True
        await request.drain()


Response = WholeResponse | StreamedResponse
Handler = Callable[[ClientRequest], Awaitable[Response]]


def close_awaitable(result: Awaitable[Response]) -> None:
    close = getattr(result, "close", None)  # a coroutine never started: no warning about it
    if close is not None:
        close()


# --- connections ---

class ClientConnection(asyncio.Protocol):
    """One client connection: requests parsed, handled one at a time, answered in order."""

    __slots__ = ("_server", "_loop", "transport", "remote", "_buf", "_request", "_body", "_decoder", "_task",
                 "_closing", "_write_paused", "_drain_waiter", "_paused_for", "_head_since",
                 "_idle_since", "_timer", "_lost", "_head_sent", "_done_when_drained")

    def __init__(self, server: GatewayServer) -> None:
        self._server = server
        self._loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self._buf = b""  # received, not yet parsed: a head in progress, or the next request
        self._request: ClientRequest | None = None  # the one being handled
        self._body: RequestBody | None = None  # its body while it arrives
        self._decoder: LengthDecoder | ChunkedDecoder | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False  # no request after the current one
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._paused_for = 0  # 1: the body's reader is behind, 2: a pipelined request waits
        self._head_since: float | None = None
        self._idle_since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._lost = False
        self._head_sent = False  # the current request's response head went out
        # A request answered without a task, waiting for the client to read the answer.
        self._done_when_drained: ClientRequest | None = None

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) and peer else None
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self._idle_since = self._loop.time()
        self._arm(self._idle_since + self._server.keepalive_timeout)
        self._server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._decoder is not None:
            data = self._feed_body(data)
            if not data:
                return
        if self._closing and self._request is None and self._decoder is None:
            return  # closing: nothing more is read
        buf = self._buf + data if self._buf else data
        self._buf = buf
        if self._request is not None:  # handling one: the next waits its turn
            if len(buf) > PIPELINE_LIMIT:
                self._pause(body=False)
            return
        self._next_request()

    def eof_received(self) -> bool:
        """The client ended its side: the connection closes, and a request still handled is
        cancelled (as aiohttp did: a client that hung up on a held BGB poll frees its stream)."""
        if self._body is not None and self._decoder is not None:
            self._body.set_exception(ConnectionResetError("the client ended the connection mid-body"))
            self._decoder = None
        self._closing = True
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self._lost = True
        self.transport = None
        self._server.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._body is not None:
            self._body.set_exception(ConnectionResetError("the client went away"))
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_exception(ConnectionResetError("the client went away"))
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the handler learns at once (its stream is reset)
        request = self._request
        if request is not None and request.on_abandon is not None:
            abandon, request.on_abandon = request.on_abandon, None
            abandon()  # taken without a task (begin): the handler learns the same way
        self._done_when_drained = None
        self._buf = b""

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)
        request = self._done_when_drained
        if request is not None:
            self._done_when_drained = None
            self._done(request)

    # --- reading requests ---

    def _next_request(self) -> None:
        buf = self._buf
        try:
            parsed = self._server.parser.parse(buf)
        except httparse.TooManyHeaders:
            self._refuse(HEADER_TOO_LARGE, "too many headers")
            return
        except httparse.ParsingError as exc:
            self._refuse(errors.BAD_REQUEST, f"{exc.__class__.__name__} {exc}".strip())
            return
        if parsed is None:
            if len(buf) > MAX_HEAD_SIZE:
                self._refuse(HEADER_TOO_LARGE, f"request head over {MAX_HEAD_SIZE} bytes")
            elif self._head_since is None:
                self._head_since = self._loop.time()
                self._arm(self._head_since + self._server.header_timeout)
            return
        self._head_since = None
        try:
            request, offset = self._request_from(parsed)
        except BadRequest as exc:
            self._refuse(exc.error, str(exc))
            return
        rest = buf[offset:] if offset < len(buf) else b""
        self._buf = b""
        self._request = request
        if self._decoder is not None and rest:
            rest = self._feed_body(rest)
            if self._lost:
                return
        self._buf = rest
        if self._paused_for & 2 and len(rest) <= PIPELINE_LIMIT:
            self._resume(body=False)
        self._head_sent = False
        begin = self._server.begin
        if begin is not None and self._decoder is None and begin(request):
            return  # taken without a task: answered through request.respond
        self._task = self._loop.create_task(self._handle(request))

    def _request_from(self, parsed: Any) -> tuple[ClientRequest, int]:
        version = parsed.version
        if version not in (0, 1):
            raise BadRequest(errors.BAD_REQUEST, f"HTTP/1.{version} is not HTTP/1.0 or 1.1")
        headers = parsed.headers
        if len(headers) > MAX_HEADERS:
            raise BadRequest(HEADER_TOO_LARGE, f"{len(headers)} headers, over {MAX_HEADERS}")
        offset = parsed.body_start_offset
        max_field = self._server.max_field_size
        raw: list[tuple[bytes, bytes]] = []
        length: int | None = None
        chunked = False
        connection: list[bytes] = []
        expect = False
        names = _NAMES.get
        for h in headers:
            name = h.name
            entry = names(name) or _name(name)
            value = h.value
            raw.append((entry[0], value))
            kind = entry[1]
            if kind:
                if kind == _CONTENT_LENGTH:
                    if length is not None:
                        raise BadRequest(errors.BAD_REQUEST, "duplicate Content-Length")
                    if not value.isdigit() or not value.isascii():
                        raise BadRequest(errors.BAD_REQUEST, f"bad Content-Length {value[:40]!r}")
                    length = int(value)
                elif kind == _TRANSFER_ENCODING:
                    codings = [c.strip().lower() for c in value.split(b",")]
                    if chunked or codings != [b"chunked"]:
                        raise BadRequest(errors.BAD_REQUEST, f"Transfer-Encoding {value[:60]!r}")
                    chunked = True
                elif kind == _CONNECTION:
                    connection += (c.strip().lower() for c in value.split(b","))
                elif kind == _EXPECT:
                    if value.strip().lower() != b"100-continue":
                        raise BadRequest(errors.BAD_REQUEST, f"Expect {value[:40]!r}")
                    expect = True
        if offset > max_field:  # only a long head can hold a field over the limit
            for k, v in raw:
                if len(k) + len(v) + 2 > max_field:
                    raise BadRequest(HEADER_TOO_LARGE, f"header field over {max_field} bytes")
            if len(parsed.path) + len(parsed.method) + 10 > max_field:
                raise BadRequest(HEADER_TOO_LARGE, f"request line over {max_field} bytes")
        if chunked:
            if length is not None:
                raise BadRequest(errors.BAD_REQUEST, "Content-Length with Transfer-Encoding")
            if version == 0:
                raise BadRequest(errors.BAD_REQUEST, "Transfer-Encoding on HTTP/1.0")
        http_version = _VERSIONS[version]
        keep_alive = (b"close" not in connection) if version else (b"keep-alive" in connection)
        body: RequestBody | _EmptyBody = EMPTY_BODY
        if chunked or length:
            body = self._body = RequestBody(self, expect and version == 1)
            self._decoder = ChunkedDecoder() if chunked else LengthDecoder(length)  # type: ignore[arg-type]
        request = ClientRequest(self, parsed.method, parsed.path, http_version, raw, keep_alive, length, body,
                                connection)
        return request, offset

    def _feed_body(self, data: bytes) -> bytes:
        """Feed the body under way; returns what follows it (the next request's bytes)."""
        decoder, body = self._decoder, self._body
        assert decoder is not None and body is not None
        try:
            pieces, done, rest = decoder.feed(data)
        except BadRequest as exc:
            # Nothing after this can be framed: the request is over, and the connection.
            self._decoder = None
            body.set_exception(ConnectionResetError(f"bad request body: {exc}"))
            task = self._task
            if task is not None and not task.done():
                task.cancel()  # its stream is reset: nothing of this body counts as complete
            if self._request is not None and not self._head_sent:
                self._refuse(exc.error, f"request body: {exc}")
            else:
                self._server.log.warning("Request body from %s broke the framing: %s; connection closed",
                                         self.remote or "?", exc)
                self._abort()
            return b""
        if pieces:
            body.feed(pieces)
        if done:
            self._decoder = None
            body.feed_eof()
            if body.dropping and self._request is None:  # lingering after the answer: now close
                self._body = None
                self._close()
                return b""
        return rest

    # --- handling ---

    def _respond(self, request: ClientRequest, result: WholeResponse | Awaitable[Response]) -> None:
        if self._request is not request or self._lost:  # the client went away meanwhile
            if not isinstance(result, WholeResponse):
                close_awaitable(result)
            return
        if not isinstance(result, WholeResponse):
            # on_abandon stays: a task cancelled before it started never runs its handler.
            self._task = self._loop.create_task(self._handle(request, result))
            return
        request.on_abandon = None
        try:
            result.write_to(request)
        except ConnectionError:
            self._closing = True
        except Exception as exc:  # a defect: as in _handle, the gateway carries on
            self._server.log.error("Unhandled exception writing the answer to %s %s: %r", request.method,
                                   request.raw_path[:200], exc, exc_info=exc)
            self._abort()
        if self._write_paused and not self._lost:
            self._done_when_drained = request  # resume_writing (or connection_lost) ends it
            return
        self._done(request)

    async def _handle(self, request: ClientRequest, pending: Awaitable[Response] | None = None) -> None:
        server = self._server
        try:
            response = await (server.handler(request) if pending is None else pending)
            if isinstance(response, StreamedResponse):
                if not response.finished:
                    raise RuntimeError("a streamed response returned unfinished")
            else:
                await response.send(request)
        except asyncio.CancelledError:
            self._closing = True
            if not self._lost:
                raise
        except ConnectionError:
            self._closing = True
        except Exception as exc:  # a defect: the client gets a 500, the gateway carries on
            server.log.error("Unhandled exception in the request handler for %s %s: %r", request.method,
                             request.raw_path[:200], exc, exc_info=exc)
            self._closing = True
            if not self._head_sent and not self._lost:
                try:
                    await errors.INTERNAL_SERVER_ERROR.response().send(request)
                except ConnectionError:
                    pass
            else:
                self._abort()
        finally:
            self._done(request)

    def _done(self, request: ClientRequest) -> None:
        self._task = None
        self._request = None
        if self._lost:
            self._body = None
            return
        body = self._body
        if body is not None and self._decoder is not None:
            # Answered before the whole body came: read and drop the rest, then close.
            self._closing = True
            body.drop()
            self._arm(self._loop.time() + self._server.linger_timeout)
            return
        self._body = None
        if self._closing or not request.keep_alive:
            self._close()
            return
        self._idle_since = self._loop.time()
        if self._timer is None:
            self._arm(self._idle_since + self._server.keepalive_timeout)
        if self._buf:
            self._next_request()
        elif self._paused_for & 2:
            self._resume(body=False)

    def _keeps_alive(self, request: ClientRequest) -> bool:
        if not request.keep_alive or self._closing or self._lost:
            return False
        if self._decoder is not None:  # the body is not all here: close after the answer
            self._closing = True
            return False
        return True

    # --- refusals, timers, closing ---

    def _refuse(self, error: errors.CMGError, why: str) -> None:
        """An unparsable request: the CMG's answer, then the connection closes."""
        self._server.log.warning("Unparsable request from %s refused with %d %s: %s", self.remote or "?",
                                 error.status, error.name, why[:200])
        self._buf = b""
        self._closing = True
        self._head_since = None
        body = error.name.encode()
        head = response_head(HttpVersion11, error.status, error.name,
                             [(b"Content-Type", b"text/plain; charset=utf-8")], False, length=len(body))
        head.append(body)
        try:
            self._write(b"".join(head))
        except ConnectionError:
            pass
        self._close()

    def _arm(self, when: float) -> None:
        timer = self._timer
        if timer is not None:
            if timer.when() <= when:
                return  # fires first anyway and re-arms for what is due then
            timer.cancel()
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._lost:
            return
        server = self._server
        now = self._loop.time()
        if self._head_since is not None:
            due = self._head_since + server.header_timeout
            if now >= due:
                server.log.warning("Client %s sent no complete request head within %.0f s; connection closed",
                                   self.remote or "?", server.header_timeout)
                self._abort()
                return
            self._arm(due)
        elif self._request is None and self._body is not None:  # lingering for a body nobody reads
            self._abort()
        elif self._request is None:
            due = self._idle_since + server.keepalive_timeout
            if now >= due:
                self._close()
                return
            self._arm(due)

    def _pause(self, body: bool) -> None:
        flag = 1 if body else 2
        if not self._paused_for and self.transport is not None:
            self.transport.pause_reading()
        self._paused_for |= flag

    def _resume(self, body: bool) -> None:
        flag = 1 if body else 2
        if self._paused_for & flag:
            self._paused_for &= ~flag
            if not self._paused_for and self.transport is not None:
                self.transport.resume_reading()

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("Cannot write to closing transport")
        transport.write(data)

    def _writelines(self, data: list[bytes]) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("Cannot write to closing transport")
        transport.writelines(data)

    async def _drain(self) -> None:
        if self.transport is None:
            raise ConnectionResetError("the client went away")
        if not self._write_paused:
            return
        waiter = self._drain_waiter
        if waiter is None:
            waiter = self._drain_waiter = self._loop.create_future()
        await waiter

    def _close(self) -> None:
        """Close once what is written was sent."""
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    def _abort(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.abort()

    def close_when_idle(self) -> None:
        """For a drain: an idle connection closes now, a busy one after its response (the
        request body under way is still read)."""
        self._closing = True
        if self._request is None and self._decoder is None:
            self._close()

    @property
    def busy(self) -> bool:
        return self._request is not None


class GatewayServer:
    """Makes a :class:`ClientConnection` per client connection (a protocol factory) and
    keeps the open ones, for a drain."""

    def __init__(self, handler: Handler, *, log: logging.Logger, header_timeout: float = 15.0,
                 keepalive_timeout: float = 120.0, linger_timeout: float = 10.0,
                 max_field_size: int = 16384) -> None:
        self.handler = handler
        # Optional: handler.begin(request) -> True when it took a request without a body
        # without a task of its own, answering later through request.respond().
        self.begin: Callable[[ClientRequest], bool] | None = getattr(handler, "begin", None)
        self.log = log
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.linger_timeout = linger_timeout
        self.max_field_size = max_field_size
        self.parser = httparse.RequestParser()
        self.connections: set[ClientConnection] = set()
        self.loop = asyncio.get_running_loop()

    def __call__(self) -> ClientConnection:
        return ClientConnection(self)

    def pre_shutdown(self) -> None:
        """No more requests: idle connections close now, busy ones after their response."""
        for conn in list(self.connections):
            conn.close_when_idle()

    async def shutdown(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the requests under way, then cancel what is left."""
        self.pre_shutdown()
        deadline = self.loop.time() + timeout
        while any(conn.busy for conn in self.connections) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            task = conn._task
            if task is not None and not task.done():
                task.cancel()
            elif conn.busy:
                conn._abort()  # a request taken without a task: its handler learns of it
