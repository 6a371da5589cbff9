"""Which connection points serve which roles, and which one takes the next request.

The real CMG round-robins requests across the connection points of a site; so does
this one, per role, skipping tunnels that are draining or closed.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from tunnel import PublishedRole, TunnelSession


@dataclass(eq=False)
class ConnectorLink:
    """One connected tunnel from a connection point to this instance."""

    name: str
    site_code: str
    session: TunnelSession
    roles: dict[int, PublishedRole]
    peer: str
    connected_at: float = field(default_factory=time.time)
    active_requests: int = 0
    total_requests: int = 0
    failed_requests: int = 0
    request_bytes: int = 0
    response_bytes: int = 0
    # per role id: total_requests, failed_requests, request_bytes, response_bytes
    traffic: dict[int, dict[str, int]] = field(default_factory=dict)

    def account(self, role_id: int, ok: bool, request_bytes: int, response_bytes: int) -> None:
        """One finished request through this tunnel (the console's traffic per role)."""
        t = self.traffic.get(role_id)
        if t is None:
            t = self.traffic[role_id] = {"total_requests": 0, "failed_requests": 0,
                                         "request_bytes": 0, "response_bytes": 0}
        t["total_requests"] += 1
        self.total_requests += 1
        t["request_bytes"] += request_bytes
        t["response_bytes"] += response_bytes
        self.request_bytes += request_bytes
        self.response_bytes += response_bytes
        if not ok:
            t["failed_requests"] += 1
            self.failed_requests += 1

    @property
    def usable(self) -> bool:
        s = self.session
        return not (s.closed or s.peer_draining or s.local_draining)


class Routes:
    """The published endpoints of every connected connection point."""

    def __init__(self) -> None:
        self._links: list[ConnectorLink] = []
        self._turn: dict[int, itertools.count[int]] = {}
        # The links that publish each role (usable or not), in connection order; made
        # on demand, forgotten whenever a link comes or goes.
        self._serving: dict[int, tuple[ConnectorLink, ...]] = {}
        # Roles ever published since start: a role whose connection points are all
        # gone answers 503 (unavailable), not 404 (unknown).
        self._known: dict[int, PublishedRole] = {}
        # The endpoints of each known role, lower-cased once (looked up per request).
        self._known_paths: dict[int, frozenset[str]] = {}

    @property
    def links(self) -> tuple[ConnectorLink, ...]:
        return tuple(self._links)

    @property
    def ever_connected(self) -> bool:
        return bool(self._known)

    def add(self, link: ConnectorLink) -> None:
        self._links.append(link)
        self._serving.clear()
        self._known.update(link.roles)
        for role_id, role in link.roles.items():
            self._known_paths[role_id] = frozenset(p.lower() for p in role.paths)

    def remove(self, link: ConnectorLink) -> None:
        if link in self._links:
            self._links.remove(link)
            self._serving.clear()

    def published_roles(self) -> list[PublishedRole]:
        """The roles connected connection points publish now, once each."""
        seen: dict[int, PublishedRole] = {}
        for link in self._links:
            for role_id, role in link.roles.items():
                seen.setdefault(role_id, role)
        return [seen[k] for k in sorted(seen)]

    def is_known(self, role_id: int, resource: str) -> bool:
        """Whether some connection point has published this role and endpoint."""
        paths = self._known_paths.get(role_id)
        return paths is not None and resource.lower() in paths

    def candidates(self, role_id: int) -> list[ConnectorLink]:
        """Usable links serving the role, starting with the one whose turn it is."""
        serving = self._serving.get(role_id)
        if serving is None:
            serving = self._serving[role_id] = tuple(l for l in self._links if role_id in l.roles)
        if len(serving) <= 1:  # the usual case: one tunnel per instance and site
            return [link for link in serving if link.usable]
        counter = self._turn.setdefault(role_id, itertools.count())
        start = next(counter) % len(serving)
        return [link for link in serving[start:] + serving[:start] if link.usable]
