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
import hashlib
import inspect
import logging
import sys
from asyncio.base_events import BaseEventLoop
from typing import Any

from aiohttp import web, web_protocol
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import BadStatusLine, LineTooLong
from aiohttp.http_parser import HttpRequestParserPy
from aiohttp.web_request import BaseRequest

from cmg.anyverb import AnyVerbRequestHandler, AnyVerbServer

from . import errors

HEADER_TOO_LARGE = errors.CMGError(431, "CMGService_RequestHeaderFieldsTooLarge")

# aiohttp's connection loop (RequestHandler.start) keeps the last request, its message,
# writer and response in its local variables while a keep-alive connection waits for
# the next request: ~4.5 KiB per idle client connection (headers, URL, response
# headers, the request's cached properties). GatewayRequestHandler.start below is that
# loop with one line added that lets go of them at the end of each request (and, on
# Python 3.11, the request handler run in the loop's task, not a task of its own). It is used
# only while aiohttp's own loop is the one it was copied from (aiohttp 3.14.5, compared
# by a hash of its source); any other aiohttp keeps its own loop and that memory.
_UPSTREAM_START_SHA256 = "2e565fd40c8e04fb"


def _upstream_start_is_known() -> bool:
    try:
        source = inspect.getsource(web_protocol.RequestHandler.start)
    except (OSError, TypeError):
        return False
    return hashlib.sha256(source.encode()).hexdigest()[:16] == _UPSTREAM_START_SHA256


RELEASES_LAST_REQUEST = _upstream_start_is_known()
_ErrInfo = getattr(web_protocol, "_ErrInfo", None)
_ERROR = getattr(web_protocol, "ERROR", None)
_PAYLOAD_ACCESS_ERROR = getattr(web_protocol, "_PAYLOAD_ACCESS_ERROR", None)


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

    if RELEASES_LAST_REQUEST:
        async def start(self) -> None:
            """aiohttp 3.14.5's ``RequestHandler.start``, letting go of each request once it is
            answered, and running the handler in this task on Python 3.11 (the two places
            marked below); see ``_UPSTREAM_START_SHA256``."""
            loop = self._loop
            manager = self._manager
            assert manager is not None
            keepalive_timeout = self._keepalive_timeout
            resp = None
            assert self._request_factory is not None
            assert self._request_handler is not None

            while not self._force_close:
                if not self._messages:
                    try:
                        # wait for next request
                        self._waiter = loop.create_future()
                        await self._waiter
                    finally:
                        self._waiter = None

                message, payload = self._messages.popleft()

                # Free a parser slot; resume reading once drained to low water so
                # pipelining keeps flowing while this request is handled.
                if self._parser is not None:  # pragma: no branch
                    self._parser.message_consumed()
                if (
                    self._buffer_paused
                    and len(self._messages) <= self._msg_queue_resume_size
                ):
                    self._resume_reading_if_drained()

                # time is only fetched if logging is enabled as otherwise
                # its thrown away and never used.
                start = loop.time() if self._logging_enabled else None

                manager.requests_count += 1
                writer = web_protocol.StreamWriter(self, loop)
                if isinstance(message, _ErrInfo):  # type: ignore[arg-type]
                    # make request_factory work
                    request_handler = self._make_error_handler(message)
                    message = _ERROR
                else:
                    request_handler = self._request_handler

                # Important don't hold a reference to the current task
                # as on traceback it will prevent the task from being
                # collected and will cause a memory leak.
                request = self._request_factory(
                    message,
                    payload,
                    self,
                    writer,
                    self._task_handler or asyncio.current_task(loop),  # type: ignore[arg-type]
                )
                try:
                    # a new task is used for copy context vars (#3406)
                    coro = self._handle_request(request, start, request_handler)
                    try:
                        if sys.version_info >= (3, 12):
                            if sys.version_info >= (3, 14) and isinstance(loop, BaseEventLoop):
                                task = asyncio.create_task(coro, eager_start=True)
                            else:
                                task = asyncio.Task(coro, loop=loop, eager_start=True)
                            resp, reset = await task
                            del task  # Drop the processed task from asyncio.Task.all_tasks() early
                        else:
                            # Changed: without eager tasks (Python 3.11) a task per request
                            # costs a turn of the event loop before the handler runs, on
                            # every request's path. The gateway's handlers set no context
                            # variables, and a client that goes away cancels this task
                            # (handler_cancellation), which now runs the handler itself.
                            resp, reset = await coro
                    except ConnectionError:
                        self.log_debug("Ignored premature client disconnection")
                        break

                    if reset:
                        self.log_debug("Ignored premature client disconnection 2")
                        break

                    # notify server about keep-alive
                    self._keepalive = bool(resp.keep_alive)

                    # check payload
                    if not payload.is_eof():
                        lingering_time = self._lingering_time
                        if not self._force_close and lingering_time:
                            self.log_debug(
                                "Start lingering close timer for %s sec.", lingering_time
                            )

                            now = loop.time()
                            end_t = now + lingering_time

                            try:
                                while not payload.is_eof() and now < end_t:
                                    async with web_protocol.ceil_timeout(end_t - now):
                                        # read and ignore
                                        await payload.readany()
                                    now = loop.time()
                            except (asyncio.CancelledError, asyncio.TimeoutError):
                                if (
                                    sys.version_info >= (3, 11)
                                    and (t := asyncio.current_task())
                                    and t.cancelling()
                                ):
                                    raise

                        # if payload still uncompleted
                        if not payload.is_eof() and not self._force_close:
                            self.log_debug("Uncompleted request.")
                            self.close()

                    payload.set_exception(_PAYLOAD_ACCESS_ERROR)

                except asyncio.CancelledError:
                    self.log_debug("Ignored premature client disconnection")
                    self.force_close()
                    raise
                except Exception as exc:
                    self.log_exception("Unhandled exception", exc_info=exc)
                    self.force_close()
                except BaseException:
                    self.force_close()
                    raise
                finally:
                    request._task = None  # type: ignore[assignment] # Break reference cycle in case of exception
                    if self.transport is None and resp is not None:
                        self.log_debug("Ignored premature client disconnection.")

                # Added: an idle keep-alive connection keeps nothing of its last request.
                request = message = payload = writer = coro = resp = None  # type: ignore[assignment]

                if self._keepalive and not self._close and not self._force_close:
                    # start keep-alive timer
                    close_time = loop.time() + keepalive_timeout
                    self._next_keepalive_close_time = close_time
                    if self._keepalive_handle is None:
                        self._keepalive_handle = loop.call_at(
                            close_time, self._process_keepalive
                        )
                else:
                    break

            # remove handler, close transport if no handlers left
            if not self._force_close:
                self._task_handler = None
                if self.transport is not None:
                    self.transport.close()

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
