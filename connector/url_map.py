"""External CMG URLs to the site's internal URLs (pure).

``https://<service>/CCM_Proxy_MutualAuth/<role id>/SMS_MP/.sms_aut?MPLIST`` becomes
``<internal url of role>/SMS_MP/.sms_aut?MPLIST``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from cmg.config import RoleConfig
from cmg.paths import parse_client_path


class UnmappedURL(Exception):
    """The target names no role this connection point publishes."""


@dataclass(frozen=True, slots=True)
class MappedURL:
    role: RoleConfig
    external_prefix: str  # https://<service>/CCM_Proxy_MutualAuth/<role id>
    internal_prefix: str  # the role's internal URL
    url: str  # the internal URL to forward to
    endpoint: str  # the published endpoint (first path segment)


class UrlMap:
    def __init__(self, service_name: str, roles: tuple[RoleConfig, ...]) -> None:
        self._service = service_name
        self._roles = {r.role_id: r for r in roles}
        self._map_cached = lru_cache(maxsize=2048)(self._map)

    def map(self, target: str) -> MappedURL:
        """The internal URL for a client's request target. Raises UnmappedURL.

        The answer (immutable) is remembered for recent short targets: clients ask
        for the same few over and over.
        """
        if len(target) <= 512:
            return self._map_cached(target)
        return self._map(target)

    def _map(self, target: str) -> MappedURL:
        cp = parse_client_path(target)
        if cp is None or cp.role_id is None:
            raise UnmappedURL(f"{target[:200]!r} is not a CMG role path")
        if cp.malformed:
            raise UnmappedURL(f"{target[:200]!r} has dot segments or backslashes")
        role = self._roles.get(cp.role_id)
        if role is None:
            raise UnmappedURL(f"role {cp.role_id} is not published by this connection point")
        if not any(e.lower() == cp.resource.lower() for e in role.endpoints):
            raise UnmappedURL(f"endpoint '{cp.resource}' of role {cp.role_id} is not published")
        external = f"https://{self._service}/{cp.channel.value}/{cp.role_id}"
        return MappedURL(role, external, role.internal_url, f"{role.internal_url}/{cp.internal}",
                         cp.resource)
