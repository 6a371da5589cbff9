"""TLS termination for the client listener: pyOpenSSL on the accepted socket, under aiohttp.

``TLSListener`` accepts client connections on the instance's listening socket once it
is told to serve. Each becomes a ``TLSServerTransport``: OpenSSL reads and writes the
non-blocking socket itself (a socket BIO, no memory BIOs to copy through), driven by
the event loop's reader and writer callbacks. After the handshake the transport creates
the HTTP protocol (aiohttp's request handler) and is its transport: plaintext in,
plaintext out.

Flow control: reading stops while the HTTP layer pauses it; what the HTTP layer writes
and the socket cannot take yet is queued (as plaintext, retried with the same buffer as
OpenSSL requires) and the HTTP layer is paused above the high-water mark, so memory stays
bounded and a slow client slows its own requests and nothing else.

The hot path calls OpenSSL through pyOpenSSL's own cffi binding (``SSL_read`` into one
buffer allocated once, ``SSL_write`` straight from the caller's bytes); errors still go
through pyOpenSSL, so its exceptions and their reasons are the ones logged.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from cryptography import x509
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

log = logging.getLogger("gateway.tls")

_READ_SIZE = 256 * 1024
# Plaintext handed on per reader callback. A fast uploader refills the socket as fast
# as it is read; the poll is level-triggered, so the rest waits for the next turn.
_READ_BUDGET = 256 * 1024
_FULL_RECORD = 16384  # the most plaintext a TLS record carries
_HIGH_WATER = 64 * 1024  # asyncio's and uvloop's defaults
_ACCEPT_BATCH = 256
_ACCEPT_RETRY_DELAY = 1.0  # as asyncio, after EMFILE and the like
_DRAIN_BEFORE_CLOSE = 256 * 1024

# The event loop is single-threaded and every result is copied out before the next call.
_BUFFER = _ffi.new("char[]", _READ_SIZE)
_BUFFER_VIEW = _ffi.buffer(_BUFFER)
_WANT_READ = _lib.SSL_ERROR_WANT_READ
_WANT_WRITE = _lib.SSL_ERROR_WANT_WRITE
# Partial writes: SSL_write returns after each record, so progress is counted per record
# and a short socket write leaves at most one record inside OpenSSL. Moving buffer: a
# retry after WANT_WRITE may pass a copy of what the caller wrote (same bytes, new address).
_MODES = _lib.SSL_MODE_ENABLE_PARTIAL_WRITE | _lib.SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER


@dataclass(frozen=True, slots=True)
class TLSServerSettings:
    """What every connection of one listener shares."""

    context: SSL.Context
    app_factory: Callable[[], asyncio.Protocol]
    handshake_timeout: float = 30.0
    send_timeout: float = 120.0
    log: logging.Logger = log  # the instance's CMGService log
    on_lost: Callable[["TLSServerTransport"], None] | None = None


class TLSServerTransport(asyncio.Transport):
    """One client connection: the TLS handshake on its socket, then the HTTP protocol's
    transport. ``connection_lost`` reaches the HTTP protocol one loop turn after the
    socket is closed, as with asyncio's transports."""

    __slots__ = ("_loop", "_settings", "_sock", "_fd", "_peername", "conn", "app", "closing",
                 "reading_paused", "_reading", "_writing", "_handshaken", "_timer", "_send_timer",
                 "_app_write_paused", "_wbuf", "_wsize", "_high", "_low", "_close_when_sent",
                 "_read_wants_write", "_write_wants_read", "_hs_wants_write")

    def __init__(self, settings: TLSServerSettings, sock: socket.socket, peername: Any = None) -> None:
        # asyncio.BaseTransport.__init__ would give every connection an empty dict.
        self._extra: dict[str, Any] | None = None
        self._loop = asyncio.get_running_loop()
        self._settings = settings
        self._sock: socket.socket | None = sock
        self._fd = sock.fileno()
        self._peername = peername
        self.conn = SSL.Connection(settings.context, sock)
        _lib.SSL_set_mode(self.conn._ssl, _MODES)
        self.conn.set_accept_state()
        self.app: asyncio.Protocol | None = None
        self.closing = False
        self.reading_paused = False
        self._handshaken = False
        self._send_timer: asyncio.TimerHandle | None = None
        self._app_write_paused = False
        self._wbuf: deque[bytes | memoryview] | None = None
        self._wsize = 0
        self._high = _HIGH_WATER
        self._low = _HIGH_WATER // 4
        self._close_when_sent = False
        self._read_wants_write = False
        self._write_wants_read = False
        self._hs_wants_write = False
        self._writing = False
        self._loop.add_reader(self._fd, self._on_readable)
        self._reading = True
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(
            settings.handshake_timeout, self._handshake_timed_out)

    @property
    def log(self) -> logging.Logger:
        return self._settings.log

    # --- event loop callbacks ---

    def _on_readable(self) -> None:
        try:
            if not self._handshaken:
                self._handshake()
                return
            if self._write_wants_read:  # SSL_write reads what it waits for itself
                self._write_wants_read = False
                self._write_pending()
                if self.reading_paused:  # the reader was there for the write only
                    if not self._write_wants_read:
                        self._stop_reading()
                    return
            if self._sock is not None:
                self._read()
        except Exception as exc:  # a level-triggered callback must not raise and fire again
            self._fatal_error(exc)

    def _on_writable(self) -> None:
        try:
            if not self._handshaken:
                self._hs_wants_write = False
                self._handshake()
                return
            if self._read_wants_write:
                self._read_wants_write = False
                self._read()
            if self._wbuf and not self._write_wants_read and self._sock is not None:
                self._write_pending()
            self._update_writer()
        except Exception as exc:
            self._fatal_error(exc)

    def _fatal_error(self, exc: Exception) -> None:
        self._loop.call_exception_handler({
            "message": "Fatal error on the client TLS transport", "exception": exc,
            "transport": self, "protocol": self.app,
        })
        self.abort()

    # --- handshake ---

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if not self._handshaken:
            self.log.info("TLS handshake timed out from %s", self._peer())
            self.abort()

    def _handshake(self) -> None:
        try:
            self.conn.do_handshake()
        except SSL.WantReadError:
            self._update_writer()
            return
        except SSL.WantWriteError:
            self._hs_wants_write = True
            self._update_writer()
            return
        except SSL.SysCallError as exc:
            # The client closed or reset mid-handshake: closed without a word, as a TCP
            # connection that goes away before its TLS starts always was.
            self._close_socket(_os_error(exc), drain=False)
            return
        except SSL.Error as exc:
            self.log.info("TLS handshake failed from %s: %s", self._peer(), _ssl_reason(exc))
            self._close_socket(None, drain=True)  # OpenSSL sent the alert already
            return
        self._handshake_done()

    def _handshake_done(self) -> None:
        self._handshaken = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._update_writer()
        self.app = self._settings.app_factory()
        self.app.connection_made(self)
        if self._sock is not None and not self.reading_paused:
            self._read()

    @property
    def peer_chain(self) -> tuple[x509.Certificate, ...]:
        """The client's certificate chain, leaf first; made on demand (the gateway asks
        once per connection and keeps its verdict), so an idle connection holds no copy."""
        if not self._handshaken:
            return ()
        chain = self.conn.get_peer_cert_chain(as_cryptography=True) or []
        leaf = self.conn.get_peer_certificate(as_cryptography=True)
        if leaf is not None and (not chain or chain[0] != leaf):
            chain = [leaf, *chain]
        return tuple(chain)

    # --- reading ---

    def _read(self) -> None:
        # Everything decryptable now (up to the budget) goes to the HTTP layer in one
        # piece: SSL_read gives one TLS record (16 KiB at most) per call, and a request
        # body fed record by record cost the parser, the body's reader and the tunnel a
        # turn per 16 KiB.
        conn = self.conn
        ssl = conn._ssl
        chunks: list[bytes] = []
        total = 0
        eof = False  # close_notify from the client
        tcp_eof = False  # the TCP connection ended without close_notify
        while True:
            n = _lib.SSL_read(ssl, _BUFFER, _READ_SIZE)
            if n > 0:
                chunks.append(_ffi.buffer(_BUFFER, n)[:])
                total += n
                if n < _FULL_RECORD:
                    # A record shorter than the most one can hold: the client wrote no more
                    # than this for now (a request, its last bytes). It goes up at once,
                    # without a read that would only say EAGAIN; if more is there, the
                    # (level-triggered) poll says so.
                    break
                if total < _READ_BUDGET:
                    continue
                if _lib.SSL_pending(ssl) > 0:  # decrypted and held inside OpenSSL: no poll will say so
                    self._loop.call_soon(self._read_pending)
                break
            err = _lib.SSL_get_error(ssl, n)
            if err == _WANT_READ:  # every read loop ends here: no exception for it
                break
            if err == _WANT_WRITE:
                self._read_wants_write = True
                self._update_writer()
                break
            try:
                conn._raise_ssl_error(ssl, n)
            except SSL.ZeroReturnError:
                eof = True
            except SSL.SysCallError as exc:
                if exc.args[0] != -1:  # reset: lost, quietly, as a TCP transport reports it
                    self._deliver(chunks)
                    self._close_socket(_os_error(exc), drain=False)
                    return
                # OpenSSL 3+ reports an EOF without close_notify as an error; the HTTP
                # layer sees what a TCP transport would show it: the end of the stream.
                tcp_eof = True
            except SSL.Error as exc:
                self.log.info("TLS error from %s: %s", self._peer(), _ssl_reason(exc))
                self._deliver(chunks)
                self.abort()
                return
            break
        self._deliver(chunks)
        if self._sock is None or not (eof or tcp_eof) or self.app is None:
            return
        keep_open = self.app.eof_received()
        if self._sock is None:
            return
        self._stop_reading()  # nothing more can arrive
        if tcp_eof:
            self._close_graceful(notify=False)
        elif not keep_open:
            self.close_tls()

    def _read_pending(self) -> None:
        """What OpenSSL has decrypted and holds, which no poll announces (a record read
        in part); not while reading is paused: the HTTP layer asked for no more, and
        pause_reading may have come after this was scheduled."""
        if self._sock is not None and not self.reading_paused and not self.closing:
            self._on_readable()

    def _deliver(self, chunks: list[bytes]) -> None:
        if chunks and self.app is not None and self._sock is not None:
            self.app.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def pause_reading(self) -> None:
        if self._sock is not None and not self.reading_paused:
            self.reading_paused = True
            if not self._write_wants_read:
                self._stop_reading()

    def resume_reading(self) -> None:
        if self._sock is not None and self.reading_paused:
            self.reading_paused = False
            if not self.closing and not self._reading:
                self._reading = True
                self._loop.add_reader(self._fd, self._on_readable)
                if self._handshaken and _lib.SSL_pending(self.conn._ssl) > 0:
                    self._loop.call_soon(self._read_pending)

    def is_reading(self) -> bool:
        return not self.reading_paused

    # --- writing ---

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing or self._sock is None or not data:
            return
        if self._wbuf:  # after what is queued, in order
            self._queue(data if isinstance(data, bytes) else bytes(data))
            return
        conn = self.conn
        ssl = conn._ssl
        buf = _ffi.from_buffer(data)
        size = len(buf)
        pos = 0
        while pos < size:
            n = _lib.SSL_write(ssl, buf + pos, size - pos)
            if n > 0:
                pos += n
                continue
            if not self._write_failed(n):
                return
            # Not taken yet: the retry passes the same bytes (a copy when the caller's
            # buffer may change after this call returns).
            rest = data if isinstance(data, bytes) else bytes(data)
            self._queue(memoryview(rest)[pos:] if pos else rest)
            return

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def _write_failed(self, n: int) -> bool:
        """After SSL_write returned n <= 0: True when it is to be retried later."""
        ssl = self.conn._ssl
        err = _lib.SSL_get_error(ssl, n)
        if err == _WANT_WRITE:
            return True
        if err == _WANT_READ:  # never seen without renegotiation; handled all the same
            self._write_wants_read = True
            if not self._reading:
                self._reading = True
                self._loop.add_reader(self._fd, self._on_readable)
            return True
        try:
            self.conn._raise_ssl_error(ssl, n)
        except SSL.SysCallError as exc:  # the client went away: lost, quietly
            self._close_socket(_os_error(exc), drain=False)
            return False
        except SSL.Error as exc:
            self.log.info("TLS write failed to %s: %s", self._peer(), _ssl_reason(exc))
            self.abort()
            return False
        self.abort()  # pragma: no cover - SSL_write failed with no error to report
        return False

    def _queue(self, data: bytes | memoryview) -> None:
        if self._wbuf is None:
            self._wbuf = deque()
        self._wbuf.append(data)
        self._wsize += len(data)
        self._update_writer()
        if self._wsize > self._high:
            self._pause_app_writing()

    def _write_pending(self) -> None:
        wbuf = self._wbuf
        ssl = self.conn._ssl
        while wbuf:
            head = wbuf[0]
            size = len(head)
            n = _lib.SSL_write(ssl, _ffi.from_buffer(head), size)
            if n <= 0:
                if not self._write_failed(n):
                    return
                break
            self._wsize -= n
            if n == size:
                wbuf.popleft()
            else:
                wbuf[0] = memoryview(head)[n:]
        if not wbuf:
            self._wbuf = None
        self._update_writer()
        if self._app_write_paused and self._wsize <= self._low:
            self._resume_app_writing()
        if self._wbuf is None and self._close_when_sent:
            self._close_when_sent = False
            self._shutdown_and_close()

    def _update_writer(self) -> None:
        if self._sock is None:
            return
        wanted = (self._hs_wants_write if not self._handshaken
                  else self._read_wants_write or (bool(self._wbuf) and not self._write_wants_read))
        if wanted and not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._on_writable)
        elif not wanted and self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)

    def _pause_app_writing(self) -> None:
        # The client reads nothing of what is sent: it gets send_timeout seconds to start
        # again, then the connection goes (a stalled reader holds no request for ever).
        if self._send_timer is None and self._sock is not None:
            self._send_timer = self._loop.call_later(self._settings.send_timeout, self._send_timed_out)
        if self.app is not None and not self._app_write_paused:
            self._app_write_paused = True
            self.app.pause_writing()

    def _resume_app_writing(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        if self.app is not None and self._app_write_paused:
            self._app_write_paused = False
            self.app.resume_writing()

    def _send_timed_out(self) -> None:
        self._send_timer = None
        self.log.warning("Client %s read nothing of its response for %.0f s; connection reset",
                         self._peer(), self._settings.send_timeout)
        if self._sock is not None:  # a reset, not a close: the kernel drops what is still queued
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.abort()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = _HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        if self._wsize > high:
            self._pause_app_writing()
        elif self._app_write_paused and self._wsize <= low:
            self._resume_app_writing()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def get_write_buffer_size(self) -> int:
        return self._wsize

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close")

    # --- closing ---

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.close_tls()

    def close_tls(self) -> None:
        """close_notify after whatever is still queued, then the socket closes."""
        if self.closing:
            return
        self._close_graceful(notify=True)

    def _close_graceful(self, notify: bool) -> None:
        self.closing = True
        self._stop_reading()
        if self._sock is None:
            return
        if self._wbuf:
            self._close_when_sent = True
            if not notify:
                self._skip_close_notify()
            return
        if notify:
            self._shutdown_and_close()
        else:
            self._close_socket(None, drain=True)

    def _skip_close_notify(self) -> None:
        # The peer ended the TCP stream: what is queued still goes, but no close_notify
        # after it (SSL_shutdown is skipped when a connection is marked as shut down).
        _lib.SSL_set_shutdown(self.conn._ssl, _lib.SSL_SENT_SHUTDOWN | _lib.SSL_RECEIVED_SHUTDOWN)

    def _shutdown_and_close(self) -> None:
        try:
            self.conn.shutdown()
        except SSL.Error:
            pass
        self._close_socket(None, drain=True)

    def abort(self) -> None:
        self.closing = True
        self._close_socket(None, drain=False)

    def _close_socket(self, exc: Exception | None, drain: bool) -> None:
        sock = self._sock
        if sock is None:
            return
        self.closing = True
        self._stop_reading()
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        if drain:
            # Unread bytes at close() make the kernel send a reset, which can overtake
            # the alert or close_notify just sent; uvloop's transport had read them.
            drained = 0
            try:
                while drained < _DRAIN_BEFORE_CLOSE:
                    n = sock.recv_into(_BUFFER_VIEW)
                    if n == 0:
                        break
                    drained += n
            except OSError:
                pass
        self._sock = None
        self._wbuf = None
        self._wsize = 0
        sock.close()
        self._loop.call_soon(self._connection_lost, exc)

    def _connection_lost(self, exc: Exception | None) -> None:
        on_lost = self._settings.on_lost
        if on_lost is not None:
            on_lost(self)
        app, self.app = self.app, None
        if app is not None:
            app.connection_lost(exc)

    # --- the rest of asyncio.Transport ---

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.app  # type: ignore[return-value]

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.app = protocol  # type: ignore[assignment]

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if self._extra is not None and name in self._extra:
            return self._extra[name]
        if name == "peername":
            return self._peername if self._peername is not None else default
        if name == "sslcontext":
            return self._settings.context
        if name == "ssl_object":
            return self.conn
        if name == "peercert_chain":
            return self.peer_chain
        if name == "socket":
            return self._sock if self._sock is not None else default
        if name == "sockname" and self._sock is not None:
            try:
                return self._sock.getsockname()
            except OSError:
                return default
        return default

    def set_extra(self, name: str, value: Any) -> None:
        if self._extra is None:
            self._extra = {}
        self._extra[name] = value

    def _peer(self) -> str:
        peer = self._peername
        return f"{peer[0]}:{peer[1]}" if peer else "?"

    def __repr__(self) -> str:
        return f"<TLSServerTransport {self._peer()}{' closing' if self.closing else ''}>"


class TLSListener:
    """The client listener: bound by the instance, listening and accepting only once it
    is told to serve. ``connection_factory(sock, peername)`` turns an accepted socket
    into a connection, or returns None to refuse it (the socket is closed at once)."""

    def __init__(self, sock: socket.socket,
                 connection_factory: Callable[[socket.socket, Any], TLSServerTransport | None],
                 backlog: int = 100, log: logging.Logger = log) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock: socket.socket | None = sock
        self._factory = connection_factory
        self._backlog = backlog
        self._log = log
        self._serving = False
        self._accepting = False
        self._retry: asyncio.TimerHandle | None = None
        sock.setblocking(False)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self._sock,) if self._sock is not None else ()

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        if self._serving or self._sock is None:
            return
        self._sock.listen(self._backlog)
        self._serving = True
        self._start_accepting()

    def _start_accepting(self) -> None:
        self._retry = None
        if self._serving and self._sock is not None and not self._accepting:
            self._accepting = True
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def _stop_accepting(self) -> None:
        if self._accepting and self._sock is not None:
            self._accepting = False
            self._loop.remove_reader(self._sock.fileno())

    def _accept(self) -> None:
        lsock = self._sock
        if lsock is None:
            return
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, peername = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._log.error("Cannot accept client connections: %s; trying again in %.0f s",
                                    exc, _ACCEPT_RETRY_DELAY)
                    self._stop_accepting()
                    self._retry = self._loop.call_later(_ACCEPT_RETRY_DELAY, self._start_accepting)
                    return
                continue  # that client is gone already (ECONNABORTED and the like)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn = self._factory(sock, peername)
            except Exception as exc:
                sock.close()
                self._loop.call_exception_handler({"message": "Cannot set up a client connection",
                                                   "exception": exc})
                continue
            if conn is None:
                sock.close()

    def close(self) -> None:
        """No new connections; those open carry on."""
        self._stop_accepting()
        self._serving = False
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _os_error(exc: SSL.SysCallError) -> OSError | None:
    code = exc.args[0] if exc.args else -1
    return OSError(code, os.strerror(code)) if isinstance(code, int) and code > 0 else None


def _ssl_reason(exc: SSL.Error) -> str:
    try:
        parts = exc.args[0]
        return "; ".join(p[2] for p in parts if len(p) > 2) or str(exc)
    except (IndexError, TypeError):
        return str(exc) or exc.__class__.__name__
