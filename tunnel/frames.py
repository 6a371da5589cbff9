"""The tunnel wire format: frames, and the payloads they carry. No I/O.

Frame
-----
Every frame is a 10-byte header followed by its payload::

    type u8 | flags u8 | stream_id u32 | length u32 | payload (length bytes)

All integers are big-endian. ``flags`` has one bit, END_STREAM (0x1), allowed on
HEADERS and DATA only. Stream ids use 31 bits; HEADERS, DATA and RESET need a nonzero
stream id, WINDOW_UPDATE may use 0 (the whole tunnel), every other type needs 0.

Size limits, checked as soon as a header is complete (before buffering the payload):
DATA up to the receiver's ``max_frame_size`` (else FRAME_SIZE_ERROR); HEADERS up to
``max(max_frame_size, max_header_size)``, and a head block above ``max_header_size``
is HEADER_TOO_LARGE; HELLO and WELCOME up to ``MAX_HANDSHAKE_SIZE``; WINDOW_UPDATE
exactly 4 bytes, PING/PONG exactly 8, DRAIN 0, RESET and CLOSE 4 to 4 +
``MAX_REASON_SIZE``.

Payloads
--------
* HELLO, WELCOME: a UTF-8 JSON object (see :func:`encode_hello`, :func:`encode_welcome`);
  every key is required, no other key is allowed, integers are never booleans.
* HEADERS: a head block. Length prefixes are big-endian::

      request head  = u16 len, method (ASCII token) | u32 len, target (UTF-8) | header list
      response head = u16 status                    | u16 len, reason (UTF-8) | header list
      header list   = u16 count, count x (u16 len, name | u32 len, value)

  Text that is not valid UTF-8 travels through ``surrogateescape``, so any byte
  string a proxy saw on the wire round-trips exactly. Nothing may follow the list.
* DATA: body bytes.
* WINDOW_UPDATE: u32 increment, 1 to 2**31-1.
* RESET, CLOSE: u32 error code, then a UTF-8 reason (the rest of the payload).
* PING, PONG: an 8-byte opaque id; PONG echoes the PING's.
* DRAIN: empty.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from .codes import ErrorCode, FrameType
from .errors import LocalProtocolError, ProtocolError
from .events import HelloReceived, PublishedRole, Settings, WelcomeReceived
from .limits import MAX_WINDOW, validate_settings

__all__ = [
    "END_STREAM",
    "FRAME_HEADER",
    "MAX_HANDSHAKE_SIZE",
    "MAX_REASON_SIZE",
    "MAX_STREAM_ID",
    "ErrorCode",
    "Frame",
    "FrameParser",
    "FrameType",
    "decode_close",
    "decode_hello",
    "decode_ping",
    "decode_request_head",
    "decode_reset",
    "decode_response_head",
    "decode_welcome",
    "decode_window_update",
    "encode_close",
    "encode_hello",
    "encode_request_head",
    "encode_reset",
    "encode_response_head",
    "encode_welcome",
    "encode_window_update",
    "parse_frame",
]

FRAME_HEADER = struct.Struct("!BBII")
END_STREAM = 0x1
MAX_STREAM_ID = 2**31 - 1
MAX_REASON_SIZE = 1024
MAX_HANDSHAKE_SIZE = 1 << 20

_HEADER_SIZE = FRAME_HEADER.size
_unpack_header = FRAME_HEADER.unpack_from
_DATA = int(FrameType.DATA)
_HEADERS = int(FrameType.HEADERS)

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_STATUS_REASON_LENGTH = struct.Struct("!HH")
# The length prefixes of header names and values up to this size, made once: a head
# block's fields are short, and a table read (compiled: a C array read) is cheaper
# than a call to pack.
_SHORT = 1024
_U16_SHORT = [_U16.pack(n) for n in range(_SHORT)]
_U32_SHORT = [_U32.pack(n) for n in range(_SHORT)]

_STREAM_TYPES = frozenset({FrameType.HEADERS, FrameType.DATA, FrameType.RESET})
_FLAGGED_TYPES = frozenset({FrameType.HEADERS, FrameType.DATA})
_FIXED_SIZES = {
    FrameType.WINDOW_UPDATE: 4,
    FrameType.PING: 8,
    FrameType.PONG: 8,
    FrameType.DRAIN: 0,
}

_TCHAR_BYTES = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_TCHAR = frozenset(_TCHAR_BYTES)
_BAD_IN_VALUE = frozenset(b"\r\n\x00")
_CR, _LF, _NUL = b"\r\n\x00"
_BAD_IN_TARGET = re.compile("[\x00-\x20\x7f]")


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame; ``payload`` is still encoded (decode it with the functions below)."""

    type: FrameType
    flags: int = 0
    stream_id: int = 0
    payload: bytes = b""

    @property
    def end_stream(self) -> bool:
        return bool(self.flags & END_STREAM)

    def serialize(self) -> bytes:
        """The frame's bytes. Raises LocalProtocolError when a field is out of range."""
        if not 0 <= self.flags <= 0xFF or not 0 <= self.stream_id <= MAX_STREAM_ID:
            raise LocalProtocolError(f"frame field out of range: {self!r}")
        return FRAME_HEADER.pack(self.type, self.flags, self.stream_id, len(self.payload)) + self.payload


class FrameParser:
    """Turns a byte stream into frames, whatever the chunking of the input.

    Checks everything the frame header alone tells (type, flags, stream id, size);
    payload contents are checked by the decode functions. After a ProtocolError the
    parser is unusable: every later ``feed`` raises again.
    """

    def __init__(self, max_frame_size: int = 65536, max_header_size: int = 65536) -> None:
        self.max_frame_size = max_frame_size
        self.max_header_size = max_header_size
        self._buffer = bytearray()
        self._position = 0  # start of the first unparsed frame in _buffer
        self._error: ProtocolError | None = None

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a complete frame."""
        return len(self._buffer) - self._position

    def feed(self, data: bytes) -> list[Frame]:
        """Add bytes; return the frames they complete. Raises ProtocolError."""
        self.append(data)
        frames = []
        while (frame := self.next_frame()) is not None:
            frames.append(frame)
        return frames

    def append(self, data: bytes) -> None:
        """Add bytes without parsing them yet (see next_frame)."""
        if self._error is not None:
            raise self._error
        if self._position and self._position * 2 >= len(self._buffer):
            del self._buffer[: self._position]
            self._position = 0
        self._buffer += data

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more bytes arrive. Raises ProtocolError."""
        fields = self.next_fields()
        return None if fields is None else Frame(*fields)

    def next_fields(self) -> tuple[FrameType, int, int, bytes] | None:
        """:meth:`next_frame`'s (type, flags, stream_id, payload), without making a Frame."""
        if self._error is not None:
            raise self._error
        buffer, position = self._buffer, self._position
        if len(buffer) - position < _HEADER_SIZE:
            return None
        type_, flags, stream_id, length = _unpack_header(buffer, position)
        # DATA and HEADERS carry every request: checked here in one go when valid.
        if type_ == _DATA and flags <= END_STREAM and 0 < stream_id <= MAX_STREAM_ID and length <= self.max_frame_size:
            frame_type = FrameType.DATA
        elif (type_ == _HEADERS and flags <= END_STREAM and 0 < stream_id <= MAX_STREAM_ID
              and length <= self.max_header_size):
            frame_type = FrameType.HEADERS
        else:
            try:
                frame_type = self._check_header(type_, flags, stream_id, length)
            except ProtocolError as exc:
                self._error = exc
                buffer.clear()
                self._position = 0
                raise
        start = position + _HEADER_SIZE
        end = start + length
        if end > len(buffer):
            return None
        payload = bytes(buffer[start:end])
        if end == len(buffer):
            buffer.clear()
            self._position = 0
        else:
            self._position = end
        return frame_type, flags, stream_id, payload

    def _check_header(self, type_: int, flags: int, stream_id: int, length: int) -> FrameType:
        try:
            frame_type = FrameType(type_)
        except ValueError:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"unknown frame type {type_}") from None
        name = frame_type.name
        allowed_flags = END_STREAM if frame_type in _FLAGGED_TYPES else 0
        if flags & ~allowed_flags:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"{name} frame with flags 0x{flags:02x}")
        if stream_id > MAX_STREAM_ID:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"{name} frame with stream id {stream_id} above 2**31-1")
        if frame_type in _STREAM_TYPES:
            if stream_id == 0:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"{name} frame on stream 0")
        elif frame_type is not FrameType.WINDOW_UPDATE and stream_id != 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"{name} frame on stream {stream_id}")
        fixed = _FIXED_SIZES.get(frame_type)
        if fixed is not None:
            if length != fixed:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, f"{name} frame of {length} bytes, not {fixed}")
        elif frame_type is FrameType.DATA:
            if length > self.max_frame_size:
                raise ProtocolError(
                    ErrorCode.FRAME_SIZE_ERROR, f"DATA frame of {length} bytes above max_frame_size {self.max_frame_size}"
                )
        elif frame_type is FrameType.HEADERS:
            if length > self.max_header_size:
                raise ProtocolError(
                    ErrorCode.HEADER_TOO_LARGE, f"head of {length} bytes above max_header_size {self.max_header_size}"
                )
        elif frame_type in (FrameType.HELLO, FrameType.WELCOME):
            if length > MAX_HANDSHAKE_SIZE:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, f"{name} frame of {length} bytes")
        elif not 4 <= length <= 4 + MAX_REASON_SIZE:  # RESET, CLOSE
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, f"{name} frame of {length} bytes")
        return frame_type


def parse_frame(data: bytes, max_frame_size: int = 65536, max_header_size: int = 65536) -> Frame:
    """Parse exactly one complete frame. Raises ProtocolError (also for missing or extra bytes)."""
    parser = FrameParser(max_frame_size, max_header_size)
    frames = parser.feed(data)
    if len(frames) != 1 or parser.pending:
        raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "not exactly one frame")
    return frames[0]


# -- small payloads ---------------------------------------------------------------


def encode_window_update(increment: int) -> bytes:
    if not 1 <= increment <= MAX_WINDOW:
        raise LocalProtocolError(f"window increment {increment} not in [1, 2**31-1]")
    return _U32.pack(increment)


def decode_window_update(payload: bytes) -> int:
    """The increment. Raises ProtocolError when it is 0 or above 2**31-1."""
    if len(payload) != 4:
        raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE payload is not 4 bytes")
    (increment,) = _U32.unpack(payload)
    if increment == 0:
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE with increment 0")
    if increment > MAX_WINDOW:
        raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, f"WINDOW_UPDATE increment {increment} above 2**31-1")
    return int(increment)


def truncate_reason(reason: str, limit: int = MAX_REASON_SIZE) -> bytes:
    """``reason`` as UTF-8, cut at a character boundary to at most ``limit`` bytes."""
    return reason.encode("utf-8", "replace")[:limit].decode("utf-8", "ignore").encode("utf-8")


def _encode_code_reason(code: ErrorCode, reason: str) -> bytes:
    return _U32.pack(ErrorCode(code)) + truncate_reason(reason)


def _decode_code_reason(payload: bytes, what: str) -> tuple[ErrorCode, str]:
    if not 4 <= len(payload) <= 4 + MAX_REASON_SIZE:
        raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, f"{what} payload of {len(payload)} bytes")
    (value,) = _U32.unpack_from(payload)
    try:
        code = ErrorCode(value)
    except ValueError:
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"{what} with unknown error code {value}") from None
    try:
        reason = payload[4:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"{what} reason is not UTF-8") from None
    return code, reason


def encode_reset(code: ErrorCode, reason: str = "") -> bytes:
    return _encode_code_reason(code, reason)


def decode_reset(payload: bytes) -> tuple[ErrorCode, str]:
    """(code, reason). Raises ProtocolError for an unknown code or a non-UTF-8 reason."""
    return _decode_code_reason(payload, "RESET")


def encode_close(code: ErrorCode, reason: str = "") -> bytes:
    return _encode_code_reason(code, reason)


def decode_close(payload: bytes) -> tuple[ErrorCode, str]:
    """(code, reason). Raises ProtocolError for an unknown code or a non-UTF-8 reason."""
    return _decode_code_reason(payload, "CLOSE")


def decode_ping(payload: bytes) -> bytes:
    if len(payload) != 8:
        raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "PING/PONG payload is not 8 bytes")
    return payload


# -- head blocks ------------------------------------------------------------------


def _is_token(value: bytes) -> bool:
    # Deleting every token character leaves nothing exactly when all of them are.
    return bool(value) and not value.translate(None, _TCHAR_BYTES)


def _check_target(target: str) -> str | None:
    if not target.startswith("/"):
        return "request target does not start with '/'"
    if _BAD_IN_TARGET.search(target) is not None:
        return "request target contains a control character or a space"
    return None


def _check_headers(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    if not headers:
        return None
    return _check_fields([name for name, _ in headers], [value for _, value in headers])


def _check_fields(names: list[bytes], values: list[bytes]) -> str | None:
    # Fast path: every name at once, every value at once; the loop below finds the
    # first culprit (and words the error) only when something is wrong.
    # Bytes are searched for ints (CR, LF, NUL): `13 in value` is a memchr, while
    # `b"\r" in value` first tries the needle as an int and fails, ten times slower.
    all_values = b"".join(values)
    if (all(names) and not b"".join(names).translate(None, _TCHAR_BYTES)
            and _CR not in all_values and _LF not in all_values and _NUL not in all_values):
        return None
    for name, value in zip(names, values):
        if not name or name.translate(None, _TCHAR_BYTES):
            return f"header name {name[:40]!r} is not a token"
        if _CR in value or _LF in value or _NUL in value:
            return f"header {name.decode('ascii')} has CR, LF or NUL in its value"
    return None


def _encode_headers(headers: Sequence[tuple[bytes, bytes]], parts: list[bytes]) -> bytes:
    """``parts`` (the head block so far) with the header list, joined."""
    count = len(headers)
    if count > 0xFFFF:
        raise LocalProtocolError("more than 65535 header fields")
    pack_name = _U16.pack
    pack_value = _U32.pack
    parts.append(pack_name(count))
    names = []
    values = []
    # Objects here: a caller's str must be a LocalProtocolError, compiled (tunnel.compiled) or not.
    for name, value in cast("Sequence[tuple[object, object]]", headers):
        if not isinstance(name, bytes) or not isinstance(value, bytes):
            raise LocalProtocolError("header names and values must be bytes")
        name_size = len(name)
        value_size = len(value)
        if name_size > 0xFFFF or value_size > 0xFFFFFFFF:
            raise LocalProtocolError("header field too long")
        names.append(name)
        values.append(value)
        parts.append(_U16_SHORT[name_size] if name_size < _SHORT else pack_name(name_size))
        parts.append(name)
        parts.append(_U32_SHORT[value_size] if value_size < _SHORT else pack_value(value_size))
        parts.append(value)
    if count:
        problem = _check_fields(names, values)
        if problem is not None:
            raise LocalProtocolError(problem)
    return b"".join(parts)


def _truncated() -> ProtocolError:
    return ProtocolError(ErrorCode.PROTOCOL_ERROR, "truncated head block")


def _decode_headers(data: bytes, position: int) -> tuple[tuple[bytes, bytes], ...]:
    """The header list that starts at ``position`` and must end the block."""
    # The hot path of every head: lengths read byte by byte (compiled, a bytes index is a
    # C array read), no method call per field.
    size = len(data)
    if position + 2 > size:
        raise _truncated()
    count = (data[position] << 8) | data[position + 1]
    position += 2
    fields = []
    names = []
    values = []
    for _ in range(count):
        if position + 2 > size:
            raise _truncated()
        end = position + 2 + ((data[position] << 8) | data[position + 1])
        if end + 4 > size:
            raise _truncated()
        name = data[position + 2 : end]
        position = end + 4 + ((data[end] << 24) | (data[end + 1] << 16) | (data[end + 2] << 8) | data[end + 3])
        if position > size:
            raise _truncated()
        value = data[end + 4 : position]
        names.append(name)
        values.append(value)
        fields.append((name, value))
    if position != size:
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "bytes after the header list")
    if count:
        problem = _check_fields(names, values)
        if problem is not None:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, problem)
    return tuple(fields)


def encode_request_head(method: str, target: str, headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    """A request head block. Raises LocalProtocolError for an invalid method, target or header."""
    method_bytes = method.encode("ascii", "replace")
    if not _is_token(method_bytes):
        raise LocalProtocolError(f"method {method[:40]!r} is not a token")
    problem = _check_target(target)
    if problem is not None:
        raise LocalProtocolError(problem)
    target_bytes = target.encode("utf-8", "surrogateescape")
    if len(method_bytes) > 0xFFFF:
        raise LocalProtocolError("method too long")
    parts = [_U16.pack(len(method_bytes)), method_bytes, _U32.pack(len(target_bytes)), target_bytes]
    return _encode_headers(headers, parts)


def decode_request_head(payload: bytes) -> tuple[str, str, tuple[tuple[bytes, bytes], ...]]:
    """(method, target, headers). Raises ProtocolError(PROTOCOL_ERROR) on any violation."""
    size = len(payload)
    if size < 2:
        raise _truncated()
    end = 2 + _U16.unpack_from(payload)[0]
    if end > size:
        raise _truncated()
    method_bytes = payload[2:end]
    if not _is_token(method_bytes):
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"method {method_bytes[:40]!r} is not a token")
    if end + 4 > size:
        raise _truncated()
    position = end + 4 + _U32.unpack_from(payload, end)[0]
    if position > size:
        raise _truncated()
    target = payload[end + 4 : position].decode("utf-8", "surrogateescape")
    problem = _check_target(target)
    if problem is not None:
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, problem)
    headers = _decode_headers(payload, position)
    return method_bytes.decode("ascii"), target, headers


def encode_response_head(status: int, reason: str, headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    """A response head block. Raises LocalProtocolError for an invalid status, reason or header."""
    if not isinstance(status, int) or not 100 <= status <= 599:
        raise LocalProtocolError(f"status {status!r} not in 100-599")
    reason_bytes = reason.encode("utf-8", "surrogateescape")
    if not _BAD_IN_VALUE.isdisjoint(reason_bytes) or len(reason_bytes) > 0xFFFF:
        raise LocalProtocolError("reason phrase has CR, LF or NUL, or is too long")
    return _encode_headers(headers, [_STATUS_REASON_LENGTH.pack(status, len(reason_bytes)), reason_bytes])


def decode_response_head(payload: bytes) -> tuple[int, str, tuple[tuple[bytes, bytes], ...]]:
    """(status, reason, headers). Raises ProtocolError(PROTOCOL_ERROR) on any violation."""
    size = len(payload)
    if size < 2:
        raise _truncated()
    (status,) = _U16.unpack_from(payload)
    if not 100 <= status <= 599:
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"status {status} not in 100-599")
    if size < 4:
        raise _truncated()
    end = 4 + _U16.unpack_from(payload, 2)[0]
    if end > size:
        raise _truncated()
    reason_bytes = payload[4:end]
    if not _BAD_IN_VALUE.isdisjoint(reason_bytes):
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "reason phrase has CR, LF or NUL")
    headers = _decode_headers(payload, end)
    return status, reason_bytes.decode("utf-8", "surrogateescape"), headers


# -- HELLO / WELCOME --------------------------------------------------------------

_SETTINGS_KEYS = ("max_frame_size", "max_concurrent_streams", "max_header_size", "stream_window", "tunnel_window")
_ROLE_KEYS = ("role_id", "kind", "name", "internal_url", "paths")


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _settings_json(settings: Settings) -> dict[str, int]:
    return {key: getattr(settings, key) for key in _SETTINGS_KEYS}


def encode_hello(
    site_code: str, connection_point: str, roles: Sequence[PublishedRole], settings: Settings
) -> bytes:
    """The HELLO payload: ``{"site_code", "connection_point", "roles": [...], "settings": {...}}``."""
    return _json(
        {
            "site_code": site_code,
            "connection_point": connection_point,
            "roles": [
                {
                    "role_id": role.role_id,
                    "kind": role.kind,
                    "name": role.name,
                    "internal_url": role.internal_url,
                    "paths": list(role.paths),
                }
                for role in roles
            ],
            "settings": _settings_json(settings),
        }
    )


def encode_welcome(instance: str, settings: Settings) -> bytes:
    """The WELCOME payload: ``{"instance", "settings": {...}}``."""
    return _json({"instance": instance, "settings": _settings_json(settings)})


def _bad(what: str) -> ProtocolError:
    return ProtocolError(ErrorCode.PROTOCOL_ERROR, what)


def _load_object(payload: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _bad(f"{what} payload is not UTF-8 JSON") from None
    if not isinstance(value, dict):
        raise _bad(f"{what} payload is not a JSON object")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def _fields(obj: Any, keys: tuple[str, ...], what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise _bad(f"{what} is not an object")
    if set(obj) != set(keys):
        raise _bad(f"{what} has keys {sorted(obj)}, expected {sorted(keys)}")
    return obj


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"{what} is not a string")
    return value


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(f"{what} is not an integer")
    return value


def _decode_settings(value: Any) -> Settings:
    obj = _fields(value, _SETTINGS_KEYS, "settings")
    settings = Settings(**{key: _int(obj[key], f"settings.{key}") for key in _SETTINGS_KEYS})
    problem = validate_settings(settings)
    if problem is not None:
        raise _bad(f"settings out of range: {problem}")
    return settings


def decode_hello(payload: bytes) -> HelloReceived:
    """Raises ProtocolError(PROTOCOL_ERROR) for bad JSON, missing/extra keys or wrong types."""
    obj = _fields(_load_object(payload, "HELLO"), ("site_code", "connection_point", "roles", "settings"), "HELLO")
    roles_value = obj["roles"]
    if not isinstance(roles_value, list):
        raise _bad("HELLO roles is not a list")
    roles = []
    for index, item in enumerate(roles_value):
        role = _fields(item, _ROLE_KEYS, f"HELLO roles[{index}]")
        paths = role["paths"]
        if not isinstance(paths, list):
            raise _bad(f"HELLO roles[{index}].paths is not a list")
        roles.append(
            PublishedRole(
                role_id=_int(role["role_id"], "role_id"),
                kind=_str(role["kind"], "kind"),
                name=_str(role["name"], "name"),
                internal_url=_str(role["internal_url"], "internal_url"),
                paths=tuple(_str(path, "path") for path in paths),
            )
        )
    return HelloReceived(
        site_code=_str(obj["site_code"], "site_code"),
        connection_point=_str(obj["connection_point"], "connection_point"),
        roles=tuple(roles),
        settings=_decode_settings(obj["settings"]),
    )


def decode_welcome(payload: bytes) -> WelcomeReceived:
    """Raises ProtocolError(PROTOCOL_ERROR) for bad JSON, missing/extra keys or wrong types."""
    obj = _fields(_load_object(payload, "WELCOME"), ("instance", "settings"), "WELCOME")
    return WelcomeReceived(instance=_str(obj["instance"], "instance"), settings=_decode_settings(obj["settings"]))
