"""Tunnel protocol versions, named by the websocket subprotocol."""

from __future__ import annotations

from collections.abc import Sequence

from .errors import VersionMismatch

__all__ = ["SUBPROTOCOL", "SUPPORTED", "negotiate"]

SUBPROTOCOL = "cmg-tunnel.v1"
SUPPORTED: tuple[str, ...] = (SUBPROTOCOL,)


def negotiate(offered: Sequence[str]) -> str:
    """Pick the subprotocol to speak from those the connection point offered.

    The connection point's order of preference wins. Raises VersionMismatch with a
    reason meant for a human when none is supported.
    """
    for candidate in offered:
        if candidate in SUPPORTED:
            return candidate
    offered_text = ", ".join(offered) if offered else "none"
    raise VersionMismatch(
        "tunnel protocol version mismatch: "
        f"the connection point offered {offered_text}; "
        f"this gateway speaks {', '.join(SUPPORTED)}"
    )
