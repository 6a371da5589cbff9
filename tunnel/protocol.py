"""The tunnel protocol as a pure state machine: bytes in, events and bytes out.

No networking, no asyncio, no threads: :class:`TunnelProtocol` is fed the bytes the
peer sent (:meth:`~TunnelProtocol.receive_data`) and returns events; the methods that
send only queue serialized frames, which the driver collects with
:meth:`~TunnelProtocol.data_to_send` and writes in order. The clock is injected.

Roles. The CONNECTOR dials out and speaks first (HELLO); the GATEWAY answers WELCOME
and then opens streams (odd ids, strictly increasing), one per proxied request. The
connector answers each stream with a response head and body.

Streams (per side: our sending half and the peer's)::

    open ──our END_STREAM──▶ half-closed local ──peer END_STREAM──▶ closed
     └──peer END_STREAM──▶ half-closed remote ──our END_STREAM──▶ closed
    any state ──RESET (either way)──▶ closed

A closed stream is forgotten at once, so memory does not grow with the number of
streams ever opened. Later frames are told apart by the monotonic id rule: an id at
or below the highest id seen that is not open is an old stream. A bounded record of
the ids WE reset recently lets their in-flight frames be ignored (their DATA still
counts against the tunnel window and is credited back at once); DATA or HEADERS for
any other old stream is a STREAM_CLOSED error, and WINDOW_UPDATE or RESET for one is
ignored (those legitimately race with the end of a stream).

Flow control. Each side grants credit for what it can buffer: per stream and per
tunnel, from the Settings in HELLO/WELCOME. Sending DATA consumes credit; the
receiving application returns it with :meth:`~TunnelProtocol.acknowledge_received_data`,
batched into WINDOW_UPDATE frames. When a stream is reset, its received but not yet
acknowledged bytes are returned to the tunnel automatically (the application drops
them), so the application must not acknowledge them afterwards.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from enum import Enum

from .codes import ErrorCode, FrameType
from .errors import (
    DrainingError,
    FlowControlError,
    LocalProtocolError,
    ProtocolError,
    StreamClosedError,
    TooManyStreamsError,
    TunnelClosedError,
)
from .events import (
    DataReceived,
    DrainReceived,
    Event,
    HelloReceived,
    PingReceived,
    PongReceived,
    PublishedRole,
    RequestReceived,
    ResponseReceived,
    Settings,
    StreamReset,
    TunnelClosed,
    WelcomeReceived,
    WindowUpdated,
)
from .frames import (
    END_STREAM,
    FRAME_HEADER,
    MAX_STREAM_ID,
    Frame,
    FrameParser,
    decode_close,
    decode_hello,
    decode_ping,
    decode_request_head,
    decode_reset,
    decode_response_head,
    decode_welcome,
    decode_window_update,
    encode_close,
    encode_hello,
    encode_request_head,
    encode_reset,
    encode_response_head,
    encode_welcome,
    encode_window_update,
)
from .limits import MAX_WINDOW, Limits

__all__ = ["RECENTLY_RESET_MEMORY", "Role", "TunnelProtocol"]

_pack_header = FRAME_HEADER.pack

#: How many ids of streams we reset are remembered, to ignore their in-flight frames.
RECENTLY_RESET_MEMORY = 4096


#: Credit is returned in batches of at least this much (or a quarter of the window).
MIN_WINDOW_UPDATE = 16384


def _should_return(unacked: int, peer_credit: int, window: int) -> bool:
    """Whether to send a WINDOW_UPDATE for ``unacked`` bytes now.

    Batches: once a quarter of the window is owed; or earlier, once the peer has
    no more credit than we owe it (so credit held by other, slow streams cannot
    starve this one), but never for less than MIN_WINDOW_UPDATE (or a quarter of a
    small window), so that tiny reads by a blocked sender's peer do not turn into
    a stream of tiny frames.
    """
    quarter = max(1, window // 4)
    if unacked >= quarter:
        return True
    return unacked >= peer_credit and unacked >= min(quarter, MIN_WINDOW_UPDATE)


#: PINGs a peer may send per second before it is cut off (a flood otherwise fills
#: our outbound queue with PONGs).
MAX_PINGS_PER_SECOND = 100


class Role(Enum):
    GATEWAY = "gateway"
    CONNECTOR = "connector"


class _Stream:
    """One open stream's state (a plain class: one per request, compiled to a C struct)."""

    __slots__ = ("stream_id", "send_window", "recv_window", "local_open", "remote_open", "head_sent",
                 "head_received", "unacked", "outstanding")

    def __init__(self, stream_id: int, send_window: int, recv_window: int) -> None:
        self.stream_id = stream_id
        self.send_window = send_window  # credit we have left to send on this stream
        self.recv_window = recv_window  # credit the peer has left to send to us
        self.local_open = True
        self.remote_open = True
        self.head_sent = False  # request head (gateway) or response head (connector)
        self.head_received = False
        self.unacked = 0  # consumed by the application, not yet returned with WINDOW_UPDATE
        self.outstanding = 0  # received, not yet consumed by the application


class _Kind(Enum):
    OPEN = "open"
    RECENTLY_RESET = "recently reset"
    OLD = "closed"
    NEW = "new"
    INVALID = "never opened"


class TunnelProtocol:
    """One end of a tunnel (gateway or connector). See the module docstring."""

    def __init__(self, role: Role, limits: Limits = Limits(), clock: Callable[[], float] = time.monotonic) -> None:
        self.role = role
        self.limits = limits
        self.clock = clock
        self._parser = FrameParser(limits.max_frame_size, limits.max_header_size)
        self._outgoing: list[bytes] = []
        self._outgoing_size = 0
        self._closed = False
        self._hello_sent = False
        self._welcome_sent = False
        self._peer_hello: HelloReceived | None = None
        self._peer_welcome: WelcomeReceived | None = None
        self._peer_ready = False  # the peer's HELLO (gateway) or WELCOME (connector) is in
        self._peer_settings: Settings | None = None
        self._local_draining = False
        self._peer_draining = False
        # After our DRAIN we send a PING: its PONG proves the peer has read the DRAIN,
        # so streams it opened before that (they arrive before the PONG) are still
        # served; only streams arriving after it are refused.
        self._drain_ping: bytes | None = None
        self._ping_window_start = self.clock()
        self._pings_in_window = 0
        self._drain_seen_by_peer = False
        self._streams: dict[int, _Stream] = {}
        self._recently_reset: OrderedDict[int, None] = OrderedDict()
        self._next_stream_id = 1  # gateway: the next id we open
        self._last_peer_stream_id = 0  # connector: the highest id the gateway opened
        # Tunnel-level flow control, same meaning as in _Stream.
        self._tunnel_send_window = 0
        self._tunnel_recv_window = limits.tunnel_window
        self._tunnel_unacked = 0
        self._tunnel_outstanding = 0
        self._ping_counter = 0
        self._pings: OrderedDict[bytes, float] = OrderedDict()
        self._last_rtt: float | None = None

    # -- state ------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def local_draining(self) -> bool:
        return self._local_draining

    @property
    def drain_acknowledged(self) -> bool:
        """Our DRAIN was read by the peer: no stream of its can arrive any more."""
        return self._drain_seen_by_peer

    @property
    def peer_draining(self) -> bool:
        return self._peer_draining

    @property
    def handshake_done(self) -> bool:
        if self.role is Role.GATEWAY:
            return self._welcome_sent
        return self._peer_welcome is not None

    @property
    def open_streams(self) -> int:
        """Streams not yet fully closed."""
        return len(self._streams)

    @property
    def peer_settings(self) -> Settings | None:
        return self._peer_settings

    @property
    def peer_hello(self) -> HelloReceived | None:
        return self._peer_hello

    @property
    def peer_welcome(self) -> WelcomeReceived | None:
        return self._peer_welcome

    @property
    def last_rtt(self) -> float | None:
        return self._last_rtt

    @property
    def ping_outstanding_since(self) -> float | None:
        """Clock time of the oldest unanswered PING, or None."""
        for sent_at in self._pings.values():
            return sent_at
        return None

    def stream_is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def stream_can_send(self, stream_id: int) -> bool:
        """Whether our sending half of the stream is still open."""
        stream = self._streams.get(stream_id)
        return stream is not None and stream.local_open

    def stream_can_receive(self, stream_id: int) -> bool:
        """Whether the peer's sending half of the stream is still open."""
        stream = self._streams.get(stream_id)
        return stream is not None and stream.remote_open

    def available_window(self, stream_id: int) -> int:
        """How many body bytes send_data() accepts now; 0 for an unknown or closed stream."""
        stream = self._streams.get(stream_id)
        if stream is None or not stream.local_open or self._closed:
            return 0
        return max(0, min(stream.send_window, self._tunnel_send_window))

    def data_to_send(self) -> list[bytes]:
        """Serialized frames queued since the last call, in order; empties the queue."""
        outgoing, self._outgoing = self._outgoing, []
        self._outgoing_size = 0
        return outgoing

    @property
    def pending_output(self) -> int:
        """Bytes queued for sending that data_to_send() has not returned yet."""
        return self._outgoing_size

    # -- receiving ---------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; return the events they complete.

        Raises ProtocolError when the peer broke the protocol: a CLOSE frame with its
        code and reason is then queued and the protocol is CLOSED. Input after CLOSED
        raises ProtocolError too. Bytes after a CLOSE frame are ignored.
        """
        if self._closed:
            raise ProtocolError(ErrorCode.STREAM_CLOSED, "data received after the tunnel was closed")
        events: list[Event] = []
        try:
            parser = self._parser
            parser.append(data)
            while not self._closed and (fields := parser.next_fields()) is not None:
                ftype, flags, stream_id, payload = fields
                # Once the handshake is in, DATA and HEADERS (every request) go straight
                # to their handlers; the rest goes through _receive_frame.
                if ftype is FrameType.DATA and self._peer_ready:
                    self._receive_data_frame(stream_id, payload, flags == END_STREAM, events)
                elif ftype is FrameType.HEADERS and self._peer_ready:
                    if self.role is Role.GATEWAY:
                        self._receive_response(stream_id, payload, flags == END_STREAM, events)
                    else:
                        self._receive_request(stream_id, payload, flags == END_STREAM, events)
                else:
                    self._receive_frame(Frame(ftype, flags, stream_id, payload), events)
        except ProtocolError as exc:
            self.close(exc.code, exc.reason)
            raise
        return events

    def _receive_frame(self, frame: Frame, events: list[Event]) -> None:
        ftype = frame.type
        if ftype is FrameType.CLOSE:
            code, reason = decode_close(frame.payload)
            self._closed = True
            self._streams.clear()
            events.append(TunnelClosed(code, reason))
            return
        if self.role is Role.GATEWAY:
            if self._peer_hello is None:
                if ftype is not FrameType.HELLO:
                    raise self._unexpected(frame, "before HELLO")
                self._receive_hello(frame, events)
                return
            if ftype in (FrameType.HELLO, FrameType.WELCOME):
                raise self._unexpected(frame, "after HELLO")
        else:
            if self._peer_welcome is None:
                if ftype is not FrameType.WELCOME or not self._hello_sent:
                    raise self._unexpected(frame, "before WELCOME" if self._hello_sent else "before we sent HELLO")
                self._receive_welcome(frame, events)
                return
            if ftype in (FrameType.HELLO, FrameType.WELCOME):
                raise self._unexpected(frame, "after WELCOME")
        if ftype is FrameType.DATA:
            self._receive_data_frame(frame.stream_id, frame.payload, frame.end_stream, events)
        elif ftype is FrameType.HEADERS:
            if self.role is Role.GATEWAY:
                self._receive_response(frame.stream_id, frame.payload, frame.end_stream, events)
            else:
                self._receive_request(frame.stream_id, frame.payload, frame.end_stream, events)
        elif ftype is FrameType.WINDOW_UPDATE:
            self._receive_window_update(frame, events)
        elif ftype is FrameType.RESET:
            self._receive_reset(frame, events)
        elif ftype is FrameType.PING:
            decode_ping(frame.payload)
            self._count_ping()
            self._queue(FrameType.PONG, 0, 0, frame.payload)
            events.append(PingReceived())
        elif ftype is FrameType.PONG:
            self._receive_pong(frame, events)
        elif ftype is FrameType.DRAIN:
            if not self._peer_draining:
                self._peer_draining = True
                events.append(DrainReceived())
        else:  # pragma: no cover - the parser only yields known types
            raise self._unexpected(frame, "")

    def _unexpected(self, frame: Frame, when: str) -> ProtocolError:
        return ProtocolError(
            ErrorCode.PROTOCOL_ERROR,
            f"{frame.type.name} frame received by the {self.role.value} {when}".rstrip(),
        )

    def _receive_hello(self, frame: Frame, events: list[Event]) -> None:
        hello = decode_hello(frame.payload)
        self._peer_hello = hello
        self._peer_ready = True
        self._set_peer_settings(hello.settings)
        events.append(hello)

    def _receive_welcome(self, frame: Frame, events: list[Event]) -> None:
        welcome = decode_welcome(frame.payload)
        self._peer_welcome = welcome
        self._peer_ready = True
        self._set_peer_settings(welcome.settings)
        events.append(welcome)

    def _set_peer_settings(self, settings: Settings) -> None:
        self._peer_settings = settings
        self._tunnel_send_window = settings.tunnel_window

    def _classify(self, stream_id: int) -> _Kind:
        if stream_id in self._streams:
            return _Kind.OPEN
        if stream_id in self._recently_reset:
            return _Kind.RECENTLY_RESET
        if stream_id % 2 == 0:
            return _Kind.INVALID
        if self.role is Role.CONNECTOR:
            return _Kind.OLD if stream_id <= self._last_peer_stream_id else _Kind.NEW
        return _Kind.OLD if stream_id < self._next_stream_id else _Kind.INVALID

    @staticmethod
    def _never_opened(ftype: FrameType, stream_id: int) -> ProtocolError:
        return ProtocolError(
            ErrorCode.PROTOCOL_ERROR, f"{ftype.name} frame on stream {stream_id}, which was never opened"
        )

    @staticmethod
    def _already_closed(ftype: FrameType, stream_id: int) -> ProtocolError:
        return ProtocolError(
            ErrorCode.STREAM_CLOSED, f"{ftype.name} frame on stream {stream_id}, which is closed"
        )

    def _receive_request(self, stream_id: int, payload: bytes, end_stream: bool, events: list[Event]) -> None:
        kind = self._classify(stream_id)
        if kind is _Kind.RECENTLY_RESET:
            return
        if kind is _Kind.OPEN:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"second request HEADERS on stream {stream_id}")
        if kind is _Kind.OLD:
            raise ProtocolError(
                ErrorCode.PROTOCOL_ERROR,
                f"stream id {stream_id} reused (ids must increase; last was {self._last_peer_stream_id})",
            )
        if kind is _Kind.INVALID:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"even stream id {stream_id} from the gateway")
        method, target, headers = decode_request_head(payload)
        self._last_peer_stream_id = stream_id
        if self._drain_seen_by_peer or len(self._streams) >= self.limits.max_concurrent_streams:
            # Not a tunnel error: the stream was never processed, the gateway may retry it.
            self._queue(FrameType.RESET, 0, stream_id, encode_reset(ErrorCode.REFUSED_STREAM))
            if not end_stream:
                self._remember_reset(stream_id)
            return
        assert self._peer_settings is not None
        stream = _Stream(stream_id, self._peer_settings.stream_window, self.limits.stream_window)
        stream.head_received = True
        stream.remote_open = not end_stream
        self._streams[stream_id] = stream
        events.append(RequestReceived(stream_id, method, target, headers, end_stream))

    def _receive_response(self, stream_id: int, payload: bytes, end_stream: bool, events: list[Event]) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            kind = self._classify(stream_id)
            if kind is _Kind.RECENTLY_RESET:
                return
            if kind is _Kind.OLD:
                raise self._already_closed(FrameType.HEADERS, stream_id)
            raise self._never_opened(FrameType.HEADERS, stream_id)
        if stream.head_received:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"second response HEADERS on stream {stream_id}")
        status, reason, headers = decode_response_head(payload)
        stream.head_received = True
        events.append(ResponseReceived(stream_id, status, reason, headers, end_stream))
        if end_stream:
            stream.remote_open = False
            self._forget_if_closed(stream)

    def _receive_data_frame(self, stream_id: int, payload: bytes, end_stream: bool, events: list[Event]) -> None:
        size = len(payload)
        stream = self._streams.get(stream_id)
        if stream is None:
            kind = self._classify(stream_id)
            if kind in (_Kind.NEW, _Kind.INVALID):
                raise self._never_opened(FrameType.DATA, stream_id)
            if kind is _Kind.OLD:
                raise self._already_closed(FrameType.DATA, stream_id)
        if size > self._tunnel_recv_window:
            raise ProtocolError(
                ErrorCode.FLOW_CONTROL_ERROR,
                f"DATA of {size} bytes beyond the tunnel window ({self._tunnel_recv_window} left)",
            )
        self._tunnel_recv_window -= size
        if stream is None:  # recently reset by us: credit it back at once
            self._tunnel_unacked += size
            self._maybe_update_tunnel_window()
            if end_stream:
                self._recently_reset.pop(stream_id, None)
            return
        if not stream.remote_open:
            raise ProtocolError(ErrorCode.STREAM_CLOSED, f"DATA on stream {stream_id} after END_STREAM")
        if not stream.head_received:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"DATA before the response HEADERS on stream {stream_id}")
        if size > stream.recv_window:
            raise ProtocolError(
                ErrorCode.FLOW_CONTROL_ERROR,
                f"DATA of {size} bytes beyond the window of stream {stream_id} ({stream.recv_window} left)",
            )
        stream.recv_window -= size
        stream.outstanding += size
        self._tunnel_outstanding += size
        events.append(DataReceived(stream_id, payload, end_stream))
        if end_stream:
            stream.remote_open = False
            self._forget_if_closed(stream)

    def _receive_window_update(self, frame: Frame, events: list[Event]) -> None:
        increment = decode_window_update(frame.payload)
        if frame.stream_id == 0:
            if self._tunnel_send_window + increment > MAX_WINDOW:
                raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "tunnel window above 2**31-1")
            self._tunnel_send_window += increment
            events.append(WindowUpdated(0))
            return
        kind = self._classify(frame.stream_id)
        if kind in (_Kind.NEW, _Kind.INVALID):
            raise self._never_opened(frame.type, frame.stream_id)
        if kind is not _Kind.OPEN:
            return
        stream = self._streams[frame.stream_id]
        if stream.send_window + increment > MAX_WINDOW:
            raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, f"window of stream {frame.stream_id} above 2**31-1")
        stream.send_window += increment
        if stream.local_open:
            events.append(WindowUpdated(frame.stream_id))

    def _receive_reset(self, frame: Frame, events: list[Event]) -> None:
        code, reason = decode_reset(frame.payload)
        kind = self._classify(frame.stream_id)
        if kind in (_Kind.NEW, _Kind.INVALID):
            raise self._never_opened(frame.type, frame.stream_id)
        if kind is _Kind.RECENTLY_RESET:
            self._recently_reset.pop(frame.stream_id, None)
            return
        if kind is _Kind.OLD:
            return
        stream = self._streams.pop(frame.stream_id)
        if stream.remote_open:
            self._return_outstanding(stream)
        # else: a RESET after the peer's END_STREAM (e.g. NO_ERROR: "the rest of your body
        # is not wanted") leaves the complete body it sent with the application.
        events.append(StreamReset(frame.stream_id, code, reason))

    def _count_ping(self) -> None:
        """A peer pinging more than MAX_PINGS_PER_SECOND makes us queue PONGs it may never
        read: that is a flood, and a protocol error."""
        now = self.clock()
        if now - self._ping_window_start >= 1.0:
            self._ping_window_start = now
            self._pings_in_window = 0
        self._pings_in_window += 1
        if self._pings_in_window > MAX_PINGS_PER_SECOND:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR,
                                f"ping flood: more than {MAX_PINGS_PER_SECOND} PINGs in a second")

    def _receive_pong(self, frame: Frame, events: list[Event]) -> None:
        ping_id = decode_ping(frame.payload)
        sent_at = self._pings.get(ping_id)
        if sent_at is None:
            return  # unsolicited PONG: harmless, ignored
        # The channel is ordered: every older ping was answered (or is lost with it).
        while self._pings:
            key, _ = self._pings.popitem(last=False)
            if key == self._drain_ping:
                self._drain_seen_by_peer = True
            if key == ping_id:
                break
        self._last_rtt = max(0.0, self.clock() - sent_at)
        events.append(PongReceived(self._last_rtt))

    # -- sending -----------------------------------------------------------------

    def _queue(self, ftype: FrameType, flags: int = 0, stream_id: int = 0,
               payload: bytes | memoryview = b"") -> None:
        # What Frame(...).serialize() makes, without the Frame: every field is ours and in range.
        data = _pack_header(ftype, flags, stream_id, len(payload)) + payload
        self._outgoing.append(data)
        self._outgoing_size += len(data)

    def _check_open(self) -> None:
        if self._closed:
            raise TunnelClosedError("the tunnel is closed")

    def _check_role(self, role: Role, what: str) -> None:
        if self.role is not role:
            raise LocalProtocolError(f"the {self.role.value} cannot {what}")

    def send_hello(self, site_code: str, connection_point: str, roles: Sequence[PublishedRole]) -> None:
        """Queue HELLO (connector only, first frame).

        Raises LocalProtocolError for the gateway or a second HELLO, TunnelClosedError if closed.
        """
        self._check_role(Role.CONNECTOR, "send HELLO")
        self._check_open()
        if self._hello_sent:
            raise LocalProtocolError("HELLO already sent")
        payload = encode_hello(site_code, connection_point, roles, self.limits.settings())
        self._queue(FrameType.HELLO, 0, 0, payload)
        self._hello_sent = True

    def send_welcome(self, instance: str) -> None:
        """Queue WELCOME (gateway only, after HelloReceived).

        Raises LocalProtocolError for the connector, before HELLO or a second time;
        TunnelClosedError if closed.
        """
        self._check_role(Role.GATEWAY, "send WELCOME")
        self._check_open()
        if self._peer_hello is None:
            raise LocalProtocolError("WELCOME before HELLO was received")
        if self._welcome_sent:
            raise LocalProtocolError("WELCOME already sent")
        self._queue(FrameType.WELCOME, 0, 0, encode_welcome(instance, self.limits.settings()))
        self._welcome_sent = True

    def _peer(self) -> Settings:
        if not self.handshake_done or self._peer_settings is None:
            raise LocalProtocolError("the handshake is not done")
        return self._peer_settings

    def open_stream(
        self, method: str, target: str, headers: Sequence[tuple[bytes, bytes]], end_stream: bool = False
    ) -> int:
        """Queue a request head on a new stream (gateway only); return its id.

        Raises LocalProtocolError (wrong role, before the handshake, invalid or too
        large head, ids exhausted), DrainingError (either side drains),
        TooManyStreamsError (the peer's max_concurrent_streams), TunnelClosedError.
        """
        self._check_role(Role.GATEWAY, "open streams")
        self._check_open()
        peer = self._peer()
        if self._local_draining or self._peer_draining:
            raise DrainingError("the tunnel is draining: " + ("we" if self._local_draining else "the peer") + " drain")
        if len(self._streams) >= peer.max_concurrent_streams:
            raise TooManyStreamsError(f"{len(self._streams)} streams open, the peer accepts {peer.max_concurrent_streams}")
        head = encode_request_head(method, target, headers)
        if len(head) > peer.max_header_size:
            raise LocalProtocolError(f"request head of {len(head)} bytes above the peer's max_header_size {peer.max_header_size}")
        stream_id = self._next_stream_id
        if stream_id > MAX_STREAM_ID:
            raise LocalProtocolError("stream ids exhausted; open a new tunnel")
        self._next_stream_id += 2
        stream = self._streams[stream_id] = _Stream(stream_id, peer.stream_window, self.limits.stream_window)
        stream.local_open = not end_stream
        stream.head_sent = True
        self._queue(FrameType.HEADERS, END_STREAM if end_stream else 0, stream_id, head)
        return stream_id

    def _sending_stream(self, stream_id: int) -> _Stream:
        self._check_open()
        stream = self._streams.get(stream_id)
        if stream is None or not stream.local_open:
            raise StreamClosedError(f"stream {stream_id} is closed for sending")
        return stream

    def send_response(
        self,
        stream_id: int,
        status: int,
        reason: str,
        headers: Sequence[tuple[bytes, bytes]],
        end_stream: bool = False,
    ) -> None:
        """Queue the response head of a stream (connector only).

        Raises LocalProtocolError (wrong role, head already sent, invalid or too large
        head), StreamClosedError, TunnelClosedError.
        """
        self._check_role(Role.CONNECTOR, "send responses")
        stream = self._sending_stream(stream_id)
        peer = self._peer()
        if stream.head_sent:
            raise LocalProtocolError(f"response already sent on stream {stream_id}")
        head = encode_response_head(status, reason, headers)
        if len(head) > peer.max_header_size:
            raise LocalProtocolError(
                f"response head of {len(head)} bytes above the peer's max_header_size {peer.max_header_size}"
            )
        stream.head_sent = True
        self._queue(FrameType.HEADERS, END_STREAM if end_stream else 0, stream_id, head)
        if end_stream:
            stream.local_open = False
            self._forget_if_closed(stream)

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> None:
        """Queue body bytes, split into frames of at most the peer's max_frame_size.
        ``data`` is copied into the frames before this returns (a memoryview saves the
        caller a copy of its own).

        Raises FlowControlError if ``len(data) > available_window(stream_id)``,
        StreamClosedError if our side of the stream is closed, LocalProtocolError
        before the connector sent the response head, TunnelClosedError.
        """
        stream = self._sending_stream(stream_id)
        peer = self._peer()
        if not stream.head_sent:
            raise LocalProtocolError(f"DATA before the response head on stream {stream_id}")
        size = len(data)
        if size > self.available_window(stream_id):
            raise FlowControlError(
                f"{size} bytes exceed the window of stream {stream_id} ({self.available_window(stream_id)} available)"
            )
        stream.send_window -= size
        self._tunnel_send_window -= size
        view = memoryview(data)
        step = peer.max_frame_size
        for offset in range(0, size, step):
            chunk = view[offset : offset + step]  # copied once, by _queue's concatenation
            last = offset + step >= size
            self._queue(FrameType.DATA, END_STREAM if (last and end_stream) else 0, stream_id, chunk)
        if end_stream:
            if size == 0:
                self._queue(FrameType.DATA, END_STREAM, stream_id, b"")
            stream.local_open = False
            self._forget_if_closed(stream)

    def end_stream(self, stream_id: int) -> None:
        """Queue an empty DATA frame with END_STREAM. Raises like send_data()."""
        self.send_data(stream_id, b"", end_stream=True)

    def acknowledge_received_data(self, stream_id: int, n: int) -> None:
        """The application consumed ``n`` bytes of the stream: return the credit.

        Updates are batched (see _should_return): a WINDOW_UPDATE goes out once the
        credit to return reaches a quarter of the window, or earlier when the peer is
        running out of credit. Acknowledging a
        stream closed after its END_STREAM still returns the tunnel credit. Do not
        acknowledge bytes of a stream that was reset (they were returned already).
        Raises LocalProtocolError for a negative ``n`` or more than was received.
        """
        if self._closed or n == 0:
            return
        if n < 0 or n > self._tunnel_outstanding:
            raise LocalProtocolError(f"cannot acknowledge {n} bytes ({self._tunnel_outstanding} unacknowledged)")
        stream = self._streams.get(stream_id)
        if stream is not None:
            if n > stream.outstanding:
                raise LocalProtocolError(
                    f"cannot acknowledge {n} bytes on stream {stream_id} ({stream.outstanding} unacknowledged)"
                )
            stream.outstanding -= n
            if stream.remote_open:
                stream.unacked += n
                if _should_return(stream.unacked, stream.recv_window, self.limits.stream_window):
                    self._queue(FrameType.WINDOW_UPDATE, 0, stream_id, encode_window_update(stream.unacked))
                    stream.recv_window += stream.unacked
                    stream.unacked = 0
        self._tunnel_outstanding -= n
        self._tunnel_unacked += n
        self._maybe_update_tunnel_window()

    def _maybe_update_tunnel_window(self) -> None:
        unacked = self._tunnel_unacked
        if _should_return(unacked, self._tunnel_recv_window, self.limits.tunnel_window):
            self._queue(FrameType.WINDOW_UPDATE, 0, 0, encode_window_update(unacked))
            self._tunnel_recv_window += unacked
            self._tunnel_unacked = 0

    def _return_outstanding(self, stream: _Stream) -> None:
        # The application drops what it buffered for a reset stream: credit it back.
        if stream.outstanding:
            self._tunnel_outstanding -= stream.outstanding
            self._tunnel_unacked += stream.outstanding
            stream.outstanding = 0
            self._maybe_update_tunnel_window()

    def _remember_reset(self, stream_id: int) -> None:
        self._recently_reset[stream_id] = None
        if len(self._recently_reset) > RECENTLY_RESET_MEMORY:
            self._recently_reset.popitem(last=False)

    def _forget_if_closed(self, stream: _Stream) -> None:
        if not stream.local_open and not stream.remote_open:
            del self._streams[stream.stream_id]

    def reset_stream(self, stream_id: int, code: ErrorCode, reason: str = "") -> None:
        """Queue RESET and forget the stream; a no-op if it is already closed.

        Its received but unacknowledged bytes are credited back to the tunnel, unless the
        peer had ended its side (END_STREAM): a complete body stays the application's,
        to acknowledge as it reads it or drops it.
        """
        if self._closed:
            return
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        self._queue(FrameType.RESET, 0, stream_id, encode_reset(code, reason))
        if stream.remote_open:
            self._remember_reset(stream_id)
            self._return_outstanding(stream)

    def ping(self) -> None:
        """Queue a PING; its PONG yields PongReceived(rtt).

        Raises LocalProtocolError before the handshake, TunnelClosedError if closed.
        """
        self._check_open()
        self._peer()
        self._ping_counter += 1
        ping_id = self._ping_counter.to_bytes(8, "big")
        self._pings[ping_id] = self.clock()
        self._queue(FrameType.PING, 0, 0, ping_id)

    def drain(self) -> None:
        """Queue DRAIN (once): the peer must open no new stream; ours in flight go on.

        A PING follows the DRAIN. Streams the peer opened before it read the DRAIN
        (they arrive before that PING's PONG) are served as usual; streams arriving
        after the PONG are refused with RESET REFUSED_STREAM (never processed, so the
        peer may retry them elsewhere). This is HTTP/2's GOAWAY-then-PING shutdown.
        Raises LocalProtocolError before the handshake; a no-op once closed.
        """
        if self._closed or self._local_draining:
            return
        self._peer()
        self._local_draining = True
        self._queue(FrameType.DRAIN)
        self.ping()
        self._drain_ping = next(reversed(self._pings))

    def close(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Queue CLOSE and move to CLOSED (every stream is gone). A no-op once closed."""
        if self._closed:
            return
        self._queue(FrameType.CLOSE, 0, 0, encode_close(code, reason))
        self._closed = True
        self._streams.clear()
