"""Events handed out by :meth:`tunnel.protocol.TunnelProtocol.receive_data`.

Each is a small frozen value; headers are tuples of (name, value) byte pairs in wire
order, duplicates kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

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


@dataclass(frozen=True, slots=True)
class RequestReceived:
    stream_id: int
    method: str
    target: str
    headers: Headers
    end_stream: bool


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    stream_id: int
    status: int
    reason: str
    headers: Headers
    end_stream: bool


@dataclass(frozen=True, slots=True)
class DataReceived:
    stream_id: int
    data: bytes
    end_stream: bool


@dataclass(frozen=True, slots=True)
class WindowUpdated:
    """More send credit: for ``stream_id``, or for the whole tunnel when it is 0."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    stream_id: int
    code: ErrorCode
    reason: str


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
