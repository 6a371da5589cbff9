"""What every role of the mock site shares: configuration, bound ports, URLs, state."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from cmg.config import RoleConfig, SiteConfig
from cmg.site_tokens import TokenSigner, load_signer
from mock_site.logs import SiteLogs
from mock_site.policy import PolicyCatalog, make_policy, policy_id
from mock_site.registry import ClientRegistry
from mock_site.signing import SigningCertificates

if TYPE_CHECKING:
    from mock_site.entra import EntraTenant

SITE_VERSION = "5.00.9128.1000"  # ConfigMgr current branch 2403
SITE_BUILD = "9128"
CLIENT_IDENTITY_HEADERS = ("X-CMG-Client-Certificate-Thumbprint", "X-CMG-Client-Certificate-Subject")


class BodyTap:
    """Counts and hashes a request body as the server receives it.

    Installed in place of an aiohttp ``StreamReader``'s buffer (``_buffer``): every
    chunk the HTTP parser feeds passes through :meth:`append`, whatever the handler then
    reads, so the size and SHA-256 are those of the body as it arrived (after chunked
    decoding), even when the handler reads only part of it.
    """

    def __init__(self) -> None:
        self.size = 0
        self._sha = hashlib.sha256()
        self.complete = False
        self.stream: Any = None

    @property
    def at_eof(self) -> bool:
        """The whole body has arrived (or there was none)."""
        if self.complete or self.stream is None:
            return True
        return bool(self.stream.is_eof())

    def update(self, data: bytes) -> None:
        self.size += len(data)
        self._sha.update(data)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()


class _TapDeque(deque):  # type: ignore[type-arg]
    def __init__(self, items: Any, tap: BodyTap) -> None:
        super().__init__(items)
        self.tap = tap

    def append(self, data: Any) -> None:  # feed_data
        self.tap.update(data)
        super().append(data)


def tap_body(request: Any) -> BodyTap:
    """A :class:`BodyTap` on ``request``'s body (bytes already buffered included)."""
    tap = BodyTap()
    stream = request.content
    buffer = getattr(stream, "_buffer", None)
    if isinstance(buffer, deque) and not getattr(stream, "_buffer_offset", 0):
        for chunk in buffer:
            tap.update(chunk)
        try:
            stream._buffer = _TapDeque(buffer, tap)
            tap.stream = stream
        except AttributeError:  # not the StreamReader this was written against
            tap.complete = True
    else:
        tap.complete = True  # no body (EmptyStreamReader)
    return tap


class RequestLog:
    """The last requests the roles received (for ``/_mock/requests``).

    Each entry gets ``seq`` (1, 2, ...: a test can ask for what came after a point).
    An entry's ``body`` may be a :class:`BodyTap`: it is read out (``body_size``,
    ``body_sha256``, ``body_complete``) when the entries are asked for, so a body the
    server kept reading after the handler answered is counted whole.
    """

    def __init__(self, size: int = 2000) -> None:
        self._entries: deque[dict[str, Any]] = deque(maxlen=size)
        self._seq = 0

    def record(self, entry: dict[str, Any]) -> None:
        self._seq += 1
        entry.setdefault("seq", self._seq)
        self._entries.append(entry)

    @property
    def last_seq(self) -> int:
        return self._seq

    def entries(self, since: int = 0) -> list[dict[str, Any]]:
        out = []
        for e in self._entries:
            if e.get("seq", 0) <= since:
                continue
            tap = e.get("body")
            if isinstance(tap, BodyTap):
                e = {k: v for k, v in e.items() if k != "body"}
                e["body_size"], e["body_sha256"] = tap.size, tap.sha256
                e["body_complete"] = tap.at_eof
            out.append(e)
        return out


def client_identity(headers: Any) -> dict[str, str]:
    """Every ``X-CMG-Client-*`` header the gateway passed on (names as received)."""
    return {k: v for k, v in headers.items() if k.lower().startswith("x-cmg-client-")}


@dataclass
class SiteContext:
    config: SiteConfig
    ports: dict[str, int]
    logs: SiteLogs
    certs: SigningCertificates
    clients: ClientRegistry
    requests: RequestLog = field(default_factory=RequestLog)
    started: float = field(default_factory=time.time)
    entra: "EntraTenant | None" = None  # the mock Entra ID tenant (same process), when enabled
    # Stalled roles ("mp", "sup", "dp"): their requests wait until the event is set
    # (POST /_mock/stall; fault injection for tests).
    stalls: dict[str, asyncio.Event] = field(default_factory=dict)
    policies: PolicyCatalog = field(init=False)
    _signer: TokenSigner | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.policies = PolicyCatalog(self.config.site_code, self._site_wide_policies())

    # --- tokens ---

    def token_signer(self) -> TokenSigner:
        """The site's token-signing key; :class:`cmg.site_tokens.SigningKeyMissing` until
        ``certs/token-signing.pem`` / ``.key`` exist (read again on the next call)."""
        if self._signer is None:
            self._signer = load_signer(self.config)
        return self._signer

    @property
    def clock_skew(self) -> dt.timedelta:
        return dt.timedelta(seconds=self.config.client_auth.clock_skew)

    # --- roles and URLs ---

    @property
    def site_code(self) -> str:
        return self.config.site_code

    def roles_of(self, kind: str) -> list[RoleConfig]:
        return [r for r in self.config.roles if r.kind == kind]

    @property
    def mp_role(self) -> RoleConfig | None:
        mps = self.roles_of("MP")
        return mps[0] if mps else None

    @property
    def cmg_base(self) -> str:
        port = self.config.client_port
        return f"https://{self.config.service_name}" + ("" if port == 443 else f":{port}")

    def cmg_url(self, role_id: int) -> str:
        """A role's URL through the CMG (PKI client authentication)."""
        return f"{self.cmg_base}/CCM_Proxy_MutualAuth/{role_id}"

    def cmg_host(self, role_id: int) -> str:
        """The name a client sees for a role through the CMG (no scheme)."""
        return self.cmg_url(role_id).split("://", 1)[1]

    @property
    def internet_mp_url(self) -> str:
        mp = self.mp_role
        return self.cmg_url(mp.role_id) if mp else ""

    def intranet_url(self, role: RoleConfig) -> str:
        """The role's on-prem URL; a configured port 0 is replaced by the bound one."""
        parts = urlsplit(role.internal_url)
        if parts.port == 0:
            kind = {"MP": "mp", "SUP": "sup", "DP": "dp"}.get(role.kind)
            if kind in self.ports:
                host = parts.hostname or "127.0.0.1"
                return urlunsplit((parts.scheme, f"{host}:{self.ports[kind]}", parts.path, "", ""))
        return role.internal_url

    # --- site-wide policies, built from the configuration ---

    def _site_wide_policies(self) -> list:
        code = self.site_code
        sups = self.roles_of("SUP")
        return [
            make_policy(policy_id(code, "CloudClientConfig"), code, "ClientSettings", "CCM_CloudClientConfig", {
                "AllowCloudManagementGateway": True,
                "CloudManagementGatewayServiceName": self.config.service_name,
                "InternetManagementPoint": self.internet_mp_url,
                "ClientAlwaysOnInternet": True,
            }),
            make_policy(policy_id(code, "SoftwareUpdatesClientConfig"), code, "ClientSettings",
                        "CCM_SoftwareUpdatesClientConfig", {
                            "Enabled": True,
                            "WSUSLocation": self.cmg_url(sups[0].role_id) if sups else "",
                            "ScanScheduleMinutes": 10080,
                        }),
        ]
