"""What one end of the tunnel is willing to receive, with safe defaults."""

from __future__ import annotations

from dataclasses import dataclass

from .events import Settings

__all__ = ["MAX_WINDOW", "Limits", "validate_settings"]

#: Windows and window increments are kept below 2**31 so they fit any signed 32-bit int.
MAX_WINDOW = 2**31 - 1
MIN_FRAME_SIZE = 64
MAX_FRAME_SIZE = 2**24
MIN_HEADER_SIZE = 256


def validate_settings(settings: Settings) -> str | None:
    """Return why ``settings`` are out of range, or None when they are acceptable."""
    if not MIN_FRAME_SIZE <= settings.max_frame_size <= MAX_FRAME_SIZE:
        return f"max_frame_size {settings.max_frame_size} not in [{MIN_FRAME_SIZE}, {MAX_FRAME_SIZE}]"
    if not 0 <= settings.max_concurrent_streams <= MAX_WINDOW:
        return f"max_concurrent_streams {settings.max_concurrent_streams} out of range"
    if not MIN_HEADER_SIZE <= settings.max_header_size <= MAX_FRAME_SIZE:
        return f"max_header_size {settings.max_header_size} not in [{MIN_HEADER_SIZE}, {MAX_FRAME_SIZE}]"
    if not 1 <= settings.stream_window <= MAX_WINDOW:
        return f"stream_window {settings.stream_window} not in [1, {MAX_WINDOW}]"
    if not 1 <= settings.tunnel_window <= MAX_WINDOW:
        return f"tunnel_window {settings.tunnel_window} not in [1, {MAX_WINDOW}]"
    return None


@dataclass(frozen=True)
class Limits:
    """What WE can receive; sent to the peer as :class:`Settings` in HELLO/WELCOME.

    ``tunnel_window`` should be several times ``stream_window``: one stream whose
    reader is slow can hold at most one stream window of the tunnel's credit, so the
    remainder keeps the other streams moving.
    """

    max_frame_size: int = 65536
    max_concurrent_streams: int = 1024
    max_header_size: int = 65536
    stream_window: int = 1048576
    tunnel_window: int = 8388608

    def __post_init__(self) -> None:
        problem = validate_settings(self.settings())
        if problem is not None:
            raise ValueError(f"invalid tunnel limits: {problem}")

    def settings(self) -> Settings:
        """These limits as the Settings announced to the peer."""
        return Settings(
            max_frame_size=self.max_frame_size,
            max_concurrent_streams=self.max_concurrent_streams,
            max_header_size=self.max_header_size,
            stream_window=self.stream_window,
            tunnel_window=self.tunnel_window,
        )
