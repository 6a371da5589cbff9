"""A thin asyncio driver for :class:`~tunnel.protocol.TunnelProtocol` over a websocket.

Every protocol decision is in :mod:`tunnel.protocol`; this module only moves bytes
and wakes tasks. Used by both ends, over any object with ``async send(bytes)``,
``async recv()`` (raises once the connection is closed) and
``async close(code, reason)``, such as the connections of ``websockets.asyncio``.

Tasks: ``run()`` reads messages and feeds the protocol; one writer task flushes
``protocol.data_to_send()`` in order, coalescing what was queued since its last turn
into websocket messages. Over a websocket of :mod:`tunnel.ws` (``send_now``), what a
turn of the event loop queued is sent by a callback at the end of that turn instead (or
as soon as ``SEND_EARLY`` bytes are queued), as long as the websocket takes it at once;
what it does not take, and everything after, goes to the writer task, which waits for
the websocket as before. Writers of streams queue frames and go on; they wait for the
writer only once ``FLUSH_AHEAD`` bytes are queued and not yet sent, which carries the
websocket's backpressure to them (``open_stream(wait_sent=True)`` waits until the head
has left). One task sends pings and enforces the ping timeout; each incoming request
(connector side) is given to ``on_request(stream)``: what that returns (a coroutine)
runs in a tracked task, and None means the handler took the stream without one: it
drives it from callbacks (:meth:`TunnelStream.respond_now`), and hands it to a task of
its own once it has to wait (:meth:`TunnelStream.continue_in_task`).

Logging: DEBUG per stream, INFO when a tunnel opens or closes, WARNING when the peer
broke the protocol, ERROR (with traceback) when our own code failed.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol as TypingProtocol

from .codes import ErrorCode
from .errors import (
    ProtocolError,
    StreamClosedError,
    StreamResetError,
    TunnelClosedError,
    TunnelError,
)
from .events import (
    DataReceived,
    DrainReceived,
    Event,
    HelloReceived,
    PongReceived,
    PublishedRole,
    RequestReceived,
    ResponseReceived,
    StreamReset,
    TunnelClosed,
    WelcomeReceived,
    WindowUpdated,
)
from .frames import truncate_reason
from .protocol import TunnelProtocol

__all__ = ["TunnelSession", "TunnelStream", "WebSocketLike"]

#: How long closing may take (flushing CLOSE, the websocket closing handshake).
CLOSE_TIMEOUT = 5.0
#: Frames are coalesced into websocket messages of about this size.
MESSAGE_SIZE = 65536
#: Writers return as soon as their frames are queued (the writer task sends them on its
#: next turn, together with whatever else was queued meanwhile); only when this much is
#: queued and not yet handed to the websocket do they wait for the writer. Memory per
#: tunnel stays bounded by it, and the websocket's own backpressure reaches the writers.
FLUSH_AHEAD = 262144
#: What a turn has queued is sent as soon as it reaches this many bytes, not only at the
#: end of the turn: a turn that handles 64 requests (or responses) then hands the first
#: ones to the peer while it works on the rest, so the two ends work side by side instead
#: of in turns (one turn-sized batch each, the other end idle meanwhile). 16 KiB is about
#: 50 request heads or 13 small responses: smaller batches cost more CPU per request than
#: the idle time they win back (docs/performance.md, "Seventh round").
SEND_EARLY = 16384

_WS_NORMAL = 1000
_WS_PROTOCOL_ERROR = 1002
_WS_INTERNAL_ERROR = 1011


class WebSocketLike(TypingProtocol):
    async def send(self, message: bytes) -> None: ...

    async def recv(self) -> bytes | str: ...

    async def close(self, code: int = 1000, reason: str = "") -> None: ...


Headers = Sequence[tuple[bytes, bytes]]


class TunnelStream:
    """One request/response exchange on a tunnel, as seen by either end."""

    def __init__(self, session: TunnelSession, stream_id: int, request: RequestReceived | None = None) -> None:
        self.stream_id = stream_id
        self.request = request
        self._session = session
        self._chunks: deque[bytes] = deque()
        self._eof = False
        # Futures, created only while a task waits: most streams never wait for credit,
        # and many responses arrive before anyone waits for them.
        self._read_waiter: asyncio.Future[None] | None = None
        self._credit_waiter: asyncio.Future[None] | None = None
        self._response: ResponseReceived | None = None
        self._read_error: TunnelError | None = None
        self._write_error: TunnelError | None = None
        self._reset_code: ErrorCode | None = None
        # A waiter without a task (gateway side, see when_answered), and the generation
        # of the session's output that carries this stream's head (see head_sent).
        self._on_answer: Callable[[bool], None] | None = None
        self._head_gen = 0
        if request is not None and request.end_stream:
            self._eof = True

    def __repr__(self) -> str:
        return f"<TunnelStream {self._session.name} #{self.stream_id}>"

    @property
    def reset_code(self) -> ErrorCode | None:
        """The code of the RESET that ended this stream (either side), if any."""
        return self._reset_code

    @property
    def done(self) -> bool:
        """Whether the stream is over on the wire (both ends finished, reset, or tunnel gone)."""
        return not self._session.protocol.stream_is_open(self.stream_id)

    @property
    def head_sent(self) -> bool:
        """Gateway side: whether the request head was handed to the websocket (a request
        whose tunnel died before that went nowhere, and may go to another tunnel)."""
        return self._session._sent_gen >= self._head_gen

    def when_answered(self, callback: Callable[[bool], None], timeout: float | None = None) -> None:
        """Gateway side, without a task: ``callback(timed_out)`` runs once, never from
        inside this call, when the response head came or the stream failed (then
        ``False``), or when ``timeout`` seconds passed first (``True``; the stream stays
        open). :meth:`response_now` then says which. An answer in a tunnel message calls
        back as soon as that whole message was handled; anything else, from the event
        loop. Replaces any callback set before."""
        session = self._session
        loop = session._event_loop()
        if self._response is not None or self._read_error is not None:
            loop.call_soon(callback, False)
            return
        self._on_answer = callback
        if timeout is not None:
            session._set_deadline(self, loop.time() + timeout)

    def response_now(self) -> ResponseReceived:
        """The response head, once :meth:`when_answered` called back without a timeout;
        raises what ended the stream before it (StreamResetError, TunnelClosedError)."""
        if self._response is not None:
            return self._response
        if self._read_error is not None:
            raise self._read_error
        raise RuntimeError(f"{self!r} has no response head yet")

    async def response(self, timeout: float | None = None) -> ResponseReceived:
        """Gateway side: wait for the response head, at most ``timeout`` seconds.

        Raises StreamResetError, TunnelClosedError, TimeoutError (the stream stays open).
        """
        while self._response is None:
            if self._read_error is not None:
                raise self._read_error
            await self._wait_readable(timeout)
        return self._response

    async def send_response(self, status: int, reason: str, headers: Headers, end_stream: bool = False,
                            body: bytes = b"") -> None:
        """Connector side: send the response head, and optionally the first body bytes.

        With ``body``, the head, the body (as far as the stream's credit allows at once)
        and, with ``end_stream``, the end all go out in one flush; the rest of ``body``
        waits for credit like :meth:`write`.
        """
        self._check_writable()
        protocol = self._session.protocol
        if not body or protocol.available_window(self.stream_id) >= len(body):
            self._queue_response(status, reason, headers, body, end_stream)
            await self._session._flush(self if end_stream else None)
            self._session._forget(self)
            return
        protocol.send_response(self.stream_id, status, reason, headers, False)
        await self.write(body)
        if end_stream:
            await self.end()

    def respond_now(self, status: int, reason: str, headers: Headers, body: bytes = b"") -> bool:
        """Connector side, without a task: the whole response (head, ``body``, end) queued
        at once, as :meth:`send_response` with ``end_stream`` would, when that needs no
        wait: the stream's credit covers the body and the writer is not ``FLUSH_AHEAD``
        behind. False, and nothing queued, when it would wait: use send_response then.

        Raises StreamResetError, TunnelClosedError, StreamClosedError as it does.
        """
        self._check_writable()
        session = self._session
        protocol = session.protocol
        if protocol.pending_output >= FLUSH_AHEAD or (body and protocol.available_window(self.stream_id) < len(body)):
            return False
        self._queue_response(status, reason, headers, body, True)
        session._queue_flush(self)
        session._forget(self)
        return True

    def _queue_response(self, status: int, reason: str, headers: Headers, body: bytes, end_stream: bool) -> None:
        """The head, and ``body`` (which the stream's credit covers) if any, queued with the end if asked."""
        protocol = self._session.protocol
        if body:
            protocol.send_response(self.stream_id, status, reason, headers, False)
            protocol.send_data(self.stream_id, body, end_stream)
        else:
            protocol.send_response(self.stream_id, status, reason, headers, end_stream)

    def continue_in_task(self, work: Awaitable[None]) -> None:
        """Connector side: go on handling this stream, taken without a task, in ``work``
        run by a task the session tracks (:meth:`TunnelSession.serve`)."""
        self._session.serve(self, work)

    async def write(self, data: bytes) -> None:
        """Send body bytes, waiting for flow-control credit as needed.

        Raises StreamResetError, TunnelClosedError, StreamClosedError (after end()).
        """
        protocol = self._session.protocol
        view = memoryview(data)
        while view:
            self._check_writable()
            available = protocol.available_window(self.stream_id)
            if available == 0:
                self._session._credit_waiters.add(self)
                waiter = self._credit_waiter = self._session._event_loop().create_future()
                try:
                    await waiter
                finally:
                    self._credit_waiter = None
                    self._session._credit_waiters.discard(self)
                continue
            chunk, view = view[:available], view[available:]
            protocol.send_data(self.stream_id, chunk)  # copied into the frames at once
            await self._session._flush()

    async def end(self) -> None:
        """Send END_STREAM; a no-op if already sent. Raises StreamResetError, TunnelClosedError."""
        if self._write_error is not None:
            raise self._write_error
        if not self._session.protocol.stream_can_send(self.stream_id):
            return
        self._session.protocol.end_stream(self.stream_id)
        await self._session._flush(self)
        self._session._forget(self)

    async def read(self, timeout: float | None = None) -> bytes:
        """The next chunk of the peer's body; b"" once it ended.

        Returning a chunk returns its credit to the peer, so at most one stream
        window is ever buffered. Raises StreamResetError, TunnelClosedError, and
        TimeoutError when nothing came for ``timeout`` seconds (the stream stays open).
        """
        while True:
            if self._read_error is not None:
                raise self._read_error
            if self._chunks:
                chunk = self._chunks.popleft()
                self._session._acknowledge(self.stream_id, len(chunk))
                return chunk
            if self._eof:
                return b""
            await self._wait_readable(timeout)

    def buffered_body(self) -> bytes | None:
        """The peer's whole body, if it has ended it and all of it is buffered; else None.

        Taking it returns its credit to the peer, as :meth:`read` does.
        """
        if not self._eof or self._read_error is not None:
            return None
        chunks = self._chunks
        if not chunks:
            return b""
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._session._acknowledge(self.stream_id, len(body))
        return body

    def reset(self, code: ErrorCode = ErrorCode.CANCEL, reason: str = "") -> None:
        """Abandon the stream: RESET if it is still open; buffered data is dropped either way."""
        protocol = self._session.protocol
        credited = False
        if protocol.stream_is_open(self.stream_id):
            # The protocol credits the buffered bytes back, unless the peer had ended its body.
            protocol.reset_stream(self.stream_id, code, reason)
            credited = not self._eof
            self._fail(StreamResetError(code, reason or "reset locally"), code)
        if self._chunks:
            if not credited:
                self._session._acknowledge(self.stream_id, sum(len(chunk) for chunk in self._chunks))
            self._chunks.clear()
        self._session._forget(self)
        self._session._kick()

    # -- driven by the session ---------------------------------------------------

    def _check_writable(self) -> None:
        if self._write_error is not None:
            raise self._write_error
        if not self._session.protocol.stream_can_send(self.stream_id):
            if self._session.protocol.closed:
                raise TunnelClosedError(self._session.close_reason or "the tunnel is closed")
            raise StreamClosedError(f"stream {self.stream_id} is closed for sending")

    async def _wait_readable(self, timeout: float | None = None) -> None:
        """Until woken; TimeoutError after ``timeout`` s (the tunnel's deadline timer, not a wait_for task)."""
        loop = self._session._event_loop()
        waiter = self._read_waiter = loop.create_future()
        if timeout is None:
            try:
                await waiter
            finally:
                self._read_waiter = None
            return
        session = self._session
        session._set_deadline(self, loop.time() + timeout)
        try:
            await waiter
        finally:
            self._read_waiter = None
            session._deadlines.pop(self, None)

    def _wake_reader(self) -> None:
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        elif self._on_answer is not None:
            self._answer(False)

    def _answer(self, timed_out: bool) -> None:
        """Call the when_answered callback back once the whole tunnel message that
        answered was handled (a response's body and end come after its head), without a
        turn of the loop in between; from the loop when no message is being handled (a
        timeout, a tunnel that closed)."""
        callback, self._on_answer = self._on_answer, None
        assert callback is not None
        session = self._session
        session._deadlines.pop(self, None)
        later = session._answer_later
        if later is not None:
            later.append((callback, timed_out))
        else:
            session._event_loop().call_soon(callback, timed_out)

    def _wake_writer(self) -> None:
        waiter = self._credit_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake(self) -> None:
        self._wake_reader()
        self._wake_writer()

    def _fail(self, error: TunnelError, reset_code: ErrorCode | None = None) -> None:
        if self._reset_code is None and reset_code is not None:
            self._reset_code = reset_code
        if self._write_error is None:
            self._write_error = error
        if self._read_error is None:
            self._read_error = error
        self._wake()

    def _peer_reset(self, error: StreamResetError, code: ErrorCode) -> None:
        """The peer reset the stream. After its END_STREAM (a complete response, and a
        RESET that says the rest of our body is not wanted) what it sent stays readable
        and only our side fails; before it, what was buffered is gone (the protocol
        credited it back) and both sides fail."""
        if not self._eof:
            self._chunks.clear()
            self._fail(error, code)
            return
        if self._reset_code is None:
            self._reset_code = code
        if self._write_error is None:
            self._write_error = error
        self._wake_writer()

    def _tunnel_closed(self, error: TunnelClosedError) -> None:
        # A body that already ended stays readable; anything unfinished fails.
        if self._write_error is None:
            self._write_error = error
        if self._read_error is None and not self._eof:
            self._read_error = error
            self._chunks.clear()
        self._wake()


class TunnelSession:
    """Runs a TunnelProtocol over a websocket until the tunnel ends."""

    def __init__(
        self,
        protocol: TunnelProtocol,
        websocket: WebSocketLike,
        *,
        ping_interval: float = 10.0,
        ping_timeout: float = 30.0,
        on_request: Callable[[TunnelStream], Awaitable[None] | None] | None = None,
        logger: logging.Logger | None = None,
        name: str = "",
    ) -> None:
        self.protocol = protocol
        self.websocket = websocket
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.on_request = on_request
        self.logger = logger if logger is not None else logging.getLogger("tunnel.session")
        self.name = name or protocol.role.value
        self.hello: HelloReceived | None = protocol.peer_hello
        self.welcome: WelcomeReceived | None = protocol.peer_welcome
        self.rtt: float | None = protocol.last_rtt
        self.close_reason: str | None = None
        self._streams: dict[int, TunnelStream] = {}
        self._credit_waiters: set[TunnelStream] = set()
        # Streams waiting to read with a timeout, and when each gives up. One timer for
        # the earliest (a timer per wait cost more than the rest of the wait).
        self._deadlines: dict[TunnelStream, float] = {}
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._deadline_at = math.inf
        self._handlers: set[asyncio.Task[None]] = set()
        self._wakeup = asyncio.Event()
        self._progress = asyncio.Event()
        self._progress_waiters = 0
        self._queued_gen = 0
        self._sent_gen = 0
        self._writer_done = False
        # The end-of-turn sending of tunnel.ws websockets (see _send_queued).
        self._send_now: Callable[[bytes], bool] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._send_handle: asyncio.Handle | None = None
        self._writer_busy = False
        self._backlog: list[bytes] = []
        self._forget_later: list[TunnelStream] | None = None
        # The when_answered callbacks due once the message being handled is done.
        self._answer_later: list[tuple[Callable[[bool], None], bool]] | None = None
        self._hello_event = asyncio.Event()
        self._handshake_event = asyncio.Event()
        self._closed_event = asyncio.Event()
        self._started = False
        self._ws_close_code = _WS_NORMAL
        self._reader_task: asyncio.Task[None] | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        if self.hello is not None:
            self._hello_event.set()
        if protocol.handshake_done:
            self._handshake_event.set()

    # -- state -------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.protocol.closed or self._closed_event.is_set()

    @property
    def drain_acknowledged(self) -> bool:
        return self.protocol.drain_acknowledged

    @property
    def peer_draining(self) -> bool:
        return self.protocol.peer_draining

    @property
    def local_draining(self) -> bool:
        return self.protocol.local_draining

    @property
    def open_streams(self) -> int:
        return self.protocol.open_streams

    # -- public API --------------------------------------------------------------

    async def run(self) -> None:
        """Drive the tunnel until it ends; never raises except CancelledError."""
        if self._started:
            raise RuntimeError("TunnelSession.run() called twice")
        self._started = True
        self._loop = asyncio.get_running_loop()
        self._send_now = getattr(self.websocket, "send_now", None)
        self._kick()  # HELLO / WELCOME may be queued already
        reader = self._reader_task = asyncio.create_task(self._read_loop(), name=f"{self.name} tunnel reader")
        writer = self._writer_task = asyncio.create_task(self._write_loop(), name=f"{self.name} tunnel writer")
        pinger = asyncio.create_task(self._ping_loop(), name=f"{self.name} tunnel pinger")
        # A websocket of tunnel.ws hands messages over as it parses them (the reader then
        # only learns that the connection ended); attached before the reader first runs,
        # so messages that came already go first.
        attach = getattr(self.websocket, "attach_receiver", None)
        if attach is not None:
            attach(self._deliver)
        # No await in a finally clause: compiled by mypyc, one re-raised a stale exception.
        failure: BaseException | None = None
        try:
            await asyncio.wait({reader})
        except BaseException as exc:
            failure = exc
        await self._shutdown(reader, writer, pinger)
        if failure is not None:
            raise failure

    async def wait_hello(self) -> HelloReceived:
        """Gateway side: wait for the connector's HELLO. Raises TunnelClosedError."""
        await self._wait_for(self._hello_event)
        assert self.hello is not None
        return self.hello

    async def wait_handshake(self) -> None:
        """Wait until HELLO and WELCOME were exchanged. Raises TunnelClosedError."""
        await self._wait_for(self._handshake_event)

    def send_hello(self, site_code: str, connection_point: str, roles: Sequence[PublishedRole]) -> None:
        self.protocol.send_hello(site_code, connection_point, roles)
        self._kick()

    def send_welcome(self, instance: str) -> None:
        self.protocol.send_welcome(instance)
        self._kick()
        self._handshake_event.set()

    async def open_stream(self, method: str, target: str, headers: Headers, end_stream: bool = False,
                          wait_sent: bool = False) -> TunnelStream:
        """Gateway side: send a request head on a new stream.

        With ``wait_sent``, return only once the head was handed to the websocket: a
        tunnel that died before that raises TunnelClosedError here, so the caller knows
        the request went nowhere (and may send it elsewhere, body and all).
        Raises DrainingError, TooManyStreamsError, LocalProtocolError, TunnelClosedError.
        """
        stream = self._open(method, target, headers, end_stream)
        try:
            if wait_sent:
                await self._sent()
            else:
                await self._flush(stream if end_stream else None)
        except BaseException:
            # The caller never gets this stream (cancelled, or the tunnel died): reset it, or
            # an answer to a head that went out anyway is buffered unread for good.
            stream.reset(ErrorCode.CANCEL, "request abandoned")
            raise
        return stream

    def open_stream_now(self, method: str, target: str, headers: Headers) -> TunnelStream:
        """Gateway side, without a task: send a request without a body on a new stream.

        The head is queued and goes out by the end of the turn, as with ``open_stream``
        (:attr:`TunnelStream.head_sent` says later whether it left); wait for the answer
        with :meth:`TunnelStream.when_answered`.
        Raises DrainingError, TooManyStreamsError, LocalProtocolError, TunnelClosedError.
        """
        stream = self._open(method, target, headers, True)
        try:
            self._queue_flush(stream)
        except TunnelClosedError:
            stream.reset(ErrorCode.CANCEL, "request abandoned")
            raise
        return stream

    def _open(self, method: str, target: str, headers: Headers, end_stream: bool) -> TunnelStream:
        if self.closed:
            raise TunnelClosedError(self.close_reason or "the tunnel is closed")
        stream_id = self.protocol.open_stream(method, target, headers, end_stream)
        stream = TunnelStream(self, stream_id)
        stream._head_gen = self._queued_gen + 1  # the generation of the next _kick
        self._streams[stream_id] = stream
        self.logger.debug("%s: opened stream %d: %s %s", self.name, stream_id, method, target)
        return stream

    async def drain(self) -> None:
        """Tell the peer to open no new streams; streams in flight go on."""
        if self.closed:
            return
        self.protocol.drain()
        self.logger.info("%s: draining the tunnel", self.name)
        await self._flush()

    async def close(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Send CLOSE, close the websocket and wait until the session is over."""
        self._local_close(code, reason)
        if self._started:
            await self.wait_closed()
        elif not self._closed_event.is_set():
            self._fail_streams()
            await self._close_websocket()
            self._closed_event.set()

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    # -- internals: writing --------------------------------------------------------

    def _kick(self) -> int:
        if self.protocol.handshake_done and not self._handshake_event.is_set():
            self._handshake_event.set()  # the application drove the handshake on the protocol
        self._queued_gen += 1
        if self._send_now is None:
            self._wakeup.set()
        elif self._send_handle is None:
            assert self._loop is not None
            self._send_handle = self._loop.call_soon(self._send_queued)
        return self._queued_gen

    def _send_queued(self) -> None:
        """At the end of a turn that queued frames: send them from here, coalesced, while
        the websocket takes them at once (no task switch, no coroutine per message).
        The writer task takes over, in order, whenever it would have to wait: it is busy
        (sending, or handed a backlog), the websocket is paused (the rest becomes its
        backlog), or the tunnel is closing."""
        if self._send_handle is not None:
            self._send_handle.cancel()  # when called before the end of the turn (_flush)
            self._send_handle = None
        if self._writer_busy or self._writer_done or self.protocol.closed:
            self._wakeup.set()
            return
        send_now = self._send_now
        assert send_now is not None
        generation = self._queued_gen
        frames = self.protocol.data_to_send()
        messages = _coalesce(frames)
        for i, message in enumerate(messages):
            try:
                sent = send_now(message)
            except Exception as exc:  # the connection is gone: as when the writer fails
                self._sending_failed(exc)
                self._wakeup.set()
                return
            if not sent:
                self._backlog = messages[i:]
                self._writer_busy = True  # until the writer task has sent the backlog
                self._wakeup.set()
                return
        self._sent_gen = generation
        self._notify_progress()

    def _sending_failed(self, exc: Exception) -> None:
        self.logger.debug("%s: sending failed: %r", self.name, exc)
        if not self.protocol.closed:
            self._set_reason(f"connection lost while sending ({type(exc).__name__})")
            self.protocol.close(ErrorCode.INTERNAL_ERROR, "connection lost")

    async def _flush(self, ended: TunnelStream | None = None) -> None:
        """Have what is queued sent; wait for the writer only when it is behind.

        ``ended``: the stream whose end was just queued. When no other stream is in
        flight, nothing would join its frames by the end of the turn: they are sent at
        once (over tunnel.ws), ahead of the caller's bookkeeping after the exchange
        (logging, metrics), which is then off the request's path. With other streams in
        flight they wait for the end of the turn, coalesced with the rest.

        Raises TunnelClosedError once the writer has stopped.
        """
        generation = self._queue_flush(ended)
        if self.protocol.pending_output >= FLUSH_AHEAD:
            await self._wait_sent(generation)

    def _queue_flush(self, ended: TunnelStream | None) -> int:
        """What :meth:`_flush` does without waiting: the generation of what was queued."""
        generation = self._kick()
        if self._send_handle is not None and self.protocol.pending_output >= SEND_EARLY:
            self._send_queued()
        elif ended is not None and self._send_handle is not None:
            streams = self._streams
            if len(streams) - (streams.get(ended.stream_id) is ended) == 0:
                self._send_queued()
        if self._writer_done:
            raise TunnelClosedError(self.close_reason or "the tunnel is closed")
        return generation

    async def _sent(self) -> None:
        """Wait until everything queued so far was handed to the websocket."""
        await self._wait_sent(self._kick())

    async def _wait_sent(self, generation: int) -> None:
        self._progress_waiters += 1
        try:
            while self._sent_gen < generation:
                if self._writer_done:
                    raise TunnelClosedError(self.close_reason or "the tunnel is closed")
                await self._progress.wait()
        finally:
            self._progress_waiters -= 1

    def _notify_progress(self) -> None:
        if self._progress_waiters or self._writer_done:
            progress, self._progress = self._progress, asyncio.Event()
            progress.set()

    async def _send_all(self, frames: list[bytes]) -> None:
        for message in _coalesce(frames):
            await self.websocket.send(message)

    async def _write_loop(self) -> None:
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                generation = self._queued_gen
                self._writer_busy = True
                backlog, self._backlog = self._backlog, []
                for message in backlog:  # what _send_queued could not send, first
                    await self.websocket.send(message)
                await self._send_all(self.protocol.data_to_send())
                if self.protocol.closed:
                    await self._send_all(self.protocol.data_to_send())
                    break
                self._writer_busy = False
                self._sent_gen = generation
                self._notify_progress()
        except Exception as exc:  # the connection is gone: the reader will notice too
            self._sending_failed(exc)
        finally:
            self._writer_done = True
            self._notify_progress()
        await self._close_websocket()
        if self._reader_task is not None:
            self._reader_task.cancel()

    async def _close_websocket(self) -> None:
        reason = truncate_reason(self.close_reason or "", 120).decode("utf-8")
        try:
            await asyncio.wait_for(self.websocket.close(self._ws_close_code, reason), CLOSE_TIMEOUT)
        except Exception as exc:
            self.logger.debug("%s: closing the websocket failed: %r", self.name, exc)

    # -- internals: reading --------------------------------------------------------

    async def _read_loop(self) -> None:
        while not self.protocol.closed:
            try:
                message = await self.websocket.recv()
            except Exception as exc:
                if not self.protocol.closed:
                    self._set_reason(f"connection lost ({type(exc).__name__}: {exc})")
                    self.protocol.close(ErrorCode.INTERNAL_ERROR, "connection lost")
                return
            if not self._receive_message(message):
                return

    def _deliver(self, message: bytes) -> None:
        """A message handed over by the websocket as it was parsed (see :mod:`tunnel.ws`):
        what the read loop does with one, and the loop ends when the session must."""
        try:
            going_on = self._receive_message(message)
        except Exception:  # never into the websocket's data_received
            self.logger.exception("%s: internal error while receiving a tunnel message", self.name)
            going_on = False
        if going_on and not self.protocol.closed:
            return
        self._detach_receiver()
        if self._reader_task is not None:
            self._reader_task.cancel()  # run() goes on to shut the session down

    def _receive_message(self, message: bytes | str) -> bool:
        """Feed one websocket message to the protocol; False when the peer broke it."""
        try:
            if isinstance(message, str):
                self.protocol.close(ErrorCode.PROTOCOL_ERROR, "text message on the tunnel")
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "text message on the tunnel")
            events = self.protocol.receive_data(message)
        except ProtocolError as exc:
            self._ws_close_code = _WS_PROTOCOL_ERROR
            self._set_reason(f"protocol error: {exc}")
            self.logger.warning("%s: the peer broke the tunnel protocol, closing: %s", self.name, exc)
            self._kick()
            return False
        # Streams are forgotten only once the whole message was handled: a RESET later in
        # the same message must still find its stream (the protocol, which parsed all of
        # it first, has forgotten it already).
        self._forget_later = []
        self._answer_later = []
        try:
            for event in events:
                self._handle_event(event)
        except Exception:
            self.logger.exception("%s: internal error while handling tunnel events", self.name)
            self._ws_close_code = _WS_INTERNAL_ERROR
            self._set_reason("internal error")
            self.protocol.close(ErrorCode.INTERNAL_ERROR, "internal error")
        finally:
            forget, self._forget_later = self._forget_later, None
            for stream in forget:
                self._forget(stream)
            answered, self._answer_later = self._answer_later, None
            for callback, timed_out in answered:
                try:
                    callback(timed_out)
                except Exception:  # as the loop would report it; the other callbacks still run
                    self.logger.exception("%s: a when_answered callback failed", self.name)
        # Wake the writer only when it has something to do: frames queued in answer
        # (PONG, WINDOW_UPDATE, RESET, CLOSE) or a tunnel that ended. Most messages
        # (a response, a request) queue nothing, and a turn of the writer for nothing
        # was a task switch per message.
        if self.protocol.pending_output or self.protocol.closed:
            self._kick()
        return True

    def _handle_event(self, event: Event) -> None:
        if isinstance(event, DataReceived):
            stream = self._streams.get(event.stream_id)
            if stream is None:  # nobody will read it: give the credit back at once
                self.protocol.acknowledge_received_data(event.stream_id, len(event.data))
                return
            if event.data:
                stream._chunks.append(event.data)
            if event.end_stream:
                stream._eof = True
                self._forget(stream)
            stream._wake_reader()
        elif isinstance(event, WindowUpdated):
            if event.stream_id == 0:
                for waiter in self._credit_waiters:
                    waiter._wake_writer()
            else:
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream._wake_writer()
        elif isinstance(event, RequestReceived):
            self._start_request(event)
        elif isinstance(event, ResponseReceived):
            stream = self._streams.get(event.stream_id)
            if stream is None:
                self.protocol.reset_stream(event.stream_id, ErrorCode.CANCEL)
                return
            stream._response = event
            if event.end_stream:
                stream._eof = True
                self._forget(stream)
            stream._wake_reader()
        elif isinstance(event, StreamReset):
            stream = self._streams.pop(event.stream_id, None)
            self.logger.debug("%s: stream %d reset by the peer: %s", self.name, event.stream_id, event.code.name)
            if stream is not None:
                stream._peer_reset(StreamResetError(event.code, event.reason), event.code)
        elif isinstance(event, PongReceived):
            self.rtt = event.rtt
        elif isinstance(event, HelloReceived):
            self.hello = event
            self.logger.info(
                "%s: HELLO from connection point %s of site %s", self.name, event.connection_point, event.site_code
            )
            self._hello_event.set()
        elif isinstance(event, WelcomeReceived):
            self.welcome = event
            self.logger.info("%s: WELCOME from gateway instance %s", self.name, event.instance)
            self._handshake_event.set()
        elif isinstance(event, DrainReceived):
            self.logger.info("%s: the peer is draining the tunnel", self.name)
        elif isinstance(event, TunnelClosed):
            self._set_reason(
                f"closed by the peer ({event.code.name}" + (f": {event.reason})" if event.reason else ")")
            )
        # PingReceived: the protocol queued the PONG already.

    def _start_request(self, event: RequestReceived) -> None:
        stream = TunnelStream(self, event.stream_id, request=event)
        self._streams[event.stream_id] = stream
        if self.on_request is None:
            self.protocol.reset_stream(event.stream_id, ErrorCode.REFUSED_STREAM, "no request handler")
            self._forget(stream)
            return
        self.logger.debug("%s: stream %d: %s %s", self.name, event.stream_id, event.method, event.target)
        try:
            work = self.on_request(stream)
        except Exception:
            self.logger.exception("%s: request handler failed on stream %d", self.name, stream.stream_id)
            stream.reset(ErrorCode.INTERNAL_ERROR)  # never the exception text on the wire
            return
        if work is not None:
            self.serve(stream, work)

    def serve(self, stream: TunnelStream, work: Awaitable[None]) -> None:
        """Run ``work``, the handling of ``stream``, in a tracked task: cancelled when the
        session ends; whatever it raises, or a response it left unfinished, resets the
        stream. A handler that took a stream without a task hands it over here once it
        has to wait."""
        task = asyncio.create_task(self._serve(stream, work), name=f"{self.name} stream {stream.stream_id}")
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _serve(self, stream: TunnelStream, work: Awaitable[None]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            stream.reset(ErrorCode.CANCEL)
            raise
        except (StreamResetError, TunnelClosedError) as exc:
            self.logger.debug("%s: stream %d ended early: %s", self.name, stream.stream_id, exc)
            stream.reset(ErrorCode.CANCEL)
        except Exception:
            self.logger.exception("%s: request handler failed on stream %d", self.name, stream.stream_id)
            stream.reset(ErrorCode.INTERNAL_ERROR)  # never the exception text on the wire
        else:
            if self.protocol.stream_can_send(stream.stream_id):
                self.logger.error(
                    "%s: request handler returned without ending stream %d", self.name, stream.stream_id
                )
                stream.reset(ErrorCode.INTERNAL_ERROR)
            else:
                # The response is complete; drop any request body nobody read.
                stream.reset(ErrorCode.NO_ERROR)

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """The loop the session runs in: kept once run() started (asyncio.get_running_loop()
        makes a getpid system call each time)."""
        loop = self._loop
        return loop if loop is not None else asyncio.get_running_loop()

    def _set_deadline(self, stream: TunnelStream, deadline: float) -> None:
        self._deadlines[stream] = deadline
        if deadline < self._deadline_at:
            if self._deadline_timer is not None:
                self._deadline_timer.cancel()
            self._deadline_at = deadline
            self._deadline_timer = self._event_loop().call_at(deadline, self._expire_deadlines)

    def _expire_deadlines(self) -> None:
        """The timer of the earliest deadline: time out every wait that is due, and set
        the timer for the next (the waits it was set for may have ended long ago)."""
        self._deadline_timer = None
        self._deadline_at = math.inf
        deadlines = self._deadlines
        if not deadlines:
            return
        loop = self._event_loop()
        now = loop.time()
        for stream in [stream for stream, deadline in deadlines.items() if deadline <= now]:
            del deadlines[stream]
            waiter = stream._read_waiter
            if waiter is not None and not waiter.done():
                waiter.set_exception(TimeoutError())
            elif stream._on_answer is not None:
                stream._answer(True)
        if deadlines:
            self._deadline_at = min(deadlines.values())
            self._deadline_timer = loop.call_at(self._deadline_at, self._expire_deadlines)

    def _stop_deadline_timer(self) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        self._deadline_at = math.inf

    def _acknowledge(self, stream_id: int, n: int) -> None:
        if n and not self.protocol.closed:
            self.protocol.acknowledge_received_data(stream_id, n)
            if self.protocol.pending_output:  # a WINDOW_UPDATE is due (they are batched)
                self._kick()

    def _forget(self, stream: TunnelStream) -> None:
        if self._forget_later is not None:  # handling a message's events (_receive_message)
            self._forget_later.append(stream)
            return
        if not self.protocol.stream_is_open(stream.stream_id):
            if self._streams.get(stream.stream_id) is stream:
                del self._streams[stream.stream_id]

    # -- internals: pings, closing ---------------------------------------------------

    async def _ping_loop(self) -> None:
        clock = self.protocol.clock
        try:
            await asyncio.wait_for(self._handshake_event.wait(), self.ping_timeout)
        except TimeoutError:
            self._local_close(ErrorCode.TIMEOUT, f"no handshake within {self.ping_timeout:g} s")
            return
        next_ping = clock() + self.ping_interval
        while not self.protocol.closed:
            now = clock()
            since = self.protocol.ping_outstanding_since
            if since is not None and now - since >= self.ping_timeout:
                self.logger.warning("%s: no PONG within %g s, closing the tunnel", self.name, self.ping_timeout)
                self._local_close(ErrorCode.TIMEOUT, f"ping timeout: no PONG within {self.ping_timeout:g} s")
                return
            if now >= next_ping:
                self.protocol.ping()
                self._kick()
                next_ping = now + self.ping_interval
                since = self.protocol.ping_outstanding_since
            deadline = next_ping if since is None else min(next_ping, since + self.ping_timeout)
            await asyncio.sleep(max(0.001, deadline - clock()))

    def _set_reason(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason

    def _local_close(self, code: ErrorCode, reason: str) -> None:
        if self.protocol.closed:
            return
        self.protocol.close(code, reason)
        self._set_reason(f"closed locally ({code.name}" + (f": {reason})" if reason else ")"))
        self._kick()
        if self._started and self._watchdog is None and not self._closed_event.is_set():
            self._watchdog = asyncio.create_task(self._force_close_later())

    async def _force_close_later(self) -> None:
        # If the peer stopped reading, the writer may be stuck: do not wait forever.
        await asyncio.sleep(CLOSE_TIMEOUT)
        for task in (self._writer_task, self._reader_task):
            if task is not None:
                task.cancel()

    async def _wait_for(self, event: asyncio.Event) -> None:
        if event.is_set():
            return
        if self.closed:
            raise TunnelClosedError(self.close_reason or "the tunnel is closed")
        waiter = asyncio.ensure_future(event.wait())
        closed = asyncio.ensure_future(self._closed_event.wait())
        try:
            await asyncio.wait({waiter, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            closed.cancel()
        if not event.is_set():
            raise TunnelClosedError(self.close_reason or "the tunnel is closed")

    def _fail_streams(self) -> None:
        error = TunnelClosedError(self.close_reason or "the tunnel is closed")
        for stream in list(self._streams.values()):
            stream._tunnel_closed(error)
        self._streams.clear()

    def _detach_receiver(self) -> None:
        detach = getattr(self.websocket, "detach_receiver", None)
        if detach is not None:
            detach()

    async def _shutdown(self, reader: asyncio.Task[None], writer: asyncio.Task[None], pinger: asyncio.Task[None]) -> None:
        self._detach_receiver()
        if not self.protocol.closed:  # run() was cancelled
            self._set_reason("session cancelled")
            self.protocol.close(ErrorCode.CANCEL, "session cancelled")
        self._set_reason("the tunnel is closed")
        self._fail_streams()
        pinger.cancel()
        self._kick()
        failure: BaseException | None = None
        try:
            await asyncio.wait({writer}, timeout=CLOSE_TIMEOUT)
        except BaseException as exc:
            failure = exc
        tasks: list[asyncio.Task[None]] = [reader, writer, pinger, *self._handlers]
        if self._watchdog is not None:
            tasks.append(self._watchdog)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._close_websocket()
        self._writer_done = True
        self._notify_progress()
        self._stop_deadline_timer()
        self._closed_event.set()
        self.logger.info("%s: tunnel closed: %s", self.name, self.close_reason)
        if failure is not None:
            raise failure


def _coalesce(frames: list[bytes]) -> list[bytes]:
    """Join consecutive small frames into messages of about MESSAGE_SIZE bytes; a turn
    with one frame (a request head at low load) is that frame, not copied."""
    if len(frames) <= 1:
        return frames
    messages: list[bytes] = []
    batch: list[bytes] = []
    size = 0
    for frame in frames:
        if batch and size + len(frame) > MESSAGE_SIZE:
            messages.append(b"".join(batch))
            batch, size = [], 0
        batch.append(frame)
        size += len(frame)
    if batch:
        messages.append(b"".join(batch))
    return messages
