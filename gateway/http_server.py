"""The gateway's HTTP/1.1 connection handling: aiohttp's, hardened for the internet edge.

On top of :class:`cmg.anyverb.AnyVerbRequestHandler` (ConfigMgr's verbs):

- a request head must arrive whole within ``header_timeout`` seconds of its first
  byte (slow-header clients are cut off);
- unparsable requests get the CMG's own answer, never an echo of the input: ``431
  CMGService_RequestHeaderFieldsTooLarge`` for a header line over the limit or too many
  headers, ``400 CMGService_BadRequest`` for the rest (bad request line, bad method,
  Content-Length with Transfer-Encoding, duplicate Content-Length, ...); the connection
  is closed afterwards, so a smuggled second request never gets read.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import BadStatusLine, LineTooLong
from aiohttp.http_parser import HttpRequestParserPy
from aiohttp.web_request import BaseRequest

from cmg.anyverb import AnyVerbRequestHandler, AnyVerbServer

from . import errors

HEADER_TOO_LARGE = errors.CMGError(431, "CMGService_RequestHeaderFieldsTooLarge")


class HTTP1RequestParser(HttpRequestParserPy):
    """Only HTTP/1.0 and HTTP/1.1 requests: "HTTP/2.0" on an HTTP/1 connection is a bad
    request (400 ``CMGService_BadRequest``), never answered as if it were HTTP/2.0."""

    def parse_message(self, lines: Any) -> Any:
        message = super().parse_message(lines)
        if message.version not in (HttpVersion10, HttpVersion11):
            raise BadStatusLine(f"HTTP version {message.version.major}.{message.version.minor} is not HTTP/1.x")
        return message


class GatewayRequestHandler(AnyVerbRequestHandler):
    parser_class = HTTP1RequestParser
    header_timeout = 15.0
    cmg_log: logging.Logger = logging.getLogger("gateway.http")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if self._close and not self._force_close and parser is not None and parser._payload_parser is not None:
            # Draining (close() was called): aiohttp drops every byte that arrives after
            # it, the rest of a request body under way too, and that request then waits
            # for its body until the drain times out. The body still arrives; a request
            # after it is parsed and never started (the connection closes after this one).
            self._close = False
            try:
                super().data_received(data)
            finally:
                self._close = True
            return
        super().data_received(data)
        parser = self._parser
        if parser is None or self._force_close or self._close:
            self._stop_header_timer()
            return
        # A head is in progress when the parser holds header lines or a partial line and
        # is not reading a body.
        pending = bool(parser._lines or parser._tail) and parser._payload_parser is None
        if pending and self._header_timer is None:
            self._header_timer = self._loop.call_later(self.header_timeout, self._header_timed_out)
        elif not pending:
            self._stop_header_timer()

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        peer = self.transport.get_extra_info("peername") if self.transport else None
        self.cmg_log.warning("Client %s sent no complete request head within %.0f s; connection closed",
                             peer[0] if peer else "?", self.header_timeout)
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status == 400:
            too_large = isinstance(exc, LineTooLong) or "Too many headers" in str(message or exc or "")
            error = HEADER_TOO_LARGE if too_large else errors.BAD_REQUEST
            self.cmg_log.warning("Unparsable request from %s refused with %d %s: %s", request.remote,
                                 error.status, error.name, (message or str(exc) or "")[:200])
            return error.response()  # aiohttp closes the connection after an error response
        return super().handle_error(request, status, exc, message)


class GatewayServer(AnyVerbServer):
    """aiohttp's low-level server with :class:`GatewayRequestHandler` connections."""

    def __init__(self, *args: Any, header_timeout: float, log: logging.Logger, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handler_class = type("BoundGatewayRequestHandler", (GatewayRequestHandler,),
                                   {"header_timeout": header_timeout, "cmg_log": log})

    def __call__(self) -> GatewayRequestHandler:  # type: ignore[override]
        return self._handler_class(self, loop=self._loop, **self._kwargs)  # type: ignore[no-any-return]
