"""Frames and payload encodings: byte-exact round trips and every validation rule."""

from __future__ import annotations

import json
import struct

import pytest

from tunnel import ErrorCode, Frame, FrameParser, FrameType, LocalProtocolError, ProtocolError, Settings
from tunnel.frames import (
    MAX_HANDSHAKE_SIZE,
    MAX_REASON_SIZE,
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
    parse_frame,
)
from tunnel.limits import Limits

from tunnel_helpers import ROLES

SETTINGS = Limits().settings()

REQUEST_HEAD = encode_request_head(
    "CCM_POST", "/ccm_system/request", [(b"Host", b"cmg"), (b"Content-Type", b"x"), (b"Host", b"dup")]
)
RESPONSE_HEAD = encode_response_head(200, "OK", [(b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")])

FRAMES = {
    "hello": Frame(FrameType.HELLO, 0, 0, encode_hello("ABC", "cp1", ROLES, SETTINGS)),
    "welcome": Frame(FrameType.WELCOME, 0, 0, encode_welcome("instance-0", SETTINGS)),
    "request": Frame(FrameType.HEADERS, 0, 1, REQUEST_HEAD),
    "request-end": Frame(FrameType.HEADERS, 1, 3, REQUEST_HEAD),
    "response": Frame(FrameType.HEADERS, 1, 1, RESPONSE_HEAD),
    "data": Frame(FrameType.DATA, 0, 5, b"\x00\x01body\xff"),
    "data-end-empty": Frame(FrameType.DATA, 1, 5, b""),
    "window-tunnel": Frame(FrameType.WINDOW_UPDATE, 0, 0, encode_window_update(65536)),
    "window-stream": Frame(FrameType.WINDOW_UPDATE, 0, 7, encode_window_update(2**31 - 1)),
    "reset": Frame(FrameType.RESET, 0, 9, encode_reset(ErrorCode.REFUSED_STREAM, "draining")),
    "ping": Frame(FrameType.PING, 0, 0, b"\x00" * 7 + b"\x01"),
    "pong": Frame(FrameType.PONG, 0, 0, b"\xff" * 8),
    "drain": Frame(FrameType.DRAIN, 0, 0, b""),
    "close": Frame(FrameType.CLOSE, 0, 0, encode_close(ErrorCode.TIMEOUT, "ping timeout ⏱")),
}


def feed_each_way(data: bytes) -> list[list[Frame]]:
    """Parse ``data`` whole and one byte at a time."""
    whole = FrameParser().feed(data)
    parser = FrameParser()
    bytewise: list[Frame] = []
    for i in range(len(data)):
        bytewise += parser.feed(data[i : i + 1])
    assert parser.pending == 0
    return [whole, bytewise]


@pytest.mark.parametrize("name", sorted(FRAMES))
def test_frame_round_trip(name: str) -> None:
    frame = FRAMES[name]
    data = frame.serialize()
    assert data[:10] == struct.pack("!BBII", frame.type, frame.flags, frame.stream_id, len(frame.payload))
    assert parse_frame(data) == frame
    assert parse_frame(data).serialize() == data
    for parsed in feed_each_way(data):
        assert parsed == [frame]


def test_all_frames_concatenated() -> None:
    frames = list(FRAMES.values())
    data = b"".join(f.serialize() for f in frames)
    for parsed in feed_each_way(data):
        assert parsed == frames
    assert b"".join(f.serialize() for f in FrameParser().feed(data)) == data


@pytest.mark.parametrize("name", sorted(FRAMES))
@pytest.mark.parametrize(
    "garbage",
    [b"\x04", b"\x04\x00\x00\x00\x00\x01\x00\x00", b"\x63" + b"\x00" * 9, b"\xff" * 10, b"\x04\x00\x00\x00\x00\x01\xff\xff\xff\xff"],
)
def test_trailing_garbage_is_pending_or_error(name: str, garbage: bytes) -> None:
    frame = FRAMES[name]
    parser = FrameParser()
    try:
        frames = parser.feed(frame.serialize() + garbage)
    except ProtocolError:
        return
    assert frames == [frame]
    assert parser.pending == len(garbage)
    # next_frame() separates the frame from what follows it
    lazy = FrameParser()
    lazy.append(frame.serialize() + garbage)
    assert lazy.next_frame() == frame


def test_parser_error_is_sticky() -> None:
    parser = FrameParser()
    with pytest.raises(ProtocolError):
        parser.feed(b"\x63" + b"\x00" * 9)
    with pytest.raises(ProtocolError):
        parser.feed(FRAMES["drain"].serialize())


def _header(type_: int, flags: int = 0, stream_id: int = 0, length: int = 0) -> bytes:
    return struct.pack("!BBII", type_, flags, stream_id, length)


@pytest.mark.parametrize(
    ("data", "code", "why"),
    [
        (_header(0), ErrorCode.PROTOCOL_ERROR, "unknown frame type"),
        (_header(11), ErrorCode.PROTOCOL_ERROR, "unknown frame type"),
        (_header(FrameType.PING, 1, 0, 8), ErrorCode.PROTOCOL_ERROR, "flags"),
        (_header(FrameType.DATA, 2, 1, 0), ErrorCode.PROTOCOL_ERROR, "flags"),
        (_header(FrameType.HELLO, 1, 0, 2), ErrorCode.PROTOCOL_ERROR, "flags"),
        (_header(FrameType.DATA, 0, 0, 0), ErrorCode.PROTOCOL_ERROR, "stream 0"),
        (_header(FrameType.HEADERS, 0, 0, 0), ErrorCode.PROTOCOL_ERROR, "stream 0"),
        (_header(FrameType.RESET, 0, 0, 4), ErrorCode.PROTOCOL_ERROR, "stream 0"),
        (_header(FrameType.PING, 0, 1, 8), ErrorCode.PROTOCOL_ERROR, "on stream 1"),
        (_header(FrameType.DRAIN, 0, 3, 0), ErrorCode.PROTOCOL_ERROR, "on stream 3"),
        (_header(FrameType.CLOSE, 0, 5, 4), ErrorCode.PROTOCOL_ERROR, "on stream 5"),
        (_header(FrameType.HELLO, 0, 1, 2), ErrorCode.PROTOCOL_ERROR, "on stream 1"),
        (_header(FrameType.DATA, 0, 2**31, 0), ErrorCode.PROTOCOL_ERROR, "above 2"),
        (_header(FrameType.DATA, 0, 1, 65537), ErrorCode.FRAME_SIZE_ERROR, "max_frame_size"),
        (_header(FrameType.HEADERS, 0, 1, 65537), ErrorCode.HEADER_TOO_LARGE, "max_header_size"),
        (_header(FrameType.HELLO, 0, 0, MAX_HANDSHAKE_SIZE + 1), ErrorCode.FRAME_SIZE_ERROR, "HELLO"),
        (_header(FrameType.PING, 0, 0, 7), ErrorCode.FRAME_SIZE_ERROR, "not 8"),
        (_header(FrameType.PONG, 0, 0, 9), ErrorCode.FRAME_SIZE_ERROR, "not 8"),
        (_header(FrameType.WINDOW_UPDATE, 0, 0, 5), ErrorCode.FRAME_SIZE_ERROR, "not 4"),
        (_header(FrameType.DRAIN, 0, 0, 1), ErrorCode.FRAME_SIZE_ERROR, "not 0"),
        (_header(FrameType.RESET, 0, 1, 3), ErrorCode.FRAME_SIZE_ERROR, "RESET"),
        (_header(FrameType.CLOSE, 0, 0, 5 + MAX_REASON_SIZE), ErrorCode.FRAME_SIZE_ERROR, "CLOSE"),
    ],
)
def test_header_validation(data: bytes, code: ErrorCode, why: str) -> None:
    # the header alone is enough to reject the frame: nothing is buffered first
    with pytest.raises(ProtocolError, match=why) as info:
        FrameParser().feed(data)
    assert info.value.code is code


def test_receiver_limits_apply() -> None:
    parser = FrameParser(max_frame_size=100, max_header_size=300)
    assert parser.feed(Frame(FrameType.DATA, 0, 1, b"x" * 100).serialize())
    assert parser.feed(Frame(FrameType.HEADERS, 0, 1, b"x" * 300).serialize())  # heads may exceed max_frame_size
    with pytest.raises(ProtocolError):
        FrameParser(max_frame_size=100).feed(_header(FrameType.DATA, 0, 1, 101))


def test_serialize_rejects_out_of_range_fields() -> None:
    with pytest.raises(LocalProtocolError):
        Frame(FrameType.DATA, 0, 2**31, b"").serialize()


# -- small payloads -----------------------------------------------------------------


def test_window_update_payload() -> None:
    assert decode_window_update(encode_window_update(1)) == 1
    assert encode_window_update(2**31 - 1) == b"\x7f\xff\xff\xff"
    with pytest.raises(ProtocolError) as info:
        decode_window_update(b"\x00\x00\x00\x00")
    assert info.value.code is ErrorCode.PROTOCOL_ERROR
    with pytest.raises(ProtocolError) as info:
        decode_window_update(b"\x80\x00\x00\x00")
    assert info.value.code is ErrorCode.FLOW_CONTROL_ERROR
    for bad in (0, 2**31):
        with pytest.raises(LocalProtocolError):
            encode_window_update(bad)


@pytest.mark.parametrize(("encode", "decode"), [(encode_reset, decode_reset), (encode_close, decode_close)])
def test_code_reason_payloads(encode, decode) -> None:  # type: ignore[no-untyped-def]
    for code in ErrorCode:
        payload = encode(code, "why ✓")
        assert decode(payload) == (code, "why ✓")
        assert encode(*decode(payload)) == payload
    assert decode(b"\x00\x00\x00\x07") == (ErrorCode.CANCEL, "")
    long = encode(ErrorCode.CANCEL, "é" * 2000)
    assert len(long) <= 4 + MAX_REASON_SIZE
    decode(long)  # truncated at a character boundary: still valid UTF-8
    with pytest.raises(ProtocolError, match="unknown error code"):
        decode(b"\x00\x00\x00\x63")
    with pytest.raises(ProtocolError, match="UTF-8"):
        decode(b"\x00\x00\x00\x01\xff")


def test_ping_payload() -> None:
    assert decode_ping(b"12345678") == b"12345678"
    with pytest.raises(ProtocolError):
        decode_ping(b"123")


# -- head blocks -------------------------------------------------------------------------

REQUESTS = [
    ("GET", "/", []),
    ("CCM_POST", "/ccm_system/request", [(b"Content-Type", b'multipart/mixed; boundary="aAbBcCdDv1234567890VxXyYzZ"')]),
    ("BITS_POST", "/CCM_Incoming/{00000000-0000-0000-0000-000000000000}", [(b"BITS-Packet-Type", b"Create-Session")]),
    ("PROPFIND", "/SMS_DP_SMSPKG$/Content_1/", [(b"Depth", b"1"), (b"Depth", b"1")]),
    ("GET", "/SMS_MP/.sms_aut?MPLIST&x=%20y", [(b"X-Empty", b""), (b"x-lower", b"\t  spaces  \t\x7f\x80\xff")]),
    ("GET", "/caf\udce9/n\u00e4me", [(b"A", b"1"), (b"B", b"2"), (b"A", b"3")]),
]


@pytest.mark.parametrize(("method", "target", "headers"), REQUESTS)
def test_request_head_round_trip(method: str, target: str, headers: list[tuple[bytes, bytes]]) -> None:
    payload = encode_request_head(method, target, headers)
    decoded = decode_request_head(payload)
    assert decoded == (method, target, tuple(headers))
    assert encode_request_head(*decoded) == payload


def test_request_head_layout() -> None:
    payload = encode_request_head("GET", "/a", [(b"H", b"v")])
    assert payload == b"\x00\x03GET" + b"\x00\x00\x00\x02/a" + b"\x00\x01" + b"\x00\x01H" + b"\x00\x00\x00\x01v"


@pytest.mark.parametrize(
    ("status", "reason", "headers"),
    [
        (100, "Continue", []),
        (200, "OK", [(b"Content-Length", b"0")]),
        (403, "Forbidden", [(b"Set-Cookie", b"a"), (b"Set-Cookie", b"b")]),
        (599, "", []),
        (500, "Erreur interne \u00e9", []),
    ],
)
def test_response_head_round_trip(status: int, reason: str, headers: list[tuple[bytes, bytes]]) -> None:
    payload = encode_response_head(status, reason, headers)
    decoded = decode_response_head(payload)
    assert decoded == (status, reason, tuple(headers))
    assert encode_response_head(*decoded) == payload


def _request(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], tail: bytes = b"") -> bytes:
    out = struct.pack("!H", len(method)) + method + struct.pack("!I", len(target)) + target
    out += struct.pack("!H", len(headers))
    for name, value in headers:
        out += struct.pack("!H", len(name)) + name + struct.pack("!I", len(value)) + value
    return out + tail


def _response(status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    out = struct.pack("!HH", status, len(reason)) + reason + struct.pack("!H", len(headers))
    for name, value in headers:
        out += struct.pack("!H", len(name)) + name + struct.pack("!I", len(value)) + value
    return out


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (_request(b"", b"/", []), "not a token"),
        (_request(b"GE T", b"/", []), "not a token"),
        (_request(b"G\xc3\xa9T", b"/", []), "not a token"),
        (_request(b"GET(", b"/", []), "not a token"),
        (_request(b"GET", b"x/", []), "start with"),
        (_request(b"GET", b"", []), "start with"),
        (_request(b"GET", b"/a b", []), "control character or a space"),
        (_request(b"GET", b"/a\rb", []), "control"),
        (_request(b"GET", b"/a\nb", []), "control"),
        (_request(b"GET", b"/a\x00b", []), "control"),
        (_request(b"GET", b"/", [(b"", b"v")]), "not a token"),
        (_request(b"GET", b"/", [(b"Bad Name", b"v")]), "not a token"),
        (_request(b"GET", b"/", [(b"Bad:Name", b"v")]), "not a token"),
        (_request(b"GET", b"/", [(b"X", b"a\rb")]), "CR, LF or NUL"),
        (_request(b"GET", b"/", [(b"X", b"a\nb")]), "CR, LF or NUL"),
        (_request(b"GET", b"/", [(b"X", b"a\x00b")]), "CR, LF or NUL"),
        (_request(b"GET", b"/", [], tail=b"\x00"), "after the header list"),
        (_request(b"GET", b"/", [])[:-1], "truncated"),
        (b"\x00\x03GE", "truncated"),
        (b"", "truncated"),
    ],
)
def test_request_head_validation(payload: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why) as info:
        decode_request_head(payload)
    assert info.value.code is ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (_response(99, b"", []), "not in 100-599"),
        (_response(600, b"", []), "not in 100-599"),
        (_response(0, b"", []), "not in 100-599"),
        (_response(200, b"O\rK", []), "CR, LF or NUL"),
        (_response(200, b"OK\n", []), "CR, LF or NUL"),
        (_response(200, b"OK", [(b"Bad Name", b"x")]), "not a token"),
        (_response(200, b"OK", [(b"X", b"\r\n")]), "CR, LF or NUL"),
        (_response(200, b"OK", []) + b"!", "after the header list"),
        (b"\x00\xc8\x00\x05OK", "truncated"),
    ],
)
def test_response_head_validation(payload: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why) as info:
        decode_response_head(payload)
    assert info.value.code is ErrorCode.PROTOCOL_ERROR


def test_encoding_invalid_heads_is_a_local_error() -> None:
    for method, target, headers in [
        ("G T", "/", []),
        ("GÉT", "/", []),
        ("GET", "x", []),
        ("GET", "/a\nb", []),
        ("GET", "/", [(b"a b", b"v")]),
        ("GET", "/", [(b"a", b"v\r")]),
        ("GET", "/", [("str", b"v")]),
    ]:
        with pytest.raises(LocalProtocolError):
            encode_request_head(method, target, headers)  # type: ignore[arg-type]
    for status, reason in [(99, "x"), (600, "x"), (200, "O\nK")]:
        with pytest.raises(LocalProtocolError):
            encode_response_head(status, reason, [])


# -- HELLO / WELCOME -----------------------------------------------------------------


def test_hello_round_trip() -> None:
    payload = encode_hello("ABC", "cp1.contoso.local", ROLES, SETTINGS)
    hello = decode_hello(payload)
    assert (hello.site_code, hello.connection_point, hello.roles, hello.settings) == (
        "ABC",
        "cp1.contoso.local",
        ROLES,
        SETTINGS,
    )
    assert encode_hello(hello.site_code, hello.connection_point, hello.roles, hello.settings) == payload
    assert decode_hello(encode_hello("ABC", "cp", (), SETTINGS)).roles == ()


def test_welcome_round_trip() -> None:
    payload = encode_welcome("instance-2", SETTINGS)
    welcome = decode_welcome(payload)
    assert (welcome.instance, welcome.settings) == ("instance-2", SETTINGS)
    assert encode_welcome(welcome.instance, welcome.settings) == payload


def _hello_obj() -> dict:  # type: ignore[type-arg]
    return json.loads(encode_hello("ABC", "cp1", ROLES, SETTINGS))  # type: ignore[no-any-return]


def _mutated(change) -> bytes:  # type: ignore[no-untyped-def]
    obj = _hello_obj()
    change(obj)
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'"string"',
        b"null",
        b"{}",
        b'{"site_code": NaN}',
        b"[" * 100000,
        _mutated(lambda o: o.pop("site_code")),
        _mutated(lambda o: o.update(extra=1)),
        _mutated(lambda o: o.update(site_code=5)),
        _mutated(lambda o: o.update(connection_point=None)),
        _mutated(lambda o: o.update(roles={})),
        _mutated(lambda o: o.update(roles=["x"])),
        _mutated(lambda o: o["roles"][0].update(role_id="1")),
        _mutated(lambda o: o["roles"][0].update(role_id=True)),
        _mutated(lambda o: o["roles"][0].update(role_id=1.5)),
        _mutated(lambda o: o["roles"][0].update(paths="/SMS_MP")),
        _mutated(lambda o: o["roles"][0].update(paths=[1])),
        _mutated(lambda o: o["roles"][0].pop("kind")),
        _mutated(lambda o: o["settings"].update(max_frame_size="65536")),
        _mutated(lambda o: o["settings"].update(max_frame_size=0)),
        _mutated(lambda o: o["settings"].update(stream_window=2**31)),
        _mutated(lambda o: o["settings"].update(tunnel_window=0)),
        _mutated(lambda o: o["settings"].update(max_concurrent_streams=-1)),
        _mutated(lambda o: o["settings"].update(extra=1)),
        _mutated(lambda o: o.update(settings=[])),
    ],
)
def test_hello_validation(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_hello(payload)
    assert info.value.code is ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize(
    "payload",
    [
        b"{}",
        b'{"instance": 1, "settings": {}}',
        json.dumps({"instance": "i", "settings": {**Limits().settings().__class__.__dict__.get("x", {})}}).encode(),
        json.dumps({"instance": "i", "settings": json.loads(encode_welcome("i", SETTINGS))["settings"], "x": 1}).encode(),
        json.dumps({"instance": ["i"], "settings": json.loads(encode_welcome("i", SETTINGS))["settings"]}).encode(),
    ],
)
def test_welcome_validation(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_welcome(payload)
    assert info.value.code is ErrorCode.PROTOCOL_ERROR


def test_limits_validate_and_produce_settings() -> None:
    assert Limits().settings() == Settings(65536, 1024, 65536, 1048576, 8388608)
    with pytest.raises(ValueError):
        Limits(stream_window=0)
    with pytest.raises(ValueError):
        Limits(max_frame_size=2**25)
