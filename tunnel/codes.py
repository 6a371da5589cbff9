"""The two numbering spaces of the tunnel wire format: frame types and error codes.

They live in their own module so that both :mod:`tunnel.errors` and
:mod:`tunnel.frames` can use them without importing each other.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["ErrorCode", "FrameType"]


class FrameType(IntEnum):
    """The type byte of a frame header."""

    HELLO = 1
    WELCOME = 2
    HEADERS = 3
    DATA = 4
    WINDOW_UPDATE = 5
    RESET = 6
    PING = 7
    PONG = 8
    DRAIN = 9
    CLOSE = 10


class ErrorCode(IntEnum):
    """Why a stream was reset or a tunnel closed (carried by RESET and CLOSE)."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2
    FLOW_CONTROL_ERROR = 3
    STREAM_CLOSED = 4
    FRAME_SIZE_ERROR = 5
    #: The stream was not processed at all: safe to retry it elsewhere.
    REFUSED_STREAM = 6
    CANCEL = 7
    #: The site role behind the connector failed.
    UPSTREAM_ERROR = 8
    TIMEOUT = 9
    VERSION_MISMATCH = 10
    HEADER_TOO_LARGE = 11
