"""Exceptions of the tunnel package.

::

    TunnelError
     ├── ProtocolError          the PEER broke the protocol (code, reason); the tunnel
     │                          is closed with that code
     ├── LocalProtocolError     WE misused the API (wrong role, wrong state, ...)
     │    ├── FlowControlError  send_data() beyond the available window
     │    └── StreamClosedError sending on a stream whose sending side is closed
     ├── TooManyStreamsError    the peer's max_concurrent_streams is reached
     ├── DrainingError          we or the peer are draining: no new streams
     ├── VersionMismatch        no common tunnel protocol version (reason)
     ├── StreamResetError       the stream was reset (code, reason); raised by the
     │                          session's stream reads and writes
     └── TunnelClosedError      the tunnel is gone

The pure core (:mod:`tunnel.protocol`, :mod:`tunnel.frames`) raises ProtocolError for
bad input bytes and the LocalProtocolError family for API misuse. The asyncio session
never lets a ProtocolError out of ``run()``: it becomes a CLOSE frame and a log line.
"""

from __future__ import annotations

from .codes import ErrorCode

__all__ = [
    "DrainingError",
    "FlowControlError",
    "LocalProtocolError",
    "ProtocolError",
    "StreamClosedError",
    "StreamResetError",
    "TooManyStreamsError",
    "TunnelClosedError",
    "TunnelError",
    "VersionMismatch",
]


class TunnelError(Exception):
    """Base class of every exception raised by the tunnel package."""


class ProtocolError(TunnelError):
    """The peer broke the protocol; ``code`` is what the CLOSE frame carries."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.code.name}: {self.reason}"


class LocalProtocolError(TunnelError):
    """We misused the API (e.g. sending on a closed stream, a connector opening a stream)."""


class FlowControlError(LocalProtocolError):
    """send_data() was called with more bytes than available_window() allows."""


class StreamClosedError(LocalProtocolError):
    """The sending side of the stream is closed (or the stream is unknown)."""


class TooManyStreamsError(TunnelError):
    """Opening a stream would exceed the peer's max_concurrent_streams."""


class DrainingError(TunnelError):
    """We or the peer are draining: no new streams may be opened on this tunnel."""


class VersionMismatch(TunnelError):
    """No tunnel protocol version in common; ``reason`` says which were offered."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class StreamResetError(TunnelError):
    """The stream was reset (by the peer, or by us) with ``code``."""

    def __init__(self, code: ErrorCode, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"stream reset: {self.code.name}" + (f" ({self.reason})" if self.reason else "")


class TunnelClosedError(TunnelError):
    """The tunnel is closed (or the connection under it is lost)."""
