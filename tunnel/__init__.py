"""The CMG tunnel: many HTTP exchanges multiplexed as streams over one websocket.

A pure protocol core (:mod:`tunnel.frames`, :mod:`tunnel.protocol`: bytes in, events
and bytes out, no I/O) and a thin asyncio driver (:mod:`tunnel.session`) that runs it
over any websocket-like object. Both run compiled by mypyc when a build for these very
sources exists (:mod:`tunnel.compiled`), else as Python.
"""

from . import compiled as _compiled

_compiled.activate(__path__)

from .codes import ErrorCode, FrameType
from .errors import (
    DrainingError,
    FlowControlError,
    LocalProtocolError,
    ProtocolError,
    StreamClosedError,
    StreamResetError,
    TooManyStreamsError,
    TunnelClosedError,
    TunnelError,
    VersionMismatch,
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
from .frames import END_STREAM, Frame, FrameParser
from .limits import Limits
from .protocol import Role, TunnelProtocol
from .session import TunnelSession, TunnelStream
from .version import SUBPROTOCOL, SUPPORTED, negotiate

__all__ = [
    "END_STREAM",
    "SUBPROTOCOL",
    "SUPPORTED",
    "DataReceived",
    "DrainReceived",
    "DrainingError",
    "ErrorCode",
    "Event",
    "FlowControlError",
    "Frame",
    "FrameParser",
    "FrameType",
    "HelloReceived",
    "Limits",
    "LocalProtocolError",
    "PingReceived",
    "PongReceived",
    "ProtocolError",
    "PublishedRole",
    "RequestReceived",
    "ResponseReceived",
    "Role",
    "Settings",
    "StreamClosedError",
    "StreamReset",
    "StreamResetError",
    "TooManyStreamsError",
    "TunnelClosed",
    "TunnelClosedError",
    "TunnelError",
    "TunnelProtocol",
    "TunnelSession",
    "TunnelStream",
    "VersionMismatch",
    "WelcomeReceived",
    "WindowUpdated",
    "negotiate",
]
