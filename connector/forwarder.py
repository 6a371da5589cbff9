"""Forwarding one tunnel stream to the site role it names, and its answer back.

Request and response bodies stream in chunks under the tunnel's flow control; the
site is reached over a keep-alive connection pool. If the gateway resets the stream
while the request body is still flowing, the request to the role is aborted, so an
upload never reaches the MP truncated and marked complete.

The pool is lean on purpose (it is the connection point's hot path): plain asyncio
protocols, one request at a time per connection, responses parsed by ``httptools``
(llhttp, in C; without it, by the small pure-Python parser in ``connector/_http11.py``).
A connection goes back to the pool only after a complete exchange the role allows to be
kept alive; anything unfinished closes it. A response body is read
under backpressure: the connection stops reading while more than ``_HIGH_WATER``
bytes wait for tunnel credit, so memory stays bounded per stream.

Each stream's exchange is an :class:`_Exchange`. The common one (a request without a
body, a kept-alive connection free, an answer that arrives whole) runs from callbacks,
without a task; anything that has to wait goes on in a task from where it stands.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
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
        self._feeding = False  # inside data_received
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
        # Or, for an exchange without a task (_Exchange.start_now), called back after
        # progress: at the end of data_received (never from inside the parser), else
        # from the loop.
        self.on_progress: Callable[[], None] | None = None
        self._progress_due = False
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
        due = self._progress_due  # called back from the loop already
        self._feeding = True
        try:
            self._feed(data)
        finally:
            self._feeding = False
        if self._progress_due and not due:
            # These bytes made progress: the exchange goes on now, the parser done with
            # them, without a turn of the loop in between.
            try:
                self._call_progress()
            except Exception as exc:  # as the loop reports a callback's; the connection stays
                self.loop.call_exception_handler({
                    "message": "Exception in the exchange's progress callback", "exception": exc, "protocol": self,
                })

    def _feed(self, data: bytes) -> None:
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
        elif self.on_progress is not None and not self._progress_due:
            self._progress_due = True
            if not self._feeding:  # else data_received calls back once the parser is done
                self.loop.call_soon(self._call_progress)

    def _call_progress(self) -> None:
        self._progress_due = False
        on_progress = self.on_progress
        if on_progress is not None:
            on_progress()

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


class _Slots:
    """At most ``limit`` holders at once; the others wait, first come first served."""

    __slots__ = ("_free", "_waiters")

    def __init__(self, limit: int) -> None:
        self._free = limit
        self._waiters: deque[asyncio.Future[None]] = deque()

    def take_now(self) -> bool:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        return False

    async def take(self) -> None:
        if self.take_now():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.give()  # handed a slot, then cancelled before taking it
            else:
                self._waiters.remove(waiter)
            raise

    def give(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


class _Pool:
    """Keep-alive connections per (scheme, host, port), at most ``limit`` in use at once."""

    def __init__(self, limit: int) -> None:
        self._limit = _Slots(limit)
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._all: set[_Conn] = set()

    def acquire_now(self, key: tuple[str, str, int]) -> _Conn | None:
        """A kept-alive connection, if one is free at once and the limit allows (no waiting)."""
        if not self._idle.get(key) or not self._limit.take_now():
            return None
        conn = self._idle_conn(key)
        if conn is None:
            self._limit.give()
        return conn

    def _idle_conn(self, key: tuple[str, str, int]) -> _Conn | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.loop.time() - conn.idle_since < _KEEPALIVE_TIMEOUT:
                return conn
            self._discard(conn)
        return None

    async def acquire(self, key: tuple[str, str, int], fresh: bool = False) -> _Conn:
        await self._limit.take()
        try:
            loop = asyncio.get_running_loop()
            conn = None if fresh else self._idle_conn(key)
            if conn is not None:
                return conn
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
            self._limit.give()
            raise

    def release(self, conn: _Conn, reuse: bool) -> None:
        self._limit.give()
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

    def handle(self, stream: TunnelStream) -> Awaitable[None] | None:
        """The tunnel session's ``on_request``: a request without a body, when a kept-alive
        connection to its role is free, is taken without a task (None); anything else
        returns the coroutine the session runs in a task."""
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
            return None
        traffic = self._traffic
        if traffic is not None:
            traffic.begin(mapped.endpoint, bearer)
        log = self._log
        if log.isEnabledFor(_INFO):
            log_fast(log, _INFO, "Forwarding proxy message %s to URL: %s", message_id, mapped.url)
            log_fast(log, _INFO, "Switched to internal URL. Replaced '%s' with '%s'",
                     mapped.external_prefix, mapped.internal_prefix)
        exchange = _Exchange(self, stream, req, mapped, headers, has_length, message_id, start)
        if req.end_stream and exchange.start_now():
            return None
        return exchange.run()


class _Exchange:
    """One stream's exchange with its site role, from the request head sent to the role
    to the response relayed, logged and counted.

    :meth:`run` does all of it in a task. A request without a body that finds a
    kept-alive connection free (the common case) starts from callbacks instead
    (:meth:`start_now`): the head goes to the role at once, and when the role's whole
    answer is in, it is relayed with :meth:`TunnelStream.respond_now`, all without a
    task, a coroutine or a future. The moment anything would have to wait (an answer
    still streaming, a role that broke the exchange and the retry on a fresh connection,
    the watchdog, the stream's credit), the exchange goes on in a task from where it
    stands (:meth:`TunnelStream.continue_in_task` of :meth:`run`), so every rule exists once.
    """

    __slots__ = ("fwd", "stream", "req", "mapped", "headers", "has_length", "message_id", "start",
                 "sent", "conn", "reused", "watched", "pump", "first", "size", "status", "status_line",
                 "reuse", "target")

    def __init__(self, fwd: Forwarder, stream: TunnelStream, req: Any, mapped: Any,
                 headers: list[tuple[bytes, bytes]], has_length: bool, message_id: str, start: float) -> None:
        self.fwd = fwd
        self.stream = stream
        self.req = req
        self.mapped = mapped
        self.headers = headers
        self.has_length = has_length
        self.message_id = message_id
        self.start = start
        self.sent = [0]
        self.conn: _Conn | None = None
        self.reused = False
        self.watched: _Conn | None = None
        self.pump: asyncio.Task[None] | None = None
        self.first: bytes | None = None  # a body taken from the role, not yet relayed
        self.size = 0
        self.status = 0
        self.status_line = ""
        self.reuse = False
        self.target: _Target | None = None

    def _send_head(self, conn: _Conn) -> None:
        """The request head to the role on ``conn`` (and its body's pump), watched."""
        req = self.req
        target = self.target
        assert target is not None and conn.transport is not None
        method = req.method
        has_body = not req.end_stream
        head = [method.encode("ascii"), b" ", target.target, b" HTTP/1.1\r\nHost: ", target.host, b"\r\n"]
        for k, v in self.headers:
            head += (k, b": ", v, b"\r\n")
        chunked = has_body and not self.has_length
        if chunked:
            head.append(b"Transfer-Encoding: chunked\r\n")
        elif not has_body and not self.has_length and method not in _NO_LENGTH_METHODS:
            head.append(b"Content-Length: 0\r\n")
        head.append(b"\r\n")
        self.conn = conn
        self.reused = conn.used
        conn._begin(method == "HEAD")
        conn.transport.write(b"".join(head))
        if has_body:
            self.pump = asyncio.ensure_future(self._pump(self.stream, conn, chunked, self.sent))
        self.fwd._watchdog.watch(conn)
        self.watched = conn

    # -- without a task ------------------------------------------------------------------

    def start_now(self) -> bool:
        """Send the head on a free kept-alive connection and go on from callbacks; False
        (nothing done) when none is free at once."""
        pool = self.fwd._pool
        assert pool is not None
        try:
            self.target = _target(self.mapped.url)
        except (ValueError, UnicodeError):
            return False  # run() reports it
        conn = pool.acquire_now(self.target.key)
        if conn is None:
            return False
        try:
            self._send_head(conn)
        except Exception:  # the connection broke under the write: run() starts afresh
            self.conn = conn
            self._release()
            return False
        conn.on_progress = self._progress
        return True

    def _progress(self) -> None:
        """The role's connection made progress (or failed): relay a whole answer from
        here, or go on in a task."""
        conn = self.conn
        assert conn is not None
        if conn.error is None and not (conn.head_done and conn.complete):
            if conn.head_done:  # a body still to come: streamed from a task
                self._hand_over()
            return  # a head not yet whole, or only a 1xx: more will come
        conn.on_progress = None
        if conn.error is not None:  # the retry, or the error's report, in the task
            self._hand_over()
            return
        stream = self.stream
        try:
            status, reason, out, empty = self._response_head(conn)
            body = b"" if empty else conn.take()
            if not stream.respond_now(status, reason, out, body):
                self.first = body
                self._hand_over()
                return
            self.size = len(body)
            self.reuse = True
        except (StreamResetError, TunnelClosedError) as exc:
            self._cancelled(exc)
        except Exception:
            self.fwd._log.exception("Proxy message %s: relaying the answer failed", self.message_id)
            stream.reset(ErrorCode.INTERNAL_ERROR)
            self.status = 0
        self._release()
        self._done()
        stream.reset(ErrorCode.NO_ERROR)  # as the session does after a handler's task

    def _hand_over(self) -> None:
        conn = self.conn
        if conn is not None:
            conn.on_progress = None
        self.stream.continue_in_task(self.run())

    # -- in a task -----------------------------------------------------------------------

    async def run(self) -> None:
        """The exchange in a task, from where it stands (from the start, or from where
        the callbacks left it)."""
        fwd = self.fwd
        pool = fwd._pool
        stream = self.stream
        assert pool is not None
        try:
            if self.target is None:
                self.target = _target(self.mapped.url)
            attempt = 0
            while True:
                if self.conn is None:
                    self._send_head(await pool.acquire(self.target.key, fresh=attempt > 0))
                conn = self.conn
                assert conn is not None
                try:
                    if self.pump is not None:
                        await self._wait_head(conn, self.pump)
                    else:
                        while not conn.head_done:
                            await conn.wait()
                    break
                except UpstreamError:
                    # A kept-alive connection the role closed meanwhile: one retry, fresh.
                    if self.pump is not None or attempt or not self.reused or conn.received_any:
                        raise
                    self._release()
                    attempt = 1
            status, reason, out, empty = self._response_head(conn)
            if empty:
                await stream.send_response(status, reason, out, end_stream=True)
            else:
                # Small answers (already complete) go out as one head + body + end.
                first = conn.take() if self.first is None else self.first
                self.first = None
                self.size += len(first)
                await stream.send_response(status, reason, out, end_stream=conn.complete, body=first)
                while True:
                    chunk = conn.take()
                    if chunk:
                        await stream.write(chunk)
                        self.size += len(chunk)
                    elif conn.complete:
                        break
                    else:
                        await conn.wait()
                await stream.end()  # a no-op when the head carried the end
            pump = self.pump
            if pump is not None:
                if not pump.done():
                    pump.cancel()  # the role answered before the whole body: do not reuse
                elif not pump.cancelled() and pump.exception() is None:
                    self.reuse = True
            else:
                self.reuse = True
        except (StreamResetError, TunnelClosedError) as exc:
            self._cancelled(exc)
        except asyncio.TimeoutError:
            fwd._log.warning("Proxy message %s to %s timed out: no data from the role for %.0f s",
                             self.message_id, self.mapped.url, fwd._timeout)
            stream.reset(ErrorCode.TIMEOUT, "site role timed out")
            self.status = 0
        except (OSError, ValueError, UnicodeError) as exc:
            self.status = 0
            if stream.reset_code is not None:  # the CMG reset the stream while the body flowed
                self._cancelled(exc)
            else:
                # Before the head: the gateway turns this into a 502; after it, the reset
                # cuts the client off rather than passing a truncated body as complete.
                fwd._log.warning("Proxy message %s to %s failed: %s: %s", self.message_id, self.mapped.url,
                                 exc.__class__.__name__, exc)
                stream.reset(ErrorCode.UPSTREAM_ERROR, "site role failed")
        except BaseException:
            self.status = 0  # cancelled (the tunnel ended), or a bug the session reports
            raise
        finally:
            self._release()
            self._done()

    # -- both ----------------------------------------------------------------------------

    def _response_head(self, conn: _Conn) -> tuple[int, str, list[tuple[bytes, bytes]], bool]:
        """(status, reason, relayed headers, whether no body follows) of the role's answer."""
        status = self.status = conn.status
        reason = conn.reason.decode("latin-1")
        self.status_line = f"HTTP/{conn.parser.get_http_version()} {status} {reason}".rstrip()
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
        return status, reason, out, self.req.method == "HEAD" or status in (204, 304) or length == 0

    def _cancelled(self, exc: BaseException) -> None:
        self.fwd._log.info("Proxy message %s cancelled by the CMG after %d response bytes: %s",
                           self.message_id, self.size, exc)
        self.status = 0

    def _release(self) -> None:
        """The connection back to the pool (kept only after a whole exchange), its body's
        pump stopped, the watchdog off it."""
        fwd = self.fwd
        watched, self.watched = self.watched, None
        if watched is not None:
            fwd._watchdog.unwatch(watched)
        pump, self.pump = self.pump, None
        if pump is not None and not pump.done():
            pump.cancel()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.on_progress = None
            assert fwd._pool is not None
            fwd._pool.release(conn, self.reuse)

    def _done(self) -> None:
        """The exchange's line in the log (when answered) and its traffic counted."""
        fwd = self.fwd
        log = fwd._log
        status = self.status
        elapsed = time.monotonic() - self.start
        if status and log.isEnabledFor(_INFO):
            log_fast(
                log, _INFO,
                "MessageID: %s RequestURI: %s EndpointName: %s ResponseHeader: %s ~~ ResponseBodySize: %d ElapsedTime: %d ms",
                self.message_id, self.req.target, self.mapped.endpoint, self.status_line, self.size, elapsed * 1000,
            )
        traffic = fwd._traffic
        if traffic is not None:
            ok = 0 < status < 500 and self.stream.reset_code is None
            traffic.end(self.mapped.role.role_id, self.mapped.endpoint, ok, self.sent[0], self.size, elapsed)

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
