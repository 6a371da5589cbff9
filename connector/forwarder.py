"""Forwarding one tunnel stream to the site role it names, and its answer back.

Request and response bodies stream in chunks under the tunnel's flow control; the
site is reached over a keep-alive connection pool. If the gateway resets the stream
while the request body is still flowing, the request to the role is aborted, so an
upload never reaches the MP truncated and marked complete.

The pool is lean on purpose (it is the connection point's hot path): plain asyncio
protocols, one request at a time per connection, responses parsed by ``httptools``
(llhttp, in C; without it, by the small pure-Python parser in ``connector/_http11.py``). A connection goes back to the pool only after a complete exchange the
role allows to be kept alive; anything unfinished closes it. A response body is read
under backpressure: the connection stops reading while more than ``_HIGH_WATER``
bytes wait for tunnel credit, so memory stays bounded per stream.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from functools import lru_cache
from typing import Any
from yarl import URL

try:  # llhttp in C: the fast path
    import httptools

    _ResponseParser: Any = httptools.HttpResponseParser
    _ParserError: tuple[type[Exception], ...] = (httptools.HttpParserError,)
except ImportError:  # pragma: no cover - exercised where httptools is not installed
    httptools = None
    from ._http11 import ParserError as _PyParserError
    from ._http11 import ResponseParser as _ResponseParser

    _ParserError = (_PyParserError,)

from cmg.cmtrace import log_fast
from tunnel import ErrorCode, StreamResetError, TunnelClosedError, TunnelStream

from .traffic import ConnectorTraffic
from .url_map import UnmappedURL, UrlMap

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "transfer-encoding", "upgrade", "host", "proxy-connection",
})
_HOP_BY_HOP_B = frozenset(h.encode() for h in HOP_BY_HOP)
MESSAGE_ID = "x-cmg-message-id"
_MESSAGE_ID_B = MESSAGE_ID.encode()

# Methods for which a request without a body carries no Content-Length (as aiohttp did).
_NO_LENGTH_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT"})
_CONNECT_TIMEOUT = 15.0
_KEEPALIVE_TIMEOUT = 60.0
_HIGH_WATER = 256 * 1024  # buffered response bytes before the connection stops reading
_LOW_WATER = 64 * 1024
_WRITE_HIGH = 256 * 1024  # request bytes queued in the socket before the pump waits
_INFO = logging.INFO


class UpstreamError(OSError):
    """The site role broke the exchange (closed early, unparsable answer)."""


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to a site role; one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, key: tuple[str, str, int]) -> None:
        self.loop = loop
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = _ResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.used = False
        self._write_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._begin(False)

    def _begin(self, head_only: bool) -> None:
        self.head_only = head_only
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.keep_alive = False
        self.informational = False
        self.complete = False
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.reading_paused = False
        self.received_any = False
        self.last_activity = self.loop.time()

    # -- asyncio ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(_WRITE_HIGH)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        self.last_activity = self.loop.time()
        if self.complete or self.error is not None:
            # Bytes nobody asked for (after a complete answer): the connection is unusable.
            self._break(UpstreamError("unexpected data from the site role"))
            return
        try:
            self.parser.feed_data(data)
        except _ParserError as exc:
            self._break(UpstreamError(f"unparsable answer from the site role: {exc}"))
            return
        if self.head_only and self.head_done:
            # llhttp cannot be told that the request was HEAD: the head is the whole
            # answer, and a fresh parser reads the next one.
            self.parser = _ResponseParser(self)
            self.complete = True
            self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.head_done and not self.complete and self.error is None and self._until_eof():
            self.complete = True  # the body ran until the connection closed
        elif not self.complete and self.error is None:
            self.error = UpstreamError("the site role closed the connection" + (f": {exc}" if exc else ""))
        self._wake()
        waiter = self._write_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter, self._write_waiter = self._write_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drain(self) -> None:
        if self.closed:
            raise self.error or UpstreamError("the site role closed the connection")
        if self._write_paused:
            self._write_waiter = self.loop.create_future()
            await self._write_waiter
            if self.closed:
                raise self.error or UpstreamError("the site role closed the connection")

    # -- httptools callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        self.reason = b""
        self.headers = []

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.informational = True  # 100 Continue and friends: wait for the real answer
            return
        self.status = status
        self.head_done = True
        # Asked now: llhttp forgets it once the message is complete.
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.head_only:
            self._break(UpstreamError("a body after the answer to HEAD"))
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered >= _HIGH_WATER and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        self.complete = True
        self._wake()

    # -- the exchange ------------------------------------------------------------------

    def _until_eof(self) -> bool:
        for name, value in self.headers:
            lname = name.lower()
            if lname == b"content-length" or (lname == b"transfer-encoding" and b"chunked" in value.lower()):
                return False
        return True

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _break(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        if self.transport is not None:
            self.transport.abort()  # never wait to flush to a role that stopped reading
        self._wake()

    async def wait(self) -> None:
        """Until the parser made progress (or the exchange failed)."""
        if self.error is not None:
            raise self.error
        self.waiter = self.loop.create_future()
        await self.waiter
        if self.error is not None:
            raise self.error

    def take(self) -> bytes:
        """Everything of the body buffered so far (b"" if nothing)."""
        chunks = self.chunks
        if not chunks:
            return b""
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()
        return data

    def reusable(self) -> bool:
        return (not self.closed and self.complete and self.error is None and not self.chunks
                and self.keep_alive)


class _Pool:
    """Keep-alive connections per (scheme, host, port), at most ``limit`` in use at once."""

    def __init__(self, limit: int) -> None:
        self._limit = asyncio.Semaphore(limit)
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._all: set[_Conn] = set()

    async def acquire(self, key: tuple[str, str, int], fresh: bool = False) -> _Conn:
        await self._limit.acquire()
        try:
            loop = asyncio.get_running_loop()
            idle = self._idle.get(key)
            now = loop.time()
            while idle and not fresh:
                conn = idle.pop()
                if not conn.closed and now - conn.idle_since < _KEEPALIVE_TIMEOUT:
                    return conn
                self._discard(conn)
            scheme, host, port = key
            ctx = None
            if scheme == "https":
                if self._ssl is None:
                    self._ssl = ssl.create_default_context()
                ctx = self._ssl
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Conn(loop, key), host, port, ssl=ctx), _CONNECT_TIMEOUT)
            self._all.add(conn)
            return conn
        except BaseException:
            self._limit.release()
            raise

    def release(self, conn: _Conn, reuse: bool) -> None:
        self._limit.release()
        if reuse and conn.reusable():
            conn.used = True
            conn.idle_since = conn.loop.time()
            self._idle.setdefault(conn.key, []).append(conn)
        else:
            self._discard(conn)

    def _discard(self, conn: _Conn) -> None:
        self._all.discard(conn)
        if conn.transport is not None and not conn.closed:
            conn.transport.close()

    def close(self) -> None:
        for conn in list(self._all):
            self._discard(conn)
        self._idle.clear()


class _Target:
    """What a mapped URL means on the wire: the pool key, the Host header, the request target."""

    __slots__ = ("key", "host", "target")

    def __init__(self, url: str) -> None:
        u = URL(url)  # the same normalisation (requoting) aiohttp applied
        scheme = u.scheme
        port = u.port or (443 if scheme == "https" else 80)
        host = u.raw_host or ""
        self.key = (scheme, host, port)
        netloc = host if u.is_default_port() else f"{host}:{port}"
        self.host = netloc.encode("idna" if not netloc.isascii() else "ascii")
        self.target = (u.raw_path_qs or "/").encode("ascii")


@lru_cache(maxsize=4096)
def _target(url: str) -> _Target:
    """The parsed internal URL: clients repeat the same few (policy, content, MP endpoints)."""
    return _Target(url)


class _Watchdog:
    """Fails an exchange once its role was silent for ``timeout`` seconds.

    One timer for all the exchanges under way (a timer per exchange cost a handle
    created and cancelled per request): it fires at the earliest deadline (last
    activity + timeout) of the connections it watches, fails those past theirs and is
    set again for the next one, so each exchange times out when it would have with a
    timer of its own pushed back while the role keeps sending.
    """

    __slots__ = ("_timeout", "_conns", "_handle", "_loop")

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._conns: dict[_Conn, None] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch(self, conn: _Conn) -> None:
        self._conns[conn] = None
        # Deadlines of exchanges watched later are never earlier than a pending timer's.
        if self._handle is None or self._loop is not conn.loop:
            self._arm(conn.loop, conn.last_activity + self._timeout)

    def unwatch(self, conn: _Conn) -> None:
        self._conns.pop(conn, None)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        self._loop = loop
        self._handle = loop.call_at(when, self._check, loop)

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self._loop:
            return  # set on a loop this forwarder no longer runs on
        self._handle = None
        if not self._conns:
            return
        now = loop.time()
        timeout = self._timeout
        earliest: float | None = None
        for conn in list(self._conns):
            last = conn.last_activity
            if now - last >= timeout:
                del self._conns[conn]
                conn._break(asyncio.TimeoutError())
            elif earliest is None or last < earliest:
                earliest = last
        if earliest is not None:
            self._arm(loop, earliest + timeout)


class Forwarder:
    """Handles the streams the gateway opens on this connection point's tunnels."""

    def __init__(self, url_map: UrlMap, log: logging.Logger, pool_size: int,
                 request_timeout: float = 600.0, traffic: ConnectorTraffic | None = None) -> None:
        self._traffic = traffic
        self._map = url_map
        self._timeout = request_timeout
        self._log = log
        self._pool_size = pool_size
        self._pool: _Pool | None = None
        self._watchdog = _Watchdog(request_timeout)

    async def start(self) -> None:
        self._pool = _Pool(self._pool_size)

    async def close(self) -> None:
        self._watchdog.close()
        if self._pool is not None:
            self._pool.close()

    async def handle(self, stream: TunnelStream) -> None:
        req = stream.request
        assert req is not None and self._pool is not None
        start = time.monotonic()
        headers: list[tuple[bytes, bytes]] = []
        message_id = ""
        bearer = False
        has_length = False
        for k, v in req.headers:
            lk = k.lower()
            if lk == _MESSAGE_ID_B:
                message_id = v.decode("latin-1")
            elif lk == b"authorization":
                bearer = v[:7].lower() == b"bearer "
            if lk not in _HOP_BY_HOP_B:
                if lk == b"content-length":
                    has_length = True
                headers.append((k, v))
        try:
            mapped = self._map.map(req.target)
        except UnmappedURL as exc:
            self._log.warning("Refused proxy message %s: %s", message_id, exc)
            stream.reset(ErrorCode.REFUSED_STREAM, "not published")
            return
        traffic = self._traffic
        if traffic is not None:
            traffic.begin(mapped.endpoint, bearer)
        sent = [0]
        status, size = 0, 0
        try:
            status, size = await self._forward(stream, req, mapped, headers, has_length, message_id, start, sent)
        finally:
            if traffic is not None:
                ok = 0 < status < 500 and stream.reset_code is None
                traffic.end(mapped.role.role_id, mapped.endpoint, ok, sent[0], size, time.monotonic() - start)

    async def _forward(self, stream: TunnelStream, req: Any, mapped: Any, headers: list[tuple[bytes, bytes]],
                       has_length: bool, message_id: str, start: float, sent: list[int]) -> tuple[int, int]:
        """Forward one exchange; (status, response bytes), status 0 when there was no answer."""
        log = self._log
        if log.isEnabledFor(_INFO):
            log_fast(log, _INFO, "Forwarding proxy message %s to URL: %s", message_id, mapped.url)
            log_fast(log, _INFO, "Switched to internal URL. Replaced '%s' with '%s'",
                     mapped.external_prefix, mapped.internal_prefix)

        size = 0
        status = 0
        status_line = ""
        conn: _Conn | None = None
        pump: asyncio.Task[None] | None = None
        watchdog = self._watchdog
        watched: _Conn | None = None
        reuse = False
        try:
            target = _target(mapped.url)
            method = req.method
            has_body = not req.end_stream
            head = [method.encode("ascii"), b" ", target.target, b" HTTP/1.1\r\nHost: ", target.host, b"\r\n"]
            for k, v in headers:
                head += (k, b": ", v, b"\r\n")
            chunked = has_body and not has_length
            if chunked:
                head.append(b"Transfer-Encoding: chunked\r\n")
            elif not has_body and not has_length and method not in _NO_LENGTH_METHODS:
                head.append(b"Content-Length: 0\r\n")
            head.append(b"\r\n")
            head_bytes = b"".join(head)

            for attempt in (0, 1):
                conn = await self._pool.acquire(target.key, fresh=attempt > 0)
                reused = conn.used
                conn._begin(method == "HEAD")
                assert conn.transport is not None
                conn.transport.write(head_bytes)
                if has_body:
                    pump = asyncio.ensure_future(self._pump(stream, conn, chunked, sent))
                    watchdog.watch(watched := conn)
                    await self._wait_head(conn, pump)
                    break
                watchdog.watch(watched := conn)
                try:
                    while not conn.head_done:
                        await conn.wait()
                    break
                except UpstreamError:
                    # A kept-alive connection the role closed meanwhile: one retry, fresh.
                    if attempt or not reused or conn.received_any:
                        raise
                    watchdog.unwatch(conn)
                    watched = None
                    self._pool.release(conn, False)
                    conn = None
            assert conn is not None
            status = conn.status
            version = conn.parser.get_http_version()
            reason = conn.reason.decode("latin-1")
            status_line = f"HTTP/{version} {status} {reason}".rstrip()
            out = []
            length: int | None = None
            for k, v in conn.headers:
                lk = k.lower()
                if lk in _HOP_BY_HOP_B:
                    continue
                if lk == b"content-length":
                    try:
                        length = int(v)
                    except ValueError:
                        length = None
                out.append((k, v))
            # With no body to follow (HEAD, 204, 304, Content-Length 0), the head ends the stream.
            empty = method == "HEAD" or status in (204, 304) or length == 0
            if empty:
                await stream.send_response(status, reason, out, end_stream=True)
            else:
                # Small answers (already complete) go out as one head + body + end.
                first = conn.take()
                size += len(first)
                await stream.send_response(status, reason, out, end_stream=conn.complete, body=first)
                while True:
                    chunk = conn.take()
                    if chunk:
                        await stream.write(chunk)
                        size += len(chunk)
                    elif conn.complete:
                        break
                    else:
                        await conn.wait()
                await stream.end()  # a no-op when the head carried the end
            if pump is not None:
                if not pump.done():
                    pump.cancel()  # the role answered before the whole body: do not reuse
                elif not pump.cancelled() and pump.exception() is None:
                    reuse = True
            else:
                reuse = True
        except (StreamResetError, TunnelClosedError) as exc:
            self._log.info("Proxy message %s cancelled by the CMG after %d response bytes: %s",
                           message_id, size, exc)
            return 0, size
        except asyncio.TimeoutError:
            self._log.warning("Proxy message %s to %s timed out: no data from the role for %.0f s",
                              message_id, mapped.url, self._timeout)
            stream.reset(ErrorCode.TIMEOUT, "site role timed out")
            return 0, size
        except (OSError, ValueError, UnicodeError) as exc:
            if stream.reset_code is not None:  # the CMG reset the stream while the body flowed
                self._log.info("Proxy message %s cancelled by the CMG after %d response bytes: %s",
                               message_id, size, exc)
                return 0, size
            # Before the head: the gateway turns this into a 502; after it, the reset
            # cuts the client off rather than passing a truncated body as complete.
            self._log.warning("Proxy message %s to %s failed: %s: %s", message_id, mapped.url,
                              exc.__class__.__name__, exc)
            stream.reset(ErrorCode.UPSTREAM_ERROR, "site role failed")
            return 0, size
        finally:
            if watched is not None:
                watchdog.unwatch(watched)
            if pump is not None and not pump.done():
                pump.cancel()
            if conn is not None:
                self._pool.release(conn, reuse)
        if log.isEnabledFor(_INFO):
            log_fast(
                log, _INFO,
                "MessageID: %s RequestURI: %s EndpointName: %s ResponseHeader: %s ~~ ResponseBodySize: %d ElapsedTime: %d ms",
                message_id, req.target, mapped.endpoint, status_line, size, (time.monotonic() - start) * 1000,
            )
        return status, size

    @staticmethod
    async def _wait_head(conn: _Conn, pump: asyncio.Task[None] | None) -> None:
        while not conn.head_done:
            if pump is not None and pump.done() and not pump.cancelled() and pump.exception() is not None:
                raise pump.exception()  # type: ignore[misc]
            if conn.error is not None:
                raise conn.error
            if pump is None or pump.done():
                await conn.wait()
                continue
            waiter = conn.loop.create_future()
            conn.waiter = waiter
            await asyncio.wait({waiter, pump}, return_when=asyncio.FIRST_COMPLETED)

    @staticmethod
    async def _pump(stream: TunnelStream, conn: _Conn, chunked: bool, sent: list[int]) -> None:
        """The client's body as it arrives through the tunnel; on any break the connection is
        closed, so the role never takes a cut-off body for a complete one."""
        try:
            while True:
                chunk = await stream.read()
                sent[0] += len(chunk)
                transport = conn.transport
                if conn.closed or transport is None:
                    raise conn.error or UpstreamError("the site role closed the connection")
                if not chunk:
                    if chunked:
                        transport.write(b"0\r\n\r\n")
                    return
                conn.last_activity = conn.loop.time()
                if chunked:
                    transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                else:
                    transport.write(chunk)
                await conn.drain()
        except BaseException:
            conn._break(UpstreamError("request body cut off"))
            raise
