"""TunnelProtocol: two instances wired back to back, bytes only."""

from __future__ import annotations

import pytest

from tunnel import (
    DataReceived,
    DrainingError,
    DrainReceived,
    ErrorCode,
    FlowControlError,
    Frame,
    FrameType,
    HelloReceived,
    Limits,
    LocalProtocolError,
    PingReceived,
    PongReceived,
    ProtocolError,
    RequestReceived,
    ResponseReceived,
    Role,
    StreamClosedError,
    StreamReset,
    TooManyStreamsError,
    TunnelClosed,
    TunnelClosedError,
    TunnelProtocol,
    WelcomeReceived,
    WindowUpdated,
)
from tunnel.frames import (
    decode_close,
    decode_reset,
    decode_window_update,
    encode_request_head,
    encode_response_head,
    encode_window_update,
    parse_frame,
)

from tunnel_helpers import ROLES, FakeClock, handshake, pump, transfer

HEADERS = [(b"Host", b"cmg.contoso.com"), (b"X-Dup", b"1"), (b"X-Dup", b"2")]


def frames_of(protocol: TunnelProtocol) -> list[Frame]:
    return [parse_frame(chunk, 1 << 24, 1 << 24) for chunk in protocol.data_to_send()]


def closing_frame(protocol: TunnelProtocol) -> tuple[ErrorCode, str]:
    frames = frames_of(protocol)
    assert frames[-1].type is FrameType.CLOSE
    return decode_close(frames[-1].payload)


# -- handshake ----------------------------------------------------------------------


def test_handshake_events_and_settings() -> None:
    gateway = TunnelProtocol(Role.GATEWAY)
    connector = TunnelProtocol(Role.CONNECTOR, Limits(stream_window=4096))
    connector.send_hello("ABC", "cp1", ROLES)
    events = transfer(connector, gateway)
    assert events == [HelloReceived("ABC", "cp1", ROLES, Limits(stream_window=4096).settings())]
    assert gateway.peer_hello == events[0]
    assert not gateway.handshake_done
    gateway.send_welcome("instance-3")
    events = transfer(gateway, connector)
    assert events == [WelcomeReceived("instance-3", Limits().settings())]
    assert gateway.handshake_done and connector.handshake_done
    assert connector.peer_settings == Limits().settings()
    assert gateway.peer_settings is not None and gateway.peer_settings.stream_window == 4096


def test_frame_before_hello_is_a_protocol_error() -> None:
    gateway = TunnelProtocol(Role.GATEWAY)
    with pytest.raises(ProtocolError) as info:
        gateway.receive_data(Frame(FrameType.PING, 0, 0, b"12345678").serialize())
    assert info.value.code is ErrorCode.PROTOCOL_ERROR
    assert "before HELLO" in info.value.reason
    assert gateway.closed
    assert closing_frame(gateway)[0] is ErrorCode.PROTOCOL_ERROR
    with pytest.raises(ProtocolError):  # after CLOSED, any input is refused
        gateway.receive_data(b"")


def test_connector_rejects_frames_before_welcome() -> None:
    connector = TunnelProtocol(Role.CONNECTOR)
    connector.send_hello("ABC", "cp1", ROLES)
    connector.data_to_send()
    headers = Frame(FrameType.HEADERS, 0, 1, encode_request_head("GET", "/", [])).serialize()
    with pytest.raises(ProtocolError, match="before WELCOME"):
        connector.receive_data(headers)


def test_welcome_before_hello_sent_and_second_hello_rejected() -> None:
    gateway, connector = handshake()
    fresh = TunnelProtocol(Role.CONNECTOR)
    gateway2 = TunnelProtocol(Role.GATEWAY)
    connector2 = TunnelProtocol(Role.CONNECTOR)
    connector2.send_hello("ABC", "cp1", ROLES)
    transfer(connector2, gateway2)
    gateway2.send_welcome("i")
    with pytest.raises(ProtocolError, match="before we sent HELLO"):
        transfer(gateway2, fresh)
    connector3 = TunnelProtocol(Role.CONNECTOR)
    connector3.send_hello("ABC", "cp1", ROLES)
    with pytest.raises(ProtocolError, match="HELLO frame received by the gateway after HELLO"):
        transfer(connector3, gateway)


def test_role_misuse_is_local() -> None:
    gateway, connector = handshake()
    with pytest.raises(LocalProtocolError):
        connector.open_stream("GET", "/", [])
    with pytest.raises(LocalProtocolError):
        gateway.send_hello("ABC", "cp1", ROLES)
    with pytest.raises(LocalProtocolError):
        connector.send_welcome("x")
    with pytest.raises(LocalProtocolError):
        gateway.send_response(1, 200, "OK", [])
    with pytest.raises(LocalProtocolError):
        gateway.send_welcome("again")
    early = TunnelProtocol(Role.GATEWAY)
    with pytest.raises(LocalProtocolError):
        early.send_welcome("x")
    with pytest.raises(LocalProtocolError):
        early.open_stream("GET", "/", [])
    with pytest.raises(LocalProtocolError):
        early.ping()


# -- request / response ---------------------------------------------------------------


def test_request_response_with_bodies() -> None:
    gateway, connector = handshake()
    sid = gateway.open_stream("CCM_POST", "/ccm_system/request", HEADERS)
    assert sid == 1
    gateway.send_data(sid, b"hello ", end_stream=False)
    gateway.send_data(sid, b"world", end_stream=True)
    g_events, c_events = pump(gateway, connector)
    assert c_events == [
        RequestReceived(1, "CCM_POST", "/ccm_system/request", tuple(HEADERS), False),
        DataReceived(1, b"hello ", False),
        DataReceived(1, b"world", True),
    ]
    connector.acknowledge_received_data(1, 11)
    connector.send_response(1, 200, "OK", [(b"Content-Type", b"text/plain")])
    connector.send_data(1, b"reply", end_stream=True)
    g_events, c_events = pump(gateway, connector)
    assert g_events == [
        ResponseReceived(1, 200, "OK", ((b"Content-Type", b"text/plain"),), False),
        DataReceived(1, b"reply", True),
    ]
    assert gateway.open_streams == 0 and connector.open_streams == 0
    assert not gateway.stream_is_open(1)
    # acknowledging a stream that is gone still returns tunnel credit
    gateway.acknowledge_received_data(1, 5)
    with pytest.raises(StreamClosedError):
        gateway.send_data(1, b"late")
    assert gateway.available_window(1) == 0
    assert gateway.open_stream("GET", "/next", []) == 3


def test_response_with_end_stream_on_headers_and_empty_request() -> None:
    gateway, connector = handshake()
    sid = gateway.open_stream("GET", "/SMS_MP/.sms_aut?MPLIST", [], end_stream=True)
    _, c_events = pump(gateway, connector)
    assert c_events == [RequestReceived(sid, "GET", "/SMS_MP/.sms_aut?MPLIST", (), True)]
    connector.send_response(sid, 204, "No Content", [], end_stream=True)
    g_events, _ = pump(gateway, connector)
    assert g_events == [ResponseReceived(sid, 204, "No Content", (), True)]
    assert gateway.open_streams == connector.open_streams == 0


def test_send_data_splits_at_peer_max_frame_size() -> None:
    gateway, connector = handshake(connector_limits=Limits(max_frame_size=1000))
    sid = gateway.open_stream("PUT", "/x", [])
    gateway.data_to_send()
    gateway.send_data(sid, b"a" * 2500, end_stream=True)
    frames = frames_of(gateway)
    assert [len(f.payload) for f in frames] == [1000, 1000, 500]
    assert [f.end_stream for f in frames] == [False, False, True]


def test_data_before_response_head_and_second_head() -> None:
    gateway, connector = handshake()
    sid = gateway.open_stream("GET", "/", [], end_stream=True)
    pump(gateway, connector)
    with pytest.raises(LocalProtocolError):
        connector.send_data(sid, b"x")
    # crafted: DATA before response HEADERS
    bad = Frame(FrameType.DATA, 0, sid, b"x").serialize()
    with pytest.raises(ProtocolError, match="before the response HEADERS"):
        gateway.receive_data(bad)


def test_second_response_headers_is_protocol_error() -> None:
    gateway, connector = handshake()
    sid = gateway.open_stream("GET", "/", [], end_stream=True)
    pump(gateway, connector)
    connector.send_response(sid, 200, "OK", [])
    pump(gateway, connector)
    again = Frame(FrameType.HEADERS, 0, sid, encode_response_head(200, "OK", [])).serialize()
    with pytest.raises(ProtocolError, match="second response HEADERS") as info:
        gateway.receive_data(again)
    assert info.value.code is ErrorCode.PROTOCOL_ERROR


def test_request_headers_from_connector_side_direction_errors() -> None:
    gateway, connector = handshake()
    # The connector never opens streams: request HEADERS on a new id are a protocol error.
    crafted = Frame(FrameType.HEADERS, 0, 1, encode_request_head("GET", "/", [])).serialize()
    with pytest.raises(ProtocolError) as info:
        gateway.receive_data(crafted)
    assert info.value.code is ErrorCode.PROTOCOL_ERROR


def test_second_request_headers_on_open_stream() -> None:
    gateway, connector = handshake()
    sid = gateway.open_stream("GET", "/", [])
    pump(gateway, connector)
    crafted = Frame(FrameType.HEADERS, 0, sid, encode_request_head("GET", "/", [])).serialize()
    with pytest.raises(ProtocolError, match="second request HEADERS"):
        connector.receive_data(crafted)


def test_stream_id_reuse_and_even_ids_are_errors() -> None:
    gateway, connector = handshake()
    for sid in (1, 3):
        connector.receive_data(Frame(FrameType.HEADERS, 1, sid, encode_request_head("GET", "/", [])).serialize())
        connector.send_response(sid, 200, "OK", [], end_stream=True)
    assert connector.open_streams == 0
    with pytest.raises(ProtocolError, match="reused") as info:
        connector.receive_data(Frame(FrameType.HEADERS, 1, 1, encode_request_head("GET", "/", [])).serialize())
    assert info.value.code is ErrorCode.PROTOCOL_ERROR
    _, connector = handshake()
    with pytest.raises(ProtocolError, match="even stream id"):
        connector.receive_data(Frame(FrameType.HEADERS, 1, 2, encode_request_head("GET", "/", [])).serialize())


def test_data_after_end_stream_is_stream_closed() -> None:
    gateway, connector = handshake()
    sid = gateway.open_stream("POST", "/", [])
    gateway.send_data(sid, b"body", end_stream=True)
    pump(gateway, connector)
    assert connector.stream_is_open(sid)  # half-closed (remote)
    with pytest.raises(ProtocolError) as info:
        connector.receive_data(Frame(FrameType.DATA, 0, sid, b"more").serialize())
    assert info.value.code is ErrorCode.STREAM_CLOSED


def test_data_on_forgotten_stream_is_stream_closed() -> None:
    gateway, connector = handshake()
    sid = gateway.open_stream("GET", "/", [], end_stream=True)
    pump(gateway, connector)
    connector.send_response(sid, 200, "OK", [], end_stream=True)
    pump(gateway, connector)
    with pytest.raises(ProtocolError) as info:
        connector.receive_data(Frame(FrameType.DATA, 0, sid, b"x").serialize())
    assert info.value.code is ErrorCode.STREAM_CLOSED


def test_data_on_never_opened_stream() -> None:
    gateway, connector = handshake()
    with pytest.raises(ProtocolError, match="never opened") as info:
        connector.receive_data(Frame(FrameType.DATA, 0, 7, b"x").serialize())
    assert info.value.code is ErrorCode.PROTOCOL_ERROR


def test_header_too_large_local_and_remote() -> None:
    gateway, connector = handshake(connector_limits=Limits(max_header_size=1024))
    with pytest.raises(LocalProtocolError, match="max_header_size"):
        gateway.open_stream("GET", "/", [(b"X-Big", b"v" * 2000)])
    head = encode_request_head("GET", "/", [(b"X-Big", b"v" * 2000)])
    with pytest.raises(ProtocolError) as info:
        connector.receive_data(Frame(FrameType.HEADERS, 0, 1, head).serialize())
    assert info.value.code is ErrorCode.HEADER_TOO_LARGE


def test_invalid_head_on_send_is_local_error() -> None:
    gateway, connector = handshake()
    with pytest.raises(LocalProtocolError):
        gateway.open_stream("GE T", "/", [])
    with pytest.raises(LocalProtocolError):
        gateway.open_stream("GET", "no-slash", [])
    with pytest.raises(LocalProtocolError):
        gateway.open_stream("GET", "/", [(b"X", b"a\r\nb")])
    assert gateway.open_streams == 0


# -- flow control ---------------------------------------------------------------------


def test_sender_blocked_at_window_and_unblocked_by_ack() -> None:
    limits = Limits(stream_window=1000, tunnel_window=10_000, max_frame_size=512)
    gateway, connector = handshake(connector_limits=limits)
    sid = gateway.open_stream("POST", "/upload", [])
    assert gateway.available_window(sid) == 1000
    gateway.send_data(sid, b"x" * 1000)
    assert gateway.available_window(sid) == 0
    with pytest.raises(FlowControlError):
        gateway.send_data(sid, b"y")
    _, c_events = pump(gateway, connector)
    assert sum(len(e.data) for e in c_events if isinstance(e, DataReceived)) == 1000
    # small acknowledgements are batched: nothing goes out for 100 bytes of 1000
    connector.acknowledge_received_data(sid, 100)
    assert connector.data_to_send() == []
    connector.acknowledge_received_data(sid, 200)  # 300 >= window / 4
    g_events, _ = pump(gateway, connector)
    assert WindowUpdated(sid) in g_events
    assert gateway.available_window(sid) == 300
    connector.acknowledge_received_data(sid, 700)
    pump(gateway, connector)
    assert gateway.available_window(sid) == 1000


def test_tiny_acks_do_not_flood_frames() -> None:
    gateway, connector = handshake()
    sid = gateway.open_stream("POST", "/", [])
    gateway.send_data(sid, b"z" * 100_000)
    pump(gateway, connector)
    for _ in range(100_000):
        connector.acknowledge_received_data(sid, 1)
    assert connector.data_to_send() == []


def test_tunnel_window_limits_all_streams() -> None:
    limits = Limits(stream_window=1000, tunnel_window=1500)
    gateway, connector = handshake(connector_limits=limits)
    a = gateway.open_stream("POST", "/a", [])
    b = gateway.open_stream("POST", "/b", [])
    gateway.send_data(a, b"a" * 1000)
    assert gateway.available_window(b) == 500
    gateway.send_data(b, b"b" * 500)
    assert gateway.available_window(a) == gateway.available_window(b) == 0
    pump(gateway, connector)
    connector.acknowledge_received_data(b, 500)  # stream b's reader is fast; a's is stuck
    g_events, _ = pump(gateway, connector)
    assert WindowUpdated(0) in g_events
    assert gateway.available_window(b) == 500


def test_over_window_data_from_crafted_peer() -> None:
    gateway, connector = handshake(connector_limits=Limits(stream_window=100, max_frame_size=1024))
    sid = gateway.open_stream("POST", "/", [])
    pump(gateway, connector)
    with pytest.raises(ProtocolError) as info:
        connector.receive_data(Frame(FrameType.DATA, 0, sid, b"x" * 101).serialize())
    assert info.value.code is ErrorCode.FLOW_CONTROL_ERROR
    assert closing_frame(connector)[0] is ErrorCode.FLOW_CONTROL_ERROR


def test_over_tunnel_window_data_from_crafted_peer() -> None:
    limits = Limits(stream_window=1000, tunnel_window=1500)
    gateway, connector = handshake(connector_limits=limits)
    a = gateway.open_stream("POST", "/a", [])
    b = gateway.open_stream("POST", "/b", [])
    pump(gateway, connector)
    connector.receive_data(Frame(FrameType.DATA, 0, a, b"x" * 1000).serialize())
    with pytest.raises(ProtocolError) as info:
        connector.receive_data(Frame(FrameType.DATA, 0, b, b"x" * 501).serialize())
    assert info.value.code is ErrorCode.FLOW_CONTROL_ERROR


def test_window_update_overflow() -> None:
    gateway, connector = handshake()
    sid = gateway.open_stream("GET", "/", [])
    pump(gateway, connector)
    for stream_id in (0, sid):
        _, connector = handshake()
        if stream_id:
            connector.receive_data(Frame(FrameType.HEADERS, 0, sid, encode_request_head("GET", "/", [])).serialize())
        big = Frame(FrameType.WINDOW_UPDATE, 0, stream_id, encode_window_update(2**31 - 1)).serialize()
        with pytest.raises(ProtocolError) as info:
            connector.receive_data(big)
        assert info.value.code is ErrorCode.FLOW_CONTROL_ERROR


def test_acknowledging_too_much_is_local_error() -> None:
    gateway, connector = handshake()
    sid = gateway.open_stream("POST", "/", [])
    gateway.send_data(sid, b"abc")
    pump(gateway, connector)
    with pytest.raises(LocalProtocolError):
        connector.acknowledge_received_data(sid, 4)
    with pytest.raises(LocalProtocolError):
        connector.acknowledge_received_data(sid, -1)


# -- many streams, resets ---------------------------------------------------------------


def test_many_concurrent_streams_interleaved() -> None:
    gateway, connector = handshake()
    ids = [gateway.open_stream("GET", f"/item/{i}", []) for i in range(200)]
    for sid in ids:
        gateway.send_data(sid, f"req{sid}".encode(), end_stream=True)
    _, c_events = pump(gateway, connector)
    assert [e.stream_id for e in c_events if isinstance(e, RequestReceived)] == ids
    for sid in reversed(ids):
        connector.send_response(sid, 200, "OK", [])
        connector.send_data(sid, f"resp{sid}".encode(), end_stream=True)
    g_events, _ = pump(gateway, connector)
    bodies = {e.stream_id: e.data for e in g_events if isinstance(e, DataReceived)}
    assert bodies == {sid: f"resp{sid}".encode() for sid in ids}
    assert gateway.open_streams == connector.open_streams == 0


def test_reset_by_gateway() -> None:
    gateway, connector = handshake()
    sid = gateway.open_stream("GET", "/", [])
    pump(gateway, connector)
    gateway.reset_stream(sid, ErrorCode.CANCEL, "client went away")
    gateway.reset_stream(sid, ErrorCode.CANCEL)  # no-op on a closed stream
    _, c_events = pump(gateway, connector)
    assert c_events == [StreamReset(sid, ErrorCode.CANCEL, "client went away")]
    assert gateway.open_streams == connector.open_streams == 0
    with pytest.raises(StreamClosedError):
        connector.send_response(sid, 200, "OK", [])


def test_reset_by_connector() -> None:
    gateway, connector = handshake()
    sid = gateway.open_stream("GET", "/", [])
    pump(gateway, connector)
    connector.reset_stream(sid, ErrorCode.UPSTREAM_ERROR, "MP unreachable")
    g_events, _ = pump(gateway, connector)
    assert g_events == [StreamReset(sid, ErrorCode.UPSTREAM_ERROR, "MP unreachable")]
    assert gateway.open_streams == connector.open_streams == 0


def test_data_for_reset_stream_ignored_and_tunnel_credit_returned() -> None:
    limits = Limits(stream_window=1000, tunnel_window=2000)
    gateway, connector = handshake(gateway_limits=limits)
    sid = gateway.open_stream("GET", "/content", [], end_stream=True)
    pump(gateway, connector)
    connector.send_response(sid, 200, "OK", [])
    connector.send_data(sid, b"x" * 1000)
    in_flight = connector.data_to_send()
    gateway.reset_stream(sid, ErrorCode.CANCEL)  # reset while the data is in flight
    reset_bytes = gateway.data_to_send()
    events = []
    for chunk in in_flight:
        events += gateway.receive_data(chunk)
    assert events == []  # ignored
    # ... but its 1000 bytes were credited back to the tunnel
    updates = [f for f in frames_of(gateway) if f.type is FrameType.WINDOW_UPDATE]
    assert [(f.stream_id, decode_window_update(f.payload)) for f in updates] == [(0, 1000)]
    for chunk in reset_bytes:
        connector.receive_data(chunk)
    assert connector.open_streams == 0


def test_reset_returns_unconsumed_data_to_tunnel() -> None:
    limits = Limits(stream_window=1000, tunnel_window=1000)
    gateway, connector = handshake(gateway_limits=limits)
    sid = gateway.open_stream("GET", "/", [], end_stream=True)
    pump(gateway, connector)
    connector.send_response(sid, 200, "OK", [])
    connector.send_data(sid, b"x" * 1000)
    pump(gateway, connector)
    assert connector.available_window(sid) == 0
    gateway.reset_stream(sid, ErrorCode.CANCEL)  # the application never read those bytes
    pump(gateway, connector)
    sid2 = gateway.open_stream("GET", "/", [], end_stream=True)
    pump(gateway, connector)
    connector.send_response(sid2, 200, "OK", [])
    assert connector.available_window(sid2) == 1000


@pytest.mark.parametrize("who", ["peer", "local"])
def test_a_reset_after_the_peers_end_stream_leaves_the_complete_body_to_the_application(who: str) -> None:
    """A RESET after the peer's END_STREAM (a complete response, the rest of the request
    body unwanted) does not credit the body back: the application still holds it and
    acknowledges it as it reads (crediting it twice broke the tunnel's accounting)."""
    limits = Limits(stream_window=4000, tunnel_window=8000)
    gateway, connector = handshake(gateway_limits=limits)
    sid = gateway.open_stream("POST", "/", [])  # the request body is still to come
    pump(gateway, connector)
    connector.send_response(sid, 200, "OK", [])
    connector.send_data(sid, b"x" * 3000, end_stream=True)
    if who == "peer":
        connector.reset_stream(sid, ErrorCode.NO_ERROR)
        events = transfer(connector, gateway)  # all in one message
        assert [type(e).__name__ for e in events] == ["ResponseReceived", "DataReceived", "StreamReset"]
    else:
        transfer(connector, gateway)
        gateway.reset_stream(sid, ErrorCode.CANCEL)
    assert not gateway.stream_is_open(sid)
    assert gateway._tunnel_outstanding == 3000
    gateway.acknowledge_received_data(sid, 3000)  # read by the application
    assert gateway._tunnel_outstanding == 0
    with pytest.raises(LocalProtocolError):
        gateway.acknowledge_received_data(sid, 1)
    pump(gateway, connector)
    assert connector._tunnel_send_window == 8000  # every byte credited back, once


def test_window_update_and_reset_for_finished_stream_are_ignored() -> None:
    gateway, connector = handshake()
    sid = gateway.open_stream("GET", "/", [], end_stream=True)
    pump(gateway, connector)
    connector.send_response(sid, 200, "OK", [])
    connector.send_data(sid, b"x" * 10, end_stream=True)
    pump(gateway, connector)
    assert connector.open_streams == 0
    assert connector.receive_data(Frame(FrameType.WINDOW_UPDATE, 0, sid, encode_window_update(10)).serialize()) == []
    assert connector.receive_data(Frame(FrameType.RESET, 0, sid, b"\x00\x00\x00\x07").serialize()) == []


# -- drain -------------------------------------------------------------------------------


def test_drain_from_connector() -> None:
    gateway, connector = handshake()
    in_flight = gateway.open_stream("POST", "/", [])
    pump(gateway, connector)
    connector.drain()
    connector.drain()  # once only
    g_events, _ = pump(gateway, connector)
    assert g_events == [DrainReceived(), PingReceived()]  # the drain ping follows
    assert gateway.peer_draining and connector.local_draining
    with pytest.raises(DrainingError):
        gateway.open_stream("GET", "/", [])
    # the stream in flight still completes
    gateway.send_data(in_flight, b"body", end_stream=True)
    pump(gateway, connector)
    connector.send_response(in_flight, 200, "OK", [])
    connector.send_data(in_flight, b"done", end_stream=True)
    g_events, _ = pump(gateway, connector)
    assert DataReceived(in_flight, b"done", True) in g_events
    assert gateway.open_streams == connector.open_streams == 0


def test_stream_racing_a_drain_is_still_served() -> None:
    gateway, connector = handshake()
    connector.drain()
    drain_bytes = connector.data_to_send()  # DRAIN + PING, not yet delivered
    racing = gateway.open_stream("POST", "/", [])  # sent before the DRAIN arrived
    gateway.send_data(racing, b"x" * 100, end_stream=True)
    c_events = transfer(gateway, connector)
    assert RequestReceived(racing, "POST", "/", (), False) in c_events  # served, not refused
    for chunk in drain_bytes:
        gateway.receive_data(chunk)  # DrainReceived; PONG queued
    transfer(gateway, connector)  # the PONG: the gateway has seen the DRAIN
    connector.send_response(racing, 200, "OK", [], end_stream=True)
    g_events = transfer(connector, gateway)
    assert ResponseReceived(racing, 200, "OK", (), True) in g_events
    assert gateway.open_streams == connector.open_streams == 0


def test_stream_after_the_drain_was_acknowledged_is_refused() -> None:
    gateway, connector = handshake()
    connector.drain()
    transfer(connector, gateway)  # DRAIN + PING
    transfer(gateway, connector)  # PONG
    # A (misbehaving) gateway that opens a stream anyway: refused, never processed.
    gateway._peer_draining = False  # type: ignore[attr-defined]
    late = gateway.open_stream("GET", "/", [], end_stream=True)
    assert transfer(gateway, connector) == []
    g_events = transfer(connector, gateway)
    assert StreamReset(late, ErrorCode.REFUSED_STREAM, "") in g_events


def test_local_drain_on_gateway_blocks_new_streams() -> None:
    gateway, connector = handshake()
    gateway.drain()
    assert transfer(gateway, connector) == [DrainReceived(), PingReceived()]
    with pytest.raises(DrainingError):
        gateway.open_stream("GET", "/", [])


# -- ping, close --------------------------------------------------------------------------


def test_ping_pong_rtt_with_fake_clock() -> None:
    clock = FakeClock()
    gateway, connector = handshake(clock=clock)
    assert gateway.ping_outstanding_since is None and gateway.last_rtt is None
    gateway.ping()
    assert gateway.ping_outstanding_since == 1000.0
    clock.now += 0.25
    gateway.ping()
    assert gateway.ping_outstanding_since == 1000.0
    assert transfer(gateway, connector) == [PingReceived(), PingReceived()]
    clock.now += 0.5
    events = transfer(connector, gateway)
    assert events == [PongReceived(0.75), PongReceived(0.5)]
    assert gateway.last_rtt == 0.5
    assert gateway.ping_outstanding_since is None


def test_unsolicited_pong_is_ignored() -> None:
    gateway, connector = handshake()
    assert gateway.receive_data(Frame(FrameType.PONG, 0, 0, b"\x00" * 8).serialize()) == []


def test_close_propagation() -> None:
    gateway, connector = handshake()
    sid = gateway.open_stream("GET", "/", [])
    pump(gateway, connector)
    connector.close(ErrorCode.NO_ERROR, "connection point shutting down")
    assert connector.closed and connector.open_streams == 0
    events = transfer(connector, gateway)
    assert events == [TunnelClosed(ErrorCode.NO_ERROR, "connection point shutting down")]
    assert gateway.closed and gateway.open_streams == 0
    with pytest.raises(TunnelClosedError):
        gateway.send_data(sid, b"x")
    with pytest.raises(TunnelClosedError):
        gateway.open_stream("GET", "/", [])
    gateway.close()  # no-op
    assert gateway.data_to_send() == []


def test_bytes_after_close_frame_ignored_then_refused() -> None:
    gateway, connector = handshake()
    connector.close(ErrorCode.PROTOCOL_ERROR, "bye")
    data = b"".join(connector.data_to_send()) + b"\xff" * 20
    assert gateway.receive_data(data) == [TunnelClosed(ErrorCode.PROTOCOL_ERROR, "bye")]
    with pytest.raises(ProtocolError):
        gateway.receive_data(b"\x07")


# -- limits, memory -------------------------------------------------------------------------


def test_refused_stream_beyond_max_concurrent_streams() -> None:
    gateway, connector = handshake(connector_limits=Limits(max_concurrent_streams=2))
    gateway.open_stream("GET", "/1", [])
    gateway.open_stream("GET", "/2", [])
    with pytest.raises(TooManyStreamsError):
        gateway.open_stream("GET", "/3", [])
    # a gateway ignoring the limit gets REFUSED_STREAM, not a tunnel error
    pump(gateway, connector)
    crafted = Frame(FrameType.HEADERS, 0, 5, encode_request_head("GET", "/3", [])).serialize()
    assert connector.receive_data(crafted) == []
    frames = frames_of(connector)
    assert [(f.type, f.stream_id) for f in frames] == [(FrameType.RESET, 5)]
    assert decode_reset(frames[0].payload)[0] is ErrorCode.REFUSED_STREAM
    assert connector.open_streams == 2 and not connector.closed
    # its DATA in flight is ignored
    assert connector.receive_data(Frame(FrameType.DATA, 0, 5, b"x").serialize()) == []


def test_hundred_thousand_sequential_streams_leave_no_state() -> None:
    gateway, connector = handshake()
    for i in range(100_000):
        sid = gateway.open_stream("GET", "/", [], end_stream=True)
        for chunk in gateway.data_to_send():
            connector.receive_data(chunk)
        if i % 2:
            connector.send_response(sid, 200, "OK", [], end_stream=True)
        else:
            connector.reset_stream(sid, ErrorCode.UPSTREAM_ERROR)
        for chunk in connector.data_to_send():
            gateway.receive_data(chunk)
    assert gateway.open_streams == connector.open_streams == 0
    for protocol in (gateway, connector):
        assert len(protocol._streams) == 0
        assert len(protocol._recently_reset) <= 4096
        assert protocol._tunnel_outstanding == 0


def test_a_ping_flood_is_a_protocol_error() -> None:
    from tunnel.protocol import MAX_PINGS_PER_SECOND

    gateway, connector = handshake()
    for _ in range(MAX_PINGS_PER_SECOND):
        connector.ping()
    transfer(connector, gateway)  # as many as allowed: fine (the fake clock stands still)
    connector.ping()
    with pytest.raises(ProtocolError, match="ping flood"):
        transfer(connector, gateway)


def test_stream_events_are_values() -> None:
    """The per-stream events are plain classes (see tunnel/events.py), compared, hashed
    and shown by their fields as the frozen dataclasses they replaced."""
    head = RequestReceived(1, "GET", "/SMS_MP/.sms_aut?MPLIST", ((b"Accept", b"*/*"),), True)
    same = RequestReceived(1, "GET", "/SMS_MP/.sms_aut?MPLIST", ((b"Accept", b"*/*"),), True)
    assert head == same and hash(head) == hash(same) and len({head, same}) == 1
    for other in (RequestReceived(3, "GET", "/SMS_MP/.sms_aut?MPLIST", ((b"Accept", b"*/*"),), True),
                  RequestReceived(1, "GET", "/SMS_MP/.sms_aut?MPLIST", (), True),
                  RequestReceived(1, "GET", "/SMS_MP/.sms_aut?MPLIST", ((b"Accept", b"*/*"),), False),
                  ResponseReceived(1, 200, "OK", ((b"Accept", b"*/*"),), True)):
        assert head != other
    assert DataReceived(1, b"x", True) != DataReceived(1, b"y", True)
    assert WindowUpdated(0) == WindowUpdated(0) != WindowUpdated(1)
    assert WindowUpdated(0) != DataReceived(0, b"", False) and WindowUpdated(0) != 0
    assert StreamReset(1, ErrorCode.CANCEL, "gone") != StreamReset(1, ErrorCode.TIMEOUT, "gone")
    assert repr(DataReceived(5, b"ab", False)) == "DataReceived(stream_id=5, data=b'ab', end_stream=False)"
    assert repr(StreamReset(7, ErrorCode.CANCEL, "")).startswith("StreamReset(stream_id=7, code=<ErrorCode.CANCEL")
