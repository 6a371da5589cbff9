"""Property tests: arbitrary input only ever raises ProtocolError; chunking never matters."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnel import ErrorCode, Frame, FrameParser, FrameType, Limits, ProtocolError, Role, TunnelProtocol
from tunnel.frames import encode_request_head, encode_reset, encode_response_head, encode_window_update

from tunnel_helpers import ROLES, handshake

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SMALL = Limits(max_frame_size=256, max_header_size=512, stream_window=1024, tunnel_window=4096, max_concurrent_streams=4)


def _fresh(role: Role, after_handshake: bool) -> TunnelProtocol:
    if not after_handshake:
        protocol = TunnelProtocol(role, SMALL)
        if role is Role.CONNECTOR:
            protocol.send_hello("ABC", "cp1", ROLES)
        return protocol
    gateway, connector = handshake(SMALL, SMALL)
    if role is Role.GATEWAY:
        gateway.open_stream("GET", "/", [])  # a stream to aim at
        return gateway
    return connector


def _feed_chunks(protocol: TunnelProtocol, chunks: list[bytes]) -> None:
    for chunk in chunks:
        try:
            protocol.receive_data(chunk)
        except ProtocolError as exc:
            assert isinstance(exc.code, ErrorCode)
            assert protocol.closed
            return
        if protocol.closed:
            return


# Frames that are plausible enough to get past the header checks, mixed with noise.
_stream_ids = st.sampled_from([0, 1, 2, 3, 5, 2**31 - 1])
_frame = st.one_of(
    st.builds(
        lambda sid, end, body: Frame(FrameType.DATA, int(end), sid, body),
        _stream_ids,
        st.booleans(),
        st.binary(max_size=300),
    ),
    st.builds(
        lambda sid, end: Frame(FrameType.HEADERS, int(end), sid, encode_request_head("GET", "/x", [(b"A", b"b")])),
        _stream_ids,
        st.booleans(),
    ),
    st.builds(
        lambda sid, end: Frame(FrameType.HEADERS, int(end), sid, encode_response_head(200, "OK", [])),
        _stream_ids,
        st.booleans(),
    ),
    st.builds(
        lambda sid, inc: Frame(FrameType.WINDOW_UPDATE, 0, sid, encode_window_update(inc)),
        _stream_ids,
        st.integers(1, 2**31 - 1),
    ),
    st.builds(lambda sid: Frame(FrameType.RESET, 0, sid, encode_reset(ErrorCode.CANCEL)), _stream_ids),
    st.builds(lambda p: Frame(FrameType.PING, 0, 0, p), st.binary(min_size=8, max_size=8)),
    st.builds(lambda p: Frame(FrameType.PONG, 0, 0, p), st.binary(min_size=8, max_size=8)),
    st.just(Frame(FrameType.DRAIN)),
    st.builds(lambda t, p: Frame(t, 0, 0, p), st.sampled_from([FrameType.HELLO, FrameType.WELCOME]), st.binary(max_size=64)),
)
_valid_frame = st.one_of(
    st.builds(
        lambda sid, end, body: Frame(FrameType.DATA, int(end), sid, body),
        st.integers(1, 2**31 - 1),
        st.booleans(),
        st.binary(max_size=1024),
    ),
    st.builds(
        lambda sid, end, method, headers: Frame(
            FrameType.HEADERS, int(end), sid, encode_request_head(method, "/p?q", headers)
        ),
        st.integers(1, 2**31 - 1),
        st.booleans(),
        st.sampled_from(["GET", "CCM_POST", "BITS_POST", "PROPFIND"]),
        st.lists(st.tuples(st.sampled_from([b"A", b"Host", b"x-y"]), st.binary(max_size=20).map(
            lambda v: v.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b""))), max_size=5),
    ),
    st.builds(
        lambda sid, inc: Frame(FrameType.WINDOW_UPDATE, 0, sid, encode_window_update(inc)),
        st.integers(0, 2**31 - 1),
        st.integers(1, 2**31 - 1),
    ),
    st.builds(
        lambda sid, code, reason: Frame(FrameType.RESET, 0, sid, encode_reset(code, reason)),
        st.integers(1, 2**31 - 1),
        st.sampled_from(list(ErrorCode)),
        st.text(max_size=30),
    ),
    st.builds(lambda t, p: Frame(t, 0, 0, p), st.sampled_from([FrameType.PING, FrameType.PONG]), st.binary(min_size=8, max_size=8)),
    st.just(Frame(FrameType.DRAIN)),
    st.builds(lambda t, p: Frame(t, 0, 0, p), st.sampled_from([FrameType.HELLO, FrameType.WELCOME]), st.binary(max_size=64)),
)
_noise = st.one_of(
    st.binary(max_size=40),
    st.lists(_frame, max_size=12).map(lambda fs: b"".join(f.serialize() for f in fs)),
)


@SETTINGS
@given(
    role=st.sampled_from(list(Role)),
    after_handshake=st.booleans(),
    chunks=st.lists(_noise, max_size=8),
)
def test_arbitrary_input_only_raises_protocol_error(role: Role, after_handshake: bool, chunks: list[bytes]) -> None:
    protocol = _fresh(role, after_handshake)
    _feed_chunks(protocol, chunks)
    # whatever happened, the queued output is made of well-formed frames
    parser = FrameParser(1 << 24, 1 << 24)
    for chunk in protocol.data_to_send():
        parser.feed(chunk)
    assert parser.pending == 0


@SETTINGS
@given(role=st.sampled_from(list(Role)), after_handshake=st.booleans(), data=st.binary(max_size=2000))
def test_arbitrary_bytes_only_raise_protocol_error(role: Role, after_handshake: bool, data: bytes) -> None:
    protocol = _fresh(role, after_handshake)
    _feed_chunks(protocol, [data])


@SETTINGS
@given(frames=st.lists(_valid_frame, max_size=20), cuts=st.lists(st.integers(0, 10_000), max_size=20))
def test_split_input_parses_like_whole_input(frames: list[Frame], cuts: list[int]) -> None:
    data = b"".join(f.serialize() for f in frames)
    whole = FrameParser(1024, 1024).feed(data)
    assert whole == frames
    assert b"".join(f.serialize() for f in whole) == data
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    parser = FrameParser(1024, 1024)
    split: list[Frame] = []
    for start, end in zip(points, points[1:]):
        split += parser.feed(data[start:end])
    assert split == frames and parser.pending == 0


@SETTINGS
@given(
    bodies=st.lists(st.binary(max_size=3000), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 100_000), max_size=30),
)
def test_protocol_events_independent_of_chunking(bodies: list[bytes], cuts: list[int]) -> None:
    """A valid exchange produces the same events however the bytes are split."""
    gateway, connector = handshake(SMALL, SMALL)
    for body in bodies:
        sid = gateway.open_stream("POST", "/upload", [(b"Content-Length", str(len(body)).encode())])
        gateway.send_data(sid, body[:1024], end_stream=True)
    data = b"".join(gateway.data_to_send())

    def events_for(chunks: list[bytes]) -> list[object]:
        _, receiver = handshake(SMALL, SMALL)
        out: list[object] = []
        for chunk in chunks:
            out += receiver.receive_data(chunk)
        return out

    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    assert events_for([data]) == events_for([data[a:b] for a, b in zip(points, points[1:])])
