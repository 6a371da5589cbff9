"""Parsing of the client-facing CMG paths (pure), shared by the gateway and the connection point.

``/CCM_Proxy_MutualAuth/<role id>/<internal path>`` and
``/CCM_Proxy_ServerAuth/<role id>/<internal path>``; the prefixes match
case-insensitively, as IIS does.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from urllib.parse import unquote

from cmg.config import ROLE_ID_BASE


class Channel(Enum):
    MUTUAL_AUTH = "CCM_Proxy_MutualAuth"  # PKI client certificate
    SERVER_AUTH = "CCM_Proxy_ServerAuth"  # bearer token


@dataclass(frozen=True, slots=True)
class ClientPath:
    channel: Channel
    role_id: int | None  # None for ServiceMetadata / AADAuthInfo
    resource: str  # the first segment under the role id (the published endpoint), or the metadata name
    internal: str  # the path after the role id, with its query, as the client sent it
    malformed: bool = False  # dot segments or backslashes: never forwarded


_PREFIXES = {("/" + c.value + "/").lower(): c for c in Channel}


def parse_client_path(raw_path: str) -> ClientPath | None:
    """Split a client request's raw path; None when it is not a CMG path at all.

    The answer (immutable) is remembered for recent short paths: clients ask for the
    same few paths over and over, and both the gateway and the connection point parse
    each request's path.
    """
    if len(raw_path) <= 512:
        return _parse_cached(raw_path)
    return _parse(raw_path)


def _parse(raw_path: str) -> ClientPath | None:
    lowered = raw_path[:32].lower()
    for prefix, channel in _PREFIXES.items():
        if lowered.startswith(prefix):
            rest = raw_path[len(prefix):]
            break
    else:
        return None
    path, _, query = rest.partition("?")
    head, _, tail = path.partition("/")
    if head.isascii() and head.isdigit():  # "²".isdigit() is True, int("²") fails
        role_id = int(head)
        if not ROLE_ID_BASE < role_id < 2 * ROLE_ID_BASE:
            return ClientPath(channel, None, head, rest)
        internal = tail + ("?" + query if query else "")
        # The endpoint is the first segment of the decoded path: "%2e%2e" and the like
        # must not slip past the filter as something else.
        first = unquote(tail.partition("/")[0])
        decoded = unquote(tail)
        malformed = "\\" in decoded or "\x00" in decoded or any(
            seg in (".", "..") for seg in decoded.split("/"))
        return ClientPath(channel, role_id, first, internal, malformed)
    return ClientPath(channel, None, unquote(head), rest)


_parse_cached = lru_cache(maxsize=2048)(_parse)
