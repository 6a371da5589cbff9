"""TLS termination for the client listener: pyOpenSSL over asyncio, under aiohttp.

``TLSServerProtocol`` owns the raw TCP transport and a pyOpenSSL connection on
memory BIOs. After the handshake it creates the HTTP protocol (aiohttp's request
handler) and hands it a ``TLSAppTransport`` that encrypts on write and exposes the
peer's certificate chain. Reading and writing flow control pass straight through to
the TCP transport, so a slow client slows its own requests and nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Any, Callable

from cryptography import x509
from OpenSSL import SSL

log = logging.getLogger("gateway.tls")

_READ_SIZE = 256 * 1024

# pyOpenSSL's recv(n) and bio_read(n) allocate an n-byte buffer on every call (at
# 256 KiB, malloc maps and unmaps it each time), and bio_read ends every flush by
# raising WantReadError. On the hot path the same OpenSSL calls are made through
# pyOpenSSL's own cffi binding into one buffer allocated once (the event loop is
# single-threaded; every result is copied out before the next call). Errors still go
# through pyOpenSSL, so its exceptions are raised exactly as before.
try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib

    _BUFFER = _ffi.new("char[]", _READ_SIZE)
    _SSL_ERROR_WANT_READ = _lib.SSL_ERROR_WANT_READ
    _FAST = all(hasattr(_lib, name) for name in ("SSL_read", "BIO_read")) and hasattr(SSL.Connection, "_raise_ssl_error")
except Exception:  # pragma: no cover - another pyOpenSSL layout: the public API
    _FAST = False


class TLSAppTransport(asyncio.Transport):
    """What the HTTP layer sees: a transport of plaintext over the TLS connection."""

    def __init__(self, owner: "TLSServerProtocol") -> None:
        super().__init__()
        self._owner = owner
        self._extra: dict[str, Any] = {}

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._owner.send_plaintext(data)

    def writelines(self, list_of_data: Any) -> None:
        self._owner.send_plaintext(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close")

    def is_closing(self) -> bool:
        return self._owner.closing

    def close(self) -> None:
        self._owner.close_tls()

    def abort(self) -> None:
        self._owner.abort()

    def pause_reading(self) -> None:
        self._owner.pause_reading()

    def resume_reading(self) -> None:
        self._owner.resume_reading()

    def is_reading(self) -> bool:
        return not self._owner.reading_paused

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._owner.raw is not None:
            self._owner.raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._owner.raw.get_write_buffer_size() if self._owner.raw else 0

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._owner.app  # type: ignore[return-value]

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._owner.app = protocol  # type: ignore[assignment]

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in self._extra:
            return self._extra[name]
        if name == "sslcontext":
            return self._owner.context
        if name == "ssl_object":
            return self._owner.conn
        if name == "peercert_chain":
            return self._owner.peer_chain
        raw = self._owner.raw
        return raw.get_extra_info(name, default) if raw is not None else default

    def set_extra(self, name: str, value: Any) -> None:
        self._extra[name] = value


class TLSServerProtocol(asyncio.Protocol):
    """One client TCP connection: TLS handshake, then plaintext to the HTTP protocol."""

    def __init__(self, context: SSL.Context, app_factory: Callable[[], asyncio.Protocol],
                 handshake_timeout: float = 30.0, send_timeout: float = 120.0,
                 log: logging.Logger = log,
                 on_handshake: Callable[[TLSAppTransport], None] | None = None,
                 on_lost: Callable[["TLSServerProtocol"], None] | None = None) -> None:
        self._on_lost = on_lost
        self.context = context
        self._app_factory = app_factory
        self._handshake_timeout = handshake_timeout
        self._on_handshake = on_handshake
        self.raw: asyncio.Transport | None = None
        self.conn = SSL.Connection(context, None)
        self.conn.set_accept_state()
        self.app: asyncio.Protocol | None = None
        self.app_transport = TLSAppTransport(self)
        self.closing = False
        self.reading_paused = False
        self._handshaken = False
        self._timer: asyncio.TimerHandle | None = None
        self._app_write_paused = False
        self._send_timeout = send_timeout
        self.log = log  # the instance's CMGService log
        self._send_timer: asyncio.TimerHandle | None = None

    # --- raw side ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._handshake_timeout, self._handshake_timed_out)

    def _handshake_timed_out(self) -> None:
        if not self._handshaken:
            self.log.info("TLS handshake timed out from %s", self._peer())
            self.abort()

    def data_received(self, data: bytes) -> None:
        try:
            self.conn.bio_write(data)
        except SSL.Error:
            self.abort()
            return
        if not self._handshaken:
            try:
                self.conn.do_handshake()
            except SSL.WantReadError:
                self._flush()
                return
            except SSL.Error as exc:
                self._flush()  # deliver the alert
                self.log.info("TLS handshake failed from %s: %s", self._peer(), _ssl_reason(exc))
                self._close_raw()
                return
            self._handshake_done()
            if self.raw is None:
                return
        self._read_plaintext()

    def _handshake_done(self) -> None:
        self._handshaken = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._flush()
        if self._on_handshake is not None:
            self._on_handshake(self.app_transport)
        self.app = self._app_factory()
        self.app.connection_made(self.app_transport)

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

    def _recv(self) -> bytes | None:
        """The next plaintext, or None when more bytes must arrive first."""
        conn = self.conn
        if not _FAST:
            try:
                return conn.recv(_READ_SIZE)
            except SSL.WantReadError:
                return None
        n = _lib.SSL_read(conn._ssl, _BUFFER, _READ_SIZE)
        if n <= 0:
            if _lib.SSL_get_error(conn._ssl, n) == _SSL_ERROR_WANT_READ:
                return None  # every read loop ends here: no exception for it
            conn._raise_ssl_error(conn._ssl, n)
            return None  # pragma: no cover - pyOpenSSL raised already
        return _ffi.buffer(_BUFFER, n)[:]

    def _read_plaintext(self) -> None:
        # Everything decryptable now goes to the HTTP layer in one piece: SSL_read gives
        # one TLS record (16 KiB at most) per call, and a request body fed record by
        # record cost the parser, the body's reader and the tunnel a turn per 16 KiB.
        chunks: list[bytes] = []
        eof = False
        while self.raw is not None:
            try:
                chunk = self._recv()
                if chunk is None:
                    break
            except SSL.ZeroReturnError:  # close_notify from the client
                eof = True
                break
            except SSL.Error as exc:
                self.log.info("TLS error from %s: %s", self._peer(), _ssl_reason(exc))
                self._deliver(chunks)
                self.abort()
                return
            chunks.append(chunk)
        self._deliver(chunks)
        if self.raw is None:
            return
        self._flush()
        if eof and self.app is not None:
            keep_open = self.app.eof_received()
            if not keep_open:
                self.close_tls()

    def _deliver(self, chunks: list[bytes]) -> None:
        if chunks and self.app is not None and self.raw is not None:
            self.app.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def eof_received(self) -> bool | None:
        if self.app is not None:
            self.app.eof_received()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._on_lost is not None:
            self._on_lost(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        self.raw = None
        self.closing = True
        app, self.app = self.app, None
        if app is not None:
            app.connection_lost(exc)

    def pause_writing(self) -> None:
        # The client reads nothing of what is sent: it gets send_timeout seconds to start
        # again, then the connection goes (a stalled reader holds no request for ever).
        if self._send_timer is None and self.raw is not None:
            self._send_timer = asyncio.get_running_loop().call_later(self._send_timeout, self._send_timed_out)
        if self.app is not None and not self._app_write_paused:
            self._app_write_paused = True
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        if self.app is not None and self._app_write_paused:
            self._app_write_paused = False
            self.app.resume_writing()

    def _send_timed_out(self) -> None:
        self._send_timer = None
        self.log.warning("Client %s read nothing of its response for %.0f s; connection reset",
                         self._peer(), self._send_timeout)
        sock = self.raw.get_extra_info("socket") if self.raw is not None else None
        if sock is not None:  # a reset, not a close: the kernel drops what is still queued
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.abort()

    # --- app side ---

    def send_plaintext(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing or self.raw is None:
            return
        try:
            self.conn.sendall(data)
        except SSL.Error as exc:
            self.log.info("TLS write failed to %s: %s", self._peer(), _ssl_reason(exc))
            self.abort()
            return
        self._flush()

    def _flush(self) -> None:
        raw = self.raw
        if raw is None:
            return
        if _FAST:
            bio = self.conn._from_ssl
            while True:
                n = _lib.BIO_read(bio, _BUFFER, _READ_SIZE)
                if n <= 0:  # a memory BIO fails a read only when it is empty
                    return
                raw.write(_ffi.buffer(_BUFFER, n)[:])
                if n < _READ_SIZE:
                    return
        while True:
            try:
                out = self.conn.bio_read(_READ_SIZE)
            except SSL.WantReadError:
                return
            if not out:
                return
            raw.write(out)

    def pause_reading(self) -> None:
        if self.raw is not None and not self.reading_paused:
            self.reading_paused = True
            self.raw.pause_reading()

    def resume_reading(self) -> None:
        if self.raw is not None and self.reading_paused:
            self.reading_paused = False
            self.raw.resume_reading()

    def close_tls(self) -> None:
        if self.closing:
            return
        self.closing = True
        try:
            self.conn.shutdown()
        except SSL.Error:
            pass
        self._flush()
        self._close_raw()

    def _close_raw(self) -> None:
        self.closing = True
        if self.raw is not None:
            self.raw.close()

    def abort(self) -> None:
        self.closing = True
        if self.raw is not None:
            self.raw.abort()

    def _peer(self) -> str:
        peer = self.raw.get_extra_info("peername") if self.raw else None
        return f"{peer[0]}:{peer[1]}" if peer else "?"


def _ssl_reason(exc: SSL.Error) -> str:
    try:
        parts = exc.args[0]
        return "; ".join(p[2] for p in parts if len(p) > 2) or str(exc)
    except (IndexError, TypeError):
        return str(exc) or exc.__class__.__name__
