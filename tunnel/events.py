"""Events handed out by :meth:`tunnel.protocol.TunnelProtocol.receive_data`.

Each is a small frozen value; headers are tuples of (name, value) byte pairs in wire
order, duplicates kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Union

from .codes import ErrorCode

__all__ = [
    "DataReceived",
    "DrainReceived",
    "Event",
    "HelloReceived",
    "PingReceived",
    "PongReceived",
    "PublishedRole",
    "RequestReceived",
    "ResponseReceived",
    "Settings",
    "StreamReset",
    "TunnelClosed",
    "WelcomeReceived",
    "WindowUpdated",
]

Headers = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class PublishedRole:
    """A site role endpoint that a connection point publishes through the tunnel."""

    role_id: int
    kind: str
    name: str
    internal_url: str
    paths: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Settings:
    """What the SENDER of HELLO/WELCOME can receive; the peer must respect them."""

    max_frame_size: int
    max_concurrent_streams: int
    max_header_size: int
    stream_window: int
    tunnel_window: int


@dataclass(frozen=True, slots=True)
class HelloReceived:
    site_code: str
    connection_point: str
    roles: tuple[PublishedRole, ...]
    settings: Settings


@dataclass(frozen=True, slots=True)
class WelcomeReceived:
    instance: str
    settings: Settings


class _StreamEvent:
    """What the per-stream events share: values compared, hashed and shown by their
    fields, as a frozen dataclass's. They come once or more per request, so they are
    plain classes (compiled to C structs by mypyc, where a dataclass's generated
    ``__init__`` stays Python); their fields are ``Final``: set once, in ``__init__``."""

    __slots__ = ()

    def _fields(self) -> tuple[object, ...]:
        names: tuple[str, ...] = getattr(self, "__match_args__")
        return tuple(getattr(self, name) for name in names)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, _StreamEvent)
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash((self.__class__.__name__, self._fields()))

    def __repr__(self) -> str:
        names: tuple[str, ...] = getattr(self, "__match_args__")
        values = ", ".join(f"{name}={getattr(self, name)!r}" for name in names)
        return f"{self.__class__.__name__}({values})"


class RequestReceived(_StreamEvent):
    __slots__ = ("stream_id", "method", "target", "headers", "end_stream")
    __match_args__ = ("stream_id", "method", "target", "headers", "end_stream")

    def __init__(self, stream_id: int, method: str, target: str, headers: Headers, end_stream: bool) -> None:
        self.stream_id: Final = stream_id
        self.method: Final = method
        self.target: Final = target
        self.headers: Final = headers
        self.end_stream: Final = end_stream


class ResponseReceived(_StreamEvent):
    __slots__ = ("stream_id", "status", "reason", "headers", "end_stream")
    __match_args__ = ("stream_id", "status", "reason", "headers", "end_stream")

    def __init__(self, stream_id: int, status: int, reason: str, headers: Headers, end_stream: bool) -> None:
        self.stream_id: Final = stream_id
        self.status: Final = status
        self.reason: Final = reason
        self.headers: Final = headers
        self.end_stream: Final = end_stream


class DataReceived(_StreamEvent):
    __slots__ = ("stream_id", "data", "end_stream")
    __match_args__ = ("stream_id", "data", "end_stream")

    def __init__(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        self.stream_id: Final = stream_id
        self.data: Final = data
        self.end_stream: Final = end_stream


class WindowUpdated(_StreamEvent):
    """More send credit: for ``stream_id``, or for the whole tunnel when it is 0."""

    __slots__ = ("stream_id",)
    __match_args__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id: Final = stream_id


class StreamReset(_StreamEvent):
    __slots__ = ("stream_id", "code", "reason")
    __match_args__ = ("stream_id", "code", "reason")

    def __init__(self, stream_id: int, code: ErrorCode, reason: str) -> None:
        self.stream_id: Final = stream_id
        self.code: Final = code
        self.reason: Final = reason


@dataclass(frozen=True, slots=True)
class PingReceived:
    pass


@dataclass(frozen=True, slots=True)
class PongReceived:
    rtt: float  # seconds


@dataclass(frozen=True, slots=True)
class DrainReceived:
    pass


@dataclass(frozen=True, slots=True)
class TunnelClosed:
    """The peer sent CLOSE."""

    code: ErrorCode
    reason: str


Event = Union[
    HelloReceived,
    WelcomeReceived,
    RequestReceived,
    ResponseReceived,
    DataReceived,
    WindowUpdated,
    StreamReset,
    PingReceived,
    PongReceived,
    DrainReceived,
    TunnelClosed,
]
